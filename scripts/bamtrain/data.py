"""Training data: token sources, sequence packing, the domain mixture and the held-out blocks.

A domain is given as NAME=PATH[,PATH...][:WEIGHT] (see parse_spec). Its files are read in order and
concatenated into one token stream, an EOS between files:
  .npy          a 1-D integer array of token ids (memory-mapped)
  .bin          raw token ids, uint16 (vocab <= 65536) or uint32 (--bin-dtype, or the "dtype" of a meta.json
                beside the file, as scripts/data writes), memory-mapped (nanoGPT's format)
  .txt          one document per file, tokenised with the model folder's tokenizer.json (`tokenizers` package)
  .jsonl        one document per line, its "text" field (--text-key), tokenised the same way; .jsonl.gz the
                same, gzip-compressed
  .parquet      one document per row, its "text" column (--text-key), tokenised the same way (pyarrow, or
                pandas with a parquet engine)
  a directory   every such file under it, sorted by path
Text documents are tokenised without special tokens and each is followed by EOS (packing: documents
concatenated, separated by EOS, cut into fixed-length blocks; the tail shorter than a block is dropped).
Token files are taken as they are (already packed with EOS by whoever tokenised them). Text is tokenised
in memory at start-up, by every process: for large corpora, write .npy token files once instead.

Every file is checked at start-up, before any training step: not empty, a whole number of tokens,
every id inside the model's vocabulary (the bad id, its position and the file named), a .bin of uint32
ids read as uint16 (every second value 0) refused, every .jsonl line JSON with the text key. A domain of
weight 0 is never trained on, only evaluated (its held-out blocks); negative weights are refused.

Held-out blocks: the last blocks of each domain's stream (--eval-blocks per domain, at most a tenth of
it), or the blocks of --eval-data NAME=PATH when given; they are never trained on.

The mixture picks the domain of every training sequence deterministically by stride scheduling: the
domain d with the smallest (count_d + 1) / weight_d next (ties: the first listed), so any prefix of the
stream holds the domains in the weights' proportions. Within a domain, blocks come in a permutation seeded
by (seed, domain index, epoch). The position (per-domain count, epoch, cursor) is the whole state, saved in
checkpoints: resuming continues the same stream.
"""

import glob
import gzip
import json
import os
import re

import numpy as np
import torch

from . import BamTrainError

TOKEN_EXTS = (".npy", ".bin")
TEXT_EXTS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_FLOAT = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
SCAN_CHUNK = 1 << 24  # tokens per min/max pass of the start-up check (bounded memory on large files)


def parse_spec(spec):
    """'NAME=PATH[,PATH...][:WEIGHT]' or 'PATH[:WEIGHT]' -> (name, [paths], weight or None).
    The name defaults to the first path's stem; weights are relative (normalised over the domains)."""
    name = None
    if "=" in spec.split(",")[0] and not os.path.exists(spec):
        name, spec = spec.split("=", 1)
    weight = None
    head, sep, tail = spec.rpartition(":")
    if sep and _FLOAT.fullmatch(tail):
        spec, weight = head, float(tail)
    paths = [p for p in spec.split(",") if p]
    if not paths:
        raise BamTrainError(f"data spec {spec!r} names no file")
    if weight is not None and not weight >= 0:
        raise BamTrainError(
            f"data spec {spec}:{tail}: the weight must be >= 0 (relative shares; 0: evaluated, never trained on)"
        )
    if name is None:
        name = os.path.splitext(os.path.basename(paths[0].rstrip("/")))[0]
    return name, paths, weight


def expand(paths):
    """Files and directories (and glob patterns) -> the data files, in order."""
    out = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise BamTrainError(f"{p}: no such file")
        for m in matches:
            if os.path.isdir(m):
                found = sorted(
                    os.path.join(r, f) for r, _, fs in os.walk(m) for f in fs if f.endswith(TOKEN_EXTS + TEXT_EXTS)
                )
                if not found:
                    raise BamTrainError(f"{m}: no {'/'.join(TOKEN_EXTS + TEXT_EXTS)} files under it")
                out += found
            elif os.path.exists(m):
                if not m.endswith(TOKEN_EXTS + TEXT_EXTS):
                    raise BamTrainError(f"{m}: unknown data file type (use {', '.join(TOKEN_EXTS + TEXT_EXTS)})")
                if os.path.getsize(m) == 0:
                    raise BamTrainError(f"{m}: empty file; remove it from --data or give the tokens it should hold")
                out.append(m)
            else:
                raise BamTrainError(f"{m}: no such file")
    return out


