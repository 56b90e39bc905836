"""Routing analysis (issue 16; BTX 4.3 and BAM publish the same per-domain view): where each held-out domain's
tokens go, and whether the routers learn from the language-model loss at all.

domain_routing   per domain and layer: the share of top-k assignments each FFN expert receives, and the mean
                 soft weight the attention router gives each attention expert (BAM's MoA router)
lm_grad_norms    the gradient norm of the language-model loss alone (NLL, no load-balance or z-loss) on the
                 FFN routers and on the attention routers: with the renormalised gate at top-1 the FFN
                 routers' is 0 (the chosen weight is the constant 1; docs/method.md)
at_eval          both, on a finetune.py mixture's held-out blocks: what scripts/finetune.py logs at eval time
"""

import torch

from . import metrics
from .trainer import autocast


def router_params(model):
    """-> {"ffn": [router weights], "attn": [router weights]} (empty lists for a dense model or BTX's attention)."""
    groups = {"ffn": [], "attn": []}
    for name, p in model.named_parameters():
        if name.endswith("mlp.router.weight"):
            groups["ffn"].append(p)
        elif name.endswith("attn.router.weight"):
            groups["attn"].append(p)
    return groups


def lm_grad_norms(model, x, amp=None):
    """x: [B, T] token ids. -> {"ffn": norm or None, "attn": norm or None}: the global gradient norm of the
    LM loss (NLL) over each group of router weights, in eval mode (no jitter, no dropout); .grad untouched."""
    groups = router_params(model)
    params = groups["ffn"] + groups["attn"]
    if not params:
        return {"ffn": None, "attn": None}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), autocast(x.device, amp):
            nll = model(input_ids=x, labels=x, use_cache=False)["nll"]
        grads = torch.autograd.grad(nll, params, allow_unused=True)
    finally:
        model.train(was_training)
    res, i = {}, 0
    for key in ("ffn", "attn"):
        gs = [g for g in grads[i : i + len(groups[key])] if g is not None]
        i += len(groups[key])
        if not groups[key]:
            res[key] = None
        else:  # no gradient at all (no path from the loss to these routers) counts as 0
            res[key] = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gs])).item() if gs else 0.0
    return res


@torch.no_grad()
def domain_routing(model, batches, amp=None):
    """batches: {domain: iterable of [B, T] token-id tensors}. -> {domain: {"tokens": n, "ffn_share": [L][E]
    (share of the top-k assignments per FFN expert) and/or "attn_weight": [L][E] (mean attention-router
    weight)}}, token-weighted over the batches; {} for a dense model."""
    was_training = model.training
    model.eval()
    res = {}
    try:
        for domain, xs in batches.items():
            sums, n = {}, 0
            for x in xs:
                with autocast(x.device, amp):
                    out = model(input_ids=x, use_cache=False, output_router_logits=True)
                tokens = x.numel()
                for key, value in metrics.router_stats(out).items():
                    sums[key] = sums.get(key, 0) + value.double() * tokens
                n += tokens
            if sums:
                entry = {"tokens": n}
                if "ffn_load" in sums:
                    entry["ffn_share"] = (sums["ffn_load"] / n).tolist()
                if "attn_weight" in sums:
                    entry["attn_weight"] = (sums["attn_weight"] / n).tolist()
                res[domain] = entry
    finally:
        model.train(was_training)
    return res


def at_eval(model, mixture, micro_batch, device, amp=None):
    """scripts/finetune.py's eval-time record: per-domain routing over every held-out block, and the routers'
    LM-gradient norms on the first micro-batch of each domain's held-out blocks together. {} for a dense model."""
    if not any(router_params(model).values()):
        return {}
    sets = list(mixture.eval_sets())
    batches = {
        name: [mixture.batch(refs[i : i + micro_batch], eval=True).to(device) for i in range(0, len(refs), micro_batch)]
        for name, refs in sets
    }
    first = torch.cat([mixture.batch(refs[:micro_batch], eval=True) for _, refs in sets]).to(device)
    return {"routing": domain_routing(model, batches, amp), "router_lm_grad_norm": lm_grad_norms(model, first, amp)}
