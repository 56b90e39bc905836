"""Tests of scripts/finetune.py, scripts/bamtrain and bench/train on CPU, in seconds:
python3 -m unittest test/python/test_finetune.py (also found by `discover -s test/python`).

The BAM folder comes from our own CLI (`node dist/src/cli/main.js upcycle` of the llama fixtures); tests
that need it skip without node or without `npm run build`. Tests that need FSDP2 and
torch.distributed.checkpoint (torch >= 2.6), the `tokenizers` package or transformers skip where those
are missing, except in CI (BAM_REQUIRE_PYTHON set, requirements.txt installed), where every test must run:
a missing requirement fails the module there.

- training lowers the loss; every logged statistic has its shape; the learning rate follows the schedule;
- the logged load-balance and z losses, FFN expert load and attention router weights equal a direct
  computation on the first batch (independent code, not the model's router_losses);
- a run stopped and resumed at step 3 logs the same losses, bit for bit, as an uninterrupted run (with
  router jitter and expert dropout on, so the RNG states matter);
- two processes with gloo: a 1-process checkpoint resumes in 2 processes (FSDP2 shards the model), their
  checkpoint resumes in 1, and every loss, held-out NLL and final weight equals the single-process run's
  within 1e-5 (float32 sums in another order: observed differences are ~5e-7);
- the final folder is the trained model: its held-out NLL equals the last logged one; it loads in the
  pure-torch core, in transformers (trust_remote_code) and in `bam inspect`;
- the data mixture, the FLOPs formula and the rope backward (the benchmark's loop experts: test_bench_loop.py).
"""

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (os.path.join(REPO, "scripts"), os.path.join(REPO, "python"), os.path.join(REPO, "bench", "train"), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bam_folder  # noqa: E402
import finetune  # noqa: E402

import modeling_bam as mb  # noqa: E402
from bamtrain import BamTrainError, ckpt, data, folder, metrics, parallel  # noqa: E402
from bamtrain.trainer import lr_at  # noqa: E402

NODE = shutil.which("node")
CLI = os.path.join(REPO, "dist", "src", "cli", "main.js")
HAS_CLI = bool(NODE) and os.path.exists(CLI)
NO_CLI = "needs node and the built CLI (npm run build)"
HAS_DIST = ckpt.dcp_available() and parallel.fsdp_available() and torch.distributed.is_available()
try:
    import tokenizers  # noqa: F401

    HAS_TOKENIZERS = True
except ImportError:
    HAS_TOKENIZERS = False
try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False

TMP = None
BAM = None  # the upcycled llama fixtures: 3 experts, moa, parallel
THREADS = None
COMMON = [
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
]


def setUpModule():
    global TMP, BAM, THREADS
    missing = [
        reason
        for ok, reason in (
            (HAS_CLI, NO_CLI),
            (HAS_DIST, "FSDP2 and DCP (torch >= 2.6)"),
            (HAS_TOKENIZERS, "the tokenizers package"),
            (HAS_TRANSFORMERS, "transformers"),
        )
        if not ok
    ]
    if missing and os.environ.get("BAM_REQUIRE_PYTHON"):
        raise RuntimeError(f"BAM_REQUIRE_PYTHON is set, but these tests would skip: {'; '.join(missing)}")
    THREADS = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and forked ranks stay safe
    TMP = tempfile.mkdtemp(prefix="bam-finetune-test-")
    code = np.tile(np.arange(1, 40, dtype=np.uint16), 40)  # 1560 tokens: a counting pattern
    np.save(os.path.join(TMP, "code.npy"), code)
    pattern = np.random.default_rng(0).integers(1, 320, 13)
    pattern.astype(np.uint16).tofile(os.path.join(TMP, "math.bin"))  # two .bin files: an EOS between them
    np.tile(pattern, 60).astype(np.uint16).tofile(os.path.join(TMP, "math2.bin"))
    with open(os.path.join(TMP, "law.txt"), "w") as f:
        f.write("The court held that the contract was void for want of consideration. " * 40)
    if HAS_CLI:
        BAM = os.path.join(TMP, "bam3")
        fx = os.path.join(REPO, "fixtures", "llama")
        subprocess.run(
            [NODE, CLI, "upcycle", f"{fx}/base", f"{fx}/code", f"{fx}/math", "-o", BAM], check=True, capture_output=True
        )


def tearDownModule():
    torch.set_num_threads(THREADS)
    shutil.rmtree(TMP, ignore_errors=True)


def data_args():
    args = ["--data", f"code={TMP}/code.npy:0.5", f"math={TMP}/math.bin,{TMP}/math2.bin:0.5"]
    if HAS_TOKENIZERS:
        args[-1] = args[-1][:-4] + ":0.25"
        args.append(f"law={TMP}/law.txt:0.25")
    return args


def train(out, *extra):
    """finetune.main in this process, quietly. -> the JSONL records."""
    argv = ["--model", BAM, "--out", out] + data_args() + COMMON + list(extra)
    with contextlib.redirect_stdout(io.StringIO()):
        code = finetune.main(argv)
    assert code == 0, f"finetune.main exited {code}"
    return metrics.read_jsonl(os.path.join(out, "train_log.jsonl"))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def losses(records):
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, argv, port):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    sys.stdout = open(os.devnull, "w")
    finetune.main(argv)


