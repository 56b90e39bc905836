"""The FSDP2 code path with world size 1 on one GPU (what issue 7 can run while multi-GPU machines
are withheld): a tiny synthetic BAM model trained 20 steps straight, and again as 10 steps + --resume;
the resumed losses must equal the uninterrupted run's. Writes OUT/fsdp_one_gpu.json.

    python3 bench/train/fsdp_one_gpu.py --out "$OUT" --commit <sha>
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "scripts"), HERE]
import synthetic  # noqa: E402


def train(model, data, out, extra):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "1",
        os.path.join(ROOT, "scripts", "finetune.py"),
        "--model",
        model,
        "--out",
        out,
        "--data",
        f"a={data}",
        "--seq-len",
        "128",
        "--micro-batch",
        "4",
        "--global-batch",
        "8",
        "--steps",
        "20",
        "--save-every",
        "10",
        "--fsdp",
        "on",
        "--no-plot",
        "--eval-every",
        "10",
    ] + extra
    subprocess.run(cmd, check=True, env=env)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "step" in r}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=None)
    a = p.parse_args()
    work = "/tmp/fsdp-one-gpu"
    model = synthetic.write_folder(os.path.join(work, "bam"), synthetic.TINY_SHAPE, synthetic.MOE)
    data = os.path.join(work, "tokens.npy")
    np.save(data, np.random.default_rng(0).integers(0, 512, 400_000).astype(np.uint16))
    straight = train(model, data, os.path.join(work, "straight"), [])
    train(model, data, os.path.join(work, "split"), ["--stop-after", "10"])
    resumed = train(model, data, os.path.join(work, "split"), ["--resume"])
    steps = sorted(s for s in straight if s > 10)
    diffs = [abs(straight[s] - resumed[s]) for s in steps]
    result = {
        "commit": a.commit,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "world_size": 1,
        "fsdp": True,
        "steps_compared": steps,
        "max_abs_loss_difference": max(diffs),
        "straight": straight,
        "resumed": {s: resumed[s] for s in steps},
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fsdp_one_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"FSDP2, world size 1: resumed losses at steps {steps[0]}..{steps[-1]} differ by at most {max(diffs):.2e}")


if __name__ == "__main__":
    main()
