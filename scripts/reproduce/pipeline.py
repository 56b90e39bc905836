#!/usr/bin/env python3
"""The small-scale BAM reproduction (issues 8 and 16), every stage in one process tree: train a dense seed with
a parallel block on general text to `tokens_per_param` tokens per parameter, branch it into code, math and
lexicon experts at half the seed's peak learning rate, upcycle with `bam upcycle` (BAM with KV experts, BAM
with shared KV, BTX, and sparse upcycling of the seed; every mixture with its FFN gate given explicitly), and
mix-train each on the four domains at the seed's peak rate, with --seeds mixing seeds (data order and router
init) per run:
  data-matched      every mixture sees mix_tokens (BTX also 0.5x and 2x as many)
  compute-matched   every model spends the FLOPs of BAM with KV experts' data-matched run; the models that
                    skip the branches (dense, sparse upcycling) are credited with the branches' FLOPs too
  gate A/B          BAM with KV experts and BTX data-matched again with the renormalised gate
Then held-out perplexity and routing per domain with the PyTorch model (heldout_tokens per domain), the
first check_tokens of each domain also with `bam eval` (the ONNX CPU engine, seed-0 models), which must
agree, and each mixture's training step timed alone on the GPU (timing_steps steps).

    scripts/reproduce.sh [--scale small|tiny] [--out runs/reproduce] [--jobs 12] [--seeds 3]   (see that script)

Stages skip what a previous run finished (a model folder under OUT/models exists, a result in the JSON), so
an interrupted run continues. OUT/reproduction.json is rewritten after every stage and job: budgets, compact
training logs (every step's losses, expert load every few steps, every held-out evaluation with its routing),
the perplexity and routing tables, both engines' disagreement and the timings. scripts/reproduce/report.py
turns it into docs/reproduction.md.
"""

import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # scripts/: bamtrain
sys.modules.setdefault("transformers", None)  # bamtrain needs only torch; skip transformers' import time
from bamtrain import folder, metrics, routing  # noqa: E402

DOMAINS = ("general", "code", "math", "lexicon")
BRANCHES = ("code", "math", "lexicon")  # the seed is the fourth expert, the generalist

# Model shapes and token budgets. small: about 1M parameters, all counted (cohere layout: parallel block, one
# LayerNorm, SwiGLU, tied embeddings; the 8192 x 80 embedding is 0.66M of them), so that 20 tokens per
# parameter are under 3 passes over the general train split (7.2M tokens, docs/data.md) and no text is seen
# more than 4 times along any seed -> branch -> mixture line; every stage fits one GPU call.
# tiny: a CPU smoke run of every stage.
SCALES = {
    "small": dict(
        hidden=80,
        layers=4,
        heads=5,
        intermediate=240,
        seq_len=256,
        micro_batch=64,
        global_batch=64,
        tokens_per_param=20,
        branch_tokens=4_000_000,
        mix_tokens=4_000_000,
        seed_lr=3e-3,
        eval_every=40,
        eval_blocks=16,
        heldout_tokens=65_536,
        check_tokens=4_096,
        log_every=50,
        timing_steps=60,
    ),
    "tiny": dict(
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        seq_len=64,
        micro_batch=4,
        global_batch=4,
        tokens_per_param=0.008,
        branch_tokens=1_024,
        mix_tokens=1_024,
        seed_lr=1e-3,
        eval_every=2,
        eval_blocks=2,
        heldout_tokens=256,
        check_tokens=128,
        log_every=1,
        timing_steps=3,
    ),
}

