/**
 * sha256 of each seed's files, computed on a worker thread while the main
 * thread writes the model, so identifying the seeds costs no extra time.
 */
import { basename } from "node:path";
import { Worker } from "node:worker_threads";
import { createHash } from "node:crypto";
import { BamError } from "../errors.js";
import type { SeedRecord } from "../arch/model.js";

const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { createReadStream } = require("node:fs");
(async () => {
  const hashes = [];
  for (const file of workerData) {
    const hash = createHash("sha256");
    for await (const chunk of createReadStream(file, { highWaterMark: 1 << 22 })) hash.update(chunk);
    hashes.push(hash.digest("hex"));
  }
  parentPort.postMessage(hashes);
})().catch((error) => parentPort.postMessage({ error: String(error && error.message || error) }));
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

/** Starts hashing now; await the result when it is needed. Rejects with IO_ERROR. */
export function hashSeeds(seeds: SeedFiles[]): { result: Promise<HashedSeed[]>; cancel: () => void } {
  const allFiles = seeds.flatMap((s) => s.files);
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: allFiles });
  const result = new Promise<HashedSeed[]>((resolve, reject) => {
    worker.once("message", (message: string[] | { error: string }) => {
      void worker.terminate();
      if (!Array.isArray(message)) {
        reject(new BamError("IO_ERROR", `hashing seed files: ${message.error}`));
        return;
      }
      let next = 0;
      resolve(seeds.map((seed) => {
        const files: Record<string, string> = {};
        for (const file of seed.files) files[basename(file)] = message[next++]!;
        return { name: seed.name, sha256: combinedHash(files), files };
      }));
    });
    worker.once("error", (error) => reject(new BamError("IO_ERROR", `hashing seed files: ${error.message}`)));
  });
  result.catch(() => {}); // awaited later; avoid an unhandled rejection before then
  return { result, cancel: () => void worker.terminate() };
}

/** One hash for a seed: sha256 of its `sha256sum`-style manifest, files sorted by name. */
export function combinedHash(files: Record<string, string>): string {
  const manifest = Object.keys(files).sort().map((file) => `${files[file]}  ${file}\n`).join("");
  return createHash("sha256").update(manifest).digest("hex");
}
