/**
 * sha256 of each seed's files, computed on a worker thread while the main
 * thread writes the model, and remembered (hash-cache.ts) for the next run.
 */
import { basename } from "node:path";
import { Worker } from "node:worker_threads";
import { createHash } from "node:crypto";
import { BamError } from "../errors.js";
import type { SeedRecord } from "../arch/model.js";
import { HashCache } from "./hash-cache.js";

// Synchronous reads into one reused buffer: on its own thread nothing waits
// on them, and a stream's fresh 4 MiB chunks cost more than the hashing.
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { closeSync, openSync, readSync } = require("node:fs");
const buffer = Buffer.allocUnsafe(1 << 22);
try {
  const hashes = workerData.map((file) => {
    const hash = createHash("sha256");
    const fd = openSync(file, "r");
    try {
      for (let n; (n = readSync(fd, buffer, 0, buffer.length, null)) > 0;) hash.update(buffer.subarray(0, n));
    } finally {
      closeSync(fd);
    }
    return hash.digest("hex");
  });
  parentPort.postMessage(hashes);
} catch (error) {
  parentPort.postMessage({ error: String(error && error.message || error) });
}
`;

export interface SeedFiles {
  name: string;
  /** config.json and the weight files. */
  files: string[];
}

export interface HashedSeed extends SeedRecord {
  /** File name -> sha256, as `sha256sum` would print. */
  files: Record<string, string>;
}

/**
 * Starts hashing now; await the result when it is needed. Files whose hash
 * is known (see HashCache) are not read. Rejects with IO_ERROR.
 */
export function hashSeeds(seeds: SeedFiles[]): { result: Promise<HashedSeed[]>; cancel: () => void } {
  let worker: Worker | undefined;
  let cancelled = false;
  const result = (async () => {
    const cache = await HashCache.load();
    const looked = await Promise.all(seeds.flatMap((s) => s.files).map((file) => cache.lookup(file)))
      .catch((error: unknown) => { throw new BamError("IO_ERROR", `hashing seed files: ${(error as Error).message}`); });
    const unknown = looked.filter((l) => l.sha256 === null);
    if (cancelled) throw new BamError("ABORTED", "hashing seed files: cancelled");
    if (unknown.length > 0) {
      worker = new Worker(WORKER_SOURCE, { eval: true, workerData: unknown.map((l) => l.real) });
      const hashes = await workerResult(worker);
      unknown.forEach((l, i) => { l.sha256 = hashes[i]!; });
      await cache.save(unknown, hashes);
    }
    let next = 0;
    return seeds.map((seed) => {
      const files: Record<string, string> = {};
      for (const file of seed.files) files[basename(file)] = looked[next++]!.sha256!;
      return { name: seed.name, sha256: combinedHash(files), files };
    });
  })();
  result.catch(() => {}); // awaited later; avoid an unhandled rejection before then
  return { result, cancel: () => { cancelled = true; void worker?.terminate(); } };
}

function workerResult(worker: Worker): Promise<string[]> {
  return new Promise<string[]>((resolve, reject) => {
    worker.once("message", (message: string[] | { error: string }) => {
      void worker.terminate();
      if (Array.isArray(message)) resolve(message);
      else reject(new BamError("IO_ERROR", `hashing seed files: ${message.error}`));
    });
    worker.once("error", (error) => reject(new BamError("IO_ERROR", `hashing seed files: ${error.message}`)));
  });
}

/** One hash for a seed: sha256 of its `sha256sum`-style manifest, files sorted by name. */
export function combinedHash(files: Record<string, string>): string {
  const manifest = Object.keys(files).sort().map((file) => `${files[file]}  ${file}\n`).join("");
  return createHash("sha256").update(manifest).digest("hex");
}
