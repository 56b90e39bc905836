"""BAM model folders (docs/format.md): read and write safetensors with no dependency beyond
torch, build the pure-torch model from a folder, and save a trained model back as a folder that
`from_pretrained(..., trust_remote_code=True)`, `bam inspect` and `bam eval` read."""

import json
import os
import re
import shutil
import struct

import torch

from . import PYTHON_DIR
from modeling_bam import BamForCausalLMCore  # noqa: E402  (python/ is on sys.path: see __init__)

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files of the source folder that travel with the model (as the upcycler copies them from the first seed)
SIDE_FILES = re.compile(r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|tokenizer\.model|"
                        r"vocab\.json|merges\.txt|added_tokens\.json|generation_config\.json|"
                        r"chat_template\.(jinja|json)|recipe\.yaml|README\.md)$")


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path):
    """-> {name: tensor} on CPU, each in its stored dtype (one read per tensor, no mmap kept open)."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = ST_DTYPES[info["dtype"]]
            f.seek(base + begin)
            raw = bytearray(end - begin)
            f.readinto(raw)
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def write_safetensors(path, tensors, metadata=None):
    """tensors: [(name, tensor)] in file order; the header is padded to 8 bytes as safetensors does."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors:
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_sharded(folder, tensors, max_shard_bytes=5 * 10**9):
    """Greedy shards in order (a tensor larger than the limit gets its own), named and indexed as
    transformers' save_pretrained and our TypeScript writer name them. -> list of files written."""
    shards = []
    for name, t in tensors:
        if shards and shards[-1][1] + _nbytes(t) <= max_shard_bytes:
            shards[-1][0].append((name, t))
            shards[-1][1] += _nbytes(t)
        else:
            shards.append([[(name, t)], _nbytes(t)])
    if len(shards) <= 1:
        write_safetensors(os.path.join(folder, SINGLE), tensors, {"format": "pt"})
        return [SINGLE]
    files, weight_map = [], {}
    for i, (items, _) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, file), items, {"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name, _ in items})
    index = {"metadata": {"total_size": sum(size for _, size in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return files


def parse_size(text):
    """'5GB' (5e9, as Hugging Face counts), '500MB', '2GiB', '1024'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40}
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


# ----------------------------------------------------------------------------- folders


def read_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def read_weights(folder):
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [SINGLE]
    state = {}
    for file in files:
        state.update(read_safetensors(os.path.join(folder, file)))
    return state


def stored_dtype(config, state):
    """The folder's weight dtype: config's dtype / torch_dtype, else the embedding's."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    return state["model.embed_tokens.weight"].dtype


def build_model(config, device="cpu"):
    """The pure-torch model, float32, on `device`, uninitialised where torch allows (meta device:
    the folder's weights overwrite everything), else initialised on CPU first (torch < 2.0)."""
    if hasattr(torch.nn.Module, "to_empty") and hasattr(torch.device("cpu"), "__enter__"):
        with torch.device("meta"):
            model = BamForCausalLMCore(config)
        model = model.to_empty(device=device)
    else:
        model = BamForCausalLMCore(config).to(device)
    if model.config.tie_word_embeddings:  # to_empty may untie the shared parameter: tie it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(folder, device="cpu", overrides=None):
    """-> (BamForCausalLMCore in float32 on device, the config dict with overrides applied, stored dtype)."""
    config = read_config(folder)
    if config.get("model_type") != "bam":
        raise ValueError(f"{folder}: model_type is {config.get('model_type')!r}, not 'bam'; build a BAM folder "
                         "with `bam upcycle` first (a dense seed is `bam upcycle seed -o out --experts 1`)")
    config.update(overrides or {})
    state = read_weights(folder)
    dtype = stored_dtype(config, state)
    model = build_model(config, device)
    if config.get("tie_word_embeddings"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model, config, dtype


def save_folder(out, state, config, source=None, dtype=torch.float32, max_shard_bytes=5 * 10**9, extra=None):
    """Writes a BAM folder atomically (to out.tmp, then renamed over out): safetensors with the docs/format.md
    names in `dtype` (lm_head left out when tied), config.json (the source's keys, updated), the model's
    python files from python/, the source folder's tokenizer and generation files, and `extra`
    {file name: text}. state: {name: tensor} full (unsharded) tensors."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tied = bool(config.get("tie_word_embeddings"))
    tensors = [(k, v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
               for k, v in state.items() if not (tied and k == "lm_head.weight")]
    write_sharded(tmp, tensors, max_shard_bytes)
    config = dict(config)
    config["dtype"] = {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, "float32")
    config.pop("torch_dtype", None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    for file in ("configuration_bam.py", "modeling_bam.py"):
        shutil.copyfile(os.path.join(PYTHON_DIR, file), os.path.join(tmp, file))
    if source:
        for entry in sorted(os.listdir(source)):
            if SIDE_FILES.match(entry):
                shutil.copyfile(os.path.join(source, entry), os.path.join(tmp, entry))
    for name, text in (extra or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
