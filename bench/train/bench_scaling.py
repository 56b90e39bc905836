#!/usr/bin/env python3
"""Issue 7 in one command: scripts/finetune.py on 1 GPU and with FSDP2 on N GPUs (torchrun), same global
batch, same data; tokens/s scaling; and checkpoints crossing world sizes (N -> 1 and 1 -> N) whose losses
continue the uninterrupted 1-GPU run's.

    python bench/train/bench_scaling.py --out OUT --gpus 2 --commit "$(git rev-parse HEAD)"   (nvidia-h200-x2)
    python bench/train/bench_scaling.py --out /tmp/scaling-tiny --tiny                         (CPU, gloo)

Runs, each a separate process tree started from here with this process's environment (NVLink multicast
off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1):
  ws1       1 process, --steps S, checkpoint at S/2                                  (the reference)
  wsN       N processes (FSDP2), stopped with a checkpoint at S/2
  wsN->1    1 process resuming wsN's checkpoint, to S
  ws1->N    N processes resuming ws1's checkpoint at S/2, to S
The model is bench_train.py's synthetic BAM folder (4 x 0.37B llama seeds, soft MoA, parallel, top-1) and
the data random tokens in two domains. tokens/s: the median over the steps after --skip of each run.
Writes OUT/scaling.json and prints a table. Loss differences across world sizes come from reduction order
(and non-deterministic GPU kernels); on CPU they are ~1e-6, on GPU in bf16 expect ~1e-3.
"""

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, HERE)
if __name__ == "__main__":
    sys.modules.setdefault("transformers", None)

import numpy as np  # noqa: E402
import synthetic  # noqa: E402
import torch  # noqa: E402

FINETUNE = os.path.join(REPO, "scripts", "finetune.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs")
    p.add_argument("--model", help="a BAM folder (default: the synthetic benchmark folder)")
    p.add_argument("--commit", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, gloo (checks the script)")
    p.add_argument("--steps", type=int, default=None, help="default 20 (--tiny 6); checkpoint at half")
    p.add_argument("--skip", type=int, default=3, help="steps left out of the tokens/s median (warm-up)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (--tiny 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 8 (--tiny 2)")
    p.add_argument("--global-batch", type=int, default=None, help="default micro-batch x gpus x 2")
    p.add_argument("--extra", default="", help="more finetune.py arguments for every run (e.g. '--compile')")
    p.add_argument("--cache-dir", default=None)
    return p.parse_args(argv)


def run(cmd, log):
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=REPO)
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - t


