"""Runs a Triton kernel test's child script through Triton's interpreter, on CPU.

TRITON_INTERPRET=1 must be set before modeling_bam imports Triton, so the script runs in a child process.
There torch.empty and torch.empty_like fill with NaN, so an element a kernel never writes fails the
comparison. The child gets `mb` (modeling_bam), a seeded generator `g`, the cases as `CASES` and `compared`
(one output's record), and prints its results as JSON. Triton comes with CUDA builds of torch; on CPU it is
a test requirement (requirements-dev.txt): in CI (BAM_REQUIRE_PYTHON set) a missing Triton fails instead of
skipping.
"""

import importlib.util
import json
import os
import subprocess
import sys

HAS_TRITON = importlib.util.find_spec("triton") is not None
REQUIRED = bool(os.environ.get("BAM_REQUIRE_PYTHON"))
PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")

PRELUDE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import modeling_bam as mb
empty, empty_like = torch.empty, torch.empty_like
torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
torch.empty_like = lambda *a, **k: empty_like(*a, **k).fill_(float("nan"))
g = torch.Generator().manual_seed(int(sys.argv[2]))
CASES = json.loads(sys.argv[3])


# one kernel output's record for assert_as_close_as_torch: its error and the torch path's (mine, in the same
# dtypes) against the float64 reference ref, and the allowance ulp
def compared(case, kernel, mine, ref, ulp, **extra):
    return dict(case=case, dtype=str(kernel.dtype), want_dtype=str(mine.dtype), nan=bool(kernel.isnan().any()),
                err=(kernel.double() - ref).abs().max().item(), torch_err=(mine.double() - ref).abs().max().item(),
                ulp=ulp, **extra)
"""


def run_interpreted(test, body, cases):
    """Runs PRELUDE + body with a fresh random seed. -> (seed, the child's JSON results)"""
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-c", PRELUDE + body, PYTHON_DIR, str(seed), json.dumps(cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    test.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    return seed, json.loads(proc.stdout)


def check_interpreted(test, body, cases, outputs, check=None):
    """Runs body (its results made by `compared`, `outputs` per case) and checks each result with
    assert_as_close_as_torch, then with check(result) when given."""
    seed, results = run_interpreted(test, body, cases)
    test.assertEqual(len(results), len(cases) * outputs)
    for r in results:
        with test.subTest(case=r["case"], seed=seed):
            assert_as_close_as_torch(test, r)
            if check is not None:
                check(r)


def assert_as_close_as_torch(test, result):
    """One output of a child's results: every element written, the torch path's dtype, and at most twice the
    torch path's error against float64 plus one ulp (`ulp`) of the output."""
    test.assertFalse(result["nan"], "an output element was never written")
    test.assertEqual(result["dtype"], result["want_dtype"])
    test.assertLessEqual(result["err"], 2 * result["torch_err"] + result["ulp"])
