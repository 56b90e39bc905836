"""The lever rows of bench/train/bench_train.py on CPU with a tiny shape: the fused loss's baseline
(bam-logits) and bf16 parameters with float32 master weights (bam-fsdp-bf16, FSDP2 in a group of one) train
the same model from the same first loss as the bam row, and the JSON gives each lever's ratio."""

import contextlib
import io
import os
import shutil
import sys
import tempfile
import unittest

import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (os.path.join(REPO, "scripts"), os.path.join(REPO, "bench", "train")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_train  # noqa: E402

from bamtrain import parallel  # noqa: E402


class TestLeverRows(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="bam-levers-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    @unittest.skipUnless(parallel.fsdp_available(), "FSDP2 needs torch >= 2.6")
    def test_lever_rows_train_the_same_model(self):
        argv = ["--out", os.path.join(self.tmp, "out"), "--tiny", "--cache-dir", os.path.join(self.tmp, "cache")]
        argv += ["--rows", "bam,bam-logits,bam-fsdp-bf16", "--seq-len", "32", "--steps", "1", "--profile", ""]
        with contextlib.redirect_stdout(io.StringIO()):
            res = bench_train.main(argv)
        rows = {r["row"]: r for r in res["rows"]}
        self.assertEqual([rows[n]["fused_loss"] for n in ("bam", "bam-logits")], [True, False])
        self.assertEqual(rows["bam-fsdp-bf16"]["fsdp_param_dtype"], "torch.bfloat16")
        self.assertIsNone(rows["bam"]["fsdp_param_dtype"])
        # the same batch and weights: the logits' loss exactly, bf16 parameters to bf16 rounding
        self.assertAlmostEqual(rows["bam-logits"]["nll_first"], rows["bam"]["nll_first"], places=5)
        self.assertNotEqual(rows["bam-fsdp-bf16"]["nll_first"], rows["bam"]["nll_first"])
        self.assertAlmostEqual(rows["bam-fsdp-bf16"]["nll_first"], rows["bam"]["nll_first"], delta=0.05)
        for lever, base in (("bam", "bam-logits"), ("bam-fsdp-bf16", "bam")):
            self.assertAlmostEqual(
                res["ratios"][f"{lever} / {base} tokens/s"], rows[lever]["tokens_per_s"] / rows[base]["tokens_per_s"]
            )
        self.assertFalse(dist.is_initialized())  # the rows' process group is shut down with the run


class TestIsolatedRows(unittest.TestCase):
    def test_each_row_runs_in_its_own_process(self):
        """--isolate: every row in a fresh process (not this one), its result and profile where an in-process
        row's go, and the ratios over them as in-process."""
        tmp = tempfile.mkdtemp(prefix="bam-isolate-")
        self.addCleanup(shutil.rmtree, tmp, True)
        out = os.path.join(tmp, "out")
        argv = ["--out", out, "--tiny", "--cache-dir", os.path.join(tmp, "cache"), "--isolate", "--profile", "bam"]
        argv += ["--rows=bam,dense", "--seq-len", "32", "--steps", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            res = bench_train.main(argv)
        rows = {r["row"]: r for r in res["rows"]}
        self.assertEqual(set(rows), {"bam", "dense"})
        processes = {rows[n]["process"] for n in rows}
        self.assertEqual(len(processes), 2)
        self.assertNotIn(os.getpid(), processes)
        self.assertTrue(os.path.exists(os.path.join(out, "profile_bam.txt")))
        self.assertAlmostEqual(
            res["ratios"]["bam / dense tokens/s"], rows["bam"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
        )

    def test_the_child_gets_its_row_and_no_isolate(self):
        argv = ["--out", "o", "--rows", "a,b", "--isolate", "--tiny", "--time-budget=9", "--seq-len", "32"]
        rest = bench_train.without_options(argv, {"--rows", "--out", "--time-budget"}, {"--isolate"})
        self.assertEqual(rest, ["--tiny", "--seq-len", "32"])


if __name__ == "__main__":
    unittest.main()
