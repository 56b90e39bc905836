"""The loss's cross-entropy kernel (modeling_bam._cross_entropy_triton) against the torch ops it replaces.

As test_norm_kernel.py: on CPU through Triton's interpreter (interpreted.py), on CUDA the compiled kernel
through linear_cross_entropy, forward and backward. The summed loss and the gradient it writes over the
logits are compared with a float64 reference and must be as close to it as the torch path in the same
dtypes is (twice its error, plus one ulp of the output dtype).
"""

import sys
import unittest

import torch
from interpreted import HAS_TRITON, PYTHON_DIR, REQUIRED, check_interpreted

sys.path.insert(0, PYTHON_DIR)
import modeling_bam as mb  # noqa: E402

# Each case: (rows, vocabulary, logits dtype, logit scale). 320 and 5000 are not powers of two (masked lanes);
# 5000 and 9000 take two and three blocks of the kernel's 4096 columns (the running max and sum).
CASES = [
    (7, 320, "float32", 1.0),
    (33, 5000, "bfloat16", 1.0),
    (5, 9000, "bfloat16", 0.0625),
    (16, 4096, "float16", 1.0),
    (3, 1000, "float32", 2.5),
]

# In the child: the kernel's loss and gradient and the torch path's, each as its error against the torch path
# in float64; some rows are ignored (-100) and the logits spread wide, so exp overflows without the max. Both
# compute a row's logsumexp in float32, each within an ulp or so of it: each row's loss may differ by that,
# and the gradient exp(s z - lse) by that much relatively, on top of one ulp of the output.
CHILD = r"""
results = []
for rows, V, zd, scale in CASES:
    dt = getattr(torch, zd)
    z = (torch.randn(rows, V, generator=g) * torch.rand(rows, 1, generator=g) * 30).to(dt)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    mb.FUSED["loss"] = False
    ref_loss, ref_grad = mb._cross_entropy_and_grad(z.double(), labels, scale)
    torch_loss, torch_grad = mb._cross_entropy_and_grad(z, labels, scale)
    zk = z.clone()
    loss = mb._cross_entropy_triton(zk, labels, scale).sum()
    lse_err = 2 * torch.finfo(torch.float32).eps * torch.logsumexp(z.double() * scale, -1).abs().max().item()
    lse_terms = dict(loss=lse_err * (labels != -100).sum().item(), grad=lse_err * ref_grad.abs().max().item())
    for name, k, t, r in (("loss", loss, torch_loss, ref_loss), ("grad", zk, torch_grad.to(dt), ref_grad)):
        ulp = torch.finfo(k.dtype).eps * r.abs().max().item() + lse_terms[name]
        results.append(compared([rows, V, zd, scale, name], k, t, r, ulp,
                                ignored_zero=bool((zk[labels == -100] == 0).all())))
print(json.dumps(results))
"""


@unittest.skipUnless(HAS_TRITON or REQUIRED, "needs triton (requirements-dev.txt)")
class TestLossKernelInterpreted(unittest.TestCase):
    def test_kernel_is_as_close_as_the_torch_ops(self):
        check_interpreted(
            self, CHILD, CASES, 2, lambda r: self.assertTrue(r["ignored_zero"], "an ignored row's gradient is not zero")
        )


@unittest.skipUnless(torch.cuda.is_available() and HAS_TRITON, "needs CUDA and triton")
class TestLossKernelCuda(unittest.TestCase):
    def test_linear_cross_entropy_matches_the_logits(self):
        """Kernel and torch ops (both accumulating the weight's gradient by addmm into float32) against the
        head's logits then F.cross_entropy, under bf16 autocast: the loss and both gradients."""
        g = torch.Generator(device="cuda").manual_seed(0)
        N, H, V = 3000, 256, 32000  # two chunks of chunk_rows(32000) = 2097 rows
        h = torch.randn(N, H, device="cuda", generator=g)
        w = torch.randn(V, H, device="cuda", generator=g) * 0.2
        labels = torch.randint(0, V, (N,), device="cuda", generator=g)
        labels[::7] = -100
        outs = {}
        for path in ("kernel", "torch ops", "logits"):
            mb.FUSED["loss"] = path == "kernel"
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if path == "logits":
                    loss = torch.nn.functional.cross_entropy(
                        (hh @ ww.t()).float(), labels, ignore_index=-100, reduction="sum"
                    )
                else:
                    loss = mb.linear_cross_entropy(hh, ww, None, labels)
            loss.backward()
            outs[path] = loss.detach(), hh.grad, ww.grad
        mb.FUSED["loss"] = True
        for path in ("kernel", "torch ops"):
            for name, k, t in zip(("loss", "grad h", "grad w"), outs[path], outs["logits"]):
                with self.subTest(path=path, tensor=name):
                    torch.testing.assert_close(k, t, rtol=2e-2, atol=1e-2 * t.abs().max().item())


if __name__ == "__main__":
    unittest.main()
