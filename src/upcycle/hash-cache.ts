/**
 * sha256s of seed files known without reading them:
 * - a file in a Hugging Face cache is a link to `blobs/<sha256>`, named by the
 *   hash the hub checked at download;
 * - a file that `hf download --local-dir` wrote has, in that folder's
 *   `.cache/huggingface/download/<file>.metadata`, the commit, the etag (the
 *   sha256 for LFS files, which weights always are) and the download time;
 *   trusted, as huggingface_hub does, while the file is not newer than that;
 * - a file hashed by an earlier run is in `sha256.json` of the user cache
 *   folder, keyed by its real path and trusted only while its device, inode,
 *   size, mtime and ctime are the same (any write or `touch` changes ctime).
 * Hashing 3 x 2 GB of seeds costs seconds of CPU on every run otherwise. The
 * cache is an optimisation: a missing, unreadable or corrupt file is empty,
 * and failing to save it is silent.
 */
import { mkdir, realpath, rename, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, relative } from "node:path";
import { userCacheDir } from "../cache-dir.js";
import { readTextFile } from "../safetensors/index.js";

const CACHE_FILE = "sha256.json";
const VERSION = 1;
/** The newest entries kept: about 1 MB of JSON. */
const MAX_ENTRIES = 4096;
/** A cache file larger than this was not written by us; it is ignored. */
const MAX_CACHE_BYTES = 16e6;
const SHA256_HEX = /^[0-9a-f]{64}$/;
/** A download metadata file is three short lines. */
const MAX_METADATA_BYTES = 4096;

interface Entry { identity: string; sha256: string }

/** A file as found now: its real path, its identity, and its hash where known. */
export interface FileLookup { file: string; real: string; identity: string; sha256: string | null }

export class HashCache {
  private constructor(private readonly path: string, private readonly entries: Map<string, Entry>) {}

  static async load(dir = userCacheDir()): Promise<HashCache> {
    const path = join(dir, CACHE_FILE);
    return new HashCache(path, await readEntries(path));
  }

  async lookup(file: string): Promise<FileLookup> {
    const real = await realpath(file);
    const identity = await identityOf(real);
    const name = basename(real);
    if (SHA256_HEX.test(name) && basename(dirname(real)) === "blobs") return { file, real, identity, sha256: name };
    const downloaded = await hubDownloadSha256(real);
    if (downloaded !== null) return { file, real, identity, sha256: downloaded };
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

/**
 * The sha256 a Hugging Face `--local-dir` download recorded for `real`, from
 * the nearest folder above it that has download metadata for it; null if
 * none, if the etag is not a sha256, or if the file changed since.
 */
async function hubDownloadSha256(real: string): Promise<string | null> {
  for (let dir = dirname(real); ; dir = dirname(dir)) {
    const metadata = join(dir, ".cache", "huggingface", "download", `${relative(dir, real)}.metadata`);
    const lines = await readTextFile(metadata, MAX_METADATA_BYTES, "IO_ERROR").then((text) => text.split("\n"), () => null);
    if (lines !== null) {
      const [, etag, timestamp] = lines.map((line) => line.trim());
      const { mtimeMs } = await stat(real);
      // 1 s of slack for coarse mtimes, as huggingface_hub allows.
      return SHA256_HEX.test(etag ?? "") && mtimeMs / 1000 - 1 <= Number(timestamp) ? etag! : null;
    }
    if (dirname(dir) === dir) return null;
  }
}

/** Changes whenever the file's content may have: another file, a write, a truncate, a touch. */
async function identityOf(real: string): Promise<string> {
  const info = await stat(real, { bigint: true });
  return [info.dev, info.ino, info.size, info.mtimeNs, info.ctimeNs].join(":");
}

async function readEntries(path: string): Promise<Map<string, Entry>> {
  try {
    const parsed = JSON.parse(await readTextFile(path, MAX_CACHE_BYTES, "IO_ERROR")) as { version?: unknown; entries?: unknown };
    if (parsed.version !== VERSION || typeof parsed.entries !== "object" || parsed.entries === null) return new Map();
    return new Map(Object.entries(parsed.entries as Record<string, unknown>).filter((pair): pair is [string, Entry] => isEntry(pair[1])));
  } catch {
    return new Map();
  }
}

function isEntry(value: unknown): value is Entry {
  const entry = value as Entry;
  return typeof entry === "object" && entry !== null && typeof entry.identity === "string" && typeof entry.sha256 === "string" && SHA256_HEX.test(entry.sha256);
}
