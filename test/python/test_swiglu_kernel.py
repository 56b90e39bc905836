"""The experts' SwiGLU kernels (modeling_bam._swiglu_triton_fwd / _bwd) against the torch ops they replace.

As test_norm_kernel.py: on CPU through Triton's interpreter (interpreted.py), on CUDA the compiled kernels
through gated_activation, forward and backward. Each output is compared with a float64 reference and must
be as close to it as the torch path in the same dtype is (twice its error, plus one ulp of the output).
"""

import sys
import unittest

import torch
import torch.nn.functional as F
from interpreted import HAS_TRITON, PYTHON_DIR, REQUIRED, check_interpreted

sys.path.insert(0, PYTHON_DIR)
import modeling_bam as mb  # noqa: E402

# Each case: (rows, I, dtype). R x I is not a multiple of the kernel's block (masked tail) and I is not a
# power of two, so rows straddle the blocks.
CASES = [
    (37, 96, "float32"),
    (33, 2816 // 16, "bfloat16"),
    (5, 1000, "bfloat16"),
    (64, 48, "float16"),
]

# In the child: the kernels' outputs and the torch path's (silu(gate) * up by F.silu and a product), each as
# its error against the torch path in float64; dout is a transposed view, as a gradient may be. Both round an
# intermediate to the dtype (silu(gate) forward; dout * up and silu(gate) backward) from float32 values that
# may differ in their last bit, so that rounding may go the other way: two ulps of the output, not one.
CHILD = r"""
import torch.nn.functional as F
results = []
for rows, I, dt in CASES:
    dtype = getattr(torch, dt)
    gu = (torch.randn(rows, 2 * I, generator=g) * 3).to(dtype)
    dout = torch.randn(I, rows, generator=g).to(dtype).t()

    def torch_path(gu, dout):
        gu = gu.clone().requires_grad_()
        gate, up = gu.chunk(2, -1)
        y = F.silu(gate) * up
        y.backward(dout)
        return y.detach(), gu.grad

    ref = torch_path(gu.double(), dout.double())
    mine = torch_path(gu, dout)
    y = mb._swiglu_triton_fwd(gu)
    dgu = mb._swiglu_triton_bwd(gu, dout)
    for name, k, t, r in zip(("y", "dgu"), (y, dgu), mine, ref):
        results.append(compared([rows, I, dt, name], k, t, r, 2 * torch.finfo(k.dtype).eps * r.abs().max().item()))
print(json.dumps(results))
"""


@unittest.skipUnless(HAS_TRITON or REQUIRED, "needs triton (requirements-dev.txt)")
class TestSwigluKernelInterpreted(unittest.TestCase):
    def test_kernels_are_as_close_as_the_torch_ops(self):
        check_interpreted(self, CHILD, CASES, 2)


@unittest.skipUnless(torch.cuda.is_available() and HAS_TRITON, "needs CUDA and triton")
class TestSwigluKernelCuda(unittest.TestCase):
    def test_gated_activation_equals_the_torch_ops(self):
        g = torch.Generator(device="cuda").manual_seed(0)
        gu = (torch.randn(4099, 2 * 2816, device="cuda", generator=g) * 3).bfloat16()
        dout = torch.randn(4099, 2816, device="cuda", generator=g).bfloat16()
        outs = {}
        for fused in (True, False):
            mb.FUSED["swiglu"] = fused
            x = gu.clone().requires_grad_()
            y = mb.gated_activation(x, F.silu)
            y.backward(dout)
            outs[fused] = y.detach(), x.grad
        mb.FUSED["swiglu"] = True
        for k, t in zip(outs[True], outs[False]):  # the same roundings: equal but for a last-bit exp or sigmoid
            torch.testing.assert_close(k, t, rtol=1e-2, atol=1e-2)


if __name__ == "__main__":
    unittest.main()
