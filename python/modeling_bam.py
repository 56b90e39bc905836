"""BAM (Branch-Attend-Mix) mixture-of-experts language model, in one file.

One implementation for every seed family, driven only by the config's features
(configuration_bam.py). Per layer (docs/method.md):
  attention: soft Mixture of Attention, Attn(h) = sum_e g_e MHA_e(h), g = softmax(W_ar h) over all E
             ("moa"); per-expert q/o with one shared k/v ("shared-kv"); or one plain attention ("merged")
  FFN:       top-k of softmax router probabilities; each chosen expert weighted by its probability over
             all E (BAM 3.3, Switch; norm_topk_prob false) or by the chosen probabilities renormalised
             to sum to 1 (Mixtral; norm_topk_prob true: at k = 1 the weight is the constant 1, so the
             router learns from the auxiliary losses alone). docs/method.md says why both exist.
  block:     parallel   y = x + MoA(Na x) + MoE(Nf x)
             sequential h = x + MoA(Na x); y = h + MoE(Nf h)
Loss = NLL + router_aux_loss_coef * load-balance (Switch) + router_z_loss_coef * z-loss (ST-MoE),
both summed over layers. Router math runs in float32, autocast off.

Layout: a pure-torch core (Norm, rope, Router, Attention, Expert, MoE, Block, BamModelCore,
BamForCausalLMCore; tests build it on CPU without transformers), then thin transformers
wrappers (BamPreTrainedModel, BamModel, BamForCausalLM) defined only when transformers imports.

Tensor names are those of docs/format.md: every expert is its own nn.Module
(`attn.experts.{e}.q_proj`, `mlp.experts.{e}.gate_proj`, ...), so state_dict, save_pretrained
and from_pretrained need no name mapping. The experts' weights are stacked on the fly
(torch.cat / torch.stack, differentiable) into one matmul for attention and one grouped GEMM
(torch.nn.functional.grouped_mm, CUDA bf16) for the FFN.

Needs torch >= 2.5 (scaled_dot_product_attention with enable_gqa); grouped_mm where torch has it (2.9+).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .configuration_bam import BamConfig
except ImportError:  # imported as a top-level module (tests, scripts)
    from configuration_bam import BamConfig

try:  # CUDA builds of torch ship Triton: the rope, RMSNorm, gate, SwiGLU and cross-entropy kernels
    import triton
    import triton.language as tl
except ImportError:  # CPU builds: all of them run as torch ops
    triton = None

# The Triton kernels (rope, RMSNorm, the attention experts' gate weighting, the experts' SwiGLU, the loss's
# cross-entropy) run eager on CUDA where Triton imports and they apply; False: the torch ops
# (finetune.py --no-fused-kernels; bench_train's *-torch-* rows)
FUSED = {"rope": True, "norm": True, "gate": True, "swiglu": True, "loss": True}


def _compiling():
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def kernel_takes(name, x):
    """Whether Triton kernel `name` of FUSED may run on x: switched on, Triton importable, x on CUDA, not
    float64 (the torch ops keep float64 exact), not empty (a grid of no programs is no launch), not inside
    torch.compile (inductor fuses the torch ops itself). Each kernel adds its own layout conditions."""
    return (
        FUSED[name]
        and triton is not None
        and x.is_cuda
        and x.dtype != torch.float64
        and x.numel() > 0
        and not _compiling()
    )


_HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.9
GROUP_ALIGN = 16  # rows per grouped_mm group are padded to a multiple of this


def gelu_tanh(x):  # gelu_new, gelu_pytorch_tanh
    return F.gelu(x, approximate="tanh")


ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}  # gelu: exact (erf)


def hi(x):
    """x in float32, or float64 when it already is (so float64 tests are exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def autocast_dtype(device_type):
    """The autocast dtype when autocast is on for this device type, else None."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: no device_type argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def cat_weights(ws, dim=0, dtype=None):
    """torch.cat of the experts' weights for one matmul. Each is cast first (to `dtype`, or the autocast
    dtype when autocast is on), so the copy is made once, in the low precision, instead of a float32
    copy then a cast; the values are those autocast would give. One weight is returned as it is."""
    dtype = dtype or autocast_dtype(ws[0].device.type)
    if dtype is not None and ws[0].is_floating_point():
        ws = [w.to(dtype) for w in ws]
    return ws[0] if len(ws) == 1 else torch.cat(ws, dim)


def as_config(config):
    return BamConfig(**config) if isinstance(config, dict) else config


# ----------------------------------------------------------------------------- norms


def norm_fn(x, weight, bias, kind, eps, unit_offset):
    """RMSNorm / LayerNorm over the last dim, statistics in float32 (weight broadcasts against x)."""
    dtype = x.dtype
    x = hi(x)
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:  # gemma: (x * (1 + w)) in float32, then cast
        return (x * (1.0 + hi(weight))).to(dtype)
    if kind == "rms":  # llama: cast, then scale
        return weight * x.to(dtype)
    x = x * hi(weight)  # LayerNorm (cohere's order): scale and shift in float32, then cast
    if bias is not None:
        x = x + hi(bias)
    return x.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        x, w, out, rstd, R, D, eps,
        OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_R rows of x [R, D]: statistics, scale and casts as norm_fn, in one read and one write."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (r < R) & (d < D)
        xv = tl.load(x + r * D + d, mask=m, other=0.0).to(tl.float32)
        rs = tl.math.rsqrt(tl.sum(xv * xv, axis=1) / D + eps)  # [BLOCK_R]
        n = xv * rs[:, None]
        wv = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)
        if OFFSET:  # gemma: (x * (1 + w)) in float32, then cast
            y = n * (1.0 + wv)
        else:  # llama: cast to x's dtype, then scale (in the promoted dtype: out's)
            y = n.to(x.dtype.element_ty).to(tl.float32) * wv
        tl.store(out + r * D + d, y.to(out.dtype.element_ty), mask=m)
        tl.store(rstd + r, rs[:, None], mask=r < R)

    @triton.jit
    def _rms_norm_bwd_kernel(
        x, w, dy, rstd, dx, dw_part, R, D,
        OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr,
    ):  # fmt: skip
        """BLOCKS blocks of BLOCK_R rows: dx = rstd (g - x_hat mean(g x_hat)), g = dy * w (or dy * (1 + w));
        the weight's gradient summed over those rows into dw_part[program]."""
        pid = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        wv = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for i in range(BLOCKS):
            r = (pid * BLOCKS + i) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
            m = (r < R) & (d < D)
            xv = tl.load(x + r * D + d, mask=m, other=0.0).to(tl.float32)
            gy = tl.load(dy + r * D + d, mask=m, other=0.0).to(tl.float32)
            rs = tl.load(rstd + r, mask=r < R, other=0.0)  # [BLOCK_R, 1]
            xh = xv * rs
            if OFFSET:
                g = gy * (1.0 + wv)
                acc += gy * xh
            else:
                g = gy * wv
                acc += gy * xh.to(x.dtype.element_ty).to(tl.float32)
            c = tl.sum(g * xh, axis=1)[:, None] / D
            tl.store(dx + r * D + d, (rs * (g - xh * c)).to(dx.dtype.element_ty), mask=m)
        tl.store(dw_part + pid * D + d, tl.sum(acc, axis=0)[None, :], mask=d < D)


