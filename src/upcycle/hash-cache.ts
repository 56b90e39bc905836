/**
 * sha256s of seed files known without reading them: a file hashed by an
 * earlier run is in `sha256.json` of the user cache folder, keyed by its real
 * path and trusted only while its device, inode, size, mtime and ctime are
 * the same (any write or `touch` changes ctime). Hashing 3 x 2 GB of seeds
 * costs seconds of CPU on every run otherwise. The cache is an optimisation:
 * a missing, unreadable or corrupt file is empty, and failing to save it is
 * silent.
 *
 * Nothing inside or beside a seed is taken as its hash: not the download
 * metadata of `hf download --local-dir` (`.cache/huggingface/download/`),
 * nor a Hugging Face cache's `blobs/<sha256>` file names. Whoever wrote the
 * seed could write those too, and no check short of reading the file shows
 * they match it; `upcycled_from` records what was read. The first run on a
 * fresh download hashes it, behind the copy, on spare cores.
 */
import { mkdir, realpath, rename, stat, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { userCacheDir } from "../cache-dir.js";
import { readTextFile } from "../safetensors/index.js";

const CACHE_FILE = "sha256.json";
const VERSION = 1;
/** The newest entries kept: about 1 MB of JSON. */
const MAX_ENTRIES = 4096;
/** A cache file larger than this was not written by us; it is ignored. */
const MAX_CACHE_BYTES = 16e6;
const SHA256_HEX = /^[0-9a-f]{64}$/;

interface Entry {
  identity: string;
  sha256: string;
}

/** A file as found now: its real path, its identity, and its hash where known. */
export interface FileLookup {
  file: string;
  real: string;
  identity: string;
  sha256: string | null;
}

export class HashCache {
  private constructor(
    private readonly path: string,
    private readonly entries: Map<string, Entry>,
  ) {}

  static async load(dir = userCacheDir()): Promise<HashCache> {
    const path = join(dir, CACHE_FILE);
    return new HashCache(path, await readEntries(path));
  }

  async lookup(file: string): Promise<FileLookup> {
    const real = await realpath(file);
    const identity = await identityOf(real);
    const entry = this.entries.get(real);
    return { file, real, identity, sha256: entry?.identity === identity ? entry.sha256 : null };
  }

  /** Records hashes computed for `looked` (same order); a file that changed meanwhile is left out. */
  async save(looked: FileLookup[], hashes: string[]): Promise<void> {
    const fresh = new Map<string, Entry>();
    for (const [i, { real, identity }] of looked.entries()) {
      if ((await identityOf(real).catch(() => null)) === identity) fresh.set(real, { identity, sha256: hashes[i]! });
    }
    if (fresh.size === 0) return;
    try {
      // Re-read: another run may have saved since this one loaded.
      const entries = await readEntries(this.path);
      for (const [real, entry] of fresh) {
        entries.delete(real); // re-inserted last: the newest survive the cap
        entries.set(real, entry);
      }
      const kept = [...entries].slice(-MAX_ENTRIES);
      await mkdir(dirname(this.path), { recursive: true });
      const temp = `${this.path}.${process.pid}.tmp`;
      await writeFile(temp, `${JSON.stringify({ version: VERSION, entries: Object.fromEntries(kept) })}\n`);
      await rename(temp, this.path);
    } catch {
      // A read-only or full cache folder only means hashing again next time.
    }
  }
}

/** Changes whenever the file's content may have: another file, a write, a truncate, a touch. */
async function identityOf(real: string): Promise<string> {
  const info = await stat(real, { bigint: true });
  return [info.dev, info.ino, info.size, info.mtimeNs, info.ctimeNs].join(":");
}

async function readEntries(path: string): Promise<Map<string, Entry>> {
  try {
    const parsed = JSON.parse(await readTextFile(path, MAX_CACHE_BYTES, "IO_ERROR")) as {
      version?: unknown;
      entries?: unknown;
    };
    if (parsed.version !== VERSION || typeof parsed.entries !== "object" || parsed.entries === null) return new Map();
    return new Map(
      Object.entries(parsed.entries as Record<string, unknown>).filter((pair): pair is [string, Entry] =>
        isEntry(pair[1]),
      ),
    );
  } catch {
    return new Map();
  }
}

function isEntry(value: unknown): value is Entry {
  const entry = value as Entry;
  return (
    typeof entry === "object" &&
    entry !== null &&
    typeof entry.identity === "string" &&
    typeof entry.sha256 === "string" &&
    SHA256_HEX.test(entry.sha256)
  );
}
