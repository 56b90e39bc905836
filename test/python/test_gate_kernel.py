"""The attention experts' gate-weighting kernels (modeling_bam._gate_triton_fwd / _bwd) against the torch ops
they replace (y * g[..., None].to(y.dtype)).

As test_norm_kernel.py: on CPU through Triton's interpreter (interpreted.py), on CUDA the compiled kernels
through weigh_by_gate, forward and backward. Each output is compared with a float64 reference and must be as
close to it as the torch path in the same dtypes is (twice its error, plus one ulp of the output).
"""

import sys
import unittest

import torch
from interpreted import HAS_TRITON, PYTHON_DIR, REQUIRED, check_interpreted

sys.path.insert(0, PYTHON_DIR)
import modeling_bam as mb  # noqa: E402

# Each case: ([B, T, E], C, y dtype). C is not always a power of two (masked lanes), and B * T * E rows are
# not a multiple of a block of rows.
CASES = [
    ([2, 37, 4], 64, "float32"),
    ([3, 7, 2], 96, "bfloat16"),
    ([1, 33, 4], 1000, "bfloat16"),
    ([2, 5, 3], 48, "float16"),
]

# In the child: the kernels' outputs and the torch path's, each as its error against the torch path in
# float64 with g rounded to y's dtype (the rounding both make); g is a softmax, dout a transposed view, as a
# gradient may be.
CHILD = r"""
results = []
for shape, C, dt in CASES:
    dtype = getattr(torch, dt)
    y = (torch.randn(*shape, C, generator=g) * 3).to(dtype)
    gate = torch.randn(*shape, generator=g).softmax(-1)
    dout = torch.randn(C, *shape[::-1], generator=g).to(dtype).permute(3, 2, 1, 0)

    def torch_path(y, gate, dout, rounded):
        y, gate = y.clone().requires_grad_(), gate.clone().requires_grad_()
        out = y * gate[..., None].to(rounded).to(y.dtype)
        out.backward(dout)
        return out.detach(), y.grad, gate.grad

    ref = torch_path(y.double(), gate.double(), dout.double(), dtype)
    mine = torch_path(y, gate, dout, dtype)
    out = mb._gate_triton_fwd(y, gate)
    dy, dg = mb._gate_triton_bwd(y, gate, dout)
    for name, k, t, r in zip(("out", "dy", "dg"), (out, dy, dg), mine, ref):
        results.append(compared([shape, C, dt, name], k, t, r, torch.finfo(k.dtype).eps * r.abs().max().item()))
print(json.dumps(results))
"""


@unittest.skipUnless(HAS_TRITON or REQUIRED, "needs triton (requirements-dev.txt)")
class TestGateKernelInterpreted(unittest.TestCase):
    def test_kernels_are_as_close_as_the_torch_ops(self):
        check_interpreted(self, CHILD, CASES, 3)


@unittest.skipUnless(torch.cuda.is_available() and HAS_TRITON, "needs CUDA and triton")
class TestGateKernelCuda(unittest.TestCase):
    def test_weigh_by_gate_equals_the_torch_ops(self):
        g = torch.Generator(device="cuda").manual_seed(0)
        y = (torch.randn(2, 2049, 4, 1024, device="cuda", generator=g) * 3).bfloat16()
        gate = torch.randn(2, 2049, 4, device="cuda", generator=g).softmax(-1)
        dout = torch.randn(2, 2049, 4, 1024, device="cuda", generator=g).bfloat16()
        outs = {}
        for fused in (True, False):
            mb.FUSED["gate"] = fused
            yy, gg = y.clone().requires_grad_(), gate.clone().requires_grad_()
            out = mb.weigh_by_gate(yy, gg)
            out.backward(dout)
            outs[fused] = out.detach(), yy.grad, gg.grad
        mb.FUSED["gate"] = True
        self.assertTrue(torch.equal(outs[True][0], outs[False][0]))  # the same roundings forward
        self.assertTrue(torch.equal(outs[True][1], outs[False][1]))
        # the gate's gradient: the kernel sums float32 products, the torch ops sum products rounded to bf16 and
        # round the sum to bf16 (the cast's gradient), so the kernel's must be the closer to float64's
        ref = (dout.double() * y.double()).sum(-1)
        self.assertLessEqual((outs[True][2] - ref).abs().max().item(), (outs[False][2] - ref).abs().max().item())


if __name__ == "__main__":
    unittest.main()