def train_two_processes(out, *extra):
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported once here, not in every forked rank)
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.multiprocessing as tmp

    argv = ["--model", BAM, "--out", out] + data_args() + COMMON + list(extra)
    tmp.start_processes(_rank_main, args=(argv, free_port()), nprocs=2, start_method="fork")
    return metrics.read_jsonl(os.path.join(out, "train_log.jsonl"))


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestFinetune(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.out = os.path.join(TMP, "run")
        cls.steps = 12
        cls.log = train(
            cls.out, "--steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "6", "--save-every", "0"
        )

    def test_loss_decreases_and_everything_is_logged(self):
        train_recs = [r for r in self.log if "loss" in r]
        self.assertEqual([r["step"] for r in train_recs], list(range(1, self.steps + 1)))
        first, last = train_recs[0]["nll"], sum(r["nll"] for r in train_recs[-3:]) / 3
        self.assertLess(last, first - 0.5, [r["nll"] for r in train_recs])
        c = folder.read_config(BAM)
        L, E = c["num_hidden_layers"], c["num_experts"]
        for r in train_recs:
            for key in ("ffn_load", "attn_weight"):
                self.assertEqual(np.array(r[key]).shape, (L, E), key)
                np.testing.assert_allclose(np.array(r[key]).sum(-1), np.ones(L), rtol=1e-5)
                want = [-sum(p * math.log(p) for p in row if p > 0) for row in r[key]]
                np.testing.assert_allclose(r[key + "_entropy"], want, rtol=1e-5, atol=1e-6)
            self.assertAlmostEqual(r["lr"], lr_at(r["step"], 3e-3, 2, self.steps, 0.1))
            self.assertGreater(r["grad_norm"], 0)
            self.assertGreater(r["tokens_per_s"], 0)
            self.assertIsNone(r["mfu"])  # no peak FLOP/s known for a CPU
            self.assertIsNone(r["mfu_causal"])
            self.assertAlmostEqual(r["loss"], r["nll"] + 0.01 * r["lb_loss"] + 0.001 * r["z_loss"], places=5)
            self.assertEqual(sum(r["domains"].values()), 4)
        self.assertAlmostEqual(train_recs[-1]["lr"], 3e-4)  # cosine down to 10% of the peak
        evals = [r for r in self.log if "eval" in r]
        self.assertEqual([r["step"] for r in evals], [0, 6, 12])  # step 0: the upcycled model's baseline
        self.assertEqual(set(evals[0]["eval"]), {"code", "math"} | ({"law"} if HAS_TOKENIZERS else set()))
        for name, v in evals[-1]["eval"].items():
            self.assertAlmostEqual(v["ppl"], math.exp(v["nll"]), places=4)
            self.assertLess(v["nll"], evals[0]["eval"][name]["nll"] + 0.5)
        args = read_json(os.path.join(self.out, "train_args.json"))
        self.assertEqual(args["accum"], 2)
        self.assertEqual(args["flops_per_token"], metrics.model_flops(c, 32)["flops_per_token"])

    def test_logged_router_losses_equal_a_direct_computation(self):
        """Step 1's logged lb, z, load and attention weights, recomputed from the first batch with the
        initial weights by code independent of the model's router_losses."""
        c = folder.read_config(BAM)
        E, k = c["num_experts"], c["num_experts_per_tok"]
        mixture = data.build_mixture(data_args()[1:], [], BAM, c, 32, 2, seed=0)
        refs = mixture.next_refs(4)
        model = bam_folder.load_folder(BAM).train()
        lb = z = 0.0
        load = attn = 0.0
        for half in (refs[:2], refs[2:]):  # the two micro-batches of the first step
            x = mixture.batch(half)
            with torch.no_grad():
                out = model(input_ids=x, labels=x, use_cache=False, output_router_logits=True)
            for al, fl in zip(out["attn_router_logits"], out["router_logits"]):
                al, fl = al.reshape(-1, E).double(), fl.double()
                z += (torch.logsumexp(al, -1) ** 2).mean() / 2 + (torch.logsumexp(fl, -1) ** 2).mean() / 2
                probs = fl.softmax(-1)
                chosen = probs.topk(k, -1).indices
                f = torch.stack([(chosen == e).double().sum() for e in range(E)]) / chosen.numel()
                lb += E * (f * probs.mean(0)).sum() / 2
            load = (
                load
                + torch.stack(
                    [
                        torch.stack([(fl.topk(k, -1).indices == e).double().mean() * 1.0 for e in range(E)])
                        for fl in out["router_logits"]
                    ]
                )
                / 2
            )
            attn = (
                attn
                + torch.stack([a.reshape(-1, E).double().softmax(-1).mean(0) for a in out["attn_router_logits"]]) / 2
            )
        r = [x for x in self.log if "loss" in x][0]
        self.assertEqual(r["step"], 1)
        self.assertAlmostEqual(r["lb_loss"], lb.item(), places=5)
        self.assertAlmostEqual(r["z_loss"], z.item(), places=4)
        np.testing.assert_allclose(r["ffn_load"], load.numpy(), atol=1e-6)
        np.testing.assert_allclose(r["attn_weight"], attn.numpy(), atol=1e-6)

    def test_final_folder_is_the_trained_model(self):
        final = os.path.join(self.out, "final")
        self.assertTrue(os.path.exists(os.path.join(final, "modeling_bam.py")))
        self.assertTrue(os.path.exists(os.path.join(final, "tokenizer.json")))
        model = bam_folder.load_folder(final)  # pure torch, strict names
        c = folder.read_config(final)
        mixture = data.build_mixture(data_args()[1:], [], BAM, c, 32, 2, seed=0)
        last_eval = [r for r in self.log if "eval" in r][-1]["eval"]
        for name, refs in mixture.eval_sets():
            x = mixture.batch(refs, eval=True)
            with torch.no_grad():
                nll = model(input_ids=x, labels=x, use_cache=False)["nll"].item()
            self.assertAlmostEqual(nll, last_eval[name]["nll"], places=5, msg=name)
        if HAS_TRANSFORMERS:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
            x = torch.randint(0, c["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch.testing.assert_close(
                    hf(x).logits, model(input_ids=x, use_cache=False)["logits"], atol=1e-5, rtol=0
                )
        run = subprocess.run([NODE, CLI, "inspect", final, "--json"], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        info = json.loads(run.stdout)
        self.assertIn("bam", json.dumps(info).lower())

    def test_resume_continues_bit_for_bit(self):
        extra = [
            "--steps",
            "6",
            "--lr",
            "3e-3",
            "--eval-every",
            "3",
            "--save-every",
            "3",
            "--router-jitter",
            "0.05",
            "--expert-dropout",
            "0.2",
            "--no-final",
        ]
        whole = train(os.path.join(TMP, "whole"), *extra)
        out = os.path.join(TMP, "parts")
        first = train(out, *extra, "--stop-after", "3")
        self.assertEqual(losses(first), losses(whole)[:3])
        self.assertTrue(os.path.exists(os.path.join(out, "checkpoints", "step_00000003", "trainer_state.json")))
        resumed = train(out, *extra, "--resume")
        self.assertEqual(losses(resumed), losses(whole))  # floats from JSON: bitwise equal
        self.assertEqual([r["eval"] for r in resumed if "eval" in r], [r["eval"] for r in whole if "eval" in r])
        self.assertEqual([r["ffn_load"] for r in resumed if "loss" in r], [r["ffn_load"] for r in whole if "loss" in r])

    @unittest.skipUnless(HAS_DIST, "needs FSDP2 and torch.distributed.checkpoint (torch >= 2.6)")
    def test_two_processes_fsdp_resume_across_world_sizes(self):
        """1 process to step 2 -> 2 processes (FSDP2) to step 3 -> 1 process to step 4, against 1 process
        throughout (one 2-process launch covers sharding and both directions)."""
        extra = ["--steps", "4", "--lr", "3e-3", "--eval-every", "3", "--save-every", "1", "--keep-checkpoints", "0"]
        ref = train(os.path.join(TMP, "ws1"), *extra)
        run = os.path.join(TMP, "ws1-2-1")
        mid = train_two_processes(
            run, *extra, "--stop-after", "3", "--resume", os.path.join(TMP, "ws1", "checkpoints", "step_00000002")
        )
        args = read_json(os.path.join(run, "train_args.json"))
        self.assertEqual((args["world_size"], args["fsdp"], args["accum"]), (2, True, 1))
        self.assertEqual([s for s, _ in losses(mid)], [3])
        self.assertTrue(os.path.exists(os.path.join(run, "checkpoints", "step_00000003", "rng_rank1.pt")))
        tail = train(run, *extra, "--resume")  # the 2-process checkpoint of step 3, resumed by 1 process
        self.assertEqual(read_json(os.path.join(run, "train_args.json"))["world_size"], 1)
        tol = 1e-5
        self.assertEqual([s for s, _ in losses(tail)], [3, 4])
        for (s, a), (_, b) in zip(losses(tail), losses(ref)[2:]):
            self.assertAlmostEqual(a, b, delta=tol, msg=f"step {s}: {'1 -> 2' if s == 3 else '2 -> 1'} processes")
        evals = lambda recs: {r["step"]: r["eval"] for r in recs if "eval" in r}  # noqa: E731
        ref_evals = evals(ref)
        self.assertEqual(sorted(evals(tail)), [3, 4])
        for s, e in evals(tail).items():
            e_ref = ref_evals[s]
            for name in e_ref:
                self.assertAlmostEqual(e[name]["nll"], e_ref[name]["nll"], delta=tol, msg=f"held-out {name} at {s}")
        a, b = folder.read_weights(os.path.join(run, "final")), folder.read_weights(os.path.join(TMP, "ws1", "final"))
        self.assertEqual(set(a), set(b))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def run_main(out, *extra, model=None, data=None):
    """finetune.main in this process. -> (exit code, stdout, stderr); argparse's exits give their code."""
    argv = ["--model", model or BAM, "--out", out] + (data or data_args()) + COMMON + list(extra)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = finetune.main(argv)
        except SystemExit as e:
            code = e.code
    return code, stdout.getvalue(), stderr.getvalue()


POISONED = None  # the parameter test_nan_weights_are_never_saved poisons
SHORT = ["--steps", "4", "--lr", "3e-3", "--eval-every", "0"]


@contextlib.contextmanager
def patched_step(hook):
    """Trainer.step runs hook(trainer, step number, result) after each real step."""
    from bamtrain import trainer

    orig, calls = trainer.Trainer.step, []

    def step(self, micro_batches, lr):
        r = orig(self, micro_batches, lr)
        calls.append(1)
        return hook(self, len(calls), r) or r

    trainer.Trainer.step = step
    try:
        yield
    finally:
        trainer.Trainer.step = orig


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestRunSafety(unittest.TestCase):
    """Issue 21: never train on a broken model, never lose a run."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=TMP)
        self.out = os.path.join(self.dir, "run")

    def assertFails(self, result, pattern, code=1):
        got, stdout, stderr = result
        self.assertEqual(got, code, stderr)
        self.assertRegex(stderr, pattern)
        self.assertNotIn("Traceback", stderr)
        if code == 1:  # one line (after any warnings)
            self.assertRegex(stderr.strip().splitlines()[-1], "^finetune.py: error: .*" + pattern)

    def damaged_model(self, damage):
        model = os.path.join(self.dir, "model")
        shutil.copytree(BAM, model)
        weights = os.path.join(model, "model.safetensors")
        damage(weights)
        return model

    def test_truncated_or_nan_weights_are_refused_before_training(self):
        def truncate(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) * 2 // 3)

        def poison(path):
            start, entries, _ = folder.read_header(path)
            with open(path, "r+b") as f:
                f.seek(start + entries["model.layers.0.mlp.experts.0.up_proj.weight"][2])
                f.write(b"\xff" * 400)

        self.assertFails(
            run_main(self.out, *SHORT, model=self.damaged_model(truncate)), "model.safetensors: .*truncated"
        )
        shutil.rmtree(os.path.join(self.dir, "model"))
        self.assertFails(
            run_main(self.out, *SHORT, model=self.damaged_model(poison)),
            "'model.layers.0.mlp.experts.0.up_proj.weight' holds NaN or Inf",
        )
        self.assertFalse(os.path.exists(os.path.join(self.out, "final")))

    def test_nonfinite_loss_stops_after_the_grace_naming_the_step(self):
        def nan_from_step_3(trainer, n, r):
            if n >= 3:
                r.update(loss=float("nan"), grad_norm=float("nan"))

        with patched_step(nan_from_step_3):
            result = run_main(self.out, "--steps", "8", "--save-every", "1", "--max-nonfinite-steps", "2")
        self.assertFails(
            result, r"step 4: loss nan, grad norm nan: not finite for 2 step\(s\) in a row .*step_00000002"
        )
        self.assertRegex(
            result[2].splitlines()[0], "^warning: step 3: loss nan, grad norm nan: not finite, update skipped"
        )
        self.assertEqual(sorted(os.listdir(os.path.join(self.out, "checkpoints"))), ["step_00000001", "step_00000002"])
        self.assertFalse(os.path.exists(os.path.join(self.out, "final")))

    def test_nan_weights_are_never_saved(self):
        global POISONED
        POISONED = next(n for n, _ in bam_folder.load_folder(BAM).named_parameters() if "layers.1" in n and "down" in n)

        def poison_after_step_2(trainer, n, r):
            if n == 2:
                with torch.no_grad():
                    dict(trainer.model.named_parameters())[POISONED].view(-1)[0] = float("nan")

        with patched_step(poison_after_step_2):
            result = run_main(self.out, *SHORT, "--save-every", "1")
        self.assertFails(result, f"step 2: parameter '{POISONED}' holds NaN or Inf; checkpoint not written")
        self.assertEqual(os.listdir(os.path.join(self.out, "checkpoints")), ["step_00000001"])
        self.assertFalse(os.path.exists(os.path.join(self.out, "final")))

    def test_out_refuses_an_existing_run_and_the_model_folder(self):
        self.assertEqual(run_main(self.out, *SHORT, "--save-every", "1", "--keep-checkpoints", "0")[0], 0)
        before = {f: os.path.getmtime(os.path.join(self.out, f)) for f in os.listdir(self.out)}
        self.assertFails(run_main(self.out, *SHORT), "holds a run .*train_log.jsonl.*--resume.*--overwrite")
        self.assertEqual({f: os.path.getmtime(os.path.join(self.out, f)) for f in os.listdir(self.out)}, before)
        code, stdout, _ = run_main(self.out, "--steps", "2", "--lr", "3e-3", "--overwrite", "--save-every", "0")
        self.assertEqual(code, 0)
        self.assertFalse(os.path.exists(os.path.join(self.out, "checkpoints")))  # the old run's, deleted
        self.assertEqual(
            [r["step"] for r in metrics.read_jsonl(os.path.join(self.out, "train_log.jsonl"))], [0, 1, 2, 2]
        )
        for out, where in (
            (BAM, "is the model folder"),
            (os.path.join(BAM, "run"), "is inside the model folder"),
            (os.path.dirname(BAM), "contains the model folder"),
        ):
            self.assertFails(run_main(out, *SHORT), f"--out {out} {where}")
        self.assertFalse(os.path.exists(os.path.join(BAM, "run")))
        self.assertFails(run_main(self.out, *SHORT, "--resume", "--overwrite"), "give one", code=2)

    def test_resume_recovers_killed_saves_a_torn_log_and_a_damaged_checkpoint(self):
        """After a kill between a re-save's renames (step 2 moved aside, the new one not in), with an unfinished
        step_*.tmp, a torn last log line and a damaged newest checkpoint (step 3), --resume falls back to
        step 2 with a warning and the run ends with the uninterrupted run's losses."""
        extra = [
            "--steps",
            "5",
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "0",
            "--no-final",
        ]
        whole = train(os.path.join(self.dir, "whole"), *extra)
        self.assertEqual(run_main(self.out, *extra, "--stop-after", "3")[0], 0)
        root = os.path.join(self.out, "checkpoints")
        os.replace(os.path.join(root, "step_00000002"), os.path.join(root, "step_00000002.old"))
        os.makedirs(os.path.join(root, "step_00000004.tmp"))
        for name in os.listdir(os.path.join(root, "step_00000003")):
            if name.endswith(".distcp"):
                with open(os.path.join(root, "step_00000003", name), "r+b") as f:
                    f.truncate(10)
        with open(os.path.join(self.out, "train_log.jsonl"), "a") as f:
            f.write('{"step": 4, "loss": 1.2')
        code, _, stderr = run_main(self.out, *extra, "--resume")
        self.assertEqual(code, 0, stderr)
        self.assertRegex(stderr, r"warning: .*step_00000003 cannot be read .*; resuming from .*step_00000002")
        self.assertIn("dropped 1 line(s) cut off", stderr)
        self.assertEqual(losses(metrics.read_jsonl(os.path.join(self.out, "train_log.jsonl"))), losses(whole))
        self.assertFalse([d for d in os.listdir(root) if d.endswith((".tmp", ".old"))])

    def test_sigterm_checkpoints_and_exits_130_then_resume_is_exact(self):
        import signal

        extra = [
            "--steps",
            "4",
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--no-final",
            "--router-jitter",
            "0.05",
        ]
        whole = train(os.path.join(self.dir, "whole"), *extra)

        def term_at_step_2(trainer, n, r):
            if n == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        with patched_step(term_at_step_2):
            code, _, stderr = run_main(self.out, *extra)
        self.assertEqual(code, 130, stderr)
        self.assertEqual(stderr.strip(), "stopped by SIGTERM after step 2; continue with --resume")
        self.assertTrue(os.path.exists(os.path.join(self.out, "checkpoints", "step_00000002", "trainer_state.json")))
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)  # the handler is gone again
        self.assertEqual(run_main(self.out, *extra, "--resume")[0], 0)
        self.assertEqual(losses(metrics.read_jsonl(os.path.join(self.out, "train_log.jsonl"))), losses(whole))

    def test_resume_with_another_steps_keeps_the_saved_schedule(self):
        extra = ["--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--save-every", "2", "--no-final"]
        self.assertEqual(run_main(self.out, "--steps", "4", "--stop-after", "2", *extra)[0], 0)
        code, _, stderr = run_main(self.out, "--steps", "6", "--resume", *extra)
        self.assertEqual(code, 0, stderr)
        self.assertIn("keeping the checkpoint's learning-rate schedule", stderr)
        lrs = {r["step"]: r["lr"] for r in metrics.read_jsonl(os.path.join(self.out, "train_log.jsonl")) if "lr" in r}
        self.assertEqual(lrs, {s: lr_at(s, 3e-3, 1, 4, 0.1) for s in range(1, 7)})  # 5 and 6: at the floor

    def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous(self):
        real = torch.save

        def full_at_step_4(obj, path, *a, **kw):
            if "step_00000004" in str(path):
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                    "file data/0: file write failed\nException raised from ...\nframe #0: ..."
                )
            return real(obj, path, *a, **kw)

        with mock.patch.object(torch, "save", full_at_step_4):
            result = run_main(self.out, *SHORT, "--save-every", "2")
        self.assertFails(
            result,
            r"step_00000004.tmp: disk full while writing the checkpoint of step 4 .*MB free.*; "
            r"the previous checkpoint .*step_00000002 is intact",
        )
        self.assertEqual(os.listdir(os.path.join(self.out, "checkpoints")), ["step_00000002"])


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestUserErrors(unittest.TestCase):
    """Each mistake: one line naming the file or flag and what to do, exit 1 (2 for bad usage)."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=TMP)
        self.out = os.path.join(self.dir, "run")

    def check(self, data, pattern, *extra, code=1, model=None):
        got, _, stderr = run_main(self.out, *SHORT, *extra, model=model, data=["--data", *data])
        self.assertEqual(got, code, stderr)
        self.assertRegex(stderr, pattern)
        self.assertNotIn("Traceback", stderr)
        if code == 1:  # (argparse's exit 2 prints its usage lines first)
            self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
        self.assertFalse(os.path.exists(os.path.join(self.out, "train_log.jsonl")))

    def path(self, name):
        return os.path.join(self.dir, name)

    def test_data_files(self):
        vocab = folder.read_config(BAM)["vocab_size"]
        code = f"code={TMP}/code.npy"
        open(self.path("empty.bin"), "wb").close()
        np.arange(1, 20, dtype=np.uint16).tofile(self.path("short.bin"))
        np.tile(np.arange(1, 40, dtype=np.uint32), 40).tofile(self.path("wide.bin"))
        np.arange(1, 42, dtype=np.uint8).tofile(self.path("odd.bin"))
        ids = np.tile(np.arange(1, 40, dtype=np.int64), 40)
        ids[1000] = -7
        np.save(self.path("negative.npy"), ids)
        ids[1000] = vocab + 5
        np.save(self.path("oov.npy"), ids)
        with open(self.path("docs.jsonl"), "w") as f:
            f.write(json.dumps({"text": "a"}) + "\n" + json.dumps({"content": "b"}) + "\n")
        cases = [
            ([code, f"x={self.path('empty.bin')}"], "empty.bin: empty file"),
            ([code, f"x={self.path('short.bin')}"], "domain 'x': 19 tokens make no training block of 32"),
            ([code, f"x={self.path('wide.bin')}"], "wide.bin: every second uint16 value is 0.*--bin-dtype uint32"),
            ([code, f"x={self.path('odd.bin')}"], "odd.bin: 41 bytes is not a whole number of uint32 tokens"),
            ([code, f"x={self.path('negative.npy')}"], "negative.npy: token id -7 at position 1000 is outside"),
            (
                [code, f"x={self.path('oov.npy')}"],
                f"oov.npy: token id {vocab + 5} at position 1000 is outside the "
                f"model's vocabulary \\(0..{vocab - 1}\\)",
            ),
            ([f"{code}:-1"], r"weight must be >= 0"),
            ([f"{code}:0"], "no domain has a positive weight"),
        ]
        if HAS_TOKENIZERS:
            cases.append(
                (
                    [code, f"x={self.path('docs.jsonl')}"],
                    "docs.jsonl: line 2 has no string field 'text' "
                    r"\(its keys: content\); name the field with --text-key",
                )
            )
        for data_spec, pattern in cases:
            with self.subTest(pattern):
                self.check(data_spec, pattern, *(["--bin-dtype", "uint32"] if "odd" in pattern else []))
        self.check([code], "oov.npy: token id", "--eval-data", f"code={self.path('oov.npy')}")  # before any step

    def test_flags_and_model(self):
        code = [f"code={TMP}/code.npy"]
        for flag, value in (
            ("--seq-len", "1"),
            ("--seq-len", "0"),
            ("--log-every", "0"),
            ("--eval-every", "-1"),
            ("--save-every", "-2"),
        ):
            with self.subTest(flag=flag, value=value):
                self.check(code, f"{flag} must be at least", flag, value, code=2)
        positions = folder.read_config(BAM)["max_position_embeddings"]
        self.check(
            code,
            f"--seq-len {positions + 1} exceeds max_position_embeddings {positions} .*config.json",
            "--seq-len",
            str(positions + 1),
        )
        self.check(
            code,
            "base: model_type is 'llama', not 'bam'; build a BAM folder with `bam upcycle`",
            model=os.path.join(REPO, "fixtures", "llama", "base"),
        )
        with mock.patch.object(torch, "compile", None):
            self.check(code, "--compile: torch .* has no torch.compile.*run without --compile", "--compile")

    def test_a_closed_stdout_stops_printing_not_training(self):
        class ClosedPipe(io.StringIO):
            def write(self, text):
                raise BrokenPipeError(32, "Broken pipe")

        argv = ["--model", BAM, "--out", self.out, "--data", f"code={TMP}/code.npy"] + COMMON + SHORT
        with contextlib.redirect_stdout(ClosedPipe()):
            self.assertEqual(finetune.main(argv), 0)
        self.assertTrue(os.path.exists(os.path.join(self.out, "final", "model.safetensors")))


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestConsole(unittest.TestCase):
    def test_defaults_labels_tensorboard_and_model_card(self):
        """Default --log-every and --save-every on a 12-step run; step 0's held-out baseline; labelled losses,
        throughput and per-expert load; TensorBoard scalars (a stand-in SummaryWriter: the tensorboard
        package is not a requirement); the final/ README says what was trained."""
        import types

        scalars = []

        class SummaryWriter:
            def __init__(self, logdir, purge_step=None):
                self.logdir = logdir

            def add_scalar(self, tag, value, step):
                scalars.append((tag, value, step))

            def close(self):
                pass

        fake = types.ModuleType("torch.utils.tensorboard")
        fake.SummaryWriter = SummaryWriter
        out = os.path.join(tempfile.mkdtemp(dir=TMP), "run")
        argv = [
            "--model",
            BAM,
            "--out",
            out,
            "--data",
            f"code={TMP}/code.npy",
            "--seq-len",
            "32",
            "--micro-batch",
            "2",
            "--eval-blocks",
            "2",
            "--no-plot",
            "--steps",
            "12",
            "--lr",
            "3e-3",
        ]
        stdout = io.StringIO()
        with mock.patch.dict(sys.modules, {"torch.utils.tensorboard": fake}), contextlib.redirect_stdout(stdout):
            self.assertEqual(finetune.main(argv), 0)
        lines = stdout.getvalue().splitlines()
        steps = [line.split(" |")[0] for line in lines if line.startswith("step ") and " | " in line]
        self.assertEqual(steps, ["step 1/12", "step 10/12", "step 12/12"])
        self.assertTrue(lines[1].startswith("step 0 held-out: code nll"), lines)
        c = folder.read_config(BAM)
        line = next(line for line in lines if line.startswith("step 10/12"))
        self.assertRegex(
            line,
            r"per layer: load-balance [\d.]+ z [\d.]+ \| .* [\d.]+k? tok/s, \d+ ms/step \| "
            rf"FFN expert load( [\d.]+){{{c['num_experts']}}} \| attention expert weight( [\d.]+){{{c['num_experts']}}}$",
        )
        self.assertEqual(sorted(os.listdir(os.path.join(out, "checkpoints"))), ["step_00000010", "step_00000012"])
        log = metrics.read_jsonl(os.path.join(out, "train_log.jsonl"))
        loss = {(tag, step): v for tag, v, step in scalars}
        self.assertEqual(loss[("train/loss", 5)], log[5]["loss"])
        self.assertEqual(loss[("eval/code/nll", 0)], log[0]["eval"]["code"]["nll"])
        self.assertIn(("ffn_load/expert_0", 12), loss)
        with open(os.path.join(out, "final", "README.md")) as f:
            card = f.read()
        self.assertIn(f"12 steps, {log[-2]['tokens']:,} tokens, batch 2 x 32", card)
        self.assertIn(f"| code | {TMP}/code.npy | 1 |", card)
        self.assertIn(f"z-loss {log[-2]['z_loss']:.4f} (each summed over the {c['num_hidden_layers']} layers)", card)
        self.assertIn(f"| code | {log[-1]['eval']['code']['nll']:.4f} |", card)
        self.assertNotIn("need fine-tuning", card.lower())

    def test_help_shows_defaults_without_torch(self):
        code = (
            "import runpy, sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
            f"sys.argv = ['finetune.py', '--help']; runpy.run_path({os.path.join(REPO, 'scripts', 'finetune.py')!r}, "
            "run_name='__main__')"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("optimiser steps (default: 1000)", " ".join(run.stdout.split()))
        self.assertIn("(default: 10)", run.stdout)


class TestData(unittest.TestCase):
    def test_spec_syntax(self):
        self.assertEqual(data.parse_spec("code=a.bin,b.bin:0.25"), ("code", ["a.bin", "b.bin"], 0.25))
        self.assertEqual(data.parse_spec("dir/web.npy"), ("web", ["dir/web.npy"], None))
        self.assertEqual(data.parse_spec("x=dir/:2"), ("x", ["dir/"], 2.0))

    def test_mixture_proportions_order_and_position(self):
        d = tempfile.mkdtemp(dir=TMP)
        np.save(f"{d}/a.npy", np.arange(400) % 50)
        np.arange(200, dtype=np.uint16).tofile(f"{d}/b.bin")
        np.arange(200, dtype=np.uint16).tofile(f"{d}/b2.bin")
        cfg = {"vocab_size": 320, "eos_token_id": 0}
        mk = lambda: data.build_mixture([f"a={d}/a.npy:3", f"b={d}/b.bin,{d}/b2.bin:1"], [], d, cfg, 10, 3, seed=1)
        m = mk()
        a, b = m.domains
        self.assertEqual((a.train_blocks, len(a.eval_blocks)), (37, 3))  # 40 blocks, 3 held out (<= 1/10 + 1)
        self.assertEqual(len(b.stream), 401)  # an EOS between the two files
        self.assertEqual(int(b.stream.read(200, 1)[0]), 0)
        refs = m.next_refs(40)
        self.assertEqual(sum(1 for i, _ in refs if i == 0), 30)  # 3 : 1
        self.assertTrue(all(blk < a.train_blocks for i, blk in refs if i == 0))  # never a held-out block
        self.assertEqual(len({blk for i, blk in refs if i == 0}), 30)  # a permutation: no repeats in an epoch
        state = m.state_dict()
        more = m.next_refs(50)
        m2 = mk()
        m2.load_state_dict(state)
        self.assertEqual(m2.next_refs(50), more)  # the saved position continues the same stream
        x = m.batch(refs[:4])
        self.assertEqual((tuple(x.shape), x.dtype), ((4, 10), torch.int64))
        with self.assertRaises(ValueError):
            m.batch(refs[:1], vocab_size=5)

    def test_bin_width_from_meta_json(self):
        """uint32 ids read as uint16 are refused; a meta.json beside the file (scripts/data writes one) gives the
        width, and contradicts --bin-dtype only with an error."""
        d = tempfile.mkdtemp(dir=TMP)
        ids = np.arange(400, dtype=np.uint32) % 50 + 1
        ids.tofile(f"{d}/a.bin")
        cfg = {"vocab_size": 320, "eos_token_id": 0}
        with self.assertRaisesRegex(BamTrainError, "a.bin: every second uint16 value is 0.*--bin-dtype uint32"):
            data.build_mixture([f"{d}/a.bin"], [], d, cfg, 10, 0)
        with open(f"{d}/meta.json", "w") as f:
            json.dump({"dtype": "uint32"}, f)
        m = data.build_mixture([f"{d}/a.bin"], [], d, cfg, 10, 0)
        self.assertEqual(m.domains[0].stream.read(0, 400).tolist(), ids.tolist())
        with self.assertRaisesRegex(BamTrainError, "meta.json says uint32 but --bin-dtype is uint16"):
            data.build_mixture([f"{d}/a.bin"], [], d, cfg, 10, 0, bin_dtype="uint16")

    @unittest.skipUnless(HAS_CLI and HAS_TOKENIZERS, "needs the CLI's BAM folder and the tokenizers package")
    def test_text_is_tokenised_with_eos_after_each_document(self):
        d = tempfile.mkdtemp(dir=TMP)
        with open(f"{d}/docs.jsonl", "w") as f:
            f.write(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "second"}) + "\n")
        cfg = folder.read_config(BAM)
        s = data.load_stream([f"{d}/docs.jsonl"], 0, data.Tokenizer(BAM), np.uint16)
        toks = s.read(0, len(s)).tolist()
        self.assertEqual(toks.count(0), 2)
        self.assertEqual(toks[-1], 0)
        self.assertLess(max(toks), cfg["vocab_size"])


class TestModelPieces(unittest.TestCase):
    def test_flops_count_the_parameters_a_token_meets(self):
        """6 x (every attention expert's projections + routers + k FFN experts + lm_head), counted from the
        model's own tensors, plus 12 L A heads D T."""
        for attention, A in (("moa", 4), ("shared-kv", 4), ("merged", 1)):
            c = dict(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                attention_experts=attention,
            )
            sd = mb.BamForCausalLMCore(c).state_dict()
            active = 0
            for name, t in sd.items():
                if t.dim() != 2 or "embed_tokens" in name:
                    continue
                if ".mlp.experts." in name and int(name.split(".mlp.experts.")[1].split(".")[0]) >= 2:
                    continue  # top-2 of 4: two FFN experts per token
                active += t.numel()
            fl = metrics.model_flops(c, 16)
            self.assertEqual(fl["active_matmul_params"], active, attention)
            self.assertEqual(fl["flops_per_token"], 6 * active + 12 * 2 * A * 4 * 8 * 16)

    def test_rope_backward_is_the_inverse_rotation(self):
        for style, rot in (("half", 8), ("interleaved", 8), ("half", 4)):
            c = mb.BamConfig(hidden_size=32, num_attention_heads=4, head_dim=8, rotary_dim=rot, rope_style=style)
            cos, sin = mb.rope_cos_sin(c, torch.arange(5)[None].expand(2, 5))
            x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
            cos, sin = cos.double(), sin.double()
            rope = lambda t, cos=cos, sin=sin, style=style: mb.apply_rope(t, cos, sin, style)
            self.assertTrue(torch.autograd.gradcheck(rope, (x,)))


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestSpeedDefaults(unittest.TestCase):
    def test_compile_is_on_by_default_on_cuda_only(self):
        base = ["--model", "m", "--data", "d.npy", "--out", "o"]
        self.assertEqual(
            [finetune.parse_args(base + flag).compile for flag in ([], ["--compile"], ["--no-compile"])],
            [None, True, False],
        )
        warnings = []
        cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
        with mock.patch.object(finetune, "compile_problem", return_value=None):
            self.assertEqual(
                [
                    finetune.use_compile(flag, torch, dev, warnings.append)
                    for flag in (None, True, False)
                    for dev in (cpu, cuda)
                ],
                [False, True, True, True, False, False],
            )
        with mock.patch.object(finetune, "compile_problem", return_value="no triton"):
            self.assertFalse(finetune.use_compile(None, torch, cuda, warnings.append))  # the default falls back
            self.assertEqual(
                warnings, ["warning: no triton; training without torch.compile (--no-compile silences this)"]
            )
            with self.assertRaisesRegex(BamTrainError, "--compile: no triton; run without --compile"):
                finetune.use_compile(True, torch, cuda, warnings.append)

    def test_compile_mode_reaches_every_block(self):
        """--compile-mode is torch.compile's mode for each block (reduce-overhead: CUDA graphs); without
        torch.compile it is refused, naming the fix."""
        modes = []
        record = lambda block, **kw: modes.append(kw.get("mode"))  # noqa: E731
        out = os.path.join(TMP, "compile-mode")
        with mock.patch.object(finetune, "compile_problem", return_value=None):
            with mock.patch.object(torch.nn.Module, "compile", record):
                code, _, err = run_main(out, "--compile", "--compile-mode", "reduce-overhead", *SHORT, "--overwrite")
        self.assertEqual(code, 0, err)
        self.assertEqual(modes, ["reduce-overhead"] * read_json(os.path.join(BAM, "config.json"))["num_hidden_layers"])
        self.assertEqual(read_json(os.path.join(out, "train_args.json"))["compile_mode"], "reduce-overhead")
        code, _, err = run_main(out, "--no-compile", "--compile-mode", "max-autotune", *SHORT)
        self.assertEqual(code, 2)
        self.assertIn("--compile-mode max-autotune is torch.compile's mode, and --no-compile turns it off", err)
        code, _, err = run_main(out, "--compile-mode", "max-autotune", *SHORT, "--overwrite")  # CPU: eager
        self.assertEqual(code, 1)
        self.assertEqual(
            err.strip().splitlines()[-1],
            "finetune.py: error: --compile-mode max-autotune: the blocks are not compiled here; add --compile",
        )

    def test_fused_kernels_flag_reaches_the_model(self):
        """--no-fused-kernels turns modeling_bam's Triton kernels off for the run (the torch ops), the default
        on: what every norm of the model sees when it decides (on CPU both are the torch ops)."""
        seen = []
        fused = mb.Norm.fused
        spy = lambda norm, x: seen.append(dict(mb.FUSED)) or fused(norm, x)  # noqa: E731
        out = os.path.join(TMP, "fused-kernels")
        try:
            for flag, want in (("--no-fused-kernels", False), ("--fused-kernels", True), (None, True)):
                seen.clear()
                with mock.patch.object(mb.Norm, "fused", spy):
                    code, _, err = run_main(out, *SHORT, "--overwrite", *([flag] if flag else []))
                self.assertEqual(code, 0, err)
                self.assertGreater(len(seen), 0)
                self.assertEqual(seen, [dict.fromkeys(mb.FUSED, want)] * len(seen), flag)
        finally:
            mb.FUSED.update(dict.fromkeys(mb.FUSED, True))

    def test_logged_mfu_is_the_benchmarks(self):
        """finetune.py and bench/train/bench_train.py count the same FLOPs per token for a folder and turn
        tokens/s into MFU by one formula (metrics.mfu), checked here against tokens/s x FLOPs / peak."""
        import bench_train

        out, peak = os.path.join(TMP, "mfu-run"), 1e12
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(
                finetune.main(
                    ["--model", BAM, "--out", out, "--data", f"{TMP}/code.npy"]
                    + COMMON
                    + SHORT
                    + ["--peak-flops", str(peak)]
                ),
                0,
            )
            res = bench_train.main(
                [
                    "--out",
                    os.path.join(TMP, "mfu-bench"),
                    "--tiny",
                    "--model",
                    BAM,
                    "--rows",
                    "bam",
                    "--seq-len",
                    "32",
                    "--micro-batch",
                    "2",
                    "--steps",
                    "1",
                    "--profile",
                    "",
                    "--peak-flops",
                    str(peak),
                ]
            )
        train_args = read_json(os.path.join(out, "train_args.json"))
        self.assertFalse(train_args["compile"])  # CPU: eager by default
        row = res["rows"][0]
        self.assertEqual(row["flops_per_token"], train_args["flops_per_token"])
        self.assertAlmostEqual(row["mfu"], row["tokens_per_s"] * row["flops_per_token"] / peak, delta=1e-12)
        steps = [r for r in metrics.read_jsonl(os.path.join(out, "train_log.jsonl")) if "loss" in r]
        self.assertEqual(len(steps), 4)
        for r in steps:
            self.assertAlmostEqual(r["mfu"], r["tokens_per_s"] * train_args["flops_per_token"] / peak, delta=1e-12)
            self.assertAlmostEqual(
                r["mfu_causal"], r["tokens_per_s"] * train_args["flops_per_token_causal"] / peak, delta=1e-12
            )
            self.assertLess(r["mfu_causal"], r["mfu"])
        self.assertIsNone(metrics.mfu(1e3, 1e9, None))


@unittest.skipUnless(HAS_CLI and HAS_TOKENIZERS, "needs the CLI's BAM folder and the tokenizers package")
class TestReadme(unittest.TestCase):
    def test_the_readme_one_liners_run_as_written(self):
        """The README's one-GPU and torchrun lines parse as written; the one-GPU line trains on CPU in a folder
        holding bam3, web.txt and code.txt, with only sizes appended (steps, batch, sequence length)."""
        with open(os.path.join(REPO, "README.md")) as f:
            section = f.read().split("## Fine-tuning on GPUs")[1].split("\n## ")[0]
        lines = [line.strip() for line in section.splitlines() if "scripts/finetune.py --model" in line]
        self.assertEqual([line.split()[0] for line in lines], ["python", "torchrun"])
        script = "node_modules/bam-upcycle/scripts/finetune.py"  # where npm installs it: what the lines name
        argv = [shlex.split(line) for line in lines]
        for words in argv:
            self.assertIn(script, words)
        one_gpu = argv[0][argv[0].index(script) + 1 :]
        self.assertEqual(one_gpu, argv[1][argv[1].index(script) + 1 :])  # the same run
        args = finetune.parse_args(one_gpu)
        self.assertIsNone(args.compile)  # the CUDA default
        cwd = tempfile.mkdtemp(dir=TMP)
        shutil.copytree(BAM, os.path.join(cwd, args.model))
        for spec in args.data:
            name, paths, _ = data.parse_spec(spec)
            with open(os.path.join(cwd, paths[0]), "w") as f:
                f.write(f"A {name} document, written for the README test. " * 30)
        sizes = [
            "--steps",
            "2",
            "--global-batch",
            "4",
            "--micro-batch",
            "2",
            "--seq-len",
            "32",
            "--eval-blocks",
            "2",
            "--no-plot",
        ]
        here = os.getcwd()
        os.chdir(cwd)  # (contextlib.chdir is Python 3.11+)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(finetune.main(one_gpu + sizes), 0)
        finally:
            os.chdir(here)
        log = metrics.read_jsonl(os.path.join(cwd, args.out, "train_log.jsonl"))
        self.assertEqual(sorted(log[0]["eval"]), ["code", "web"])
        self.assertTrue(os.path.exists(os.path.join(cwd, args.out, "final", "model.safetensors")))


class TestBenchmark(unittest.TestCase):
    def test_tiny_benchmark_runs_and_backs_off_on_oom(self):
        """bench_train.py --tiny on CPU: every row measured, the JSON written, and a micro-batch that runs
        out of memory (simulated) replaced by the next candidate."""
        import bench_train

        from bamtrain import trainer

        out = os.path.join(TMP, "bench")
        orig = trainer.Trainer.step

        def step(self, micro_batches, lr):
            if micro_batches[0].shape[0] > 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return orig(self, micro_batches, lr)

        trainer.Trainer.step = step
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                res = bench_train.main(
                    [
                        "--out",
                        out,
                        "--tiny",
                        "--steps",
                        "1",
                        "--micro-batch",
                        "0",
                        "--batch-candidates",
                        "4,2",
                        "--cache-dir",
                        os.path.join(TMP, "bench-cache"),
                        "--profile",
                        "bam",
                    ]
                )
        finally:
            trainer.Trainer.step = orig
        rows = {r["row"]: r for r in res["rows"]}
        self.assertEqual(set(rows), {"bam", "bam-loop", "dense"})
        for r in rows.values():
            self.assertEqual(r["micro_batch"], 2, r)
            self.assertGreater(r["tokens_per_s"], 0)
        self.assertAlmostEqual(rows["bam"]["loss_first"], rows["bam-loop"]["loss_first"], places=4)
        self.assertIn("bam / bam-loop tokens/s", res["ratios"])
        self.assertTrue(rows["bam"]["profile"]["top"])
        saved = read_json(os.path.join(out, "train_bench.json"))
        self.assertEqual(len(saved["rows"]), 3)
        self.assertTrue(os.path.exists(os.path.join(out, "profile_bam.txt")))


if __name__ == "__main__":
    unittest.main()
