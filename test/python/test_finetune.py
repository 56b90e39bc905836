"""Tests of scripts/finetune.py, scripts/bamtrain and bench/train on CPU, in seconds:
python3 -m unittest test/python/test_finetune.py (also found by `discover -s test/python`).

The BAM folder comes from our own CLI (`node dist/src/cli/main.js upcycle` of the llama fixtures); tests
that need it skip without node or without `npm run build`. Tests that need FSDP2 and
torch.distributed.checkpoint (torch >= 2.6), the `tokenizers` package or transformers skip where those
are missing (Debian's torch 1.13 runs the rest).

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
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (os.path.join(REPO, "scripts"), os.path.join(REPO, "python"), os.path.join(REPO, "bench", "train"), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import finetune  # noqa: E402
import modeling_bam as mb  # noqa: E402
from bamtrain import ckpt, data, folder, metrics, parallel  # noqa: E402
from bamtrain.trainer import lr_at  # noqa: E402
import bam_folder  # noqa: E402

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
COMMON = ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--eval-blocks", "2", "--no-plot",
          "--log-every", "1000"]


def setUpModule():
    global TMP, BAM, THREADS
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
        subprocess.run([NODE, CLI, "upcycle", f"{fx}/base", f"{fx}/code", f"{fx}/math", "-o", BAM],
                       check=True, capture_output=True)


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
        finetune.main(argv)
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
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.stdout = open(os.devnull, "w")
    finetune.main(argv)


def train_two_processes(out, *extra):
    import torch.multiprocessing as tmp
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported once here, not in every forked rank)
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    argv = ["--model", BAM, "--out", out] + data_args() + COMMON + list(extra)
    tmp.start_processes(_rank_main, args=(argv, free_port()), nprocs=2, start_method="fork")
    return metrics.read_jsonl(os.path.join(out, "train_log.jsonl"))


@unittest.skipUnless(HAS_CLI, NO_CLI)
class TestFinetune(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.out = os.path.join(TMP, "run")
        cls.steps = 12
        cls.log = train(cls.out, "--steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "6",
                        "--save-every", "0")

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
            self.assertAlmostEqual(r["loss"], r["nll"] + 0.01 * r["lb_loss"] + 0.001 * r["z_loss"], places=5)
            self.assertEqual(sum(r["domains"].values()), 4)
        self.assertAlmostEqual(train_recs[-1]["lr"], 3e-4)  # cosine down to 10% of the peak
        evals = [r for r in self.log if "eval" in r]
        self.assertEqual([r["step"] for r in evals], [6, 12])
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
            load = load + torch.stack([torch.stack([(fl.topk(k, -1).indices == e).double().mean() * 1.0 for e in range(E)])
                                       for fl in out["router_logits"]]) / 2
            attn = attn + torch.stack([a.reshape(-1, E).double().softmax(-1).mean(0) for a in out["attn_router_logits"]]) / 2
        r = self.log[0]
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
                torch.testing.assert_close(hf(x).logits, model(input_ids=x, use_cache=False)["logits"], atol=1e-5, rtol=0)
        run = subprocess.run([NODE, CLI, "inspect", final, "--json"], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        info = json.loads(run.stdout)
        self.assertIn("bam", json.dumps(info).lower())

    def test_resume_continues_bit_for_bit(self):
        extra = ["--steps", "6", "--lr", "3e-3", "--eval-every", "3", "--save-every", "3", "--router-jitter", "0.05",
                 "--expert-dropout", "0.2", "--no-final"]
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
        mid = train_two_processes(run, *extra, "--stop-after", "3", "--resume",
                                  os.path.join(TMP, "ws1", "checkpoints", "step_00000002"))
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
        evals = lambda recs: [(r["step"], r["eval"]) for r in recs if "eval" in r]
        for (s, e), (s_ref, e_ref) in zip(evals(tail), evals(ref)):
            self.assertEqual(s, s_ref)
            for name in e_ref:
                self.assertAlmostEqual(e[name]["nll"], e_ref[name]["nll"], delta=tol, msg=f"held-out {name} at {s}")
        a, b = folder.read_weights(os.path.join(run, "final")), folder.read_weights(os.path.join(TMP, "ws1", "final"))
        self.assertEqual(set(a), set(b))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


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
            c = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, attention_experts=attention)
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
            self.assertTrue(torch.autograd.gradcheck(lambda t: mb.apply_rope(t, cos.double(), sin.double(), style), (x,)))


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
                res = bench_train.main(["--out", out, "--tiny", "--steps", "1", "--micro-batch", "0",
                                        "--batch-candidates", "4,2", "--cache-dir", os.path.join(TMP, "bench-cache"),
                                        "--profile", "bam"])
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
