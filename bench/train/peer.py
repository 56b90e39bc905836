"""The peer of our BTX-mode rows in bench_train.py: transformers' own MoE causal LMs (MixtralForCausalLM,
Qwen3MoeForCausalLM) trained from the native folder our export holds (synthetic.write_native: the very
weights of the BAM folder our `btx` rows train), with each experts implementation transformers offers.

PeerModel puts such a model behind the interface bench_train's Trainer (scripts/bamtrain/trainer.py) uses
for ours, so both train with one recipe: the same step, autocast, optimiser, clipping and statistics. The
loss is transformers' own (cross-entropy plus router_aux_loss_coef x its load-balancing loss, as a user of
transformers trains it); `nll` is the cross-entropy alone, the figure to compare with our model's.
"""

import os
import sys
from types import SimpleNamespace

import torch

# transformers 5.17's experts implementations: "eager" (a Python loop over the experts) and the keys of
# transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS (test/python/test_bench_peer.py keeps the two equal),
# its default (grouped_mm) first after eager, so a run short of time drops the least likely ones. deepgemm
# and sonicmoe fetch kernels from the Hub (and deepgemm takes bf16 activations only): their rows record why
# they did not run.
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")
# family -> the native format its folder is written in, the transformers class, our row training the same weights
FAMILIES = {
    "mixtral": dict(fmt="mixtral", cls="MixtralForCausalLM", ours="btx"),
    "qwen3moe": dict(fmt="qwen3_moe", cls="Qwen3MoeForCausalLM", ours="btx-qwen3"),
}


def transformers_module():
    """transformers, imported here: bench_train.py hides it from modeling_bam (our pure-torch model needs none,
    and the import costs seconds), so the entry it left in sys.modules is dropped first."""
    if sys.modules.get("transformers", False) is None:
        del sys.modules["transformers"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machine: fail at once, not on a timeout
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def expert_load(router_logits, top_k, num_experts):
    """[L, E]: the fraction of the top-k assignments each expert got per layer (our model's `expert_load`),
    from transformers' router logits (one [tokens, E] per layer)."""
    counts = torch.zeros(len(router_logits), num_experts, device=router_logits[0].device)
    for layer, logits in enumerate(router_logits):
        chosen = logits.detach().topk(top_k, dim=-1).indices.reshape(-1)
        counts[layer].scatter_add_(0, chosen, torch.ones_like(chosen, dtype=counts.dtype))  # no host sync
    return counts / counts.sum(-1, keepdim=True)


class PeerModel(torch.nn.Module):
    """A transformers MoE causal LM answering as our model does: forward -> dict with loss, nll, lb_loss,
    z_loss (None: transformers has none), expert_load, logits; `config` with the fields Trainer reads."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        c = hf.config
        experts = getattr(c, "num_local_experts", None) or c.num_experts
        self.config = SimpleNamespace(
            num_hidden_layers=c.num_hidden_layers,
            num_experts=experts,
            num_experts_per_tok=c.num_experts_per_tok,
            attention_experts="merged",
        )

    def forward(self, input_ids, labels=None, use_cache=False, output_router_logits=True, skip_logits=False):
        """skip_logits is ignored: transformers' head makes its logits, as a user of transformers trains."""
        out = self.hf(
            input_ids=input_ids, labels=labels, use_cache=use_cache, output_router_logits=output_router_logits
        )
        lb = out.aux_loss
        nll = out.loss
        if out.loss is not None and lb is not None:  # transformers added coef x lb to the cross-entropy
            nll = out.loss - self.hf.config.router_aux_loss_coef * lb
        load = (
            expert_load(out.router_logits, self.config.num_experts_per_tok, self.config.num_experts)
            if output_router_logits
            else None
        )
        return dict(loss=out.loss, nll=nll, lb_loss=lb, z_loss=None, expert_load=load, logits=out.logits)


def load(path, family, impl, device):
    """The native folder `path` through transformers' own class of `family`, float32 weights (autocast casts,
    as for ours), SDPA attention, experts by `impl`. -> PeerModel on device"""
    transformers = transformers_module()
    cls = getattr(transformers, FAMILIES[family]["cls"])
    hf = cls.from_pretrained(path, dtype=torch.float32, experts_implementation=impl, attn_implementation="sdpa")
    return PeerModel(hf.to(device))


def blocks(model):
    """The decoder layers, compiled one by one as ours are (finetune.py --compile)."""
    return model.hf.model.layers