def records(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    args = parse_args(argv)
    tiny = args.tiny
    steps = args.steps or (6 if tiny else 20)
    half = steps // 2
    T = args.seq_len or (64 if tiny else 2048)
    mb = args.micro_batch or 2
    if not tiny and args.micro_batch is None:
        mb = 8
    G = args.global_batch or mb * args.gpus * 2
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache_dir or ("/tmp/bam-bench-tiny" if tiny else "/tmp/bam-bench")
    cuda = torch.cuda.is_available() and not tiny
    if cuda and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}, but torch sees {torch.cuda.device_count()} GPU(s)")
    model = args.model
    if not model:
        shape = dict(synthetic.TINY_SHAPE if tiny else synthetic.SEED_SHAPE)
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], T)
        model = synthetic.write_folder(
            os.path.join(cache, "bam-scaling"), shape, synthetic.MOE, device="cuda" if cuda else "cpu"
        )
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    need = (steps + 2) * G * T * 2 + 64 * T  # every domain has enough for the whole run and its held-out blocks
    rng = np.random.default_rng(0)
    specs = []
    for name in ("a", "b"):
        path = os.path.join(data_dir, f"{name}.npy")
        np.save(
            path,
            rng.integers(0, vocab, need // 2 + 64 * T, dtype=np.int64).astype(
                np.uint16 if vocab <= 65536 else np.uint32
            ),
        )
        specs.append(f"{name}={path}")
    common = [
        "--model",
        model,
        "--data",
        *specs,
        "--steps",
        str(steps),
        "--seq-len",
        str(T),
        "--micro-batch",
        str(mb),
        "--global-batch",
        str(G),
        "--eval-every",
        "0",
        "--eval-blocks",
        "2",
        "--save-every",
        str(half),
        "--log-every",
        "1",
        "--no-plot",
        "--lr",
        "1e-4",
        "--warmup-steps",
        "2",
    ] + args.extra.split()
    if tiny:
        common += ["--device", "cpu"]
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"]
    out = {k: os.path.join(args.out, k) for k in ("ws1", f"ws{args.gpus}", f"ws{args.gpus}to1", f"ws1to{args.gpus}")}
    for d in out.values():
        shutil.rmtree(d, ignore_errors=True)
    N = args.gpus
    wall = {}
    print(
        f"model {model}; {steps} steps of {G} x {T} tokens; micro-batch {mb}; {N} processes for the FSDP runs",
        flush=True,
    )
    wall["ws1"] = run(py + [FINETUNE, *common, "--out", out["ws1"], "--no-final"], os.path.join(args.out, "ws1.log"))
    wall[f"ws{N}"] = run(
        torchrun + [FINETUNE, *common, "--out", out[f"ws{N}"], "--stop-after", str(half)],
        os.path.join(args.out, f"ws{N}.log"),
    )
    shutil.copytree(out[f"ws{N}"], out[f"ws{N}to1"])
    wall[f"ws{N}to1"] = run(
        py + [FINETUNE, *common, "--out", out[f"ws{N}to1"], "--resume", "--no-final"],
        os.path.join(args.out, f"ws{N}to1.log"),
    )
    wall[f"ws1to{N}"] = run(
        torchrun
        + [
            FINETUNE,
            *common,
            "--out",
            out[f"ws1to{N}"],
            "--resume",
            os.path.join(out["ws1"], "checkpoints", f"step_{half:08d}"),
            "--no-final",
        ],
        os.path.join(args.out, f"ws1to{N}.log"),
    )
    recs = {k: [r for r in records(v) if "loss" in r] for k, v in out.items()}
    loss = {k: {r["step"]: r["loss"] for r in v} for k, v in recs.items()}
    ref = loss["ws1"]
    diffs = {k: max(abs(loss[k][s] - ref[s]) for s in loss[k]) for k in loss if k != "ws1"}

    def median_after_warmup(k, key):
        """The run's own steps after its first --skip (at least one kept)."""
        vals = [r[key] for r in recs[k] if r.get(key) is not None]
        vals = vals[min(args.skip, len(vals) - 1) :] if vals else []
        return statistics.median(vals) if vals else None

    tps1, tpsN = median_after_warmup("ws1", "tokens_per_s"), median_after_warmup(f"ws{N}", "tokens_per_s")
    tpsN_resumed = median_after_warmup(f"ws1to{N}", "tokens_per_s")
    mfu = {k: median_after_warmup(k, "mfu") for k in recs}
    result = dict(
        commit=args.commit,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        gpus=N,
        steps=steps,
        checkpoint_step=half,
        seq_len=T,
        micro_batch=mb,
        global_batch=G,
        extra=args.extra,
        model=model,
        tokens_per_s={"1": tps1, str(N): tpsN, f"{N} (resumed from 1)": tpsN_resumed},
        scaling=(tpsN / tps1) if tps1 and tpsN else None,
        mfu=mfu,
        max_abs_loss_diff_vs_ws1=diffs,
        losses=loss,
        wall_s=wall,
    )
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump(result, f, indent=2)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    print("\n| processes | tokens/s | MFU | scaling |\n|---|---|---|---|")
    print(f"| 1 | {tps1:,.0f} | {pct(mfu['ws1'])} | 1.00x |")
    print(f"| {N} (FSDP2) | {tpsN:,.0f} | {pct(mfu[f'ws{N}'])} | {result['scaling']:.2f}x |")
    print(
        f"| {N} (FSDP2, resumed from 1) | {tpsN_resumed:,.0f} | {pct(mfu[f'ws1to{N}'])} | {tpsN_resumed / tps1:.2f}x |"
    )
    print(f"\nlosses against the uninterrupted 1-process run (steps 1..{steps}, checkpoint at {half}):")
    for k, d in diffs.items():
        print(f"  {k:>10}: max |diff| {d:.2e} over steps {min(loss[k])}..{max(loss[k])}")
    print(f"wrote {os.path.join(args.out, 'scaling.json')}")
    return result


if __name__ == "__main__":
    main()
