"""Logits of a native MoE folder (Mixtral, Qwen3-MoE: stock transformers, no remote code) against the BAM
folder of the same upcycle (modeling_bam.py's pure-torch core), or against logits our CPU engine computed
from the native folder itself (a LOGITS.safetensors file holding "logits"). Used by test/pytorch/native.test.ts.

    python test/python/native_folder.py REFERENCE.safetensors NATIVE_DIR BAM_DIR|LOGITS.safetensors [...]
prints one line {"max_abs_error": ..., "max_abs_logit": ...} per pair, on the reference's input_ids.
"""

import json
import sys

import torch
from bam_folder import load_folder, read_safetensors
from transformers import AutoModelForCausalLM


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False)["logits"].float()


def main():
    reference, *folders = sys.argv[1:]
    if not folders or len(folders) % 2:
        raise SystemExit(__doc__)
    ids = read_safetensors(reference)["input_ids"]
    for native, bam in zip(folders[::2], folders[1::2]):
        want = read_safetensors(bam)["logits"] if bam.endswith(".safetensors") else logits_of(load_folder(bam), ids)
        got = logits_of(AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval(), ids)
        print(
            json.dumps({"max_abs_error": (got - want).abs().max().item(), "max_abs_logit": want.abs().max().item()}),
            flush=True,
        )


if __name__ == "__main__":
    main()