# How attention is upcycled: name -> (bam upcycle arguments after the seeds, seeds). BAM's recipe is top-1 FFN
# routing; every mixture uses it, so the variants differ in attention (and sparse upcycling in its experts).
VARIANTS = {
    "bam-kv": (["--attention", "moa"], ["seed", *BRANCHES]),
    "bam-shared-kv": (["--attention", "shared-kv"], ["seed", *BRANCHES]),
    "btx": (["--attention", "merged"], ["seed", *BRANCHES]),
    "sparse": (["--experts", "4"], ["seed"]),
}
# The FFN gate, given explicitly to every `bam upcycle` (docs/method.md): paper = the chosen expert weighted by
# its probability over all experts (BAM 3.3, Switch); renorm = Mixtral's, the constant 1 at top-1.
GATES = {"paper": "--no-norm-topk-prob", "renorm": "--norm-topk-prob"}
# The mixtures: name -> (variant, gate). The -renorm ones are the gate A/B, data-matched only.
MIXTURES = {
    **{v: (v, "paper") for v in VARIANTS},
    "bam-kv-renorm": ("bam-kv", "renorm"),
    "btx-renorm": ("btx", "renorm"),
}
# Compute-matched runs spend the FLOPs of the most expensive mixture's data-matched run.
REFERENCE = "bam-kv"
# Extra data budgets, as multiples of mix_tokens: how much a token is worth against a parameter.
TOKEN_MULTIPLES = {"btx": (0.5, 2.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "reproduce"), help="work folder (models, runs, results)")
    p.add_argument(
        "--data",
        default=os.path.join(ROOT, "data", "corpus", "tokens"),
        help="token files DOMAIN.train.bin / DOMAIN.heldout.bin (scripts/data/build_corpus.sh)",
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--jobs", type=int, default=12, help="training runs at once (they share the GPUs)")
    p.add_argument("--seeds", type=int, default=3, help="mixing seeds per run (data order and router init)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread runs over (default: all visible)")
    p.add_argument("--bam", default=None, help="the bam command (default: node dist/src/cli/main.js in the repo)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--bam-eval",
        choices=["on", "off", "only"],
        default="on",
        help="the `bam eval` check: beside training (on), not at all (off: a machine without the ONNX "
        "runtime), or alone over the models OUT/models holds (only: after an off run, elsewhere)",
    )
    return p.parse_args(argv)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.s = SCALES[args.scale]
        self.out = os.path.abspath(args.out)
        self.models = os.path.join(self.out, "models")
        self.runs = os.path.join(self.out, "runs")
        self.logs = os.path.join(self.out, "logs")
        for d in (self.models, self.runs, self.logs):
            os.makedirs(d, exist_ok=True)
        self.bam = shlex.split(args.bam) if args.bam else ["node", os.path.join(ROOT, "dist", "src", "cli", "main.js")]
        self.cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.gpus = (args.gpus or torch.cuda.device_count()) if self.cuda else 0
        self.results_path = os.path.join(self.out, "reproduction.json")
        self.results = self._load_results()
        self.started = time.time()
        self.env = environment(self.cuda)
        self.onnx_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one at a time: each uses every core
        self.onnx_jobs = {}  # model name -> its `bam eval` future (its result: the keys to record)
        self.onnx_recorded = set()  # names whose future's result is in self.results

    # ------------------------------------------------------------------ bookkeeping

    def _load_results(self):
        if os.path.exists(self.results_path):
            with open(self.results_path) as f:
                return json.load(f)
        return {"runs": {}, "heldout": {}, "upcycle": {}, "stages": {}}

    def save(self):
        """Writes OUT/reproduction.json (main thread only), with the `bam eval` results finished so far."""
        for name, job in list(self.onnx_jobs.items()):
            if job.done() and name not in self.onnx_recorded:
                self.results["heldout"].setdefault(name, {}).update(job.result() or {})
                self.onnx_recorded.add(name)
        if self.args.bam_eval == "only":  # the training run's environment and times stay as they were
            self.results["bam_eval_env"] = self.env
        else:
            self.results.update(
                scale=dict(name=self.args.scale, **self.s), env=self.env, elapsed_s=round(time.time() - self.started, 1)
            )
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, separators=(",", ":"))  # one line: every run's step log makes it megabytes
            f.write("\n")
        os.replace(tmp, self.results_path)

    def stage(self, name, body):
        t0 = time.time()
        log(f"== {name}")
        body()
        self.results["stages"][name] = round(time.time() - t0, 1)
        self.save()

    def data(self, domain, split):
        path = os.path.join(self.args.data, f"{domain}.{split}.bin")
        if not os.path.exists(path):
            raise SystemExit(f"{path}: missing; build the corpus with scripts/data/build_corpus.sh (docs/data.md)")
        return path

    def model(self, name):
        return os.path.join(self.models, name)

    # ------------------------------------------------------------------ stages

    def init_seed(self):
        """A randomly initialised dense cohere checkpoint (as a user brings one), then its single-expert BAM
        folder, which scripts/finetune.py trains."""
        if os.path.exists(self.model("init")):
            return
        dense = os.path.join(self.out, "init-dense")
        write_random_cohere(dense, self.s, os.path.join(os.path.dirname(self.args.data), "tokenizer.json"))
        self.run_bam(["upcycle", dense, "--experts", "1", "-o", self.model("init"), "--force"], "upcycle-init")

    def train_seed(self):
        """The seed trains to tokens_per_param tokens per parameter (every parameter counted, the tied embedding
        once) on general text, at the seed's peak learning rate."""
        budget = self.results.get("seed_budget")
        if budget is None:
            model, _, _ = folder.load_model(self.model("init"), "cpu")
            params = metrics.count_params(model)
            tokens = self.s.get("seed_tokens") or round(self.s["tokens_per_param"] * params)
            general = os.path.getsize(self.data("general", "train")) // 2
            budget = self.results["seed_budget"] = dict(
                params=params,
                tokens=tokens,
                tokens_per_param=tokens / params,
                general_train_tokens=general,
                passes=tokens / general,
            )
            self.save()
        self.train_all([self.job("seed", "init", {"general": 1.0}, budget["tokens"], self.s["seed_lr"])])

    def branch(self):
        """BAM 5.1 as we read it (docs/reproduction.md): the branches continue at half the seed's peak rate."""
        lr = self.s["seed_lr"] / 2
        self.train_all([self.job(d, "seed", {d: 0.9, "general": 0.1}, self.s["branch_tokens"], lr) for d in BRANCHES])

    def upcycle(self):
        for seed in range(self.args.seeds):
            for name in MIXTURES:
                target = self.model(upcycled(name, seed))
                variant, gate = MIXTURES[name]
                flags, seeds = VARIANTS[variant]
                command = ["upcycle", *seeds, "--seed", str(seed), *flags, GATES[gate]]
                if not os.path.exists(target):
                    t0 = time.time()
                    self.run_bam(
                        [*command[:1], *[self.model(m) for m in seeds], "-o", target, *command[len(seeds) + 1 :]],
                        f"upcycle-{name}-s{seed}",
                    )
                    self.results["upcycle"][f"{name}-s{seed}"] = dict(
                        seconds=round(time.time() - t0, 2), command=["bam", *command]
                    )
                if seed == 0:
                    self.evaluate_onnx(upcycled(name, seed))

    def mix(self):
        """Every run at the seed's peak learning rate (BAM 5.1 as we read it), 25% of each domain, per mixing
        seed. Data-matched: every mixture sees mix_tokens. Compute-matched: every model spends the reference
        mixture's data-matched FLOPs; dense and sparse upcycling, which skip the branches, also get the
        branches' FLOPs (the reference's own run is both)."""
        uniform = {d: 0.25 for d in DOMAINS}
        lr = self.s["seed_lr"]
        mix_tokens = self.s["mix_tokens"]
        flops = {name: self.flops_per_token(self.model(upcycled(name, 0))) for name in MIXTURES}
        flops["dense"] = self.flops_per_token(self.model("seed"))
        branch_flops = sum(
            self.results["runs"][d]["tokens"] * self.results["runs"][d]["flops_per_token"] for d in BRANCHES
        )
        budget = flops[REFERENCE] * mix_tokens
        plan = {}
        for name in ("dense", *VARIANTS):
            credit = branch_flops if name in ("dense", "sparse") else 0
            plan[name] = dict(
                flops_per_token=flops[name],
                data_matched_tokens=mix_tokens,
                branch_flops_credited=credit,
                compute_matched_tokens=round((budget + credit) / flops[name]),
                token_multiples=list(TOKEN_MULTIPLES.get(name, ())),
            )
        self.results["mix_plan"] = dict(
            reference=REFERENCE,
            compute_budget_flops=budget,
            branch_flops=branch_flops,
            lr=lr,
            seeds=self.args.seeds,
            models=plan,
        )
        self.save()
        jobs = []
        for seed in range(self.args.seeds):
            start = lambda name: "seed" if name == "dense" else upcycled(name, seed)  # noqa: B023
            for name in ("dense", *MIXTURES):
                jobs.append(self.job(run_name(name, "dm", seed), start(name), uniform, mix_tokens, lr, seed))
            for name, p in plan.items():
                if name != REFERENCE:
                    jobs.append(
                        self.job(
                            run_name(name, "cm", seed), start(name), uniform, p["compute_matched_tokens"], lr, seed
                        )
                    )
                for m in p["token_multiples"]:
                    jobs.append(
                        self.job(run_name(name, f"x{m:g}", seed), start(name), uniform, m * mix_tokens, lr, seed)
                    )
        jobs.sort(key=lambda j: -j["cost"])  # longest first: the last wave is short
        self.train_all(jobs)

    def evaluate_torch(self):
        """Held-out NLL per domain with the pure-torch model in float32: the table's (heldout_tokens), the
        check against `bam eval` (the same windows: the first check_tokens), and for mixtures the routing per
        domain on the same windows (bamtrain/routing.py)."""
        device = torch.device("cuda" if self.cuda else "cpu")
        names = ["seed", *BRANCHES, *[upcycled(m, s) for s in range(self.args.seeds) for m in MIXTURES]]
        names += [r for r in sorted(self.results["runs"]) if r not in names and r not in ("seed", *BRANCHES)]
        ids = {d: self.heldout_ids(d) for d in DOMAINS}
        for name in names:
            entry = self.results["heldout"].setdefault(name, {})
            if "torch" in entry or not os.path.exists(self.model(name)):
                continue
            t0 = time.time()
            model, _, _ = folder.load_model(self.model(name), device)
            model.eval()
            entry["torch"] = {d: torch_nll(model, ids[d], self.s["seq_len"], device) for d in DOMAINS}
            entry["torch_check"] = {
                d: torch_nll(model, ids[d][: self.s["check_tokens"]], self.s["seq_len"], device) for d in DOMAINS
            }
            windows = {d: windows_of(ids[d], self.s["seq_len"], device) for d in DOMAINS}
            routed = routing.domain_routing(model, windows)
            if routed:
                entry["routing"] = routed
            entry["torch_seconds"] = round(time.time() - t0, 2)
            del model
            log(f"torch eval {name}: " + ", ".join(f"{d} {v['ppl']:.2f}" for d, v in entry["torch"].items()))
            self.save()

    def timing(self):
        """Each model's training step timed alone on the device (nothing else training): timing_steps steps
        of its seed-0 start, the median step time over the second half. GPU seconds of a run = its steps x that."""
        timing = self.results.setdefault("timing", {})
        for name in ("dense", *VARIANTS):
            if name in timing:
                continue
            start = "seed" if name == "dense" else upcycled(name, 0)
            j = self.job(
                f"timing-{name}",
                start,
                {d: 0.25 for d in DOMAINS},
                self.s["timing_steps"] * self.tokens_per_step(),
                self.s["seed_lr"],
                0,
                evaluate=False,
            )
            out = os.path.join(self.runs, j["name"])
            shutil.rmtree(out, ignore_errors=True)
            with open(os.path.join(self.logs, f"{j['name']}.log"), "w") as f:
                done = subprocess.run(
                    j["cmd"], env=self.run_env(0 if self.gpus else None), stdout=f, stderr=subprocess.STDOUT
                )
            if done.returncode != 0:
                raise SystemExit(f"timing {name} failed (exit {done.returncode}); see {self.logs}/{j['name']}.log")
            steps = [
                r["step_time"] for r in metrics.read_jsonl(os.path.join(out, "train_log.jsonl")) if "step_time" in r
            ]
            tail = sorted(steps[len(steps) // 2 :])
            timing[name] = dict(step_s=tail[len(tail) // 2], steps=len(steps), tokens_per_step=self.tokens_per_step())
            log(f"timing {name}: {1000 * timing[name]['step_s']:.1f} ms/step alone")
            self.save()

    def finish_onnx(self):
        concurrent.futures.wait(list(self.onnx_jobs.values()))
        self.save()  # records every result
        for entry in self.results["heldout"].values():
            if "torch_check" in entry and "bam_eval" in entry:
                entry["agreement"] = {
                    d: abs(entry["torch_check"][d]["ppl"] - entry["bam_eval"][d]["ppl"])
                    / entry["torch_check"][d]["ppl"]
                    for d in DOMAINS
                }
        agreed = [max(e["agreement"].values()) for e in self.results["heldout"].values() if "agreement" in e]
        self.results["max_relative_ppl_difference"] = max(agreed) if agreed else None
        self.save()

    # ------------------------------------------------------------------ training

    def tokens_per_step(self):
        return self.s["global_batch"] * self.s["seq_len"]

    def job(self, name, start, weights, tokens, lr, seed=0, evaluate=True):
        """A finetune.py run (AdamW, weight decay 0.1, 5% warm-up, cosine to 10%, load balance 0.01 and z-loss
        1e-3 from the folder: its defaults). Domains missing from `weights` get weight 0: never trained on, but
        their held-out perplexity is logged with the others'. `seed`: data order (and router jitter)."""
        s = self.s
        tokens_per_step = self.tokens_per_step()
        steps = max(1, round(tokens / tokens_per_step))
        data = [f"{d}={self.data(d, 'train')}:{weights.get(d, 0)}" for d in DOMAINS]
        evals = [f"{d}={self.data(d, 'heldout')}" for d in DOMAINS]
        cmd = [
            sys.executable,
            os.path.join(ROOT, "scripts", "finetune.py"),
            "--model",
            self.model(start),
            "--out",
            os.path.join(self.runs, name),
            "--data",
            *data,
            "--steps",
            str(steps),
            "--seq-len",
            str(s["seq_len"]),
            "--micro-batch",
            str(s["micro_batch"]),
            "--global-batch",
            str(s["global_batch"]),
            "--lr",
            str(lr),
            "--eval-blocks",
            str(s["eval_blocks"]),
            "--save-every",
            "0",
            "--log-every",
            str(s["log_every"]),
            "--no-plot",
            "--seed",
            str(seed),
            "--device",
            "cuda" if self.cuda else "cpu",
            # a run killed before its model folder appeared starts over (it keeps no checkpoints); eager: at
            # this size compiling costs more than it saves, and the measured step times are eager
            "--overwrite",
            "--no-compile",
        ]
        cmd += (
            ["--eval-data", *evals, "--eval-every", str(s["eval_every"])]
            if evaluate
            else ["--eval-every", "0", "--no-final"]
        )
        return dict(
            name=name,
            start=start,
            cmd=cmd,
            steps=steps,
            tokens=steps * tokens_per_step,
            lr=lr,
            weights=weights,
            seed=seed,
            cost=steps * tokens_per_step * self.flops_per_token(self.model(start)),
        )

    def run_env(self, gpu):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        return env

    def train_all(self, jobs):
        """Runs the jobs, --jobs at a time, spread over the GPUs; a finished one becomes OUT/models/NAME."""
        pending = []
        for j in jobs:
            if os.path.exists(self.model(j["name"])):
                self.evaluate_onnx(j["name"])  # finished by an earlier run; its check may not be
            else:
                pending.append(j)
        running = []
        failed = []
        while pending or running:
            while pending and len(running) < self.args.jobs:
                j = pending.pop(0)
                gpu = None
                if self.gpus:  # the least busy GPU
                    gpu = min(range(self.gpus), key=lambda g: sum(1 for r in running if r[4] == g))
                env = self.run_env(gpu)
                logf = open(os.path.join(self.logs, f"{j['name']}.log"), "w")
                log(f"start {j['name']}: {j['steps']} steps ({j['tokens'] / 1e6:.2f}M tokens) from {j['start']}")
                proc = subprocess.Popen(j["cmd"], env=env, stdout=logf, stderr=subprocess.STDOUT)
                running.append((j, proc, logf, time.time(), gpu))
            time.sleep(0.5)
            for entry in list(running):
                j, proc, logf, t0, _ = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                logf.close()
                if proc.returncode != 0:
                    failed.append(j["name"])
                    log(f"FAILED {j['name']} (exit {proc.returncode}); see {logf.name}")
                    continue
                run_dir = os.path.join(self.runs, j["name"])
                os.replace(os.path.join(run_dir, "final"), self.model(j["name"]))
                record = compact_log(os.path.join(run_dir, "train_log.jsonl"))
                with open(os.path.join(run_dir, "train_args.json")) as f:
                    record["params"] = json.load(f)["params"]
                record.update(
                    start=j["start"],
                    steps=j["steps"],
                    tokens=j["tokens"],
                    lr=j["lr"],
                    weights=j["weights"],
                    seed=j["seed"],
                    wall_s=round(time.time() - t0, 1),
                    flops_per_token=self.flops_per_token(self.model(j["name"])),
                )
                self.results["runs"][j["name"]] = record
                last = record["evals"][-1]["eval"] if record["evals"] else {}
                log(
                    f"done {j['name']} in {record['wall_s']}s: "
                    + ", ".join(f"{d} {v['ppl']:.2f}" for d, v in last.items())
                )
                self.save()
                self.evaluate_onnx(j["name"])
        if failed:
            raise SystemExit(f"training failed: {', '.join(failed)} (logs under {self.logs})")

    def flops_per_token(self, model_dir):
        return metrics.model_flops(folder.read_config(model_dir), self.s["seq_len"])["flops_per_token"]

    # ------------------------------------------------------------------ bam

    def run_bam(self, args, name):
        with open(os.path.join(self.logs, f"{name}.log"), "w") as f:
            done = subprocess.run([*self.bam, *args], stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"bam {' '.join(args[:1])} failed (exit {done.returncode}); see {self.logs}/{name}.log")

    def evaluate_onnx(self, name):
        """`bam eval --tokens` on the held-out files, in the background (CPU) while the GPU trains: the seed, the
        branches and the seed-0 mixtures (the CPU engine's time is what limits it)."""
        if re.search(r"-s[1-9][0-9]*(-|$)", name):
            return
        entry = self.results["heldout"].setdefault(name, {})
        if self.args.bam_eval == "off" or "bam_eval" in entry or name in self.onnx_jobs:
            return

        def work():  # a worker thread: returns what to record; only the main thread touches self.results
            files = [self.data(d, "heldout") for d in DOMAINS]
            t0 = time.time()
            done = subprocess.run(
                [
                    "nice",
                    "-n",
                    "10",
                    *self.bam,
                    "eval",
                    self.model(name),
                    "--tokens",
                    *files,
                    "--context",
                    str(self.s["seq_len"]),
                    "--max-tokens",
                    str(self.s["check_tokens"]),
                    "--json",
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                log(f"bam eval {name} failed: {done.stderr.strip()}")
                return {"bam_eval_error": done.stderr.strip()}
            report = json.loads(done.stdout)
            found = {
                d: dict(nll=f["nll"] / f["predicted"], ppl=f["perplexity"], predicted=f["predicted"])
                for d, f in zip(DOMAINS, report["files"])
            }
            log(f"bam eval {name}: " + ", ".join(f"{d} {v['ppl']:.2f}" for d, v in found.items()))
            return {
                "bam_eval": found,
                "bam_eval_seconds": round(time.time() - t0, 2),
                "bam_eval_tokens_per_s": report["tokensPerSecond"],
            }

        self.onnx_jobs[name] = self.onnx_pool.submit(work)

    def heldout_ids(self, domain):
        ids = np.fromfile(self.data(domain, "heldout"), dtype="<u2")[: self.s["heldout_tokens"]]
        return torch.from_numpy(ids.astype(np.int64))


# ---------------------------------------------------------------------- helpers


def upcycled(mixture, seed):
    return f"{mixture}-s{seed}-upcycled"


def run_name(model, budget, seed):
    """e.g. bam-kv-dm-s0, dense-cm-s2, btx-x0.5-s1 (budget: dm, cm or a multiple of mix_tokens)."""
    return f"{model}-{budget}-s{seed}"


def windows_of(ids, context, device, batch=16):
    """The held-out ids as whole windows of `context` tokens, `batch` at a time (torch_nll's full windows)."""
    full = len(ids) // context * context
    return [w.to(device) for w in ids[:full].view(-1, context).split(batch)] if full else []


def log(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def environment(cuda):
    """What ran the pipeline; BAM_COMMIT names the commit where the tree has no .git (the GPU machine's copy)."""
    commit = os.environ.get("BAM_COMMIT")
    if commit is None:
        try:
            commit = (
                subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
                or None
            )
        except OSError:
            commit = None
    return dict(
        torch=torch.__version__,
        python=sys.version.split()[0],
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        gpus=torch.cuda.device_count() if cuda else 0,
        commit=commit,
    )


def write_random_cohere(dense, s, tokenizer):
    """A cohere-layout checkpoint, initialised as transformers does (normal(0, 0.02), LayerNorm weights 1),
    with the residual projections scaled by 1/sqrt(2 x layers) (GPT-2) for a stable start."""
    g = torch.Generator().manual_seed(0)
    H, I, L, V = s["hidden"], s["intermediate"], s["layers"], 8192
    normal = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std
    residual = 0.02 / math.sqrt(2 * L)
    tensors = [("model.embed_tokens.weight", normal(V, H))]
    for l in range(L):
        p = f"model.layers.{l}"
        tensors += [
            (f"{p}.input_layernorm.weight", torch.ones(H)),
            (f"{p}.self_attn.q_proj.weight", normal(H, H)),
            (f"{p}.self_attn.k_proj.weight", normal(H, H)),
            (f"{p}.self_attn.v_proj.weight", normal(H, H)),
            (f"{p}.self_attn.o_proj.weight", normal(H, H, std=residual)),
            (f"{p}.mlp.gate_proj.weight", normal(I, H)),
            (f"{p}.mlp.up_proj.weight", normal(I, H)),
            (f"{p}.mlp.down_proj.weight", normal(H, I, std=residual)),
        ]
    tensors.append(("model.norm.weight", torch.ones(H)))
    tmp = dense + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    folder.write_sharded(tmp, tensors)
    config = dict(
        architectures=["CohereForCausalLM"],
        model_type="cohere",
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_qk_norm=False,
        logit_scale=1.0,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        attention_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="float32",
    )
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))
    shutil.rmtree(dense, ignore_errors=True)
    os.replace(tmp, dense)


@torch.no_grad()
def torch_nll(model, ids, context, device):
    """Summed NLL over non-overlapping windows of `context` tokens, each predicting all but its first token,
    in float64: what `bam eval --tokens --context` computes."""
    nll, predicted = 0.0, 0
    full = len(ids) // context * context
    windows = [ids[:full].view(-1, context)] if full else []
    if len(ids) - full >= 2:
        windows.append(ids[full:].view(1, -1))
    for block in windows:
        for chunk in block.split(16):
            x = chunk.to(device)
            logits = model(input_ids=x, use_cache=False)["logits"].double()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None])
            nll -= logp.sum().item()
            predicted += x.shape[0] * (x.shape[1] - 1)
    return dict(nll=nll / predicted, ppl=math.exp(nll / predicted), predicted=predicted)


def six_digits(value):
    """A float to 6 significant digits (the step log's scalars: more is noise, and megabytes in the results)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def compact_log(path):
    """Every step's scalars (log, 6 significant digits), the expert load and attention weights every tenth step,
    every evaluation."""
    steps, loads, evals = [], [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "eval" in r:
                evals.append({k: r[k] for k in ("step", "tokens", "eval", "routing", "router_lm_grad_norm") if k in r})
                continue
            steps.append(
                {
                    k: six_digits(r[k])
                    for k in (
                        "step",
                        "tokens",
                        "loss",
                        "nll",
                        "lb_loss",
                        "z_loss",
                        "grad_norm",
                        "lr",
                        "tokens_per_s",
                        "mfu",
                    )
                    if k in r
                }
            )
            if ("ffn_load" in r or "attn_weight" in r) and (r["step"] % 10 == 0 or r["step"] == 1):
                loads.append({k: r[k] for k in ("step", "ffn_load", "attn_weight") if k in r})
    return dict(log=steps, loads=loads, evals=evals)


def main(argv=None):
    args = parse_args(argv)
    p = Pipeline(args)
    log(
        f"reproduction at scale {args.scale} in {p.out}: {f'{p.gpus} GPU(s)' if p.cuda else 'CPU'}, {args.jobs} runs at once"
    )
    if args.bam_eval == "only":
        for name in sorted(os.listdir(p.models)):
            p.evaluate_onnx(name)
        p.stage("evaluate-bam", p.finish_onnx)
        log(f"largest torch/bam eval perplexity difference {p.results['max_relative_ppl_difference']}")
        return
    p.stage("init", p.init_seed)
    p.stage("seed", p.train_seed)
    p.stage("branch", p.branch)
    p.stage("upcycle", p.upcycle)
    p.stage("mix", p.mix)
    p.stage("evaluate-torch", p.evaluate_torch)
    p.stage("evaluate-bam", p.finish_onnx)
    p.stage("timing", p.timing)
    log(
        f"done in {time.time() - p.started:.0f}s; largest torch/bam eval perplexity difference "
        f"{p.results['max_relative_ppl_difference']}; results in {p.results_path}"
    )


if __name__ == "__main__":
    main()
