"""The peer rows of bench/train/bench_train.py on CPU with a tiny shape: transformers' own Mixtral and
Qwen3-MoE, trained from the native folder synthetic.write_native writes of our BTX folder, compute our
model's function (same logits, same first loss on the same batch), learn, and run as benchmark rows."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (os.path.join(REPO, "scripts"), os.path.join(REPO, "bench", "train")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_train  # noqa: E402
import peer  # noqa: E402
import synthetic  # noqa: E402

from bamtrain import folder, trainer  # noqa: E402

try:
    import transformers
except ImportError:
    transformers = None

NODE = shutil.which("node")
CLI = os.path.join(REPO, "dist", "src", "cli", "main.js")
SEEDS = {"mixtral": {}, "qwen3moe": synthetic.QWEN3_SEEDS}  # family -> the seed family its format holds


def setUpModule():
    global TMP
    TMP = tempfile.mkdtemp(prefix="bam-peer-")


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def bench(*rows, extra=()):
    with contextlib.redirect_stdout(io.StringIO()):
        return bench_train.main(
            ["--out", os.path.join(TMP, "out"), "--tiny", "--cache-dir", os.path.join(TMP, "cache")]
            + ["--rows", ",".join(rows), "--seq-len", "32", "--steps", "1", "--profile", ""]
            + list(extra)
        )


@unittest.skipIf(transformers is None, "transformers is not installed")
class TestPeer(unittest.TestCase):
    def test_every_experts_implementation_of_transformers_has_its_rows(self):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        self.assertEqual(set(peer.EXPERTS_IMPLEMENTATIONS), {"eager"} | set(ALL_EXPERTS_FUNCTIONS))
        for family in peer.FAMILIES:
            for impl in peer.EXPERTS_IMPLEMENTATIONS:
                self.assertIn(f"hf-{family}-{impl}-compile", bench_train.ROWS)

    def test_same_weights_same_function_and_the_peer_learns(self):
        """Our model on the BTX folder and transformers' on its native export: the same logits; one
        backward of the peer's own loss reaches every parameter (experts and routers included)."""
        x = torch.randint(0, synthetic.TINY_SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
        for family, spec in peer.FAMILIES.items():
            with self.subTest(family=family):
                shape = dict(synthetic.TINY_SHAPE, **SEEDS[family])
                bam = synthetic.write_folder(os.path.join(TMP, f"btx-{family}"), shape, synthetic.BTX)
                path = synthetic.write_native(bam, spec["fmt"], bam + "-native")
                with open(os.path.join(path, "config.json")) as f:
                    self.assertEqual(json.load(f)["model_type"], spec["fmt"])
                ours = folder.load_model(bam)[0]
                model = peer.load(path, family, "eager", torch.device("cpu"))
                with torch.no_grad():
                    want = ours(input_ids=x, labels=x, use_cache=False)
                got = model(input_ids=x, labels=x)
                err = (got["logits"] - want["logits"]).abs().max().item()
                self.assertLess(err, 1e-5 * want["logits"].abs().max().item())
                self.assertAlmostEqual(got["nll"].item(), want["nll"].item(), places=5)
                self.assertGreater(got["lb_loss"].item(), 0)
                got["loss"].backward()
                for name, p in model.named_parameters():
                    self.assertTrue(p.grad is not None and bool(p.grad.abs().sum() > 0), name)

    @unittest.skipUnless(NODE and os.path.exists(CLI), "needs node and the built CLI (npm run build)")
    def test_the_native_folder_is_what_bam_upcycle_format_writes(self):
        """synthetic.write_native of a BTX-layout BAM folder from `bam upcycle` is that command's own --format
        mixtral / qwen3-moe folder: the same tensors, bit for bit, and the same config as transformers reads it."""
        for family, spec in peer.FAMILIES.items():
            with self.subTest(family=family):
                seeds = [
                    os.path.join(REPO, "fixtures", "mistral" if family == "mixtral" else "qwen3", v)
                    for v in ("base", "code", "math")
                ]
                native_fmt = spec["fmt"].replace("_", "-")  # the CLI's spelling
                out = {}
                for fmt in ("bam", native_fmt):
                    out[fmt] = os.path.join(TMP, f"cli-{family}-{fmt}")
                    subprocess.run(
                        [NODE, CLI, "upcycle", *seeds, "-o", out[fmt], "--format", fmt, "--attention", "merged"]
                        + ["--block", "sequential", "--norm-topk-prob", "--seed", "3"],
                        check=True,
                        capture_output=True,
                    )
                ours = synthetic.write_native(out["bam"], spec["fmt"], os.path.join(TMP, f"py-{family}"))
                want = folder.read_weights(out[native_fmt])
                got = folder.read_weights(ours)
                self.assertEqual(sorted(got), sorted(want))
                for name, t in want.items():
                    self.assertEqual(got[name].dtype, t.dtype, name)
                    self.assertTrue(torch.equal(got[name], t), name)
                configs = [transformers.AutoConfig.from_pretrained(path).to_dict() for path in (ours, out[native_fmt])]
                for c in configs:
                    c.pop("_name_or_path")
                self.assertEqual(configs[0], configs[1])

    def test_peer_rows_run_and_start_from_our_loss(self):
        res = bench("btx", "hf-mixtral-eager", "hf-mixtral-grouped_mm", "btx-qwen3", "hf-qwen3moe-batched_mm")
        rows = {r["row"]: r for r in res["rows"]}
        for r in rows.values():
            self.assertGreater(r["tokens_per_s"], 0, r)
            self.assertEqual(r["flops_per_token"], rows["btx"]["flops_per_token"])  # one count for all
        for ours, peers in (
            ("btx", ["hf-mixtral-eager", "hf-mixtral-grouped_mm"]),
            ("btx-qwen3", ["hf-qwen3moe-batched_mm"]),
        ):
            for name in peers:  # same weights, same batch: the same cross-entropy
                self.assertAlmostEqual(rows[name]["nll_first"], rows[ours]["nll_first"], places=5)
        best = res["best_peer"]["mixtral"]
        self.assertIn(best, ("hf-mixtral-eager", "hf-mixtral-grouped_mm"))
        self.assertAlmostEqual(
            res["ratios"][f"btx / {best} tokens/s"], rows["btx"]["tokens_per_s"] / rows[best]["tokens_per_s"]
        )
        self.assertEqual(res["models"]["mixtral"]["flops_per_token"], res["models"]["btx"]["flops_per_token"])
        with open(os.path.join(TMP, "out", "train_bench.json")) as f:
            self.assertEqual(len(json.load(f)["rows"]), 5)

    def test_a_row_out_of_memory_at_every_micro_batch_is_recorded(self):
        """Recorded, not a crash; its compile row is skipped (it would search the same micro-batches again)."""

        def oom(self, micro_batches, lr):
            raise RuntimeError("CUDA out of memory (simulated)")

        with mock.patch.object(trainer.Trainer, "step", oom):
            res = bench(
                "btx",
                "hf-mixtral-eager",
                "hf-mixtral-eager-compile",
                extra=["--micro-batch", "0", "--batch-candidates", "4,2"],
            )
        rows = {r["row"]: r for r in res["rows"]}
        for name in ("btx", "hf-mixtral-eager"):
            self.assertEqual(rows[name]["error"], "out of memory at every micro-batch (4,2)")
            self.assertEqual(rows[name]["oom"], [4, 2])
        self.assertEqual(
            rows["hf-mixtral-eager-compile"]["skipped"], "its eager row ran out of memory at every micro-batch"
        )
        self.assertEqual(res["ratios"], {})


if __name__ == "__main__":
    unittest.main()