def _row_blocks(D):
    """(BLOCK_D, BLOCK_R) of the row kernels (RMSNorm, the gate weighting): a power-of-two row width and about
    4K elements per block of rows (8 warps: 16 to 32 float32 values per thread for each of the norm backward's
    five arrays, well within the registers)."""
    block_d = triton.next_power_of_2(D)
    return block_d, max(1, 4096 // block_d)


def _rms_norm_triton_fwd(x, w, eps, unit_offset):
    """norm_fn's RMSNorm of contiguous x [..., D] by w [D] in one kernel. -> (out, rstd [rows] float32)"""
    D = x.shape[-1]
    R = x.numel() // D
    dtype = x.dtype if unit_offset else torch.promote_types(w.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    block_d, block_r = _row_blocks(D)
    _rms_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, w, out, rstd, R, D, eps, OFFSET=unit_offset, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8
    )
    return out, rstd


def _rms_norm_triton_bwd(x, w, rstd, dy, unit_offset):
    """Gradients of _rms_norm_triton_fwd. -> (dx in x's dtype, dw in w's dtype)"""
    D = x.shape[-1]
    R = x.numel() // D
    block_d, block_r = _row_blocks(D)
    blocks = 8  # blocks of rows per program: fewer partial weight gradients to sum
    programs = triton.cdiv(R, block_r * blocks)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        x, w, dy.contiguous(), rstd, dx, dw_part, R, D,
        OFFSET=unit_offset, BLOCK_R=block_r, BLOCK_D=block_d, BLOCKS=blocks, num_warps=8,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(w.dtype)


class _RmsNormFn(torch.autograd.Function):
    """RMSNorm whose forward and backward are one kernel each; saves x and one float per row."""

    @staticmethod
    def forward(ctx, x, w, eps, unit_offset):
        out, rstd = _rms_norm_triton_fwd(x, w, eps, unit_offset)
        ctx.save_for_backward(x, w, rstd)
        ctx.unit_offset = unit_offset
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_triton_bwd(x, w, rstd, dy, ctx.unit_offset)
        return dx, dw, None, None


MAX_ROW_KERNEL_DIM = 8192  # the row kernels (RMSNorm, gate): a row is one block of registers (_row_blocks)


class Norm(nn.Module):
    """The model's norm; weight [*shape] ([H] for hidden states, [D] or [heads, D] for qk-norm)."""

    def __init__(self, shape, c):
        super().__init__()
        self.kind, self.eps, self.unit_offset = c.norm_type, c.norm_eps, c.norm_unit_offset
        self.weight = nn.Parameter(torch.zeros(shape) if self.unit_offset else torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if c.norm_type == "layer" and c.norm_bias else None

    def forward(self, x):
        if self.fused(x):
            return _RmsNormFn.apply(x, self.weight, self.eps, self.unit_offset)
        return norm_fn(x, self.weight, self.bias, self.kind, self.eps, self.unit_offset)

    def fused(self, x):
        w = self.weight
        fits = self.kind == "rms" and w.dim() == 1 and x.shape[-1] == w.shape[0] <= MAX_ROW_KERNEL_DIM
        return kernel_takes("norm", x) and fits and w.dtype != torch.float64 and x.is_contiguous()


def stacked_norm(x, norms):
    """x [B, T, E, heads, D]; norms: E qk-norms with weight [D] or [heads, D]: one call for all experts."""
    w = torch.stack([n.weight for n in norms])  # [E, D] or [E, heads, D]
    b = torch.stack([n.bias for n in norms]) if norms[0].bias is not None else None
    if w.dim() == 2:
        w, b = w[:, None], (b[:, None] if b is not None else None)  # [E, 1, D]
    n = norms[0]
    return norm_fn(x, w, b, n.kind, n.eps, n.unit_offset)


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(c, seq_len, device):
    """Inverse frequencies [rotary_dim/2] and the cos/sin scale, as transformers' modeling_rope_utils."""
    dim, base = c.rotary_dim, c.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv = 1.0 / (base**exps)
    sc = c.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    max_pos = c.max_position_embeddings
    orig = sc.get("original_max_position_embeddings") or getattr(c, "original_max_position_embeddings", None) or max_pos
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / sc["factor"], 1.0
    if kind == "dynamic":  # NTK: base grows once the sequence outgrows max_position_embeddings
        f, seq = sc["factor"], max(seq_len, max_pos)
        base = base * ((f * seq / max_pos) - (f - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exps), 1.0
    if kind == "llama3":
        f, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > orig / lo, inv / f, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < orig / hi) * ~(wavelen > orig / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        f = sc.get("factor") or max_pos / orig
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        attn = sc.get("attention_factor")
        if attn is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn = float(mscale(f, m) / mscale(f, m_all)) if m and m_all else mscale(f)
        fast, slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1
        corr = lambda rot: (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
        lo, hi = corr(fast), corr(slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
        extra = 1 - ramp  # 1 where frequencies are kept (extrapolated), 0 where divided by f
        return (inv / f) * (1 - extra) + inv * extra, attn
    if kind == "longrope":
        f = sc.get("factor") or max_pos / orig
        attn = sc.get("attention_factor")
        if attn is None:
            attn = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig))
        ext = sc["long_factor"] if seq_len > orig else sc["short_factor"]
        return inv / torch.tensor(ext, dtype=torch.float32, device=device), attn
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def rope_cos_sin(c, position_ids):
    """position_ids [B, T] -> cos, sin [B, 1, T, rotary_dim] in float32 (None without rotary)."""
    if not c.rotary_dim:
        return None
    kind = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type"))
    seq_len = int(position_ids.max()) + 1 if kind in ("dynamic", "longrope") else 0  # host sync only there
    with torch.autocast(position_ids.device.type, enabled=False):
        inv, scale = rope_inv_freq(c, seq_len, position_ids.device)
        freqs = position_ids[..., None].float() * inv  # [B, T, rotary_dim/2]
        emb = torch.cat((freqs, freqs), -1) if c.rope_style == "half" else freqs.repeat_interleave(2, -1)
        return (emb.cos() * scale)[:, None], (emb.sin() * scale)[:, None]


def rope_layout(x):
    """An empty tensor like x, dense, in x's dim order. For the attention's q and k ([B, heads, T, D] views
    of the projections' [B, T, heads, D]) that keeps the projections' layout: SDPA (cuDNN) then writes its
    output in it too, so the heads merge back into [B, T, heads * D] as a view, and in backward the
    gradients flow back to the projections through views, where a [B, heads, T, D] tensor is copied."""
    return torch.empty_like(x)  # preserve_format: x's strides, or dense strides in x's dim order


def _rope(x, cos, sin, style):
    """The rotation, without autograd: rotated dims x*cos + rotate(x)*sin computed in float32 (float64 for
    float64 x) and written in x's dtype; dims past rotary_dim pass through. Two fused multiply-adds per
    half instead of an upcast copy, a rotated copy, two products and a sum: rope runs on every query and
    key head of every attention expert, so its memory traffic matters. The output is dense in x's dim
    order (rope_layout)."""
    r = cos.shape[-1]
    out = rope_layout(x)
    if style == "half":  # rotate_half of llama / neox: (a, b) -> (a cos - b sin, b cos + a sin)
        h = r // 2
        a, b, oa, ob = x[..., :h], x[..., h:r], out[..., :h], out[..., h:r]
        cos, sin = cos[..., :h], sin[..., :h]  # both halves of cos/sin are equal
    else:  # interleaved pairs (x0, x1), (x2, x3), ... of cohere / gpt-j
        a, b, oa, ob = x[..., 0:r:2], x[..., 1:r:2], out[..., 0:r:2], out[..., 1:r:2]
        cos, sin = cos[..., 0::2], sin[..., 0::2]
    torch.addcmul(a * cos, b, sin, value=-1, out=oa)  # float32 math rounded once into x's dtype
    torch.addcmul(b * cos, a, sin, out=ob)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


if triton is not None:

    @triton.jit
    def _rope_kernel(
        x, out, cos, sin, T, sx_b, sx_h, sx_t, so_b, so_h, so_t, sc_b, sc_t, sign,
        HEADS: tl.constexpr, HALF: tl.constexpr, PAIRS: tl.constexpr, PASS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    ):  # fmt: skip
        """One (batch, block of positions): cos/sin read once, then every head rotated in one pass."""
        b, t = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        m = (t < T) & (d < HALF)
        ia = 2 * d if PAIRS else d  # the rotated pair (a, b): (x[2d], x[2d+1]) or (x[d], x[d + HALF])
        ib = ia + 1 if PAIRS else d + HALF
        c = tl.load(cos + b * sc_b + t * sc_t + ia, mask=m)
        s = tl.load(sin + b * sc_b + t * sc_t + ia, mask=m) * sign
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        pm = (t < T) & (p < 2 * HALF + PASS)
        xh, oh = x + b * sx_b + t * sx_t, out + b * so_b + t * so_t  # 64-bit offsets: large tensors
        for _ in range(HEADS):
            xa, xb = tl.load(xh + ia, mask=m).to(tl.float32), tl.load(xh + ib, mask=m).to(tl.float32)
            tl.store(oh + ia, (xa * c - xb * s).to(out.dtype.element_ty), mask=m)
            tl.store(oh + ib, (xb * c + xa * s).to(out.dtype.element_ty), mask=m)
            if PASS > 0:  # dims past rotary_dim
                tl.store(oh + p, tl.load(xh + p, mask=pm), mask=pm)
            xh, oh = xh + sx_h, oh + so_h


def _rope_triton(x, cos, sin, style, sign):
    """_rope in one Triton kernel (sign -1: the inverse rotation): each element read and written once,
    where the torch ops take several passes over float32 temporaries. x [B, heads, T, D], last dim dense;
    the output as _rope's (rope_layout)."""
    B, heads, T, D = x.shape
    r = cos.shape[-1]
    cos, sin = cos.expand(B, 1, T, r), sin.expand(B, 1, T, r)  # a batch of one broadcasts (stride 0)
    out = rope_layout(x)
    block_t = 16
    _rope_kernel[(B, triton.cdiv(T, block_t))](
        x, out, cos, sin, T, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), cos.stride(0), cos.stride(2), float(sign),
        HEADS=heads, HALF=r // 2, PAIRS=style != "half", PASS=D - r,
        BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(r // 2), BLOCK_PASS=triton.next_power_of_2(max(D - r, 1)),
    )  # fmt: skip
    return out


def _rope_any(x, cos, sin, style, sign):
    layout = x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.dtype == torch.float32
    if kernel_takes("rope", x) and layout:
        return _rope_triton(x, cos, sin, style, sign)
    return _rope(x, cos, -sin if sign < 0 else sin, style)


class _RopeFn(torch.autograd.Function):
    """Rope is a rotation per position: its backward is the inverse rotation of the gradient (sin negated),
    so nothing but cos/sin is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin, style):
        ctx.save_for_backward(cos, sin)
        ctx.style = style
        return _rope_any(x, cos, sin, style, 1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rope_any(grad, cos, sin, ctx.style, -1), None, None, None


def apply_rope(x, cos, sin, style):
    """x [B, heads, T, D]: rotate the first rotary_dim dims (in float32), pass the rest."""
    if not _compiling():
        return _RopeFn.apply(x, cos, sin, style)
    r = cos.shape[-1]  # under torch.compile: the plain formula, which inductor fuses into one kernel
    xr = hi(x[..., :r])
    if style == "half":
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat((-x2, x1), -1)
    else:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    out = (xr * cos + rot * sin).to(x.dtype)
    return torch.cat((out, x[..., r:]), -1) if r < x.shape[-1] else out


# ----------------------------------------------------------------------------- attention


class Router(nn.Module):
    """Linear router, weight [E, H]; logits in float32 with autocast off (Switch / ST-MoE)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c.num_experts, c.hidden_size))
        self.jitter = c.router_jitter

    def forward(self, x):  # [..., H] -> [..., E] float32
        with torch.autocast(x.device.type, enabled=False):
            x = hi(x)
            if self.training and self.jitter > 0:  # multiplicative input noise (Switch)
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight.to(x.dtype))


