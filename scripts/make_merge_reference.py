#!/usr/bin/env python3
"""Reference logits of real merges, for the CPU engine's tests (test/onnx/merge.test.ts).

For each family and attention mode, `bam upcycle base code math` (the built CLI, through node) writes a
BAM folder into a temporary directory; python/modeling_bam.py's pure-torch core loads it (float32, CPU)
and runs the family's reference input_ids. The result is
fixtures/merge/<family>-<mode>.safetensors: input_ids (I64 [2, 12]) and logits (F32 [2, 12, vocab]),
with the upcycle options in the metadata (key "options", JSON), so the test rebuilds the same folder
(routers are deterministic from --seed) and compares its ONNX logits.

    npm run build && python3 scripts/make_merge_reference.py [--cli dist/src/cli/main.js] [--out fixtures/merge]

Needs torch >= 2.6 and node (no transformers); files are read and written through scripts/bamtrain/folder.py
(read validated, written in a fixed byte order). Deterministic: a rerun writes the same files up to
float rounding of the torch build.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bamtrain.folder import load_model, read_safetensors, write_safetensors  # noqa: E402

FAMILIES = [
    "llama",
    "qwen3",
    "cohere",
    "gpt2",
]  # GQA+biases; qk-norm; interleaved rope+parallel seed; learned positions
# One block kind, k and FFN gate per mode, so that the three files cover both blocks, both k and both
# gates (the paper's at k = 1 and 2, renormalised at k = 2).
CASES = {
    "moa": {"attention": "moa", "block": "parallel", "expertsPerToken": 2, "normTopkProb": False, "seed": 7},
    "shared-kv": {
        "attention": "shared-kv",
        "block": "sequential",
        "expertsPerToken": 1,
        "normTopkProb": False,
        "seed": 7,
    },
    "merged": {"attention": "merged", "block": "sequential", "expertsPerToken": 2, "normTopkProb": True, "seed": 7},
}
FLAGS = {"attention": "--attention", "block": "--block", "expertsPerToken": "--experts-per-token", "seed": "--seed"}


def cli_flags(options):
    """The options as `bam upcycle` flags (a boolean is --name or --no-name)."""
    flags = [x for key, value in options.items() if key in FLAGS for x in (FLAGS[key], str(value))]
    return flags + ["--norm-topk-prob" if options["normTopkProb"] else "--no-norm-topk-prob"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cli", default=os.path.join(ROOT, "dist", "src", "cli", "main.js"))
    parser.add_argument("--out", default=os.path.join(ROOT, "fixtures", "merge"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    for family in args.families.split(","):
        seeds = [os.path.join(ROOT, "fixtures", family, v) for v in ("base", "code", "math")]
        ids = read_safetensors(os.path.join(ROOT, "fixtures", family, "reference.safetensors"))["input_ids"]
        for mode, options in CASES.items():
            with tempfile.TemporaryDirectory() as tmp:
                folder = os.path.join(tmp, "bam")
                run = subprocess.run(
                    ["node", args.cli, "upcycle", *seeds, "-o", folder, *cli_flags(options)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                if run.returncode != 0:
                    sys.exit(f"bam upcycle failed for {family} {mode}:\n{run.stderr}")
                with torch.no_grad():
                    model = load_model(folder)[0].eval()
                    logits = model(input_ids=ids, use_cache=False)["logits"].float().contiguous()
            out = os.path.join(args.out, f"{family}-{mode}.safetensors")
            write_safetensors(
                out,
                [("input_ids", ids), ("logits", logits)],
                {"options": json.dumps(options), "torch": torch.__version__},
            )
            print(f"{out}: logits {list(logits.shape)}, max |logit| {logits.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