class Tokenizer:
    """The model folder's tokenizer.json through the `tokenizers` package, loaded on first use."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "tokenizer.json")
        self._tok = None

    def encode(self, texts):
        if self._tok is None:
            try:
                from tokenizers import Tokenizer as HfTokenizer
            except ImportError as e:
                raise BamTrainError(
                    "text data (.txt, .jsonl, .parquet) needs the `tokenizers` package (pip install "
                    "tokenizers); "
                    "or give token ids as .npy/.bin"
                ) from e
            if not os.path.exists(self.path):
                raise BamTrainError(f"{self.path}: text data needs the model folder's tokenizer.json")
            self._tok = HfTokenizer.from_file(self.path)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def read_documents(path, text_key="text"):
    """-> the documents (strings) of a text file: .txt whole, .jsonl / .jsonl.gz per line, .parquet per row."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    if path.endswith(".parquet"):
        return read_parquet(path, text_key)
    docs = []
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    raise BamTrainError(f"{path}: line {n} is not JSON ({e})") from e
                if not isinstance(doc, dict) or not isinstance(doc.get(text_key), str):
                    keys = ", ".join(doc) if isinstance(doc, dict) else "none"
                    raise BamTrainError(
                        f"{path}: line {n} has no string field {text_key!r} (its keys: {keys}); "
                        "name the field with --text-key"
                    )
                docs.append(doc[text_key])
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError; EOFError: cut off
        raise BamTrainError(f"{path}: not readable {'gzip ' if opener is gzip.open else ''}text ({e})") from e
    return docs


def read_parquet(path, text_key):
    """A parquet file's `text_key` column as documents: pyarrow where installed, else pandas (which needs
    pyarrow or fastparquet itself); neither: one line saying what to install."""
    missing = f"{path}: .parquet data needs pyarrow (pip install pyarrow); or give the text as .jsonl / .jsonl.gz"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            table = pq.read_table(path)
            columns = table.column_names
            texts = table.column(text_key).to_pylist() if text_key in columns else None
        else:
            try:
                import pandas as pd
            except ImportError as e:
                raise BamTrainError(missing) from e
            frame = pd.read_parquet(path)
            columns = [str(c) for c in frame.columns]
            texts = frame[text_key].tolist() if text_key in frame.columns else None
    except ImportError as e:  # pandas without a parquet engine
        raise BamTrainError(missing) from e
    except BamTrainError:
        raise
    except Exception as e:  # noqa: BLE001  (each library has its own error types for a damaged file)
        raise BamTrainError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e!r})") from e
    if texts is None:
        raise BamTrainError(
            f"{path}: no column {text_key!r} (its columns: {', '.join(columns)}); name the column with --text-key"
        )
    for n, text in enumerate(texts, 1):
        if not isinstance(text, str):
            raise BamTrainError(f"{path}: row {n} of column {text_key!r} is {type(text).__name__}, not text")
    return texts


