"""The benchmark's baseline: the same BAM model with its experts run one at a time in a Python loop, as
transformers' eager MoE code does (the attention experts each with their own projections and attention
call; the FFN experts by torch.where and index_add_). Same parameters, same function and gradient (a test
in test/python/test_bench_loop.py); it lives here because nothing but bench_train.py uses it.

    with loop_experts():        # inside: every modeling_bam model in this process runs the loop version
        ...
"""

import contextlib

import torch
import torch.nn.functional as F

import modeling_bam as mb


def _moe_loop(self, x, w, idx):
    """MoE.run_experts, one expert at a time: x [N, H], w, idx [N, k] -> [N, H]."""
    out = torch.zeros_like(x)
    hit = F.one_hot(idx, len(self.experts)).permute(2, 1, 0)  # [E, k, N]
    for e, expert in enumerate(self.experts):
        slot, tok = torch.where(hit[e])
        y = expert(x[tok]) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _attention_loop(self, h, rope, mask_fn):
    """sum_e g_e MHA_e(h), one attention expert at a time (training only: no KV cache)."""
    c, (B, T, _) = self.c, h.shape
    D, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads

    def heads(t, n):
        return t.view(B, T, n, D)

    logits = self.router(h)  # [B, T, E]
    g = logits.softmax(-1)
    mask, causal = mask_fn(T)
    kv = None
    if self.mode == "shared-kv":
        kv = heads(self.k_proj(h), nkv), heads(self.v_proj(h), nkv)
    out = 0
    for e, m in enumerate(self.experts):
        q = heads(m.q_proj(h), nh)
        k, v = kv if kv is not None else (heads(m.k_proj(h), nkv), heads(m.v_proj(h), nkv))
        if c.qk_norm != "none":
            q, k = m.q_norm(q), (self.k_norm if kv is not None else m.k_norm)(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = mb.apply_rope(q, *rope, c.rope_style), mb.apply_rope(k, *rope, c.rope_style)
        y = mb.attend(q, k, v, mask, causal, self.scale).transpose(1, 2).reshape(B, T, nh * D)
        out = out + g[..., e : e + 1] * m.o_proj(y)
    return out.to(h.dtype), logits


@contextlib.contextmanager
def loop_experts():
    """Swaps modeling_bam's fused expert code for the loops above while the block runs."""
    fused_moe, fused_attention = mb.MoE.run_experts, mb.Attention.forward

    def attention(self, h, rope, mask_fn, cache):
        if self.router is None or cache is not None:
            return fused_attention(self, h, rope, mask_fn, cache)
        return _attention_loop(self, h, rope, mask_fn)

    mb.MoE.run_experts, mb.Attention.forward = _moe_loop, attention
    try:
        yield
    finally:
        mb.MoE.run_experts, mb.Attention.forward = fused_moe, fused_attention
