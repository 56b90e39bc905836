#!/usr/bin/env python3
"""Build the four-domain corpus for the small-scale BAM reproduction (issue 8) out of Debian packages.

    nice -n 10 python3 scripts/data/build_corpus.py            # or scripts/data/build_corpus.sh
    python3 scripts/data/build_corpus.py --verify              # check the token files against the manifest

Needs: Debian's apt-get / apt-cache / dpkg-deb (the packages are downloaded with `apt-get download`, never
installed) and a Python with the `tokenizers` package (everything else is the standard library).

Stages
  1. fetch     every package of SOURCES as a .deb into <out>/cache/debs (sha256 checked against apt's).
               With a manifest present, the versions it records are fetched (`apt-get download pkg=ver`)
               or taken from the cache; --refresh takes apt's current candidates instead.
  2. extract   `dpkg-deb -x` into a temporary folder; text out of HTML, roff, GNU info, dictd, TeX and
               source files (scripts/data/extract.py); normalised; files over 64K characters cut at
               blank lines into parts of at most 32K characters; documents under 200 characters dropped;
               exact duplicates (white space collapsed) dropped across all domains.
  3. split     per domain, by document, with a fixed seed: held-out = the first documents of a seeded
               shuffle until 2% of the domain's characters (at least 256K, at most 1M); the rest is train.
  4. tokenizer byte-level BPE (`tokenizers`), vocabulary 8192 with <|endoftext|> = id 0, trained on the
               general train split only -> <out>/tokenizer.json
  5. tokens    each domain/split as flat uint16 token ids, every document followed by <|endoftext|>
               (nanoGPT's .bin layout, read by scripts/bamtrain/data.py); train splits in seeded shuffled
               order, cut at --train-tokens tokens each; held-out splits whole.
               -> <out>/tokens/{domain}.{train,heldout}.bin and <out>/tokens/meta.json
  6. manifest  <out>/manifest.json: packages (name, version, architecture, sha256), documents, characters,
               bytes and tokens per domain and split, sha256 of every token file.

Everything is deterministic: the same package versions give byte-identical token files.
"""

import argparse
import array
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extract as X  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORMAT = 1

# --------------------------------------------------------------------------------------------------
# what goes in: domain -> [(package, [(path regex, kind)])]. Paths are relative to the package root.

PY_SRC = [(r"usr/lib/python3\.11/.*\.py$", "code")]
R_VIGNETTES = [(r"usr/lib/R/(site-)?library/[^/]+/doc/[^/]+\.(Rnw|tex)$", "text")]
MAN = [(r"usr/share/man/man\d/[^/]+\.\d\w*\.gz$", "man")]
DICTD = [(r"usr/share/dictd/[^/]+\.index$", "dictd")]