def add_attention_projections(m, c, q=True, kv=True):
    """Gives module m the seed attention's tensors: q_proj, o_proj (+ q_norm) and/or k_proj, v_proj (+ k_norm)."""
    H, D, nh, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    qk_shape = lambda heads: (D,) if c.qk_norm == "shared" else (heads, D)
    if q:
        m.q_proj = nn.Linear(H, nh * D, bias=c.qkv_bias)
    if kv:
        m.k_proj = nn.Linear(H, nkv * D, bias=c.qkv_bias)
        m.v_proj = nn.Linear(H, nkv * D, bias=c.qkv_bias)
    if q:
        m.o_proj = nn.Linear(nh * D, H, bias=c.attn_out_bias)
    if c.qk_norm != "none":
        if q:
            m.q_norm = Norm(qk_shape(nh), c)
        if kv:
            m.k_norm = Norm(qk_shape(nkv), c)


class AttentionExpert(nn.Module):
    """One seed's attention tensors (moa: q, k, v, o; shared-kv: q, o)."""

    def __init__(self, c, kv):
        super().__init__()
        add_attention_projections(self, c, q=True, kv=kv)


def attend(q, k, v, mask, causal, scale):
    """q [B, hq, Tq, D], k/v [B, hk, Tk, D] (hq a multiple of hk, grouped heads) -> [B, hq, Tq, D]."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


if triton is not None:

    @triton.jit
    def _gate_block(y, g, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's BLOCK_R rows of y [R, C] and g [R] float32: rows r, element offsets at, mask m, the
        gates rounded to y's dtype first (as the torch ops' g.to(y.dtype)) and y, in float32.
        -> (r, at, m, gv, yv)"""
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        m = (r < R) & (c < C)
        gv = tl.load(g + r, mask=r < R, other=0.0).to(y.dtype.element_ty).to(tl.float32)
        yv = tl.load(y + r * C + c, mask=m, other=0.0).to(tl.float32)
        return r, r * C + c, m, gv, yv

    @triton.jit
    def _gate_fwd_kernel(y, g, out, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """out = y * g of BLOCK_R rows of y [R, C] and g [R] float32, g rounded to y's dtype first."""
        _, at, m, gv, yv = _gate_block(y, g, R, C, BLOCK_R, BLOCK_C)
        tl.store(out + at, (yv * gv).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _gate_bwd_kernel(y, g, dout, dy, dg, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """The gradients of _gate_fwd_kernel in one pass: dy = dout * g, dg = sum over C of dout * y in float32
        (the torch ops round each product to y's dtype before the sum)."""
        r, at, m, gv, yv = _gate_block(y, g, R, C, BLOCK_R, BLOCK_C)
        d = tl.load(dout + at, mask=m, other=0.0).to(tl.float32)
        tl.store(dy + at, (d * gv).to(dy.dtype.element_ty), mask=m)
        tl.store(dg + r, tl.sum(d * yv, axis=1)[:, None], mask=r < R)


def _gate_triton_fwd(y, g):
    """y [..., E, C] * g [..., E] (float32) of contiguous y and g in one kernel. -> y's shape and dtype"""
    C = y.shape[-1]
    R = g.numel()
    out = torch.empty_like(y)
    block_c, block_r = _row_blocks(C)
    _gate_fwd_kernel[(triton.cdiv(R, block_r),)](y, g, out, R, C, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    return out


def _gate_triton_bwd(y, g, dout):
    """The gradients of _gate_triton_fwd. -> (dy in y's dtype, dg float32 in g's shape)"""
    C = y.shape[-1]
    R = g.numel()
    dy = torch.empty_like(y)
    dg = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    block_c, block_r = _row_blocks(C)
    _gate_bwd_kernel[(triton.cdiv(R, block_r),)](
        y, g, dout.contiguous(), dy, dg, R, C, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8
    )
    return dy, dg


class _GateFn(torch.autograd.Function):
    """The attention experts' outputs weighted by their gates: one kernel each way, where the torch ops take a
    broadcast product forward and two products and a sum backward. Saves y (SDPA keeps it anyway) and g."""

    @staticmethod
    def forward(ctx, y, g):
        ctx.save_for_backward(y, g)
        return _gate_triton_fwd(y, g)

    @staticmethod
    def backward(ctx, dout):
        y, g = ctx.saved_tensors
        return _gate_triton_bwd(y, g, dout)


def weigh_by_gate(y, g):
    """y [..., E, C] weighted by g [..., E] float32 (g rounded to y's dtype): the gate kernel (eager, CUDA,
    contiguous, rows up to MAX_ROW_KERNEL_DIM wide), else the torch ops."""
    fits = g.dtype == torch.float32 and y.shape[:-1] == g.shape and y.shape[-1] <= MAX_ROW_KERNEL_DIM
    if kernel_takes("gate", y) and fits and y.is_contiguous() and g.is_contiguous():
        return _GateFn.apply(y, g)
    return y * g[..., None].to(y.dtype)


class Attention(nn.Module):
    """Soft mixture of attention experts ("moa", "shared-kv") or one attention ("merged").

    All experts run as one: their q/k/v weights are concatenated into one matmul, attention
    runs over (batch, E*heads) in one scaled_dot_product_attention, and the o projections are
    one matmul over the concatenated, gate-weighted expert outputs. The KV cache holds
    E*kv_heads heads for moa and kv_heads for shared-kv and merged.
    """

    def __init__(self, c, layer_idx):
        super().__init__()
        self.c, self.layer_idx, self.mode = c, layer_idx, c.attention_experts
        E = c.num_experts
        self.router = Router(c) if E > 1 and self.mode != "merged" else None
        if self.mode == "merged":
            add_attention_projections(self, c)
        else:
            self.experts = nn.ModuleList(AttentionExpert(c, kv=self.mode == "moa") for _ in range(E))
            if self.mode == "shared-kv":
                add_attention_projections(self, c, q=False, kv=True)
        self.scale = c.attention_scale if c.attention_scale is not None else c.head_dim**-0.5

    def forward(self, h, rope, mask_fn, cache):
        """h [B, T, H] (normed) -> out [B, T, H], router logits [B, T, E] float32 or None."""
        c, (B, T, _) = self.c, h.shape
        D, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        qs = [self] if self.mode == "merged" else list(self.experts)  # modules holding q_proj, o_proj
        kvs = qs if self.mode == "moa" else [self]  # modules holding k_proj, v_proj
        Eq, Ek = len(qs), len(kvs)
        # 1. every expert's q, k, v in one matmul
        lins = [m.q_proj for m in qs] + [m.k_proj for m in kvs] + [m.v_proj for m in kvs]
        w = cat_weights([l.weight for l in lins])  # [(Eq*nh + 2*Ek*nkv)*D, H]
        b = torch.cat([l.bias for l in lins]) if c.qkv_bias else None
        q, k, v = F.linear(h, w, b).split([Eq * nh * D, Ek * nkv * D, Ek * nkv * D], -1)
        q, k, v = q.view(B, T, Eq, nh, D), k.view(B, T, Ek, nkv, D), v.view(B, T, Ek, nkv, D)
        if c.qk_norm != "none":
            q, k = stacked_norm(q, [m.q_norm for m in qs]), stacked_norm(k, [m.k_norm for m in kvs])
        # 2. heads: moa keeps expert-major order (expert e's head i uses kv head e*nkv + i//group);
        # shared-kv goes kv-major, so each shared kv head serves its query heads of every expert
        q = q.view(B, T, Eq, nkv, nh // nkv, D)
        if Ek == 1 and Eq > 1:
            q = q.transpose(2, 3)  # [B, T, nkv, E, group, D]
        q = q.reshape(B, T, Eq * nh, D).transpose(1, 2)  # [B, Eq*nh, T, D]
        k = k.reshape(B, T, Ek * nkv, D).transpose(1, 2)  # [B, Ek*nkv, T, D]
        v = v.reshape(B, T, Ek * nkv, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope, c.rope_style), apply_rope(k, *rope, c.rope_style)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # all keys so far: [B, Ek*nkv, Tk, D]
        mask, causal = mask_fn(k.shape[-2])
        y = attend(q, k, v, mask, causal, self.scale).transpose(1, 2)  # [B, T, Eq*nh, D]
        if Ek == 1 and Eq > 1:
            y = y.reshape(B, T, nkv, Eq, nh // nkv, D).transpose(2, 3)
        y = y.reshape(B, T, Eq, nh * D)
        # 3. soft routing: sum_e g_e o_proj_e(y_e), one matmul over the concatenated experts
        logits = None
        if self.router is not None:
            logits = self.router(h)  # [B, T, E]
            g = logits.softmax(-1)
            y = weigh_by_gate(y, g)
        out = F.linear(y.reshape(B, T, Eq * nh * D), cat_weights([m.o_proj.weight for m in qs], 1))
        if c.attn_out_bias:
            bo = torch.stack([m.o_proj.bias for m in qs])  # [Eq, H]
            out = out + (g.to(bo.dtype) @ bo if self.router is not None else bo.sum(0))
        return out, logits


# ----------------------------------------------------------------------------- FFN experts


class Expert(nn.Module):
    """One seed's FFN: down(drop(act(gate x) * up x)), or down(drop(act(up x))) when not gated."""

    def __init__(self, c):
        super().__init__()
        H, I, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
        if c.gated_mlp:
            self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        self.act, self.gated = ACT[c.hidden_act], c.gated_mlp
        self.drop = nn.Dropout(c.expert_dropout)

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(self.drop(h))


if triton is not None:

    @triton.jit
    def _swiglu_block(gu, n, I, BLOCK: tl.constexpr):
        """This program's BLOCK elements i of the [R, I] product (mask m), their gate and up offsets in gu
        [R, 2I] (gate | up side by side) and values in float32. -> (i, m, gate offset, g, u)"""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        at = i // I * 2 * I + i % I
        g = tl.load(gu + at, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu + at + I, mask=m, other=0.0).to(tl.float32)
        return i, m, at, g, u

    @triton.jit
    def _swiglu_fwd_kernel(gu, out, n, I, BLOCK: tl.constexpr):
        """out [R, I] = silu(gate) * up of gu [R, 2I], rounded as the torch ops round: silu(gate) to gu's
        dtype, then the product."""
        i, m, at, g, u = _swiglu_block(gu, n, I, BLOCK)
        a = (g * tl.sigmoid(g)).to(gu.dtype.element_ty).to(tl.float32)
        tl.store(out + i, (a * u).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(gu, dout, dgu, n, I, BLOCK: tl.constexpr):
        """dgu [R, 2I] = (d gate | d up) of _swiglu_fwd_kernel for dout [R, I], rounded as silu_backward and the
        product's backward round: d up = dout silu(gate), d gate = (dout up) silu'(gate)."""
        i, m, at, g, u = _swiglu_block(gu, n, I, BLOCK)
        d = tl.load(dout + i, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        a = (g * s).to(gu.dtype.element_ty).to(tl.float32)
        da = (d * u).to(gu.dtype.element_ty).to(tl.float32)
        tl.store(dgu + at, (da * s * (1.0 + g * (1.0 - s))).to(dgu.dtype.element_ty), mask=m)
        tl.store(dgu + at + I, (d * a).to(dgu.dtype.element_ty), mask=m)


SWIGLU_BLOCK = 2048  # elements of out per program


def _swiglu_triton_fwd(gu):
    """silu(gate) * up of contiguous gu [R, 2I] in one kernel. -> [R, I] in gu's dtype"""
    I = gu.shape[-1] // 2
    out = torch.empty((*gu.shape[:-1], I), dtype=gu.dtype, device=gu.device)
    n = out.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gu, out, n, I, BLOCK=SWIGLU_BLOCK, num_warps=8)
    return out


def _swiglu_triton_bwd(gu, dout):
    """The gradient of _swiglu_triton_fwd with respect to gu, [R, 2I], in one kernel."""
    I = gu.shape[-1] // 2
    dgu = torch.empty_like(gu)
    n = dout.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](
        gu, dout.contiguous(), dgu, n, I, BLOCK=SWIGLU_BLOCK, num_warps=8
    )
    return dgu


class _SwigluFn(torch.autograd.Function):
    """silu(gate) * up from the experts' side-by-side gate and up outputs: one kernel each way, reading gu
    once and writing the [R, I] product forward and the [R, 2I] gradient backward; saves gu only."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return _swiglu_triton_fwd(gu)

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        return _swiglu_triton_bwd(gu, dout)


def gated_activation(gu, act):
    """act(gate) * up of gu [..., 2I] (gate | up side by side): the SwiGLU kernel for silu (eager, CUDA,
    contiguous), else the torch ops."""
    if act is F.silu and kernel_takes("swiglu", gu) and gu.is_contiguous():
        return _SwigluFn.apply(gu)
    g, u = gu.chunk(2, -1)
    return act(g) * u


class MoE(nn.Module):
    """Token-choice top-k MoE over E FFN experts (E == 1: a dense FFN, no router).

    Dropless by default. With capacity_factor, each expert takes at most
    ceil(cf * N * k / E) assignments, top-1 choices first, then in token order (Switch);
    the overflow gets weight 0, so its token passes through the residual only.
    """

    grouped_mm = "auto"  # "auto" | True | False: use F.grouped_mm (CUDA, bf16) for the experts

    def __init__(self, c):
        super().__init__()
        self.k, self.capacity_factor = c.num_experts_per_tok, c.capacity_factor
        self.norm_topk_prob = c.norm_topk_prob
        self.router = Router(c) if c.num_experts > 1 else None
        self.experts = nn.ModuleList(Expert(c) for _ in range(c.num_experts))

    def forward(self, x):
        """x [B, T, H] -> y [B, T, H], router logits [N, E] float32, chosen experts [N, k] (None if dense)."""
        if self.router is None:
            return self.experts[0](x), None, None
        B, T, H = x.shape
        x = x.reshape(-1, H)  # [N, H]
        logits = self.router(x)  # [N, E]
        w, idx = logits.softmax(-1).topk(self.k, -1)  # [N, k]
        if self.norm_topk_prob:  # Mixtral: the chosen weights sum to 1 (function-preserving for [s, s, s])
            w = w / w.sum(-1, keepdim=True)
        if self.capacity_factor is not None:
            w = w * self.capacity_keep(idx)
        return self.run_experts(x, w, idx).view(B, T, H), logits, idx

    def run_experts(self, x, w, idx):
        """x [N, H], gate weights w and chosen experts idx [N, k] -> sum_j w[:, j] expert_idx[:, j](x), [N, H]."""
        N, H = x.shape
        # sort the N*k (token, expert) assignments by expert
        order = torch.sort(idx.reshape(-1), stable=True)[1]  # [N*k]
        sorted_e = idx.reshape(-1)[order]
        counts = F.one_hot(sorted_e, len(self.experts)).sum(0)  # [E]; bincount would sync with the host
        if self.use_grouped(x, N * self.k):
            ys = self.grouped_experts(x, order, sorted_e, counts)  # [N*k, H], (token, slot) order
        else:
            ys_sorted = self.looped_experts(x[order // self.k], counts)
            ys = torch.empty_like(ys_sorted)
            ys[order] = ys_sorted  # back to (token, slot) order
        ys = ys.view(N, self.k, H) * w[..., None]  # in w's (float32) dtype: the product promotes
        return (ys[:, 0] if self.k == 1 else ys.sum(1)).to(x.dtype)  # weighted sum over the k choices

    def capacity_keep(self, idx):  # idx [N, k] -> [N, k] 1.0 kept, 0.0 over capacity
        N, k = idx.shape
        E = len(self.experts)
        cap = math.ceil(self.capacity_factor * N * k / E)
        onehot = F.one_hot(idx.t().reshape(-1), E)  # [k*N, E], slot-major: top-1 choices come first
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place of each assignment in its expert's queue
        return (pos < cap).view(k, N).t().float()

    def use_grouped(self, x, assignments):
        if self.grouped_mm != "auto":
            return bool(self.grouped_mm)
        if not (_HAS_GROUPED_MM and x.is_cuda) or assignments < 128:  # decode-sized: loop over the few experts used
            return False
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        return x.dtype == torch.bfloat16 or autocast

    def looped_experts(self, xs, counts):  # fallback (CPU, fp32, old torch): one matmul chain per expert
        parts = xs.split(counts.tolist())
        return torch.cat([e(p) for e, p in zip(self.experts, parts)])

    def grouped_experts(self, x, order, sorted_e, counts):
        """x [N, H]; the N*k assignments sorted by expert (order, sorted_e), counts [E] -> the experts' outputs
        [N*k, H] bf16 in (token, slot) order, with F.grouped_mm(mat_a [rows, K], mat_b [E, K, N], offs=int32
        group ends). The tokens go into their experts' groups in bf16 and come back in one gather each way."""
        M = order.shape[0]
        E, A, ex = len(self.experts), GROUP_ALIGN, self.experts[0]
        # each assignment's row in groups padded to multiples of A (no host sync: the buffer has a static bound)
        padded = (counts + A - 1) // A * A
        starts = padded.cumsum(0) - padded
        dest = starts[sorted_e] + torch.arange(M, device=x.device) - (counts.cumsum(0) - counts)[sorted_e]
        row_of = torch.empty_like(dest).index_put_((order,), dest)  # assignment (token, slot) -> its row
        rows = (M + E * A + A - 1) // A * A
        offs = torch.cat([padded.cumsum(0)[:-1], padded.new_tensor([rows])]).to(
            torch.int32
        )  # last group takes the slack
        buf = _ToRows.apply(x, row_of.view(-1, self.k), rows)  # [rows, H] bf16, padding rows zero
        row_e = torch.zeros(rows, dtype=torch.long, device=x.device).index_put((dest,), sorted_e)
        row_onehot = F.one_hot(row_e, E).to(torch.bfloat16)  # [rows, E]: adds biases by matmul (fp32-accumulated grads)

        def gmm(a, *projs):  # a [rows, K] @ [E, N, K]^T, N = the projections' outputs side by side -> [rows, N]
            w = cat_weights([p[e].weight for e in range(E) for p in projs], 0, torch.bfloat16).view(E, -1, a.shape[1])
            out = F.grouped_mm(a, w.transpose(-2, -1), offs=offs)
            if projs[0][0].bias is None:
                return out
            b = torch.cat([torch.stack([e_.bias for e_ in p]) for p in projs], 1).to(out.dtype)  # [E, N]
            return out + row_onehot @ b  # each row gets its expert's bias

        es = self.experts
        with torch.autocast("cuda", enabled=False):
            if ex.gated:
                hid = gated_activation(gmm(buf, [e.gate_proj for e in es], [e.up_proj for e in es]), ex.act)
            else:
                hid = ex.act(gmm(buf, [e.up_proj for e in es]))
            out = gmm(ex.drop(hid), [e.down_proj for e in es])  # [rows, H]
        return _FromRows.apply(out, row_of)


class _ToRows(torch.autograd.Function):
    """x [N, H] -> bf16 [rows, H]: token t at rows row_of[t, 0..k-1], every other row zero (finite: the padding
    rows enter the weights' gradients). Backward: each token's k row gradients gathered and summed in
    float32, without the atomic adds of index_put's backward."""

    @staticmethod
    def forward(ctx, x, row_of, rows):
        N, k = row_of.shape
        ctx.save_for_backward(row_of)
        ctx.dtype = x.dtype
        xb = x.to(torch.bfloat16)
        src = xb if k == 1 else xb[:, None].expand(N, k, x.shape[-1]).reshape(N * k, -1)
        return xb.new_zeros(rows, x.shape[-1]).index_put_((row_of.reshape(-1),), src)

    @staticmethod
    def backward(ctx, grad):
        (row_of,) = ctx.saved_tensors
        N, k = row_of.shape
        g = grad[row_of.reshape(-1)].view(N, k, -1)
        g = g[:, 0].float() if k == 1 else g.sum(1, dtype=torch.float32)
        return g.to(ctx.dtype), None, None


class _FromRows(torch.autograd.Function):
    """out [rows, H] -> out[row_of] [N*k, H]; row_of is one-to-one, so the backward writes each gradient row
    in place (index_put without accumulation) and leaves the padding rows zero."""

    @staticmethod
    def forward(ctx, out, row_of):
        ctx.save_for_backward(row_of)
        ctx.rows = out.shape[0]
        return out[row_of]

    @staticmethod
    def backward(ctx, grad):
        (row_of,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_put_((row_of,), grad), None


CHUNK_LOGITS = 1 << 26  # logits per chunk of linear_cross_entropy: 256 MiB in float32


def chunk_rows(vocab):
    """Rows per chunk of linear_cross_entropy (441 for a vocabulary of 152K, 2097 for 32K)."""
    return max(1, CHUNK_LOGITS // vocab)


def _float_logits(z, scale):
    """Logits z in float32, times the model's logit scale."""
    return z.float() * scale if scale != 1.0 else z.float()


def _logit_chunks(h, w, b):
    """(rows, hc, z) for each chunk of h [N, H]: its row slice, its hidden states in w's dtype and its logits
    hc @ w^T + b in w's dtype, so no more than chunk_rows of them are in memory at once."""
    step = chunk_rows(w.shape[0])
    for start in range(0, h.shape[0], step):
        rows = slice(start, start + step)
        hc = h[rows].to(w.dtype)
        yield rows, hc, F.linear(hc, w, b)


if triton is not None:

    @triton.jit
    def _cross_entropy_kernel(z, labels, loss, V, scale, BLOCK_V: tl.constexpr):
        """One row of z [rows, V] (logits in the head's dtype): loss[row] = lse(s z) - s z[label] in float32, and
        z overwritten by the loss's gradient s (softmax(s z) - onehot(label)); zero for an ignored row (-100)."""
        row = tl.program_id(0).to(tl.int64)
        zr = z + row * V
        label = tl.load(labels + row)
        valid = label != -100
        m = tl.full([], float("-inf"), tl.float32)  # running max and sum of exp(s z - m): one read of the row
        total = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            v = tl.load(zr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(v, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new), 0)
            m = m_new
        lse = m + tl.log(total)
        target = tl.where(valid, label, 0)
        tl.store(loss + row, tl.where(valid, lse - tl.load(zr + target).to(tl.float32) * scale, 0.0))
        for start in range(0, V, BLOCK_V):  # the gradient, over the same row (from L2 where it stayed)
            cols = start + tl.arange(0, BLOCK_V)
            v = tl.load(zr + cols, mask=cols < V, other=0.0).to(tl.float32) * scale
            g = tl.exp(v - lse) - tl.where(cols == target, 1.0, 0.0)
            g = tl.where(valid, g * scale, 0.0)
            tl.store(zr + cols, g.to(z.dtype.element_ty), mask=cols < V)


def _cross_entropy_triton(z, labels, scale):
    """_cross_entropy_kernel over contiguous logits z [rows, V]: z becomes the gradient. -> loss [rows] float32"""
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    _cross_entropy_kernel[(z.shape[0],)](z, labels, loss, z.shape[1], scale, BLOCK_V=4096, num_warps=8)
    return loss


def _cross_entropy_and_grad(z, labels, scale):
    """z [rows, V] logits, labels [rows] (-100: ignored) -> (summed cross-entropy of scale * z in float32, its
    gradient with respect to z in z's dtype). The kernel writes the gradient over z; the torch ops in float32."""
    if kernel_takes("loss", z) and z.is_contiguous():
        return _cross_entropy_triton(z, labels.contiguous(), scale).sum(), z
    z = _float_logits(z, scale)
    valid = labels != -100
    target = labels.clamp(min=0)[:, None]
    lse = torch.logsumexp(z, -1)
    total = ((lse - z.gather(-1, target)[:, 0]) * valid).sum()
    g = torch.exp(z - lse[:, None])  # softmax; minus one at the label, zero on ignored rows
    g.scatter_add_(-1, target, torch.full_like(g[:, :1], -1.0))
    return total, g * (valid[:, None] * scale)


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype")  # torch >= 2.8: bf16 operands, float32 out (CUDA)


def _add_product(acc, a, b):
    """acc + a @ b in acc's dtype. On CUDA with a and b in a narrower dtype, one GEMM accumulating in float32
    into acc's values (addmm's out_dtype), where the product would be rounded to bf16, cast and added."""
    if acc.is_cuda and a.dtype != acc.dtype and _HAS_MM_OUT_DTYPE:
        return torch.addmm(acc, a, b, out_dtype=acc.dtype)
    return acc + (a @ b).to(acc.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of scale * (h @ W^T + b) against labels (-100: ignored), chunk by chunk, so the
    [N, V] logits are never whole in memory. The loss ends the graph, so its gradients are computed in
    forward, chunk by chunk too, and backward only scales them: the matmuls of an unfused head, no more."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, scale, dtype):
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for rows, hc, z in _logit_chunks(h, w, None if bias is None else bias.to(dtype)):
                loss, g = _cross_entropy_and_grad(z, labels[rows], scale)
                total += loss
                g = g.to(dtype)
                grad_h[rows] = (g @ w).to(h.dtype)
                grad_w = _add_product(grad_w, g.t(), hc)
                if grad_b is not None:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.weight_dtypes
        grad_b = None if grad_b is None else (grad_b * grad_total).to(b_dtype)
        return grad_h * grad_total.to(grad_h.dtype), (grad_w * grad_total).to(w_dtype), grad_b, None, None, None


def linear_cross_entropy(h, weight, bias, labels, scale=None):
    """sum over rows of cross_entropy(scale * (h @ W^T + b), labels, ignore_index=-100) in float32, h [N, H],
    labels [N], as the head and F.cross_entropy would give it (in the autocast dtype, when autocast is on)
    without the [N, V] logits: training's loss for large vocabularies."""
    dtype = autocast_dtype(h.device.type) or torch.promote_types(h.dtype, weight.dtype)
    scale = 1.0 if scale is None else float(scale)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, bias, labels, scale, dtype)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):  # evaluation: the loss alone
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows, _, z in _logit_chunks(h, w, b):
            total += F.cross_entropy(_float_logits(z, scale), labels[rows], ignore_index=-100, reduction="sum")
        return total


def router_losses(logits, idx, mask=None):
    """Switch load balance E * sum_i f_i P_i (f_i: fraction of the top-k assignments to expert i,
    P_i: mean router probability) and ST-MoE z-loss mean(logsumexp(logits)^2), over the tokens
    where mask is true. logits [N, E] float32, idx [N, k] or None (soft routing: z-loss only)."""
    w = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.reshape(-1).float()
    n = w.sum().clamp(min=1.0)
    z = (torch.logsumexp(logits, -1).pow(2) * w).sum() / n
    if idx is None:
        return None, z, None
    E, k = logits.shape[-1], idx.shape[-1]
    f = (F.one_hot(idx, E).sum(1).float() * w[:, None]).sum(0) / (n * k)  # [E], no gradient
    P = (logits.softmax(-1) * w[:, None]).sum(0) / n  # [E]
    return E * (f * P).sum(), z, f


# ----------------------------------------------------------------------------- block and model


class Block(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.input_layernorm = Norm(c.hidden_size, c)
        if c.second_norm:
            self.post_attention_layernorm = Norm(c.hidden_size, c)
        self.attn = Attention(c, layer_idx)
        self.mlp = MoE(c)
        self.parallel = c.block == "parallel"
        self.drop = nn.Dropout(c.hidden_dropout)

    def forward(self, x, rope, mask_fn, cache):
        ffn_norm = self.post_attention_layernorm if hasattr(self, "post_attention_layernorm") else self.input_layernorm
        h = self.input_layernorm(x)
        a, attn_logits = self.attn(h, rope, mask_fn, cache)
        if self.parallel:  # y = x + MoA(Na x) + MoE(Nf x); Nf x is h when the seed has one norm
            m, ffn_logits, idx = self.mlp(h if ffn_norm is self.input_layernorm else ffn_norm(x))
            return x + self.drop(a) + self.drop(m), attn_logits, ffn_logits, idx
        x = x + self.drop(a)  # sequential
        m, ffn_logits, idx = self.mlp(ffn_norm(x))
        return x + self.drop(m), attn_logits, ffn_logits, idx


class KVCache:
    """Minimal stand-in for transformers' DynamicCache: per layer keys/values [B, heads, T, D]."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        if layer_idx in self.keys:
            k, v = torch.cat([self.keys[layer_idx], k], -2), torch.cat([self.values[layer_idx], v], -2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def get_seq_length(self, layer_idx=0):
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


class MaskFn:
    """Attention mask for the current queries, built once per key length Tk.

    Queries sit at absolute positions total-Tq .. total-1 and the keys a cache returns are the last
    Tk positions (a sliding-window cache returns fewer). Returns (bool mask [B|1, 1, Tq, Tk] or None,
    is_causal) for attend()."""

    def __init__(self, pad_mask, q_len, total, window, device):
        self.pad, self.q_len, self.total, self.window, self.device = pad_mask, q_len, total, window, device
        self.built = {}

    def __call__(self, k_len):
        if self.pad is None and (self.window is None or self.window >= self.total):
            if k_len == self.q_len:
                return None, True  # plain causal: lets SDPA pick its flash kernel
            if self.q_len == 1:
                return None, False  # one new token sees every cached key
        if k_len not in self.built:
            qpos = torch.arange(self.total - self.q_len, self.total, device=self.device)[:, None]
            kpos = torch.arange(self.total - k_len, self.total, device=self.device)[None, :]
            m = kpos <= qpos
            if self.window is not None:
                m = m & (qpos - kpos < self.window)
            m = m[None, None]  # [1, 1, Tq, Tk]
            if self.pad is not None:
                m = m & self.pad[:, None, None, -k_len:].bool()
                m = m | ~m.any(-1, keepdim=True)  # all-masked rows (left padding) attend anywhere; unused
            self.built[k_len] = m
        return self.built[k_len], False


def _model_init(m, c):
    c = as_config(c)
    m.config = c
    m.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
    if c.learned_positions:
        m.embed_positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
    m.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
    m.norm = Norm(c.hidden_size, c)
    m.gradient_checkpointing = False  # transformers' gradient_checkpointing_enable() sets this


class ModelMixin:
    """The decoder stack, shared by BamModelCore (torch) and BamModel (transformers)."""

    def new_cache(self):
        return KVCache()

    def run(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=False,
        **kwargs,
    ):
        """-> dict(last_hidden_state [B, T, H], past_key_values, hidden_states, attn_router_logits,
        router_logits, router_choices (per layer), token_mask [B, T] or None)."""
        c = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        B, T, _ = x.shape
        if use_cache is None:
            use_cache = c.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        pad = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if pad is not None and pad.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {pad.shape[-1]} positions, expected past + new = {past + T}")
        if pad is not None and bool(pad.all()):
            pad = None  # no padding: keep the plain causal path (flash attention)
        if position_ids is None:
            if pad is not None:  # left padding: count only real tokens
                position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if c.embedding_scale is not None:
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)  # gemma casts the scale to the hidden dtype
        if c.learned_positions:
            x = x + self.embed_positions(position_ids)
        rope = rope_cos_sin(c, position_ids)
        if attention_mask is not None and attention_mask.dim() == 4:  # prepared [B, 1, Tq, Tk] mask
            m4 = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
            mask_fn = lambda k_len: (m4[..., -k_len:], False)
        else:
            mask_fn = MaskFn(pad, T, past + T, c.sliding_window, x.device)
        out = dict(
            hidden_states=[x] if output_hidden_states else None,
            attn_router_logits=[],
            router_logits=[],
            router_choices=[],
        )
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                ckpt = getattr(self, "_gradient_checkpointing_func", None)
                if ckpt is None:
                    import torch.utils.checkpoint as tuc

                    ckpt = lambda f, *a: tuc.checkpoint(f, *a, use_reentrant=False)
                x, al, fl, idx = ckpt(block.__call__, x, rope, mask_fn, past_key_values)
            else:
                x, al, fl, idx = block(x, rope, mask_fn, past_key_values)
            out["attn_router_logits"].append(al)
            out["router_logits"].append(fl)
            out["router_choices"].append(idx)
            if output_hidden_states:
                out["hidden_states"].append(x)
        x = self.norm(x)
        if output_hidden_states:
            out["hidden_states"][-1] = x  # as transformers: the last entry is the final norm's output
        out.update(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            token_mask=pad[:, -T:].bool() if pad is not None else None,
        )
        return out


def _lm_init(m, c):
    c = as_config(c)
    m.config = c
    m.model = m.make_model(c)
    m.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=c.lm_head_bias)
    if c.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight


class CausalLMMixin:
    """Head, losses and outputs, shared by BamForCausalLMCore (torch) and BamForCausalLM (transformers)."""

    def run(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=False,
        output_hidden_states=False,
        logits_to_keep=0,
        num_items_in_batch=None,
        skip_logits=False,
        **kwargs,
    ):
        """-> dict(loss, nll, aux_loss, lb_loss, z_loss, logits, past_key_values, hidden_states,
        router_logits, attn_router_logits (when output_router_logits), expert_load [L, E]).
        skip_logits with labels: the loss by linear_cross_entropy, without the logits (None)."""
        c = self.config
        out = self.model.run(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, output_hidden_states
        )
        h = out["last_hidden_state"]
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        skip_logits = skip_logits and labels is not None
        logits = None if skip_logits else self.lm_head(h)  # [B, T, V]
        if logits is not None and c.logit_scale is not None:
            logits = logits * c.logit_scale
        # router losses, summed over layers (the soft attention router has no load to balance: z-loss only)
        mask = out["token_mask"]
        lb = z = None
        load = []
        for al, fl, idx in zip(out["attn_router_logits"], out["router_logits"], out["router_choices"]):
            for logits_l, idx_l in ((al, None), (fl, idx)):
                if logits_l is None:
                    continue
                lb_l, z_l, f_l = router_losses(logits_l.reshape(-1, logits_l.shape[-1]), idx_l, mask)
                z = z_l if z is None else z + z_l
                if lb_l is not None:
                    lb = lb_l if lb is None else lb + lb_l
                    load.append(f_l)
        aux = None
        if z is not None:
            aux = c.router_z_loss_coef * z + (c.router_aux_loss_coef * lb if lb is not None else 0.0)
        nll = loss = None
        if labels is not None:
            shift = labels[:, 1:].reshape(-1)
            if skip_logits:
                head = self.lm_head
                nll = linear_cross_entropy(
                    h[:, :-1].reshape(-1, h.shape[-1]), head.weight, head.bias, shift, c.logit_scale
                )
            else:
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shift, ignore_index=-100, reduction="sum"
                )
            n = num_items_in_batch if num_items_in_batch is not None else (shift != -100).sum().clamp(min=1)
            nll = nll / n
            loss = nll + aux if aux is not None else nll
        keep = output_router_logits
        return dict(
            loss=loss,
            nll=nll,
            aux_loss=aux,
            lb_loss=lb,
            z_loss=z,
            logits=logits,
            past_key_values=out["past_key_values"],
            hidden_states=out["hidden_states"],
            router_logits=tuple(out["router_logits"]) if keep else None,
            attn_router_logits=tuple(out["attn_router_logits"]) if keep else None,
            expert_load=torch.stack(load) if load else None,
        )


def init_weights(module, c, init=nn.init):
    """Fresh-model init: Linear/Embedding N(0, initializer_range), biases 0, norms 1 (0 with unit
    offset), routers N(0, sqrt(0.1 / H)) (Switch: 0.1 of the fan-in scale). `init`: torch.nn.init, or
    transformers' initialization module, which skips tensors loaded from a checkpoint."""
    if isinstance(module, Router):
        init.normal_(module.weight, mean=0.0, std=math.sqrt(0.1 / module.weight.shape[1]))
    elif isinstance(module, Norm):
        (init.zeros_ if module.unit_offset else init.ones_)(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        init.normal_(module.weight, mean=0.0, std=c.initializer_range)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)


class BamModelCore(ModelMixin, nn.Module):
    def __init__(self, config):
        super().__init__()
        _model_init(self, config)

    def forward(self, *args, **kwargs):
        return self.run(*args, **kwargs)


class BamForCausalLMCore(CausalLMMixin, nn.Module):
    """Pure-torch BAM language model; state_dict names are those of the transformers model."""

    make_model = BamModelCore

    def __init__(self, config):
        super().__init__()
        _lm_init(self, config)
        self.apply(lambda m: init_weights(m, self.config))

    def forward(self, *args, **kwargs):
        return self.run(*args, **kwargs)


# ----------------------------------------------------------------------------- transformers wrappers

try:
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

    try:
        from transformers import initialization as _hf_init  # v5: skips tensors loaded from the checkpoint
    except ImportError:
        _hf_init = nn.init
    _HAS_TRANSFORMERS = True
except ImportError:
    _HAS_TRANSFORMERS = False

if _HAS_TRANSFORMERS:

    @dataclass
    class BamCausalLMOutput(MoeCausalLMOutputWithPast):
        """MoeCausalLMOutputWithPast (aux_loss = coef_lb * lb + coef_z * z, router_logits: FFN, per layer
        [N, E]) plus the unscaled losses, the attention routers' logits and expert_load [L, E]: the
        fraction of top-k assignments each FFN expert got in each layer."""

        nll_loss: torch.FloatTensor = None
        lb_loss: torch.FloatTensor = None
        z_loss: torch.FloatTensor = None
        attn_router_logits: tuple = None
        expert_load: torch.FloatTensor = None

    class BamPreTrainedModel(PreTrainedModel):
        config_class = BamConfig
        base_model_prefix = "model"
        supports_gradient_checkpointing = True
        _no_split_modules = ["Block"]
        _skip_keys_device_placement = ["past_key_values"]
        _supports_sdpa = True

        def _init_weights(self, module):
            init_weights(module, self.config, _hf_init)

    class BamModel(ModelMixin, BamPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            _model_init(self, config)
            self.post_init()

        def new_cache(self):
            return DynamicCache(config=self.config)

        def get_input_embeddings(self):
            return self.embed_tokens

        def set_input_embeddings(self, value):
            self.embed_tokens = value

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            inputs_embeds=None,
            use_cache=None,
            output_hidden_states=None,
            **kwargs,
        ):
            out = self.run(
                input_ids,
                attention_mask,
                position_ids,
                past_key_values,
                inputs_embeds,
                use_cache,
                bool(output_hidden_states),
            )
            return MoeModelOutputWithPast(
                last_hidden_state=out["last_hidden_state"],
                past_key_values=out["past_key_values"],
                hidden_states=tuple(out["hidden_states"]) if output_hidden_states else None,
            )

    class BamForCausalLM(CausalLMMixin, BamPreTrainedModel, GenerationMixin):
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        make_model = BamModel

        def __init__(self, config):
            super().__init__(config)
            _lm_init(self, config)
            self.post_init()

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def set_input_embeddings(self, value):
            self.model.embed_tokens = value

        def get_output_embeddings(self):
            return self.lm_head

        def set_output_embeddings(self, value):
            self.lm_head = value

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            inputs_embeds=None,
            labels=None,
            use_cache=None,
            output_router_logits=None,
            output_hidden_states=None,
            return_dict=None,
            logits_to_keep=0,
            **kwargs,
        ):
            out = self.run(
                input_ids,
                attention_mask,
                position_ids,
                past_key_values,
                inputs_embeds,
                labels,
                use_cache,
                bool(output_router_logits),
                bool(output_hidden_states),
                logits_to_keep,
                kwargs.get("num_items_in_batch"),
                skip_logits=bool(kwargs.get("skip_logits")),
            )
            res = BamCausalLMOutput(
                loss=out["loss"],
                aux_loss=out["aux_loss"],
                logits=out["logits"],
                past_key_values=out["past_key_values"],
                hidden_states=tuple(out["hidden_states"]) if output_hidden_states else None,
                router_logits=out["router_logits"],
                nll_loss=out["nll"],
                lb_loss=out["lb_loss"],
                z_loss=out["z_loss"],
                attn_router_logits=out["attn_router_logits"],
                expert_load=out["expert_load"],
            )
            return res if return_dict is not False else res.to_tuple()

    __all__ = ["BamConfig", "BamPreTrainedModel", "BamModel", "BamForCausalLM", "BamModelCore", "BamForCausalLMCore"]