class Stream:
    """A domain's token stream: pieces (memory-mapped arrays or in-memory token lists) read as one."""

    def __init__(self, pieces):
        self.pieces = [p for p in pieces if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces])

    def __len__(self):
        return int(self.starts[-1])

    def read(self, start, n):
        out = np.empty(n, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < n:
            off = start + done - int(self.starts[i])
            take = min(n - done, len(self.pieces[i]) - off)
            out[done : done + take] = self.pieces[i][off : off + take]
            done += take
            i += 1
        return out


def meta_dtype(path):
    """(the "dtype" of a meta.json beside a .bin, as scripts/data writes one, its path), or (None, None)."""
    meta = os.path.join(os.path.dirname(path), "meta.json")
    if os.path.exists(meta):
        try:
            with open(meta) as f:
                dtype = json.load(f).get("dtype")
        except (OSError, ValueError, AttributeError):
            dtype = None
        if dtype in ("uint16", "uint32"):
            return np.dtype(dtype), meta
    return None, None


def open_bin(path, dtype, given):
    """The memory-mapped ids of a .bin, after the checks its layout allows. dtype: --bin-dtype when
    `given`, else the vocabulary's default, which a meta.json beside the file overrides."""
    stated, meta = meta_dtype(path)
    if stated is not None and stated != dtype:
        if given:
            raise BamTrainError(
                f"{path}: {meta} says {stated.name} but --bin-dtype is {dtype.name}; drop --bin-dtype or fix meta.json"
            )
        dtype = stated
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise BamTrainError(
            f"{path}: {size} bytes is not a whole number of {dtype.name} tokens; "
            f"pass --bin-dtype {'uint16' if dtype.itemsize == 4 else 'uint32'} if that is its width"
        )
    ids = np.memmap(path, dtype=dtype, mode="r")
    if dtype == np.uint16 and len(ids) >= 16:
        head = np.asarray(ids[: min(len(ids), 1 << 20) // 2 * 2])
        if not head[1::2].any() and head[0::2].any():
            source = f" ({meta} says uint16)" if meta else ""
            raise BamTrainError(
                f"{path}: every second uint16 value is 0, as uint32 ids read as uint16 are{source}; "
                "pass --bin-dtype uint32"
            )
    return ids


def check_ids(path, ids, vocab, offset=0):
    """Every id of a piece in [0, vocab): one pass of min/max per chunk."""
    for start in range(0, len(ids), SCAN_CHUNK):
        chunk = np.asarray(ids[start : start + SCAN_CHUNK])
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            where = start + int(np.argmax(chunk == bad))
            hint = "; wrong --bin-dtype, or tokens of another tokenizer?" if path.endswith(".bin") else ""
            raise BamTrainError(
                f"{path}: token id {bad} at position {offset + where} is outside the model's "
                f"vocabulary (0..{vocab - 1}){hint}"
            )


def load_stream(files, eos, tokenizer, bin_dtype, text_key="text", vocab=None, bin_dtype_given=False):
    """-> Stream; with `vocab`, every id is checked against it (check_ids)."""
    pieces = []
    texts = []

    def flush_texts():
        if texts:
            ids = tokenizer.encode(texts)
            pieces.append(np.fromiter((t for doc in ids for t in doc + [eos]), dtype=np.int64))
            if vocab is not None:
                check_ids(", ".join(text_files), pieces[-1], vocab)
            texts.clear()
            text_files.clear()

    text_files = []

    for path in files:
        if path.endswith(TEXT_EXTS):
            texts.extend(read_documents(path, text_key))
            text_files.append(path)
            continue
        flush_texts()
        if pieces:
            pieces.append(np.array([eos], dtype=np.int64))  # each token file ends a document
        if path.endswith(".npy"):
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise BamTrainError(f"{path}: not a .npy array ({e})") from e
            if arr.dtype.kind not in "iu":
                raise BamTrainError(f"{path}: token ids must be integers, got {arr.dtype}")
            if arr.size == 0:
                raise BamTrainError(f"{path}: holds no tokens")
            pieces.append(arr.reshape(-1))
        else:
            pieces.append(open_bin(path, bin_dtype, bin_dtype_given))
        if vocab is not None:
            check_ids(path, pieces[-1], vocab)
    flush_texts()
    return Stream(pieces)


class Domain:
    def __init__(self, name, weight, stream, seq_len, eval_blocks, eval_stream=None):
        self.name, self.weight, self.stream, self.seq_len = name, weight, stream, seq_len
        n = len(stream) // seq_len
        if eval_stream is not None:
            self.eval_stream = eval_stream
            self.eval_blocks = list(range(min(eval_blocks, len(eval_stream) // seq_len)))
            self.train_blocks = n
        else:
            self.eval_stream = stream
            k = min(eval_blocks, n // 10) if eval_blocks else 0
            if eval_blocks and n >= 2:
                k = max(k, 1)
            self.eval_blocks = list(range(n - k, n))
            self.train_blocks = n - k
        if weight > 0 and self.train_blocks < 1:
            raise BamTrainError(
                f"domain {name!r}: {len(stream)} tokens make no training block of {seq_len} "
                "(and its held-out share); add data or lower --seq-len"
            )
        if eval_stream is not None and not self.eval_blocks and eval_blocks:
            raise BamTrainError(
                f"--eval-data {name}: {len(eval_stream)} tokens make no block of {seq_len}; "
                "add held-out data or lower --seq-len"
            )

    def block(self, i, eval=False):
        return (self.eval_stream if eval else self.stream).read(i * self.seq_len, self.seq_len)


class Mixture:
    """The training stream over several domains; state_dict() is the data position."""

    def __init__(self, domains, seed=0):
        self.domains = domains
        self.train = [i for i, d in enumerate(domains) if d.weight > 0]
        if not self.train:
            raise BamTrainError("no domain has a positive weight")
        total = sum(domains[i].weight for i in self.train)
        self.weights = {i: domains[i].weight / total for i in self.train}
        self.seed = seed
        self.state = {"sequences": 0, "domains": {d.name: {"count": 0, "epoch": 0, "cursor": 0} for d in domains}}
        self._perm = {}

    def _permutation(self, i, epoch):  # one cached per domain: its current epoch's
        if self._perm.get(i, (None,))[0] != epoch:
            self._perm[i] = (
                epoch,
                np.random.default_rng([self.seed, i, epoch]).permutation(self.domains[i].train_blocks),
            )
        return self._perm[i][1]

    def next_refs(self, n):
        """The next n training sequences as (domain index, block index); advances the position."""
        refs = []
        for _ in range(n):
            counts = self.state["domains"]
            i = min(self.train, key=lambda j: ((counts[self.domains[j].name]["count"] + 1) / self.weights[j], j))
            st = counts[self.domains[i].name]
            refs.append((i, int(self._permutation(i, st["epoch"])[st["cursor"]])))
            st["count"] += 1
            st["cursor"] += 1
            if st["cursor"] == self.domains[i].train_blocks:
                st["epoch"], st["cursor"] = st["epoch"] + 1, 0
        self.state["sequences"] += n
        return refs

    def batch(self, refs, vocab_size=None, eval=False):
        x = np.stack([self.domains[i].block(b, eval) for i, b in refs])
        if vocab_size is not None and (x.min() < 0 or x.max() >= vocab_size):
            raise ValueError(f"token id {int(x.max())} outside the model's vocabulary of {vocab_size}")
        return torch.from_numpy(x)

    def eval_sets(self):
        """-> [(domain name, [(domain index, block index), ...])] for the held-out perplexity."""
        return [(d.name, [(i, b) for b in d.eval_blocks]) for i, d in enumerate(self.domains) if d.eval_blocks]

    def state_dict(self):
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state):
        if set(state["domains"]) != set(self.state["domains"]):
            raise BamTrainError(
                f"the checkpoint's data domains {sorted(state['domains'])} differ from "
                f"--data's {sorted(self.state['domains'])}"
            )
        self.state = json.loads(json.dumps(state))


def eos_id(config, folder, given=None):
    if given is not None:
        return given
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>"):
            if name in added:
                return added[name]
    raise BamTrainError("the model's config has no eos_token_id; give --eos-id")


def build_mixture(
    specs, eval_specs, model_folder, config, seq_len, eval_blocks, seed=0, bin_dtype=None, eos=None, text_key="text"
):
    """--data and --eval-data specs -> Mixture."""
    vocab = config["vocab_size"]
    given = bin_dtype is not None
    bin_dtype = np.dtype(bin_dtype or (np.uint16 if vocab <= 65536 else np.uint32))
    eos = eos_id(config, model_folder, eos)
    if not 0 <= eos < vocab:
        raise BamTrainError(f"--eos-id / eos_token_id {eos} is outside the model's vocabulary (0..{vocab - 1})")
    load = lambda paths: load_stream(expand(paths), eos, tok, bin_dtype, text_key, vocab, given)  # noqa: E731
    tok = Tokenizer(model_folder)
    parsed = [parse_spec(s) for s in specs]
    names = [n for n, _, _ in parsed]
    if len(set(names)) != len(names):
        raise BamTrainError(f"domain names repeat: {names}; name them NAME=PATH")
    evals = {}
    for s in eval_specs or []:
        n, paths, _ = parse_spec(s)
        if n not in names:
            raise BamTrainError(f"--eval-data {s!r}: no --data domain named {n!r} ({names})")
        evals[n] = load(paths)
    domains = []
    for name, paths, weight in parsed:
        stream = load(paths)
        domains.append(Domain(name, 1.0 if weight is None else weight, stream, seq_len, eval_blocks, evals.get(name)))
    return Mixture(domains, seed)