SOURCES = {
    # documentation and manuals: reStructuredText, AsciiDoc, HTML, man pages, a GNU info manual
    "general": [
        ("python3.11-doc", [(r"usr/share/doc/python3\.11/html/_sources/.*\.rst\.txt$", "text")]),
        ("debian-reference-en", [(r"usr/share/debian-reference/(?!index\.)[^/]+\.en\.html$", "html")]),
        ("manpages", MAN),
        ("manpages-dev", MAN),
        ("bash-doc", [(r"usr/share/info/bash\.info\.gz$", "info")]),
        ("git-doc", [(r"usr/share/doc/git-doc/.*\.txt$", "text")]),
        (
            "postgresql-doc-15",
            [(r"usr/share/doc/postgresql-doc-15/html/(?!(index|bookindex)\.html)[^/]+\.html$", "html")],
        ),
    ],
    # Python (the 3.11 standard library and its test suite) and C (the X.Org server's source tree)
    "code": [
        ("libpython3.11-minimal", PY_SRC),
        ("libpython3.11-stdlib", PY_SRC),
        ("libpython3.11-testsuite", PY_SRC),
        ("xorg-server-source", [(r"usr/src/xorg-server\.tar\.xz$", "tarball:" + r"[^/]+/.*\.[ch]$")]),
    ],
    # LaTeX / TeX (PARI/GP's manuals, R package vignettes) and the manuals of mathematical software
    # (SymPy, with its formulas' TeX; GAP; Maxima; GNU Octave)
    "math": [
        ("pari-doc", [(r"usr/share/pari/doc/[^/]+\.tex$", "text")]),
        ("r-cran-survival", R_VIGNETTES),
        ("r-cran-lme4", R_VIGNETTES),
        ("r-cran-sandwich", R_VIGNETTES),
        ("r-cran-zoo", R_VIGNETTES),
        ("r-cran-actuar", R_VIGNETTES),
        ("r-cran-coin", R_VIGNETTES),
        ("r-cran-vcd", R_VIGNETTES),
        ("r-cran-multcomp", R_VIGNETTES),
        ("r-cran-strucchange", R_VIGNETTES),
        (
            "python-sympy-doc",
            [
                (
                    r"usr/share/doc/python-sympy-doc/html/(?!_|genindex|search|py-modindex)"
                    r"(.*/)?[^/_][^/]*\.html$",
                    "html",
                )
            ],
        ),
        ("gap-doc", [(r"usr/share/gap/doc/[^/]+/chap(?!0\.|Bib|Ind)[^/_]+\.html$", "html")]),
        ("maxima-doc", [(r"usr/share/info/maxima\.info-\d+\.gz$", "info")]),
        (
            "octave-doc",
            [
                (
                    r"usr/share/doc/octave/(octave|liboctave)\.html/(?!index\.html)(?![^/]*Index\.html)"
                    r"[^/]+\.html$",
                    "html",
                )
            ],
        ),
    ],
    # dictionaries (dictd format): GCIDE (Webster 1913 with WordNet 1.5 glosses), FOLDOC, the Jargon
    # File, the Devil's Dictionary. One document = consecutive entries, about 16K characters.
    "lexicon": [
        ("dict-gcide", DICTD),
        ("dict-foldoc", DICTD),
        ("dict-jargon", DICTD),
        ("dict-devil", DICTD),
    ],
}
DOMAINS = list(SOURCES)

SPECIAL = "<|endoftext|>"
MIN_CHARS = 200


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def rel(path):
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return path


# --------------------------------------------------------------------------------------------------
# 1. fetch


def apt_candidate(pkg):
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"apt-cache knows no package {pkg!r} (run `apt-get update` first?)\n{r.stderr}")
    fields = {}
    for line in r.stdout.split("\n\n")[0].split("\n"):
        m = re.match(r"([A-Za-z0-9-]+):\s*(.*)$", line)
        if m:
            fields[m.group(1)] = m.group(2)
    return {
        "version": fields["Version"],
        "architecture": fields["Architecture"],
        "filename": os.path.basename(fields["Filename"]),
        "size": int(fields["Size"]),
        "sha256": fields["SHA256"],
    }


def apt_download(pkg, version, dest_dir, want_sha, filename):
    with tempfile.TemporaryDirectory(prefix="bam-apt-") as tmp:
        os.chmod(tmp, 0o755)
        cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"]
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if r.returncode != 0 or len(debs) != 1:
            raise SystemExit(
                f"`{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}\n"
                "(a version that left the archive: rerun with --refresh to take the current one)"
            )
        got = os.path.join(tmp, debs[0])
        sha = sha256_file(got)
        if want_sha and sha != want_sha:
            raise SystemExit(f"{pkg} {version}: sha256 {sha} != expected {want_sha}")
        dst = os.path.join(dest_dir, filename)
        shutil.move(got, dst)
        return dst


def deb_field(path, field):
    return subprocess.run(["dpkg-deb", "-f", path, field], capture_output=True, text=True, check=True).stdout.strip()


