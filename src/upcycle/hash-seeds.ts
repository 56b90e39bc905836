/**
 * sha256 of each seed's files, computed on worker threads while the main
 * thread writes the model, and remembered (hash-cache.ts) for the next run.
 */
import { stat } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { basename, join } from "node:path";
import { Worker } from "node:worker_threads";
import { createHash } from "node:crypto";
import { BamError } from "../errors.js";
import type { Seed } from "../arch/index.js";
import type { SeedRecord } from "../arch/model.js";
import { HashCache } from "./hash-cache.js";

// One file per message, answered with { bytes } every 64 MiB read (progress)
// and then its hash. Synchronous reads into one reused buffer: on its own
// thread nothing waits on them, and a stream's fresh 4 MiB chunks cost more
// than the hashing.
const WORKER_SOURCE = `
const { parentPort } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { closeSync, openSync, readSync } = require("node:fs");
const buffer = Buffer.allocUnsafe(1 << 22);
parentPort.on("message", (file) => {
  try {
    const hash = createHash("sha256");
    const fd = openSync(file, "r");
    let unreported = 0;
    try {
      for (let n; (n = readSync(fd, buffer, 0, buffer.length, null)) > 0;) {
        hash.update(buffer.subarray(0, n));
        unreported += n;
        if (unreported >= 1 << 26) parentPort.postMessage({ bytes: unreported }), unreported = 0;
      }
      if (unreported > 0) parentPort.postMessage({ bytes: unreported });
    } finally {
      closeSync(fd);
    }
    parentPort.postMessage({ sha256: hash.digest("hex") });
  } catch (error) {
    parentPort.postMessage({ error: String(error && error.message || error) });
  }
});
`;

// sha256 is sequential within a file, so files are hashed in parallel: at
// 1.4 GB/s a core, one thread for every shard of three 7B seeds would take
// longer than copying them. One core is left to the copies. Eight threads
// hash faster than disks write; more would only add their memory.
export const HASH_THREADS = Math.min(8, Math.max(1, availableParallelism() - 1));
/** Peak resident memory a hashing thread adds, its isolate and read buffer (measured with 1, 8 and 16 threads: 12 MiB each). */
const HASH_THREAD_BYTES = 12 * 2 ** 20;

export interface SeedFiles {
  name: string;
  /** config.json and the weight files. */
  files: string[];
}

/** What `upcycled_from` hashes of a seed: its config.json and weight files. */
export function filesToHash(seed: Seed): SeedFiles {
  return { name: seed.name, files: [join(seed.dir, "config.json"), ...seed.files] };
}

/** Peak memory of hashing these seeds when no hash is known: one thread per distinct file, up to HASH_THREADS. */
export function hashingMemoryBytes(seeds: SeedFiles[]): number {
  return Math.min(HASH_THREADS, new Set(seeds.flatMap((s) => s.files)).size) * HASH_THREAD_BYTES;
}

export interface HashedSeed extends SeedRecord {
  /** File name -> sha256, as `sha256sum` would print. */
  files: Record<string, string>;
}

/**
 * Starts hashing now; await the result when it is needed. Files whose hash
 * is known (see HashCache) are not read; `onProgress` counts the bytes of
 * the others. Rejects with IO_ERROR.
 */
export function hashSeeds(
  seeds: SeedFiles[],
  onProgress?: (done: number, total: number) => void,
): { result: Promise<HashedSeed[]>; cancel: () => void } {
  const workers: Worker[] = [];
  let cancelled = false;
  const result = (async () => {
    const cache = await HashCache.load();
    const looked = await Promise.all(seeds.flatMap((s) => s.files).map((file) => cache.lookup(file))).catch(
      (error: unknown) => {
        throw new BamError("IO_ERROR", `hashing seed files: ${(error as Error).message}`);
      },
    );
    const unknown = looked.filter((l) => l.sha256 === null);
    if (cancelled) throw new BamError("ABORTED", "hashing seed files: cancelled");
    if (unknown.length > 0) {
      const files = [...new Set(unknown.map((l) => l.real))]; // [s, s, s] reads s once
      const total = (await Promise.all(files.map((file) => stat(file)))).reduce((sum, s) => sum + s.size, 0);
      let done = 0;
      onProgress?.(done, total);
      const hashes = await hashFiles(files, HASH_THREADS, workers, (bytes) => onProgress?.((done += bytes), total));
      for (const l of unknown) l.sha256 = hashes[files.indexOf(l.real)]!;
      await cache.save(
        unknown,
        unknown.map((l) => l.sha256!),
      );
    }
    let next = 0;
    return seeds.map((seed) => {
      const files: Record<string, string> = {};
      for (const file of seed.files) files[basename(file)] = looked[next++]!.sha256!;
      return { name: seed.name, sha256: combinedHash(files), files };
    });
  })();
  result.catch(() => {}); // awaited later; avoid an unhandled rejection before then
  return {
    result,
    cancel: () => {
      cancelled = true;
      for (const worker of workers) void worker.terminate();
    },
  };
}

/**
 * The files' sha256s, in order, from up to `threads` worker threads (pushed
 * onto `workers`, for cancel), each taking the next file when it is done.
 */
export async function hashFiles(
  files: string[],
  threads: number,
  workers: Worker[] = [],
  onBytes?: (bytes: number) => void,
): Promise<string[]> {
  const hashes: string[] = new Array(files.length);
  let next = 0;
  const hashOn = (worker: Worker) =>
    new Promise<void>((resolve, reject) => {
      const fail = (why: string) => reject(new BamError("IO_ERROR", `hashing seed files: ${why}`));
      let at = -1;
      worker.on("message", (message: { bytes: number } | { sha256: string } | { error: string }) => {
        if ("bytes" in message) return onBytes?.(message.bytes);
        if ("error" in message) return fail(message.error);
        hashes[at] = message.sha256;
        take();
      });
      const take = () => {
        if (next === files.length) return resolve();
        at = next++;
        worker.postMessage(files[at]);
      };
      worker.once("error", (error) => fail(error.message));
      worker.once("exit", () => fail("a hashing thread stopped")); // no-op once resolved
      take();
    });
  try {
    for (let i = 0; i < Math.min(threads, files.length); i++) workers.push(new Worker(WORKER_SOURCE, { eval: true }));
    await Promise.all(workers.map(hashOn));
    return hashes;
  } finally {
    await Promise.all(workers.map((worker) => worker.terminate()));
  }
}

/** One hash for a seed: sha256 of its `sha256sum`-style manifest, files sorted by name. */
export function combinedHash(files: Record<string, string>): string {
  const manifest = Object.keys(files)
    .sort()
    .map((file) => `${files[file]}  ${file}\n`)
    .join("");
  return createHash("sha256").update(manifest).digest("hex");
}
