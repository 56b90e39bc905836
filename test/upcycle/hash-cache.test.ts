/**
 * The seed hashes in `upcycled_from`: computed, remembered in the user cache
 * for the next run, recomputed when a file changes, and never taken from
 * what lies in or beside a seed (blob names, `--local-dir` download metadata).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cp, mkdir, readFile, readdir, rename, symlink, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import type { BamError } from "../../src/errors.js";
import { hashFiles } from "../../src/upcycle/hash-seeds.js";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, fixtureFamilies, withTempDir } from "../helpers.js";

const skip = fixtureFamilies().includes("llama") ? false : "fixtures not made yet";

async function sha256Of(file: string): Promise<string> {
  return createHash("sha256")
    .update(await readFile(file))
    .digest("hex");
}

/** Runs an upcycle of [seed, seed] with the cache in `cacheDir`; returns the first seed's file hashes. */
async function seedHashes(seed: string, output: string, cacheDir: string): Promise<Record<string, string>> {
  const previous = process.env.BAM_CACHE_DIR;
  process.env.BAM_CACHE_DIR = cacheDir;
  try {
    const result = await upcycle({ seeds: [seed, seed], output, force: true });
    return result.seeds[0]!.files;
  } finally {
    if (previous === undefined) delete process.env.BAM_CACHE_DIR;
    else process.env.BAM_CACHE_DIR = previous;
  }
}

type CacheFile = { version: number; entries: Record<string, { identity: string; sha256: string }> };

test("seed hashes are computed once, remembered, and recomputed when a file changes", { skip }, () =>
  withTempDir(async (dir) => {
    const seed = join(dir, "seed");
    await cp(fixture("llama", "sharded"), seed, { recursive: true });
    const cacheDir = join(dir, "cache");
    const out = join(dir, "out");
    const shard = join(seed, "model-00002-of-00003.safetensors");
    const truth: Record<string, string> = {};
    for (const file of (await readdir(seed)).filter((f) => f === "config.json" || f.endsWith(".safetensors")))
      truth[file] = await sha256Of(join(seed, file));

    assert.deepEqual(await seedHashes(seed, out, cacheDir), truth);
    const cacheFile = join(cacheDir, "sha256.json");
    const entries = (JSON.parse(await readFile(cacheFile, "utf8")) as CacheFile).entries;
    assert.equal(Object.keys(entries).length, Object.keys(truth).length, "one entry per seed file");

    // A remembered hash is used as it is: a planted one shows up in the output...
    const planted = "f".repeat(64);
    const plant = async () => {
      const cache = JSON.parse(await readFile(cacheFile, "utf8")) as CacheFile;
      cache.entries[
        Object.keys(cache.entries).find((real) => real.endsWith("model-00002-of-00003.safetensors"))!
      ]!.sha256 = planted;
      await writeFile(cacheFile, JSON.stringify(cache));
    };
    await plant();
    assert.equal((await seedHashes(seed, out, cacheDir))["model-00002-of-00003.safetensors"], planted);
    // ...until the file is touched (same bytes, new times): hashed again.
    await utimes(shard, new Date(), new Date(Date.now() + 5000));
    assert.deepEqual(await seedHashes(seed, out, cacheDir), truth);
    // ...or replaced under the same name, as a download would: hashed again.
    await plant();
    await cp(shard, join(dir, "replacement"));
    await rename(join(dir, "replacement"), shard);
    assert.deepEqual(await seedHashes(seed, out, cacheDir), truth);

    // A corrupt cache is ignored and rewritten.
    await writeFile(cacheFile, "{ not json");
    assert.deepEqual(await seedHashes(seed, out, cacheDir), truth);
    assert.equal(
      Object.keys((JSON.parse(await readFile(cacheFile, "utf8")) as CacheFile).entries).length,
      Object.keys(truth).length,
    );
  }),
);

test(
  "nothing planted in or beside a seed is taken as its hash: blob names and download metadata are ignored",
  { skip },
  () =>
    withTempDir(async (dir) => {
      // A Hugging Face cache layout whose blob is named by a hash that is not its content's.
      const repo = join(dir, "hub", "models--org--llama");
      const snapshot = join(repo, "snapshots", "0123abcd");
      await mkdir(join(repo, "blobs"), { recursive: true });
      await cp(fixture("llama", "base"), snapshot, { recursive: true });
      const weights = join(snapshot, "model.safetensors");
      const truth = await sha256Of(weights);
      const planted = "e".repeat(64);
      await rename(weights, join(repo, "blobs", planted));
      await symlink(join("..", "..", "blobs", planted), weights);
      assert.equal((await seedHashes(snapshot, join(dir, "out"), join(dir, "cache")))["model.safetensors"], truth);

      // `hf download --local-dir` metadata recording a hash that is not the file's, newer than the file.
      const local = join(dir, "local");
      const seed = join(local, "seed");
      await cp(fixture("llama", "base"), seed, { recursive: true });
      const download = join(local, ".cache", "huggingface", "download", "seed");
      await mkdir(download, { recursive: true });
      await writeFile(
        join(download, "model.safetensors.metadata"),
        `${"c".repeat(40)}\n${planted}\n${Date.now() / 1000 + 1}\n`,
      );
      assert.equal((await seedHashes(seed, join(dir, "out"), join(dir, "cache2")))["model.safetensors"], truth);
    }),
);

test("files are hashed in parallel, each hash in its file's place; an unreadable file is an IO_ERROR", {
  skip,
}, async () => {
  const seed = fixture("llama", "sharded");
  const files = (await readdir(seed)).sort().map((file) => join(seed, file));
  const hashes = await hashFiles(files, 3);
  assert.deepEqual(hashes, await Promise.all(files.map(sha256Of)));
  await assert.rejects(hashFiles([...files, join(seed, "missing.safetensors")], 3), (error: BamError) => {
    assert.equal(error.code, "IO_ERROR");
    assert.match(error.message, /missing\.safetensors/);
    return true;
  });
});
