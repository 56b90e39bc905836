"""Checks that folders written by bam-upcycle load in Python's safetensors and
in Hugging Face transformers, and give the seed's reference logits.

    node dist/test/evidence/build.js CASES            # on a machine with Node
    python3 scripts/check_transformers.py CASES fixtures OUT.json

`npm test` runs it on CPU on every commit (test/evidence/evidence.test.ts). On a GPU machine it also checks
CUDA: bench/results/evidence/transformers-gpu.json is such a run (its file hashes name the output it checked).

For each case of CASES/cases.json: every *.safetensors file through
safetensors.torch.load_file; the folder through
AutoModelForCausalLM.from_pretrained (trust_remote_code for the bam format,
stock classes for native formats) in float32, on CPU and on CUDA when there
is one; its logits against fixtures/<family>/reference.safetensors.
Writes the evidence JSON (with each file's sha256 from cases.json) and exits
non-zero if any case fails.
"""

import json
import os
import sys
import traceback

import safetensors.torch
import torch
import transformers
from transformers import AutoModelForCausalLM

import safetensors

TOLERANCE = 1e-4


def check_case(case, cases_dir, fixtures):
    folder = os.path.join(cases_dir, case["name"])
    result = {"name": case["name"], "files": case["files"], "safetensors_loaded": 0}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors = safetensors.torch.load_file(os.path.join(folder, file))
            result["safetensors_loaded"] += len(tensors)
    reference = safetensors.torch.load_file(os.path.join(fixtures, case["family"], "reference.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=case["remote_code"], dtype=torch.float32, output_loading_info=True
    )
    result["class"] = type(model).__name__
    result["missing_keys"] = sorted(info["missing_keys"])
    result["unexpected_keys"] = sorted(info["unexpected_keys"])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model = model.to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=reference["input_ids"].to(device)).logits.float().cpu()
        result[f"max_abs_error_{device}"] = (logits - reference[case["reference"]]).abs().max().item()
    result["ok"] = (
        not result["missing_keys"]
        and not result["unexpected_keys"]
        and all(result[f"max_abs_error_{d}"] <= TOLERANCE for d in devices)
    )
    return result


def main():
    cases_dir, fixtures, out = sys.argv[1:4]
    with open(os.path.join(cases_dir, "cases.json")) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        try:
            results.append(check_case(case, cases_dir, fixtures))
        except Exception:  # one broken case must not hide the others
            results.append({"name": case["name"], "files": case["files"], "ok": False, "error": traceback.format_exc()})
        r = results[-1]
        print(
            f"{r['name']:28s} {'ok' if r['ok'] else 'FAILED'} "
            + " ".join(f"{k}={v:.2e}" for k, v in r.items() if k.startswith("max_abs_error")),
            flush=True,
        )
    evidence = {
        "tolerance": TOLERANCE,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cases": results,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(evidence, f, indent=1)
        f.write("\n")
    failed = [r["name"] for r in results if not r["ok"]]
    print(
        f"{len(results) - len(failed)}/{len(results)} cases ok" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
