"""scripts/finetune.py on native folders (`bam upcycle --format mixtral | qwen3-moe`), checked against stock
transformers (MixtralForCausalLM / Qwen3MoeForCausalLM, no remote code):

- before training, the held-out NLL finetune logs at step 0 equals transformers' loss on the same blocks;
- after a few CPU steps, final/ is a folder of the same format (no modeling_bam.py) that transformers loads,
  whose logits equal our model's within float32 tolerance, and whose held-out NLL is the last logged one;
- the mapping (scripts/bamtrain/native.py) is one table read both ways: a folder's names and config
  survive the round trip unchanged.

Folders come from our CLI (skipped without node or `npm run build`); transformers is needed (in CI, with
BAM_REQUIRE_PYTHON set, a missing requirement fails the module).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (os.path.join(REPO, "scripts"), os.path.join(REPO, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import finetune  # noqa: E402

from bamtrain import data, folder, metrics, native  # noqa: E402

NODE = shutil.which("node")
CLI = os.path.join(REPO, "dist", "src", "cli", "main.js")
HAS_CLI = bool(NODE) and os.path.exists(CLI)
try:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False

# top-2 routing in both, so the gate matters: Mixtral renormalises, Qwen3-MoE here does not
CASES = {
    "mixtral": ("mistral", ["--format", "mixtral", "--norm-topk-prob"]),
    "qwen3_moe": ("qwen3", ["--format", "qwen3-moe", "--no-norm-topk-prob"]),
}
TMP = None
FOLDERS = {}
SPEC = [
    "--seq-len",
    "32",
    "--micro-batch",
    "2",
    "--global-batch",
    "4",
    "--eval-blocks",
    "2",
    "--no-plot",
    "--log-every",
    "1000",
    "--steps",
    "4",
    "--lr",
    "3e-3",
    "--eval-every",
    "0",
]


def setUpModule():
    global TMP
    if os.environ.get("BAM_REQUIRE_PYTHON") and not (HAS_CLI and HAS_TRANSFORMERS):
        raise RuntimeError("BAM_REQUIRE_PYTHON is set, but these tests would skip (node + dist, transformers)")
    TMP = tempfile.mkdtemp(prefix="bam-native-test-")
    np.save(os.path.join(TMP, "code.npy"), np.tile(np.arange(1, 40, dtype=np.uint16), 40))
    if not HAS_CLI:
        return
    for fmt, (family, flags) in CASES.items():
        fx = os.path.join(REPO, "fixtures", family)
        FOLDERS[fmt] = os.path.join(TMP, fmt)
        subprocess.run(
            [
                NODE,
                CLI,
                "upcycle",
                f"{fx}/base",
                f"{fx}/code",
                f"{fx}/math",
                "-o",
                FOLDERS[fmt],
                "--attention",
                "merged",
                "--block",
                "sequential",
                "--experts-per-token",
                "2",
                *flags,
            ],
            check=True,
            capture_output=True,
        )


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def held_out(model_dir):
    """The held-out batch finetune evaluates (code domain, 2 blocks of 32)."""
    config = folder.load_model(model_dir)[1]
    mixture = data.build_mixture([f"code={TMP}/code.npy"], [], model_dir, config, 32, 2, seed=0)
    ((_, refs),) = mixture.eval_sets()
    return mixture.batch(refs, eval=True)


@unittest.skipUnless(HAS_CLI and HAS_TRANSFORMERS, "needs node with the built CLI, and transformers")
class TestNativeFolders(unittest.TestCase):
    def test_finetune_reads_and_writes_each_native_format(self):
        for fmt, source in FOLDERS.items():
            with self.subTest(fmt):
                out = os.path.join(TMP, f"run-{fmt}")
                with contextlib.redirect_stdout(io.StringIO()):
                    code = finetune.main(["--model", source, "--out", out, "--data", f"code={TMP}/code.npy"] + SPEC)
                self.assertEqual(code, 0)
                evals = [
                    r["eval"]["code"]["nll"]
                    for r in metrics.read_jsonl(os.path.join(out, "train_log.jsonl"))
                    if "eval" in r
                ]
                x = held_out(source)
                with torch.no_grad():  # transformers' own loss: mean NLL of every predicted token
                    self.assertAlmostEqual(hf_model(source)(input_ids=x, labels=x).loss.item(), evals[0], places=5)

                final = os.path.join(out, "final")
                self.assertEqual(folder.read_config(final)["model_type"], fmt)
                self.assertFalse(os.path.exists(os.path.join(final, "modeling_bam.py")))
                self.assertTrue(os.path.exists(os.path.join(final, "tokenizer.json")))
                with open(os.path.join(final, "README.md")) as f:
                    self.assertIn("no remote code", f.read())
                hf, ours = hf_model(final), folder.load_model(final)[0].eval()
                ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    torch.testing.assert_close(
                        hf(input_ids=ids).logits, ours(input_ids=ids, use_cache=False)["logits"], atol=1e-5, rtol=0
                    )
                    self.assertAlmostEqual(hf(input_ids=x, labels=x).loss.item(), evals[-1], places=5)
                self.assertLess(evals[-1], evals[0])  # it trained: the held-out NLL moved down
                before, after = folder.read_weights(source), folder.read_weights(final)
                self.assertEqual(sorted(before), sorted(after))  # the same tensor names as the input
                router = next(k for k in before if k.endswith(".gate.weight"))
                self.assertFalse(torch.equal(before[router], after[router]))  # and the routers learned

    def test_the_mapping_round_trips(self):
        for fmt, source in FOLDERS.items():
            with self.subTest(fmt):
                config, state = folder.read_config(source), folder.read_weights(source)
                bam = native.to_bam_config(fmt, config, source)
                self.assertEqual(native.to_native_config(fmt, bam, config), config)
                names = native.to_bam_state(fmt, state)
                self.assertFalse([k for k in names if "self_attn" in k or ".gate." in k or "block_sparse" in k])
                self.assertEqual(list(native.to_native_state(fmt, names)), list(state))

    def test_a_folder_bam_cannot_hold_is_refused_in_one_line(self):
        source = FOLDERS["qwen3_moe"]
        bad = os.path.join(TMP, "sparse-step")
        shutil.copytree(source, bad)
        config = folder.read_config(bad)
        config["decoder_sparse_step"] = 2
        with open(os.path.join(bad, "config.json"), "w") as f:
            json.dump(config, f)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = finetune.main(
                ["--model", bad, "--out", os.path.join(TMP, "run-bad"), "--data", f"code={TMP}/code.npy"] + SPEC
            )
        self.assertEqual(code, 1)
        self.assertRegex(stderr.getvalue(), r"config.json: decoder_sparse_step is 2; finetune.py reads qwen3_moe")
        self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1)


if __name__ == "__main__":
    unittest.main()
