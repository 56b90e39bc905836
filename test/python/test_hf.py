"""Tests of python/modeling_bam.py against transformers (skipped where transformers or CUDA is missing).

- parity: tiny random transformers seed models (llama, mistral, qwen3, gemma, gpt_neox, phi, cohere, gpt2)
  converted to the BAM dense layout give the same logits, and so does their 3-expert upcycling;
- rope inverse frequencies equal transformers' ROPE_INIT_FUNCTIONS; norms equal Llama/GemmaRMSNorm in bf16;
- save_pretrained writes the docs/format.md names, AutoModelForCausalLM.from_pretrained(trust_remote_code=True)
  loads them back, generate() with the KV cache equals greedy decoding without it;
- CUDA: the grouped_mm expert path equals the per-expert loop (forward and gradients), a bf16 training step.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.path.join(HERE, "..", "..", "python")
sys.path.insert(0, PY)
sys.path.insert(0, HERE)

try:
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError:
    transformers = None

if transformers is not None:
    from test_modeling import randomize, upcycle

    import modeling_bam as mb
    from configuration_bam import BamConfig

CUDA = torch.cuda.is_available()
FEATURE_KEYS = [  # FeatureConfig of src/arch/features.ts
    "seed_model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "norm_type",
    "norm_eps",
    "norm_bias",
    "norm_unit_offset",
    "second_norm",
    "seed_parallel_block",
    "hidden_act",
    "gated_mlp",
    "qkv_bias",
    "attn_out_bias",
    "mlp_bias",
    "lm_head_bias",
    "qk_norm",
    "rotary_dim",
    "rope_theta",
    "rope_style",
    "rope_scaling",
    "learned_positions",
    "embedding_scale",
    "logit_scale",
    "tie_word_embeddings",
    "sliding_window",
    "attention_scale",
]
SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def rotary_dim_of(model):
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            return buf.numel() * 2
    return 0


def split_rows(t, sizes):
    return list(torch.split(t, sizes, 0))


def seed_family(family):
    """A tiny random transformers model of `family`, its BAM features and its tensors in BAM dense names."""
    T = transformers
    L = lambda l: f"model.layers.{l}."
    if family in ("llama", "llama3", "mistral", "qwen3", "gemma", "cohere"):
        kw = dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False)
        feats = dict(norm_type="rms", hidden_act="silu")
        if family == "llama":
            hf = T.LlamaForCausalLM(T.LlamaConfig(**kw, rms_norm_eps=1e-5, attention_bias=True))
            feats.update(qkv_bias=True, attn_out_bias=True)
        elif family == "llama3":
            sc = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
            hf = T.LlamaForCausalLM(
                T.LlamaConfig(**kw, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **sc))
            )
            feats.update(rope_theta=500000.0, rope_scaling=dict(type="llama3", **sc))
        elif family == "mistral":
            hf = T.MistralForCausalLM(T.MistralConfig(**kw, rms_norm_eps=1e-5, sliding_window=4))
            feats.update(sliding_window=4)
        elif family == "qwen3":
            sc = dict(factor=4.0, original_max_position_embeddings=16)
            hf = T.Qwen3ForCausalLM(
                T.Qwen3Config(**kw, head_dim=8, rms_norm_eps=1e-5, rope_scaling=dict(rope_type="yarn", **sc))
            )
            feats.update(qk_norm="shared", rope_scaling=dict(type="yarn", **sc))
        elif family == "gemma":
            kw.update(num_key_value_heads=1, tie_word_embeddings=True)
            hf = T.GemmaForCausalLM(T.GemmaConfig(**kw, head_dim=16, rms_norm_eps=1e-5))
            feats.update(
                norm_unit_offset=True,
                hidden_act="gelu_tanh",
                embedding_scale=math.sqrt(32),
                head_dim=16,
                num_key_value_heads=1,
                tie_word_embeddings=True,
            )
        else:  # cohere
            kw.update(tie_word_embeddings=True)
            hf = T.CohereForCausalLM(T.CohereConfig(**kw, layer_norm_eps=1e-5, use_qk_norm=True, logit_scale=0.25))
            feats.update(
                norm_type="layer",
                rope_style="interleaved",
                qk_norm="per_head",
                second_norm=False,
                seed_parallel_block=True,
                tie_word_embeddings=True,
                logit_scale=0.25,
            )
        feats.setdefault("num_key_value_heads", 2)
        feats.setdefault("tie_word_embeddings", False)
        randomize(hf, 1)
        sd = {}
        for k, v in hf.state_dict().items():
            k = k.replace(".self_attn.", ".attn.")
            for p in ("gate", "up", "down"):
                k = k.replace(f".mlp.{p}_proj.", f".mlp.experts.0.{p}_proj.")
            sd[k] = v
    elif family == "gpt_neox":
        hf = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                **SMALL,
                rotary_pct=0.5,
                partial_rotary_factor=0.5,
                use_parallel_residual=True,
                layer_norm_eps=1e-5,
                hidden_act="gelu",
                tie_word_embeddings=False,
            )
        )
        randomize(hf, 1)
        s, sd = hf.state_dict(), {}
        sd["model.embed_tokens.weight"] = s["gpt_neox.embed_in.weight"]
        sd["lm_head.weight"] = s["lm_head.weight"] if "lm_head.weight" in s else s["embed_out.weight"]
        for t in ("weight", "bias"):
            sd[f"model.norm.{t}"] = s[f"gpt_neox.final_layer_norm.{t}"]
            for l in range(2):
                src = f"gpt_neox.layers.{l}."
                for n in ("input_layernorm", "post_attention_layernorm"):
                    sd[f"{L(l)}{n}.{t}"] = s[f"{src}{n}.{t}"]
                qkv = s[f"{src}attention.query_key_value.{t}"]
                qkv = qkv.view(4, 3, 8, *qkv.shape[1:])  # [heads, (q, k, v), head_dim, ...]
                for i, p in enumerate("qkv"):
                    sd[f"{L(l)}attn.{p}_proj.{t}"] = qkv[:, i].reshape(32, *qkv.shape[3:])
                sd[f"{L(l)}attn.o_proj.{t}"] = s[f"{src}attention.dense.{t}"]
                sd[f"{L(l)}mlp.experts.0.up_proj.{t}"] = s[f"{src}mlp.dense_h_to_4h.{t}"]
                sd[f"{L(l)}mlp.experts.0.down_proj.{t}"] = s[f"{src}mlp.dense_4h_to_h.{t}"]
        feats = dict(
            norm_type="layer",
            norm_bias=True,
            hidden_act="gelu",
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            seed_parallel_block=True,
            num_key_value_heads=4,
        )
    elif family == "phi":
        hf = T.PhiForCausalLM(
            T.PhiConfig(
                **SMALL,
                partial_rotary_factor=0.5,
                qk_layernorm=True,
                layer_norm_eps=1e-5,
                hidden_act="gelu_new",
                tie_word_embeddings=False,
            )
        )
        randomize(hf, 1)
        sd = {}
        for k, v in hf.state_dict().items():
            for a, b in (
                (".self_attn.dense.", ".attn.o_proj."),
                (".self_attn.q_layernorm.", ".attn.q_norm."),
                (".self_attn.k_layernorm.", ".attn.k_norm."),
                (".self_attn.", ".attn."),
                (".mlp.fc1.", ".mlp.experts.0.up_proj."),
                (".mlp.fc2.", ".mlp.experts.0.down_proj."),
                ("model.final_layernorm.", "model.norm."),
            ):
                k = k.replace(a, b)
            sd[k] = v
        feats = dict(
            norm_type="layer",
            norm_bias=True,
            hidden_act="gelu_tanh",
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            lm_head_bias=True,
            second_norm=False,
            seed_parallel_block=True,
            qk_norm="shared",
            num_key_value_heads=4,
        )
    elif family == "gpt2":
        hf = T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=61,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                n_inner=48,
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
            )
        )
        randomize(hf, 1)
        s, sd = hf.state_dict(), {}
        sd["model.embed_tokens.weight"] = s["transformer.wte.weight"]
        sd["model.embed_positions.weight"] = s["transformer.wpe.weight"]
        for t in ("weight", "bias"):
            sd[f"model.norm.{t}"] = s[f"transformer.ln_f.{t}"]
            for l in range(2):
                src = f"transformer.h.{l}."
                sd[f"{L(l)}input_layernorm.{t}"] = s[f"{src}ln_1.{t}"]
                sd[f"{L(l)}post_attention_layernorm.{t}"] = s[f"{src}ln_2.{t}"]
                conv = lambda n: s[f"{src}{n}.{t}"].t() if t == "weight" else s[f"{src}{n}.{t}"]  # Conv1D: [in, out]  # noqa: B023
                for p, part in zip("qkv", split_rows(conv("attn.c_attn"), [32, 32, 32])):
                    sd[f"{L(l)}attn.{p}_proj.{t}"] = part
                sd[f"{L(l)}attn.o_proj.{t}"] = conv("attn.c_proj")
                sd[f"{L(l)}mlp.experts.0.up_proj.{t}"] = conv("mlp.c_fc")
                sd[f"{L(l)}mlp.experts.0.down_proj.{t}"] = conv("mlp.c_proj")
        feats = dict(
            norm_type="layer",
            norm_bias=True,
            hidden_act="gelu_tanh",
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            learned_positions=True,
            tie_word_embeddings=True,
            num_key_value_heads=4,
        )
    else:
        raise KeyError(family)
    feats.setdefault("rotary_dim", rotary_dim_of(hf))
    rp = getattr(hf.config, "rope_parameters", None) or {}
    if "rope_theta" in rp or hasattr(hf.config, "rope_theta"):
        feats.setdefault("rope_theta", rp.get("rope_theta", getattr(hf.config, "rope_theta", None)))
    feats.setdefault("head_dim", 8)
    cfg = dict(
        SMALL,
        norm_eps=1e-5,
        seed_model_type=family.replace("llama3", "llama"),
        num_experts=1,
        attention_experts="merged",
        block="parallel" if feats.get("seed_parallel_block") else "sequential",
        **feats,
    )
    return hf.eval(), BamConfig(**cfg), sd


def load_dense(cfg, sd, cls=None):
    m = (cls or mb.BamForCausalLMCore)(cfg).eval()
    missing, unexpected = m.load_state_dict({k: v for k, v in sd.items() if k in m.state_dict()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing, missing
    return m


@unittest.skipIf(transformers is None, "transformers is not installed")
class TestSeedParity(unittest.TestCase):
    FAMILIES = ("llama", "llama3", "mistral", "qwen3", "gemma", "gpt_neox", "phi", "cohere", "gpt2")

    def test_dense_and_upcycled_match_transformers(self):
        x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
        for family in self.FAMILIES:
            with self.subTest(family=family):
                hf, cfg, sd = seed_family(family)
                with torch.no_grad():
                    ref = hf(x).logits
                    dense = load_dense(cfg, sd)
                    tol = 2e-5 * max(1.0, ref.abs().max().item())
                    torch.testing.assert_close(dense(x)["logits"], ref, atol=tol, rtol=0)
                    for attention in ("moa", "shared-kv", "merged"):
                        moe = upcycle([dense], attention, norm_topk_prob=True)  # top-2 of 3 keeps the seed renormalised
                        torch.testing.assert_close(moe(x)["logits"], ref, atol=tol, rtol=0, msg=f"{attention}")

    def test_rope_inv_freq_matches_transformers(self):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cases = [
            dict(rope_type="linear", factor=2.0),
            dict(rope_type="dynamic", factor=2.0),
            dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
            dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=16,
                beta_slow=2,
                mscale=1.0,
                mscale_all_dim=0.5,
            ),
            dict(rope_type="yarn", factor=4.0, attention_factor=1.3, original_max_position_embeddings=16),
            dict(
                rope_type="longrope",
                short_factor=[1.0, 1.5, 2.0, 2.5],
                long_factor=[3.0, 4.0, 5.0, 6.0],
                original_max_position_embeddings=16,
            ),
        ]
        for sc in cases:
            for seq_len in (None, 100):
                with self.subTest(sc=sc, seq_len=seq_len):
                    hc = transformers.LlamaConfig(
                        hidden_size=64,
                        num_attention_heads=8,
                        head_dim=8,
                        max_position_embeddings=64,
                        rope_theta=10000.0,
                        rope_scaling=dict(sc),
                    )
                    inv, att = ROPE_INIT_FUNCTIONS[sc["rope_type"]](hc, torch.device("cpu"), seq_len)
                    bc = BamConfig(
                        **dict(
                            SMALL,
                            hidden_size=64,
                            num_attention_heads=8,
                            head_dim=8,
                            rotary_dim=8,
                            rope_scaling={("type" if k == "rope_type" else k): v for k, v in sc.items()},
                        )
                    )
                    mine, att2 = mb.rope_inv_freq(bc, seq_len or 0, torch.device("cpu"))
                    torch.testing.assert_close(mine, inv.float(), atol=0, rtol=1e-6)
                    self.assertAlmostEqual(float(att), float(att2), places=6)

    def test_norms_match_transformers_in_bf16(self):
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        x = (torch.randn(4, 7, 32) * 3).bfloat16()
        for ref_cls, offset in ((LlamaRMSNorm, False), (GemmaRMSNorm, True)):
            ref = ref_cls(32, eps=1e-5)
            with torch.no_grad():
                ref.weight.copy_(torch.randn(32) * 0.5 + (0 if offset else 1))
            ref = ref.bfloat16()
            mine = mb.Norm(32, BamConfig(**dict(SMALL, norm_eps=1e-5, norm_unit_offset=offset))).bfloat16()
            mine.load_state_dict(ref.state_dict())
            self.assertTrue(torch.equal(mine(x), ref(x)), ref_cls.__name__)


def tiny_bam(attention="moa", E=3, k=2, **over):
    d = dict(
        SMALL,
        num_key_value_heads=2,
        head_dim=8,
        norm_eps=1e-5,
        num_experts=E,
        num_experts_per_tok=k,
        attention_experts=attention,
        block="parallel",
        qk_norm="shared",
        qkv_bias=True,
        upcycled_from=[{"name": "seed", "sha256": "0" * 64}],
    )
    d.update(over)
    return BamConfig(**d)


def save_folder(model, folder):
    model.config.auto_map = {
        "AutoConfig": "configuration_bam.BamConfig",
        "AutoModelForCausalLM": "modeling_bam.BamForCausalLM",
    }
    model.config.architectures = ["BamForCausalLM"]
    model.save_pretrained(folder)
    for f in ("configuration_bam.py", "modeling_bam.py"):
        shutil.copy(os.path.join(PY, f), folder)


def saved_names(folder):
    from safetensors import safe_open

    names = set()
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                names |= set(st.keys())
    return names


@unittest.skipIf(transformers is None, "transformers is not installed")
class TestTransformersModel(unittest.TestCase):
    def test_save_load_roundtrip(self):
        x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
        for attention, tied in (("moa", False), ("shared-kv", True), ("merged", False)):
            with self.subTest(attention=attention, tied=tied), tempfile.TemporaryDirectory() as d:
                model = mb.BamForCausalLM(
                    tiny_bam(attention, tie_word_embeddings=tied, rope_scaling={"type": "linear", "factor": 2.0})
                ).eval()
                randomize(model, 2)
                ref = model(x).logits
                save_folder(model, d)
                want = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
                self.assertEqual(saved_names(d), want)
                self.assertEqual(
                    want,
                    set(mb.BamForCausalLMCore(model.config).state_dict()) - ({"lm_head.weight"} if tied else set()),
                )
                cfg = json.load(open(os.path.join(d, "config.json")))
                for key in FEATURE_KEYS:
                    self.assertIn(key, cfg)
                self.assertEqual(cfg["model_type"], "bam")
                self.assertEqual(cfg["rope_scaling"], {"type": "linear", "factor": 2.0})
                self.assertEqual(cfg["attention_experts"], attention)
                loaded, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
                self.assertEqual(type(loaded).__name__, "BamForCausalLM")
                self.assertFalse(info["missing_keys"], info)
                self.assertFalse(info["unexpected_keys"], info)
                torch.testing.assert_close(loaded.eval()(x).logits, ref)
                self.assertEqual(loaded.config.rope_scaling, {"type": "linear", "factor": 2.0})
                with tempfile.TemporaryDirectory() as d2:  # a loaded model saves the same names again
                    loaded.save_pretrained(d2)
                    self.assertEqual(saved_names(d2), want)

    def test_generate_matches_greedy_without_cache(self):
        for attention, over in (("moa", {}), ("shared-kv", {}), ("merged", {}), ("moa", dict(sliding_window=4))):
            with self.subTest(attention=attention, **over):
                model = mb.BamForCausalLM(tiny_bam(attention, **over)).eval()
                randomize(model, 3)
                prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(4))
                out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
                seq = prompt
                for _ in range(8):
                    nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                    seq = torch.cat([seq, nxt], 1)
                self.assertTrue(torch.equal(out, seq), (out, seq))

    def test_batched_left_padded_generate(self):
        model = mb.BamForCausalLM(tiny_bam("moa")).eval()
        randomize(model, 5)
        a = torch.randint(1, 61, (1, 6), generator=torch.Generator().manual_seed(6))
        b = torch.randint(1, 61, (1, 3), generator=torch.Generator().manual_seed(7))
        ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
        mask = (torch.arange(6)[None] >= torch.tensor([[0], [3]])).long()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        single = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
        self.assertTrue(torch.equal(out[1, 3:], single[0]))

    def test_outputs_and_checkpointing(self):
        model = mb.BamForCausalLM(tiny_bam("moa")).train()
        randomize(model, 8)
        x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(9))
        out = model(x, labels=x, output_router_logits=True)
        for key in ("loss", "logits", "aux_loss", "router_logits", "attn_router_logits", "expert_load", "lb_loss"):
            self.assertIsNotNone(getattr(out, key), key)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.gradient_checkpointing_enable()
        out2 = model(x, labels=x)
        out2.loss.backward()
        torch.testing.assert_close(out2.loss, out.loss)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], msg=n)
        model.zero_grad()
        fused = model(x, labels=x, skip_logits=True)  # the fused loss through transformers' forward
        self.assertIsNone(fused.logits)
        fused.loss.backward()
        torch.testing.assert_close(fused.loss, out.loss)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], msg=n)


@unittest.skipUnless(
    CUDA and transformers is not None and hasattr(torch.nn.functional, "grouped_mm"),
    "needs CUDA and torch.nn.functional.grouped_mm",
)
class TestGroupedMM(unittest.TestCase):
    def test_grouped_equals_loop_with_gradients(self):
        for over in (dict(), dict(gated_mlp=False, mlp_bias=True, hidden_act="gelu")):
            c = BamConfig(
                **dict(SMALL, hidden_size=256, intermediate_size=512, num_experts=4, num_experts_per_tok=2, **over)
            )
            layer32 = mb.MoE(c).cuda()
            torch.manual_seed(0)
            for p in layer32.parameters():
                torch.nn.init.normal_(p, std=0.05)
            layer = mb.MoE(c).cuda()
            layer.load_state_dict(layer32.state_dict())
            layer = layer.bfloat16()
            x32 = torch.randn(3, 333, 256, device="cuda")
            res = {}
            for name, m, mode in (("ref", layer32, False), ("loop", layer, False), ("grouped", layer, True)):
                m.grouped_mm = mode
                m.zero_grad()
                x = x32.clone().to(next(m.parameters()).dtype).requires_grad_()
                y = m(x)[0]
                (y.float() * torch.linspace(-1, 1, 256, device="cuda")).sum().backward()
                res[name] = [y.float(), x.grad.float()] + [p.grad.float() for p in m.parameters()]
            rel = lambda a, b: ((a - b).norm() / b.norm().clamp(min=1e-6)).item()
            names = ["y", "x.grad"] + [n for n, _ in layer.named_parameters()]
            for i, n in enumerate(names):  # grouped bf16 is as close to the float32 reference as the bf16 loop
                err_g, err_l = rel(res["grouped"][i], res["ref"][i]), rel(res["loop"][i], res["ref"][i])
                self.assertLess(err_g, 2 * err_l + 5e-3, (n, err_g, err_l))

    def test_bf16_training_step(self):
        c = tiny_bam(
            "moa",
            E=4,
            k=1,
            hidden_size=256,
            intermediate_size=512,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            vocab_size=1000,
            router_jitter=0.01,
            expert_dropout=0.1,
            hidden_dropout=0.1,
        )
        model = mb.BamForCausalLM(c).cuda().bfloat16().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 1000, (4, 256), device="cuda")
        calls = []
        orig = mb.MoE.grouped_experts
        mb.MoE.grouped_experts = lambda self, *a: calls.append(1) or orig(self, *a)
        try:
            losses = []
            for _ in range(3):
                out = model(x, labels=x)
                out.loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(out.loss.item())
        finally:
            mb.MoE.grouped_experts = orig
        self.assertTrue(all(math.isfinite(v) for v in losses), losses)
        self.assertLess(losses[-1], losses[0])
        self.assertEqual(len(calls), 3 * c.num_hidden_layers)  # the grouped_mm path ran


if __name__ == "__main__":
    unittest.main()
