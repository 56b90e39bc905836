"""Runs a BAM model folder through the pure-torch core (no transformers; files read
by scripts/bamtrain/folder.py, validated) and prints the logits' distance to a
reference. Used by test/pytorch/*.test.ts.

    python3 test/python/bam_folder.py MODEL_DIR REFERENCE.safetensors LOGITS_KEY [MODEL_DIR REFERENCE KEY ...]
prints one line {"max_abs_error": ..., "max_abs_reference": ..., "shape": [...]} per triple (one
process for many folders: starting python with torch costs seconds).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from bamtrain.folder import load_model, read_safetensors  # noqa: E402,F401  (read_safetensors: for importers)


def load_folder(folder):
    """The folder's model in float32, in eval mode."""
    return load_model(folder)[0].float().eval()


def compare(folder, reference, key):
    ref = read_safetensors(reference)
    model = load_folder(folder)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], use_cache=False)["logits"]
    expected = ref[key]
    return {
        "max_abs_error": (logits - expected).abs().max().item(),
        "max_abs_reference": expected.abs().max().item(),
        "shape": list(logits.shape),
    }


def main():
    args = sys.argv[1:]
    if not args or len(args) % 3:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 3):
        print(json.dumps(compare(*args[i : i + 3])), flush=True)


if __name__ == "__main__":
    main()
