"""Loads a BAM model folder into the pure-torch core (no transformers, no
safetensors package: Debian's python3-torch is enough) and prints the logits'
distance to a reference. Used by test/pytorch/*.test.ts.

    python3 test/python/bam_folder.py MODEL_DIR REFERENCE.safetensors LOGITS_KEY
prints {"max_abs_error": ..., "max_abs_reference": ..., "shape": [...]}.
"""
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
from modeling_bam import BamForCausalLMCore  # noqa: E402

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = bytearray(body[begin:end])
        dtype = DTYPES[info["dtype"]]
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"]).clone()
    return tensors


def load_folder(folder):
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(read_safetensors(os.path.join(folder, file)))
    model = BamForCausalLMCore(config)
    if config.get("tie_word_embeddings"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.float().eval()


def main():
    folder, reference, key = sys.argv[1:4]
    ref = read_safetensors(reference)
    model = load_folder(folder)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], use_cache=False)["logits"]
    expected = ref[key]
    print(json.dumps({
        "max_abs_error": (logits - expected).abs().max().item(),
        "max_abs_reference": expected.abs().max().item(),
        "shape": list(logits.shape),
    }))


if __name__ == "__main__":
    main()
