"""Rope's Triton kernel (modeling_bam._rope_triton) against rope's torch ops (modeling_bam._rope).

On CPU, through Triton's interpreter (interpreted.py): the kernel's indexing, masks and strides on every
layout the model hands it. On CUDA, the compiled kernel, forward and backward, through apply_rope.
"""

import os
import sys
import unittest

import torch
from interpreted import HAS_TRITON, PYTHON_DIR, REQUIRED, run_interpreted

sys.path.insert(0, PYTHON_DIR)
import modeling_bam as mb  # noqa: E402
from configuration_bam import BamConfig  # noqa: E402

# Each case: (style, rotary_dim, head_dim, heads, T, cos batch, dtype). Partial rotary dims pass the rest
# through; 12 and 6 are not powers of two (masked lanes); T = 37 is not a multiple of the position block.
CASES = [
    ("half", 16, 16, 3, 37, 2, "float32"),
    ("half", 16, 16, 3, 37, 1, "bfloat16"),
    ("half", 12, 16, 2, 20, 2, "float16"),
    ("interleaved", 16, 16, 3, 37, 2, "float32"),
    ("interleaved", 6, 16, 2, 9, 1, "bfloat16"),
]

# In the child: every case, forward (sign 1) and inverse (sign -1), on x laid out as the model's q and k
# (a slice of the q/k/v projections' [B, T, ...], as [B, heads, T, D]), as a dense transposed tensor and
# as a contiguous x (a gradient). The output must be dense in x's dim order, as the torch path's.
CHILD = r"""
from configuration_bam import BamConfig
results = []
for style, rot, D, heads, T, cb, dtype in CASES:
    c = BamConfig(hidden_size=heads * D, num_attention_heads=heads, head_dim=D, rotary_dim=rot, rope_style=style)
    B = 2
    pos = torch.randint(0, 500, (cb, T), generator=g)
    cos, sin = mb.rope_cos_sin(c, pos)
    for layout in ("projection", "transposed", "contiguous"):
        x = torch.randn(B, T, heads, D, generator=g).to(getattr(torch, dtype))
        if layout == "projection":  # q of [B, T, q | k | v]
            qkv = torch.randn(B, T, 3 * heads * D, generator=g).to(x.dtype)
            x = qkv[..., : heads * D].view(B, T, heads, D)
        x = x.transpose(1, 2) if layout != "contiguous" else x.transpose(1, 2).contiguous()
        dense_order = sorted(range(4), key=lambda i: -x.stride(i))
        for sign in (1, -1):
            got = mb._rope_triton(x, cos, sin, style, sign)
            want = mb._rope(x, cos.expand(B, -1, -1, -1), sin * sign, style)
            err = (got.double() - want.double()).abs().max().item()
            ulp = torch.finfo(x.dtype).eps * max(got.double().abs().max().item(), want.double().abs().max().item())
            results.append(dict(case=[style, rot, dtype, layout, sign], err=err, ulp=ulp, shape=list(got.shape),
                                layout=[sorted(range(4), key=lambda i: -t.stride(i)) == dense_order
                                        and t.permute(*dense_order).is_contiguous() for t in (got, want)],
                                nan=bool(got.isnan().any())))
print(json.dumps(results))
"""


@unittest.skipUnless(HAS_TRITON or REQUIRED, "needs triton (requirements-dev.txt)")
class TestRopeKernelInterpreted(unittest.TestCase):
    def test_kernel_equals_the_torch_rotation(self):
        seed, results = run_interpreted(self, CHILD, CASES)
        self.assertEqual(len(results), len(CASES) * 6)
        for r in results:
            with self.subTest(case=r["case"], seed=seed):
                self.assertFalse(r["nan"], "an output element was never written")
                self.assertEqual(r["layout"], [True, True])  # dense in x's dim order, kernel and torch ops
                # the same float32 products; a fused multiply-add may round once less, and the output's
                # rounding may then go the other way: one ulp of the output dtype, at most eps * |output|
                self.assertLessEqual(r["err"], r["ulp"])


@unittest.skipUnless(torch.cuda.is_available() and HAS_TRITON, "needs CUDA and triton")
class TestRopeKernelCuda(unittest.TestCase):
    def test_forward_and_backward_equal_the_torch_path(self):
        g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
        for style, rot, D, heads, T, cb, dtype in CASES + [("half", 64, 64, 64, 2048, 1, "bfloat16")]:
            with self.subTest(style=style, rot=rot, dtype=dtype, T=T):
                kw = dict(num_attention_heads=heads, head_dim=D, rotary_dim=rot, rope_style=style)
                c = BamConfig(hidden_size=heads * D, **kw)
                cos, sin = mb.rope_cos_sin(c, torch.randint(0, 4096, (cb, T), device="cuda", generator=g))
                x0 = torch.randn(2, T, heads, D, device="cuda", generator=g).to(getattr(torch, dtype))
                gy = torch.randn(2, heads, T, D, device="cuda", generator=g).to(x0.dtype)
                outs = []
                for fused in (True, False):
                    mb.FUSED["rope"] = fused
                    try:
                        x = x0.clone().requires_grad_()
                        y = mb.apply_rope(x.transpose(1, 2), cos, sin, style)
                        y.backward(gy)
                        outs.append((y.detach().double(), x.grad.double().transpose(1, 2)))
                    finally:
                        mb.FUSED["rope"] = True
                (y1, g1), (y2, g2) = outs
                eps = torch.finfo(x0.dtype).eps
                self.assertLessEqual((y1 - y2).abs().max().item(), eps * y2.abs().max().item())
                self.assertLessEqual((g1 - g2).abs().max().item(), eps * g2.abs().max().item())
                self.assertGreater(g1.abs().max().item(), 0)  # the gradient reaches x


if __name__ == "__main__":
    unittest.main()