def fetch(packages, cache, old, refresh):
    """packages: [(domain, name)]. Returns {name: record} with the .deb's path under 'path'."""
    os.makedirs(cache, exist_ok=True)
    recorded = {} if refresh or not old else {p["name"]: p for p in old.get("packages", [])}
    out = {}
    for domain, name in packages:
        rec = recorded.get(name)
        if rec is None:
            rec = apt_candidate(name)
        else:
            rec = {k: rec[k] for k in ("version", "architecture", "filename", "size", "sha256")}
        path = os.path.join(cache, rec["filename"])
        if os.path.exists(path) and sha256_file(path) == rec["sha256"]:
            how = "cached"
        else:
            log(f"  download {name}={rec['version']} ({rec['size'] / 1e6:.1f} MB)")
            path = apt_download(name, rec["version"], cache, rec["sha256"], rec["filename"])
            how = "downloaded"
        if deb_field(path, "Package") != name or deb_field(path, "Version") != rec["version"]:
            raise SystemExit(f"{path}: not {name} {rec['version']}")
        out[name] = dict(rec, name=name, domain=domain, path=path, how=how)
    return out


# --------------------------------------------------------------------------------------------------
# 2. extract


def read_maybe_gz(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def convert(kind, name, data):
    """One file's bytes -> a list of texts (several for info manuals)."""
    text = X.decode(data)
    if kind in ("text", "code"):
        t = X.normalise(text)
        if kind == "code" and t and X.looks_generated(t):
            return []
        return [t]
    if kind == "html":
        return [X.html_to_text(text)]
    if kind == "man":
        t = X.roff_to_text(text)
        return [t] if t else []
    if kind == "info":
        return X.group(X.info_to_nodes(text))
    raise ValueError(kind)


def files_of(root):
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            if not os.path.islink(p) and os.path.isfile(p):
                yield os.path.relpath(p, root).replace(os.sep, "/"), p


def extract_package(deb, rules):
    """-> [(path, text)] in path order, and the number of files read."""
    texts, nfiles = [], 0
    with tempfile.TemporaryDirectory(prefix="bam-deb-") as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        for relpath, path in files_of(tmp):
            for rx, kind in rules:
                if not re.match(rx, relpath):
                    continue
                nfiles += 1
                if kind == "dictd":
                    base = path[: -len(".index")]
                    dz = base + ".dict.dz"
                    plain = base + ".dict"
                    body = read_maybe_gz(dz) if os.path.exists(dz) else open(plain, "rb").read()
                    with open(path, "rb") as f:
                        index = X.decode(f.read())
                    for i, t in enumerate(X.group(X.dictd_entries(index, body))):
                        texts.append((f"{relpath}#{i}", t))
                elif kind.startswith("tarball:"):
                    inner = kind[len("tarball:") :]
                    with tarfile.open(path, "r:*") as tf:
                        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
                        for m in members:
                            if re.match(inner, m.name):
                                data = tf.extractfile(m).read()
                                for t in convert("code", m.name, data):
                                    texts.append((f"{relpath}:{m.name}", t))
                else:
                    data = read_maybe_gz(path)
                    for i, t in enumerate(convert(kind, relpath, data)):
                        texts.append((relpath if i == 0 else f"{relpath}#{i}", t))
                break
        kinds = {k for _, k in rules}
        if "html" in kinds:  # navigation lines the class filter missed
            cleaned = X.drop_boilerplate([t for _, t in texts])
            texts = [(p, t) for (p, _), t in zip(texts, cleaned)]
    return texts, nfiles


def build_documents(debs):
    """-> {domain: [doc]} with doc = {key, package, text}; and per-package statistics."""
    seen = set()
    docs = {d: [] for d in DOMAINS}
    stats = {}
    for domain in DOMAINS:
        for name, rules in SOURCES[domain]:
            t0 = time.time()
            texts, nfiles = extract_package(debs[name]["path"], rules)
            st = {"files": nfiles, "documents": 0, "chars": 0, "bytes": 0, "duplicates": 0, "short": 0}
            for path, text in texts:
                for j, part in enumerate(X.chunk(text)):
                    if len(part) < MIN_CHARS:
                        st["short"] += 1
                        continue
                    key = hashlib.sha256(X.dedup_key(part).encode("utf-8")).digest()
                    if key in seen:
                        st["duplicates"] += 1
                        continue
                    seen.add(key)
                    docs[domain].append(
                        {"key": f"{name}/{path}" + (f"@{j}" if j else ""), "package": name, "text": part}
                    )
                    st["documents"] += 1
                    st["chars"] += len(part)
                    st["bytes"] += len(part.encode("utf-8"))
            stats[name] = st
            log(
                f"  {domain:8s} {name:28s} files={nfiles:5d} docs={st['documents']:6d} "
                f"chars={st['chars'] / 1e6:7.2f}M dup={st['duplicates']} short={st['short']} "
                f"({time.time() - t0:.1f}s)"
            )
    return docs, stats


# --------------------------------------------------------------------------------------------------
# 3. split


def split(docs, seed, frac, lo, hi):
    """Seeded shuffle; held-out = leading documents until frac of the characters (clamped to [lo, hi]).
    Returns (train, heldout), both in the shuffled order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d["text"]) for d in docs)
    target = min(max(frac * total, lo), hi)
    held, size, i = [], 0, 0
    while i < len(order) and size < target:
        held.append(docs[order[i]])
        size += len(docs[order[i]]["text"])
        i += 1
    train = [docs[j] for j in order[i:]]
    return train, held


# --------------------------------------------------------------------------------------------------
# 4. tokenizer


def train_tokenizer(texts, vocab_size, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.save(path)
    return tok


# --------------------------------------------------------------------------------------------------
# 5. tokens


def write_tokens(tok, docs, eos, path, cap=None, batch=256):
    """Encodes docs in order, each followed by eos, into a uint16 file; stops at cap tokens (the last
    document cut). Returns counts."""
    buf = array.array("H")
    used_docs, used_chars, used_bytes, cut = 0, 0, 0, False
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        encs = tok.encode_batch([d["text"] for d in chunk], add_special_tokens=False)
        for d, e in zip(chunk, encs):
            ids = e.ids + [eos]
            if cap is not None and len(buf) + len(ids) > cap:
                ids = ids[: cap - len(buf)]
                cut = True
            buf.extend(ids)
            used_docs += 1
            used_chars += len(d["text"])
            used_bytes += len(d["text"].encode("utf-8"))
            if cut:
                break
        if cut:
            break
    if sys.byteorder != "little":
        buf.byteswap()
    with open(path, "wb") as f:
        buf.tofile(f)
    return {
        "path": os.path.basename(path),
        "tokens": len(buf),
        "documents": used_docs,
        "last_document_cut": cut,
        "chars": used_chars,
        "bytes": used_bytes,
        "file_bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
    }


# --------------------------------------------------------------------------------------------------


def by_package(docs):
    """{package: [documents, characters]} in the order of SOURCES."""
    out = {}
    for x in docs:
        r = out.setdefault(x["package"], [0, 0])
        r[0] += 1
        r[1] += len(x["text"])
    order = [n for d in DOMAINS for n, _ in SOURCES[d]]
    return {n: out[n] for n in order if n in out}


def verify(out):
    man_path = os.path.join(out, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    bad = 0
    tokdir = os.path.join(out, man["tokens"]["dir"])
    for rec in man["tokens"]["files"].values():
        p = os.path.join(tokdir, rec["path"])
        ok = os.path.exists(p) and sha256_file(p) == rec["sha256"]
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {rel(p)} {rec['tokens']} tokens")
    p = os.path.join(out, "tokenizer.json")
    ok = os.path.exists(p) and sha256_file(p) == man["tokenizer"]["sha256"]
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} {rel(p)}")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "data", "corpus"))
    ap.add_argument("--cache", default=None, help="where the .deb files are kept (default <out>/cache/debs)")
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="take apt's current candidate versions, not the ones the manifest records",
    )
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--heldout-min-chars", type=int, default=256_000)
    ap.add_argument("--heldout-max-chars", type=int, default=1_000_000)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--train-tokens", type=int, default=8_000_000, help="cap per domain's train split")
    ap.add_argument("--threads", type=int, default=1, help="tokenizers' threads (RAYON_RS_NUM_CPUS)")
    ap.add_argument(
        "--verify", action="store_true", help="only check the token files and tokenizer against the manifest's sha256"
    )
    args = ap.parse_args()

    out = os.path.abspath(args.out)
    if args.verify:
        return verify(out)
    os.environ["RAYON_RS_NUM_CPUS"] = os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import tokenizers  # noqa: F401  (fail early, before the downloads)

    t_start = time.time()
    cache = os.path.abspath(args.cache or os.path.join(out, "cache", "debs"))
    tokdir = os.path.join(out, "tokens")
    os.makedirs(tokdir, exist_ok=True)
    man_path = os.path.join(out, "manifest.json")
    old = None
    if os.path.exists(man_path):
        with open(man_path) as f:
            old = json.load(f)

    log("1. fetch")
    wanted = [(d, name) for d in DOMAINS for name, _ in SOURCES[d]]
    debs = fetch(wanted, cache, old, args.refresh)
    t_fetch = time.time()

    log("2. extract")
    docs, pkg_stats = build_documents(debs)
    t_extract = time.time()

    log("3. split")
    splits = {}
    for d in DOMAINS:
        splits[d] = split(
            docs[d], f"{args.seed}:{d}", args.heldout_frac, args.heldout_min_chars, args.heldout_max_chars
        )
        tr, he = splits[d]
        log(
            f"  {d:8s} train={len(tr)} docs {sum(len(x['text']) for x in tr) / 1e6:.2f}M chars, "
            f"heldout={len(he)} docs {sum(len(x['text']) for x in he) / 1e6:.2f}M chars"
        )

    log("4. tokenizer (general train split)")
    tok_path = os.path.join(out, "tokenizer.json")
    # the general train documents in their original (package, path) order
    general_train = sorted(splits["general"][0], key=lambda x: x["key"])
    tok = train_tokenizer([x["text"] for x in general_train], args.vocab_size, tok_path)
    eos = tok.token_to_id(SPECIAL)
    assert eos == 0 and tok.get_vocab_size() == args.vocab_size <= 65536
    t_tok = time.time()

    log("5. tokens")
    files = {}
    for d in DOMAINS:
        tr, he = splits[d]
        files[f"{d}.train"] = write_tokens(tok, tr, eos, os.path.join(tokdir, f"{d}.train.bin"), cap=args.train_tokens)
        files[f"{d}.heldout"] = write_tokens(tok, he, eos, os.path.join(tokdir, f"{d}.heldout.bin"))
        for s in ("train", "heldout"):
            r = files[f"{d}.{s}"]
            log(
                f"  {d}.{s}: {r['tokens']} tokens, {r['documents']} docs, "
                f"{r['bytes'] / max(1, r['tokens'] - r['documents']):.2f} bytes/token"
            )
    t_bins = time.time()

    tokens_meta = {
        "dir": "tokens",
        "dtype": "uint16",
        "byteorder": "little",
        "eos_id": eos,
        "eos_token": SPECIAL,
        "vocab_size": args.vocab_size,
        "layout": "flat token ids; every document is followed by eos_id",
        "files": files,
        "total_tokens": sum(r["tokens"] for r in files.values()),
        "total_file_bytes": sum(r["file_bytes"] for r in files.values()),
    }
    with open(os.path.join(tokdir, "meta.json"), "w") as f:
        json.dump({**tokens_meta, "tokenizer": "../tokenizer.json"}, f, indent=1, sort_keys=True)
        f.write("\n")

    domains = {}
    for d in DOMAINS:
        tr, he = splits[d]
        domains[d] = {
            "packages": [name for name, _ in SOURCES[d]],
            "documents": {"train": len(tr), "heldout": len(he)},
            "chars": {"train": sum(len(x["text"]) for x in tr), "heldout": sum(len(x["text"]) for x in he)},
            "bytes": {
                "train": sum(len(x["text"].encode("utf-8")) for x in tr),
                "heldout": sum(len(x["text"].encode("utf-8")) for x in he),
            },
            "tokens": {"train": files[f"{d}.train"]["tokens"], "heldout": files[f"{d}.heldout"]["tokens"]},
            "train_documents_in_tokens": files[f"{d}.train"]["documents"],
            # documents per package: in the held-out split, and in the (capped) train token file
            "heldout_by_package": by_package(he),
            "train_tokens_by_package": by_package(tr[: files[f"{d}.train"]["documents"]]),
            "heldout_keys_sha256": hashlib.sha256("\n".join(sorted(x["key"] for x in he)).encode()).hexdigest(),
        }
    import tokenizers as _t

    manifest = {
        "format": FORMAT,
        "what": "four-domain corpus from Debian packages for the small-scale BAM reproduction (issue 8); "
        "built by scripts/data/build_corpus.py, described in docs/data.md",
        "distribution": subprocess.run(
            ["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"], capture_output=True, text=True
        ).stdout.strip(),
        "settings": {
            "seed": args.seed,
            "heldout_frac": args.heldout_frac,
            "heldout_min_chars": args.heldout_min_chars,
            "heldout_max_chars": args.heldout_max_chars,
            "min_doc_chars": MIN_CHARS,
            "chunk": "texts over 65536 chars cut at blank lines into parts of at most 32768 chars",
            "dedup": "exact, sha256 of the text with white space collapsed, "
            "across all domains in the order general, code, math, lexicon",
            "vocab_size": args.vocab_size,
            "train_tokens_cap": args.train_tokens,
            "tokenizers_version": _t.__version__,
        },
        "packages": [
            {k: debs[name][k] for k in ("name", "domain", "version", "architecture", "filename", "size", "sha256")}
            | pkg_stats[name]
            for _, name in wanted
        ],
        "download_bytes": sum(debs[name]["size"] for _, name in wanted),
        "domains": domains,
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": sha256_file(tok_path),
            "vocab_size": args.vocab_size,
            "eos_id": eos,
            "special_tokens": [SPECIAL],
            "model": "byte-level BPE",
            "trained_on": "general train split",
            "documents": len(general_train),
            "chars": sum(len(x["text"]) for x in general_train),
        },
        "tokens": tokens_meta,
    }
    if (
        old
        and old.get("tokens")
        and all(p["sha256"] == debs[p["name"]]["sha256"] for p in old.get("packages", []) if p["name"] in debs)
        and old.get("settings") == manifest["settings"]
    ):
        same = all(old["tokens"]["files"].get(k, {}).get("sha256") == v["sha256"] for k, v in files.items())
        log(
            "  rebuild of the recorded package versions: token files "
            + ("IDENTICAL to the manifest's" if same else "DIFFER from the manifest's")
        )
    with open(man_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    t_end = time.time()
    log(
        f"done in {t_end - t_start:.0f}s (fetch {t_fetch - t_start:.0f}s, extract {t_extract - t_fetch:.0f}s, "
        f"tokenizer {t_tok - t_extract:.0f}s, tokens {t_bins - t_tok:.0f}s); "
        f"{tokens_meta['total_tokens']} tokens in {tokens_meta['total_file_bytes'] / 2**20:.1f} MiB; "
        f"manifest {rel(man_path)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
