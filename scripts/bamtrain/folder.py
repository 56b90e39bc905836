"""BAM model folders (docs/format.md): read and write safetensors, build the pure-torch model from a
folder, and save a trained model back as a folder that `from_pretrained(..., trust_remote_code=True)`,
`bam inspect` and `bam eval` read. Native `mixtral` and `qwen3_moe` folders (`bam upcycle --format`) are
read into the same model and saved back in their own format (bamtrain/native.py holds the mapping).

Every file is validated before it is trusted, as src/safetensors/reader.ts and checkpoint.ts do: the
header's length against the file, UTF-8 JSON without repeated keys, each entry's dtype, shape and
offsets, the tensors tiling the data section exactly (no gap, no overlap, nothing after, nothing cut
off); an index's weight_map against its shards (each shard inside the folder, every tensor exactly where
it says). Tensor data is read with the `safetensors` package where it is installed, else with plain
reads that refuse a short file; files are written by write_safetensors (deterministic bytes). Errors are
BamTrainError, one line naming the file.

Folders are replaced atomically (replace_folder): the new one is written beside the target, the old one
moved aside, the new one moved in, then the old one deleted; recover_folder, at start-up, puts back an
old folder a killed process had moved aside and removes unfinished new ones.
"""

import errno
import json
import os
import re
import shutil
import struct

import torch

from modeling_bam import BamForCausalLMCore  # noqa: E402  (python/ is on sys.path: see __init__)

from . import PYTHON_DIR, BamTrainError, native

try:  # the reference implementation, where installed (requirements.txt pins it); plain reads otherwise
    import safetensors.torch as st_lib
except ImportError:
    st_lib = None

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in ST_DTYPES.items()}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit, as reader.ts
METADATA = "__metadata__"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files of the source folder that travel with the model (as the upcycler copies them from the first seed)
SIDE_FILES = re.compile(
    r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|tokenizer\.model|"
    r"vocab\.json|merges\.txt|added_tokens\.json|generation_config\.json|"
    r"chat_template\.(jinja|json)|recipe\.yaml|README\.md)$"
)


# ----------------------------------------------------------------------------- safetensors


def _no_repeats(pairs):
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise BamTrainError(f"header repeats the key {k!r}")
    return dict(pairs)


