"""BamConfig: the config.json of a BAM (Branch-Attend-Mix) model folder.

The architecture keys mirror `FeatureConfig` in src/arch/features.ts (same
snake_case names, same meanings; see src/arch/types.ts); change both together.
The MoE keys are described in docs/format.md. Without transformers installed,
BamConfig is a small attribute bag with the same defaults, so the pure-torch
core of modeling_bam.py can be built from a plain dict: BamConfig(**d).
"""

try:  # transformers is optional: check_imports skips imports inside try blocks
    from transformers import PreTrainedConfig as _Base
except ImportError:
    try:
        from transformers import PretrainedConfig as _Base
    except ImportError:

        class _Base:
            """Attribute bag standing in for transformers' PretrainedConfig."""

            def __init__(self, **kwargs):
                for k, v in kwargs.items():
                    setattr(self, k, v)

            def to_dict(self):
                return {"model_type": self.model_type, **self.__dict__}


ATTENTION_EXPERTS = ("moa", "shared-kv", "merged")
BLOCKS = ("parallel", "sequential")
NORM_TYPES = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
QK_NORMS = ("none", "shared", "per_head")
ROPE_STYLES = ("half", "interleaved")


class BamConfig(_Base):
    model_type = "bam"
    keys_to_ignore_at_inference = ["past_key_values"]
    # transformers 5 maps `rope_scaling` to `rope_parameters` with a property; BAM keeps the
    # seed's `rope_scaling` (and `rope_theta`) as plain keys, which the TypeScript side reads.
    rope_scaling = None

    def __init__(
        self,
        # --- architecture features (src/arch/features.ts FeatureConfig) ---
        seed_model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        norm_type="rms",  # "rms" | "layer"
        norm_eps=1e-6,
        norm_bias=False,  # LayerNorm with a bias (gpt2, gpt_neox, phi)
        norm_unit_offset=False,  # gemma: weight w applied as (1 + w)
        second_norm=True,  # post_attention_layernorm feeds the FFN
        seed_parallel_block=False,  # the seed's own block is parallel
        hidden_act="silu",  # "silu" | "gelu" | "gelu_tanh" | "relu"
        gated_mlp=True,  # down(act(gate x) * up x), else down(act(up x))
        qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        lm_head_bias=False,
        qk_norm="none",  # "none" | "shared" ([head_dim]) | "per_head" ([heads, head_dim])
        rotary_dim=None,  # rotated dims per head; 0 = no rotary; None = head_dim
        rope_theta=10000.0,
        rope_style="half",  # "half" (llama, neox) | "interleaved" (cohere, gpt-j)
        rope_scaling=None,  # {"type": "linear"|"dynamic"|"llama3"|"yarn"|"longrope", ...} or None
        learned_positions=False,  # gpt2: model.embed_positions
        embedding_scale=None,  # gemma: sqrt(hidden)
        logit_scale=None,  # cohere
        tie_word_embeddings=False,
        sliding_window=None,
        attention_scale=None,  # None = 1/sqrt(head_dim)
        # --- mixture of experts (docs/format.md; the method: docs/method.md) ---
        num_experts=4,
        num_experts_per_tok=1,
        norm_topk_prob=True,  # renormalise the top-k weights (Mixtral); false: softmax over all E (BAM, Switch)
        attention_experts="moa",  # "moa" | "shared-kv" | "merged"
        block="parallel",  # "parallel" | "sequential"
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        router_jitter=0.0,  # multiplicative router-input noise in training (Switch: 1e-2)
        expert_dropout=0.0,  # dropout inside FFN experts (Switch: 0.4 when fine-tuning)
        hidden_dropout=0.0,  # dropout on the attention and FFN outputs (Switch: 0.1)
        capacity_factor=None,  # None = dropless; else Switch capacity (overflow tokens dropped)
        upcycled_from=None,  # [{"name": ..., "sha256": ...}, ...]
        initializer_range=0.02,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.seed_model_type = seed_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.norm_bias = norm_bias
        self.norm_unit_offset = norm_unit_offset
        self.second_norm = second_norm
        self.seed_parallel_block = seed_parallel_block
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.qkv_bias = qkv_bias
        self.attn_out_bias = attn_out_bias
        self.mlp_bias = mlp_bias
        self.lm_head_bias = lm_head_bias
        self.qk_norm = qk_norm
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.rope_theta = rope_theta
        self.rope_style = rope_style
        self.rope_scaling = rope_scaling
        self.learned_positions = learned_positions
        self.embedding_scale = embedding_scale
        self.logit_scale = logit_scale
        self.tie_word_embeddings = tie_word_embeddings
        self.sliding_window = sliding_window
        self.attention_scale = attention_scale
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.attention_experts = attention_experts
        self.block = block
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_jitter = router_jitter
        self.expert_dropout = expert_dropout
        self.hidden_dropout = hidden_dropout
        self.capacity_factor = capacity_factor
        self.upcycled_from = list(upcycled_from or [])
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self._check()

    def _check(self):
        def one_of(key, options):
            if getattr(self, key) not in options:
                raise ValueError(f"BamConfig.{key} must be one of {options}, got {getattr(self, key)!r}")

        one_of("attention_experts", ATTENTION_EXPERTS)
        one_of("block", BLOCKS)
        one_of("norm_type", NORM_TYPES)
        one_of("hidden_act", ACTIVATIONS)
        one_of("qk_norm", QK_NORMS)
        one_of("rope_style", ROPE_STYLES)
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim, got {self.rotary_dim}")
        if self.rotary_dim and self.learned_positions:
            raise ValueError("a model has either rotary or learned positions, not both")
