"""Causal attention kernels at the shape a BAM training step runs them (issue 19): forward + backward time of
each scaled_dot_product_attention backend torch offers on this GPU, and of FlexAttention (compiled), on
q, k, v [micro-batch, experts x heads, seq, head_dim] bf16, the layout Attention.forward hands to `attend`.
Each kernel's output and gradients are first checked against the math backend in float32 on smaller
inputs (a kernel off by more than bf16's rounding is reported as an error, not timed). Reports milliseconds (median of triton's do_bench), TFLOP/s of the causal work (fwd 2 x 2BHT^2D/2,
bwd 2.5x fwd) and the ratio to cuDNN's, the backend the benchmark's profile shows.

    python3 bench/train/bench_attention.py --out DIR --commit SHA [--micro-batch 16] [--heads 64]
"""

import argparse
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F
from bench_train import git_commit  # this folder is on sys.path: the script's own
from torch.nn.attention import SDPBackend, sdpa_kernel

MAX_RELATIVE_ERROR = 2e-2  # bf16 operands land between 1e-3 and 1e-2 of the float32 reference
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for attention_bench.json")
    p.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=64, help="experts x heads (base BAM: 4 x 16)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=64)
    return p.parse_args()


def kernels():
    """name -> fn(q, k, v) running causal attention; FlexAttention compiled, with its causal block mask."""
    out = {name: functools.partial(_sdpa, backend) for name, backend in BACKENDS.items()}
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run_flex(q, k, v):
        T = q.shape[-2]
        if T not in masks:
            masks[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=q.device)
        return flex(q, k, v, block_mask=masks[T])

    out["flex"] = run_flex
    return out


def _sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def inputs(shape):
    """Fresh random q, k, v in bf16, requiring gradients."""
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(fn, shape):
    """Output and gradients against the math backend in float32 on the same (smaller) inputs."""
    q, k, v = inputs(shape)
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    y = fn(q, k, v)
    y.backward(dy)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        y_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    y_ref.backward(dy.float())
    return max(relative_error(a, b) for a, b in [(y, y_ref)] + [(t.grad, r.grad) for t, r in zip((q, k, v), ref)])


def time_ms(fn, shape):
    from triton.testing import do_bench

    q, k, v = inputs(shape)
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dy)

    return do_bench(step, warmup=200, rep=1000, return_mode="median")


def main():
    args = parse_args()
    B, H, T, D = args.micro_batch, args.heads, args.seq_len, args.head_dim
    shape = (B, H, T, D)
    flops = 3.5 * 4 * B * H * T * T * D / 2  # causal: half the scores; backward 2.5x the forward
    rows = []
    for name, fn in kernels().items():
        try:
            err = check(fn, (2, 4, 512, D))
            if not err <= MAX_RELATIVE_ERROR:  # NaN fails too
                raise ValueError(f"relative error {err:.1e} against the math backend in float32")
            ms = time_ms(fn, shape)
            rows.append(dict(kernel=name, ms=ms, tflops=flops / ms / 1e9, max_relative_error=err))
        except Exception as e:  # a backend this GPU or shape does not run: reported, not fatal
            rows.append(dict(kernel=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        print(rows[-1], flush=True)
    base = next((r["ms"] for r in rows if r["kernel"] == "cudnn" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["speed_vs_cudnn"] = base / r["ms"]
    result = dict(
        commit=args.commit or git_commit(),
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        shape=dict(micro_batch=B, heads=H, seq_len=T, head_dim=D),
        rows=rows,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'kernel':10} {'ms':>8} {'TFLOP/s':>8} {'vs cudnn':>8} {'error':>8}")
    for r in rows:
        if "ms" in r:
            print(
                f"{r['kernel']:10} {r['ms']:8.2f} {r['tflops']:8.0f} {r.get('speed_vs_cudnn', 0):8.2f} "
                f"{r['max_relative_error']:8.1e}"
            )
        else:
            print(f"{r['kernel']:10} {r['error']}")


if __name__ == "__main__":
    sys.exit(main())
