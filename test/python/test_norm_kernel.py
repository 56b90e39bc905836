"""RMSNorm's Triton kernels (modeling_bam._rms_norm_triton_fwd / _bwd) against norm_fn's torch ops.

As test_rope_kernel.py: on CPU through Triton's interpreter (interpreted.py), on CUDA the compiled kernels
through Norm, forward and backward. Each kernel output is compared with a float64 reference and must be as close to it as the
torch path in the same dtypes is (twice its error, plus one ulp of the output dtype; for the weight's
gradient, plus the ulps of the normalised x that both round).
"""

import os
import sys
import unittest

import torch
from interpreted import HAS_TRITON, PYTHON_DIR, REQUIRED, check_interpreted

sys.path.insert(0, PYTHON_DIR)
import modeling_bam as mb  # noqa: E402
from configuration_bam import BamConfig  # noqa: E402

# Each case: (rows as [B, T], D, x dtype, weight dtype, unit offset). 96 and 1000 are not powers of two
# (masked lanes); 37 * 2 rows are not a multiple of a block of rows, nor of the backward's 8 blocks.
CASES = [
    ([2, 37], 64, "float32", "float32", False),
    ([3, 7], 96, "bfloat16", "bfloat16", False),
    ([1, 5], 80, "bfloat16", "float32", False),
    ([2, 33], 48, "float16", "float16", True),
    ([1, 9], 1000, "float32", "float32", True),
    ([4, 300], 128, "float32", "float32", False),
]

# In the child: the kernels' outputs and the torch path's, each as its error against norm_fn in float64;
# dy is a transposed view, as a gradient may be.
CHILD = r"""
results = []
for rows, D, xd, wd, offset in CASES:
    xdt, wdt = getattr(torch, xd), getattr(torch, wd)
    eps = float(torch.empty(1).uniform_(1e-6, 1e-2, generator=g))
    x = (torch.randn(*rows, D, generator=g) * torch.rand(*rows, 1, generator=g) * 4).to(xdt)
    w = (torch.randn(D, generator=g) * 0.5 + (0.0 if offset else 1.0)).to(wdt)
    out_dtype = xdt if offset else torch.promote_types(wdt, xdt)
    dy = torch.randn(D, *rows[::-1], generator=g).to(out_dtype).permute(2, 1, 0)  # not contiguous

    def torch_path(x, w, dy):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = mb.norm_fn(x, w, None, "rms", eps, offset)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    ref = torch_path(x.double(), w.double(), dy.double())
    mine = torch_path(x, w, dy)
    y, rstd = mb._rms_norm_triton_fwd(x, w, eps, offset)
    dx, dw = mb._rms_norm_triton_bwd(x, w, rstd, dy, offset)
    # without the offset, y = w * n and dw sums dy * n over rows, with n rounded to x's dtype first: each n
    # may round either way in the kernel and the torch ops (by one ulp of x's dtype)
    x64 = x.double()
    n = (x64 * (x64.pow(2).mean(-1, keepdim=True) + eps).rsqrt()).abs() * (0 if offset else torch.finfo(xdt).eps)
    rounding = dict(y=(n * w.double().abs()).max().item(), dx=0.0, dw=(n * dy.double().abs()).sum((0, 1)).max().item())
    for name, k, t, r in zip(("y", "dx", "dw"), (y, dx, dw), mine, ref):
        ulp = max(torch.finfo(k.dtype).eps * r.abs().max().item(), rounding[name])
        results.append(compared([rows, D, xd, wd, offset, name], k, t, r, ulp))
print(json.dumps(results))
"""


@unittest.skipUnless(HAS_TRITON or REQUIRED, "needs triton (requirements-dev.txt)")
class TestNormKernelInterpreted(unittest.TestCase):
    def test_kernels_are_as_close_as_the_torch_ops(self):
        check_interpreted(self, CHILD, CASES, 3)


@unittest.skipUnless(torch.cuda.is_available() and HAS_TRITON, "needs CUDA and triton")
class TestNormKernelCuda(unittest.TestCase):
    def test_norm_forward_and_backward_equal_the_torch_path(self):
        g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
        for D, offset, dtype in (
            (1024, False, torch.float32),
            (2048, True, torch.bfloat16),
            (4000, False, torch.float32),
        ):
            with self.subTest(D=D, offset=offset, dtype=dtype):
                norm = mb.Norm(D, BamConfig(norm_unit_offset=offset, norm_eps=1e-5)).cuda()
                with torch.no_grad():
                    norm.weight.normal_(0.0 if offset else 1.0, 0.5, generator=g)
                x0 = torch.randn(4, 2048, D, device="cuda", generator=g).to(dtype)
                dy = torch.randn(x0.shape, device="cuda", generator=g).to(dtype)
                outs = []
                for fused in (True, False):
                    mb.FUSED["norm"] = fused
                    try:
                        self.assertEqual(norm.fused(x0), fused)
                        x = x0.clone().requires_grad_()
                        norm.weight.grad = None
                        y = norm(x)
                        y.backward(dy.to(y.dtype))
                        outs.append([t.double() for t in (y.detach(), x.grad, norm.weight.grad)])
                    finally:
                        mb.FUSED["norm"] = True
                for name, a, b in zip(("y", "dx", "dw"), *outs):
                    tol = 4 * torch.finfo(dtype).eps * b.abs().max().item()
                    self.assertLessEqual((a - b).abs().max().item(), tol, name)
                self.assertGreater(outs[0][2].abs().max().item(), 0)  # the gradient reaches the weight


if __name__ == "__main__":
    unittest.main()