def _is_dims(value):
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def read_header(path):
    """-> (data start, {name: (dtype name, shape, begin, end)} in file order, metadata or None), after the
    checks of reader.ts; raises BamTrainError naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise BamTrainError(f"{path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise BamTrainError(f"{path}: header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise BamTrainError(
                    f"{path}: header claims {n} bytes but the file has only {size - 8} after the "
                    "length; truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise BamTrainError(f"{path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except BamTrainError as e:
        raise BamTrainError(f"{path}: {e}") from e
    except ValueError as e:
        raise BamTrainError(f"{path}: header is not UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise BamTrainError(f"{path}: header is not a JSON object")
    metadata = header.pop(METADATA, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BamTrainError(f"{path}: {METADATA} must map strings to strings")
    entries = {}
    for name, info in header.items():
        bad = lambda reason: BamTrainError(f"{path}: tensor {name!r}: {reason}")  # noqa: B023
        if not isinstance(info, dict):
            raise bad("entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_SIZES:
            raise bad(f"dtype {dtype} is not supported")
        if not _is_dims(shape):
            raise bad("shape is not an array of non-negative integers")
        if not (_is_dims(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise bad("data_offsets is not [begin, end] with integers 0 <= begin <= end")
        need = ST_SIZES[dtype] * _prod(shape)
        if need != offsets[1] - offsets[0]:
            raise bad(f"{dtype} {shape} needs {need} bytes but data_offsets span {offsets[1] - offsets[0]}")
        entries[name] = (dtype, shape, offsets[0], offsets[1])
    data_bytes, expected = size - 8 - n, 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != expected:
            problem = f"leaves a gap after data byte {expected}" if begin > expected else "overlaps the previous tensor"
            raise BamTrainError(f"{path}: tensor {name!r} at data bytes {begin}..{end} {problem}")
        if end > data_bytes:
            raise BamTrainError(
                f"{path}: tensor {name!r} ends at data byte {end} but the file holds {data_bytes} "
                "data bytes; the file is truncated"
            )
        expected = end
    if expected < data_bytes:
        raise BamTrainError(f"{path}: {data_bytes - expected} bytes after the last tensor belong to no tensor")
    return 8 + n, entries, metadata


def _prod(shape):
    out = 1
    for d in shape:
        out *= d
    return out


def read_safetensors(path):
    """-> {name: tensor} on CPU, each in its stored dtype, after read_header's checks."""
    start, entries, _ = read_header(path)
    if st_lib is not None:
        try:
            return st_lib.load_file(path)
        except Exception as e:  # the file changed under us, or the package disagrees: one line
            raise BamTrainError(f"{path}: {e}") from e
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(start + begin)
            raw = bytearray(end - begin)
            if f.readinto(raw) != len(raw):
                raise BamTrainError(f"{path}: tensor {name!r} is cut off; the file is truncated")
            t = torch.frombuffer(raw, dtype=ST_DTYPES[dtype]) if raw else torch.empty(0, dtype=ST_DTYPES[dtype])
            out[name] = t.reshape(shape)
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def write_safetensors(path, tensors, metadata=None):
    """tensors: [(name, tensor)] in file order; the header is padded to 8 bytes as safetensors does. Our
    own writer even where the package is installed: its save_file reorders tensors and writes metadata
    keys in no fixed order, and reference files should be the same bytes on every rerun."""
    tensors = [(name, t.detach().cpu().contiguous()) for name, t in tensors]
    header, offset = {}, 0
    if metadata:
        header[METADATA] = metadata
    for name, t in tensors:
        header[name] = {
            "dtype": ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + _nbytes(t)],
        }
        offset += _nbytes(t)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


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
    index = {
        "metadata": {"total_size": sum(size for _, size in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return files


def parse_size(text):
    """'5GB' (5e9, as Hugging Face counts), '500MB', '2GiB', '1024'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    units = {
        "": 1,
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


# ----------------------------------------------------------------------------- folders


def read_config(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise BamTrainError(f"{path}: no such file; --model takes a model folder (bam upcycle's output)") from e
    except (OSError, ValueError) as e:
        raise BamTrainError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise BamTrainError(f"{path}: not a JSON object")
    return config


def weight_files(folder):
    """-> ({file: [tensor names] or None}, index path or None): the index's shards, validated as
    checkpoint.ts validates them, or the single file."""
    index = os.path.join(folder, INDEX)
    if not os.path.exists(index):
        if not os.path.exists(os.path.join(folder, SINGLE)):
            raise BamTrainError(f"{folder}: no model weights ({SINGLE} or {INDEX})")
        return {SINGLE: None}, None
    try:
        with open(index) as f:
            weight_map = json.load(f, object_pairs_hook=_no_repeats).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise BamTrainError(f"{index}: not a valid index ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise BamTrainError(f"{index}: expected an object with a non-empty weight_map object")
    shards = {}
    real = os.path.realpath(folder)
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise BamTrainError(f"{index}: weight_map entry {name!r} is not a file name")
        if os.path.dirname(os.path.realpath(os.path.join(folder, file))) != real:
            raise BamTrainError(f"{index}: shard {file!r} lies outside {folder}; shards must lie inside the folder")
        shards.setdefault(file, []).append(name)
    return shards, index


def read_weights(folder):
    """-> {name: tensor}: every file validated, every tensor exactly where the index puts it."""
    shards, index = weight_files(folder)
    state = {}
    for file, listed in shards.items():
        tensors = read_safetensors(os.path.join(folder, file))
        if listed is not None:
            extra = sorted(set(tensors) - set(listed))
            missing = sorted(set(listed) - set(tensors))
            if extra:
                raise BamTrainError(f"{index}: tensor {extra[0]!r} in {file} is not where weight_map puts it")
            if missing:
                raise BamTrainError(f"{index}: tensor {missing[0]!r} is listed in weight_map but missing from {file}")
        state.update(tensors)
    return state


def stored_dtype(config, state):
    """The folder's weight dtype: config's dtype / torch_dtype, else the embedding's."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    return state["model.embed_tokens.weight"].dtype


def build_model(config, device="cpu"):
    """The pure-torch model, float32, on `device`, uninitialised (meta device: the folder's weights
    overwrite everything)."""
    with torch.device("meta"):
        model = BamForCausalLMCore(config)
    model = model.to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty may untie the shared parameter: tie it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def first_non_finite(named_tensors):
    """The name of the first floating tensor holding NaN or Inf, or None."""
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_model(folder, device="cpu", overrides=None):
    """-> (BamForCausalLMCore in float32 on device, the config dict with overrides applied, stored dtype)."""
    config = read_config(folder)
    fmt = config.get("model_type")
    if fmt in native.FORMATS:
        config = native.to_bam_config(fmt, config, os.path.join(folder, "config.json"))
    elif fmt != "bam":
        raise BamTrainError(
            f"{folder}: model_type is {fmt!r}, not 'bam'; build a BAM folder with `bam upcycle` first "
            "(a dense seed is `bam upcycle seed -o out --experts 1`; `--format mixtral|qwen3-moe` "
            "folders are read too)"
        )
    config.update(overrides or {})
    state = read_weights(folder)
    if fmt in native.FORMATS:
        state = native.to_bam_state(fmt, state)
    bad = first_non_finite(state.items())
    if bad:
        raise BamTrainError(
            f"{folder}: tensor {bad!r} holds NaN or Inf values; the weights are damaged "
            "(`bam inspect --scan` lists every such tensor): rebuild the folder"
        )
    dtype = stored_dtype(config, state)
    model = build_model(config, device)
    if config.get("tie_word_embeddings"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        layout = f"{fmt} layout of `bam upcycle --format`" if fmt in native.FORMATS else "BAM layout (docs/format.md)"
        raise BamTrainError(
            f"{folder}: tensors missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            f"not a folder of this version's {layout}"
        )
    return model, config, dtype


# ----------------------------------------------------------------------------- atomic folders


def _aside(target):
    return target.rstrip("/") + ".old"


def _staging(target):
    return target.rstrip("/") + ".tmp"


def recover_folder(target):
    """Undoes what a killed replace_folder left: the old folder moved aside while the target is missing
    is put back; otherwise the aside copy (the swap had finished) and an unfinished new folder are removed."""
    old = _aside(target)
    if os.path.isdir(old):
        if os.path.exists(target):
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    shutil.rmtree(_staging(target), ignore_errors=True)


def replace_folder(new, target):
    """Moves the finished folder `new` to `target`: an existing target is renamed aside first and deleted
    only once the new one is in place, so a kill at any point leaves one complete folder (recover_folder)."""
    old = _aside(target)
    had = os.path.exists(target)
    if had:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if had:
        shutil.rmtree(old)


def is_disk_full(error):
    """ENOSPC, or torch's C++ writer's message for it ("file write failed", with its stack) / safetensors'."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return "file write failed" in text or "No space left" in text or "StorageFull" in text


def write_error(path, error, what):
    """A write's exception as one line: disk full, or the OS's reason."""
    if is_disk_full(error):
        try:
            free = f" ({shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:.0f} MB free)"
        except OSError:
            free = ""
        return BamTrainError(f"{path}: disk full while writing {what}{free}; free space, then run again")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return BamTrainError(f"{path}: cannot write {what}: {reason}")


def native_format(folder):
    """The source folder's native format ('mixtral', 'qwen3_moe'), or None for a BAM folder (or none)."""
    fmt = read_config(folder).get("model_type") if folder else None
    return fmt if fmt in native.FORMATS else None


def save_folder(out, state, config, source=None, dtype=torch.float32, max_shard_bytes=5 * 10**9, extra=None):
    """Writes a model folder atomically (into out.tmp, then replace_folder) in the source folder's format: a
    BAM folder (safetensors with the docs/format.md names, the model's python files from python/) or, for a
    native source, that format's tensor names and config.json (the source's, with the mapped keys updated),
    no remote code. Weights in `dtype` (lm_head left out when tied), the source folder's tokenizer and
    generation files, and `extra`
    {file name: text} (written last: a README.md there replaces the source's). state: {name: tensor}
    full (unsharded) tensors. A failed write (disk full) removes out.tmp and leaves `out` as it was."""
    tmp = _staging(out)
    fmt = native_format(source)
    recover_folder(out)
    try:
        os.makedirs(tmp)
        tied = bool(config.get("tie_word_embeddings"))
        state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
        if fmt:
            state = native.to_native_state(fmt, state)
            config = native.to_native_config(fmt, config, read_config(source))
        tensors = [
            (k, v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()) for k, v in state.items()
        ]
        write_sharded(tmp, tensors, max_shard_bytes)
        config = dict(config)
        config["dtype"] = {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, "float32")
        config.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        for file in () if fmt else ("configuration_bam.py", "modeling_bam.py"):
            shutil.copyfile(os.path.join(PYTHON_DIR, file), os.path.join(tmp, file))
        if source:
            for entry in sorted(os.listdir(source)):
                if SIDE_FILES.match(entry):
                    shutil.copyfile(os.path.join(source, entry), os.path.join(tmp, entry))
        for name, text in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or is_disk_full(e):
            raise write_error(out, e, "the model folder") from e
        raise
    replace_folder(tmp, out)
    return out
