/**
 * Seeds by Hugging Face id, read from a cache laid out as huggingface_hub
 * lays it (blobs + snapshot links, refs, a second revision, a sharded seed):
 * by id, id@branch, id@commit and repository-root path, the upcycle equals the
 * same upcycle of the plain fixture folders byte for byte, and names the
 * experts and the card by repo id. Offline, a missing id is one line, exit 1.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cp, readFile, readlink, rm } from "node:fs/promises";
import { join, resolve } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { resolveSeed } from "../../src/hub/index.js";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";
import { addSnapshot, HUB_PYTHON, pythonSnapshot, repoDir, weights, withEnv } from "./hub-cache.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

interface Cache {
  dir: string;
  base: string;
  code: string;
  math: string;
  sharded: string;
}

/** org/base (main), org/code (main: the code seed; branch v2: the math seed), org/sharded (main). */
async function makeCache(dir: string): Promise<Cache> {
  const cache = join(dir, "hub");
  return {
    dir: cache,
    base: await addSnapshot(cache, "org/base", fixture("llama", "base"), ["main"]),
    code: await addSnapshot(cache, "org/code", fixture("llama", "code"), ["main"]),
    math: await addSnapshot(cache, "org/code", fixture("llama", "math"), ["v2"]),
    sharded: await addSnapshot(cache, "org/sharded", fixture("llama", "sharded"), ["main"]),
  };
}

/** Offline, with the cache in `dir` and bam's own cache beside it: nothing touches ~/.cache or the network. */
const inCache = <T>(dir: string, body: () => Promise<T>) =>
  withEnv({ HF_HUB_CACHE: join(dir, "hub"), HF_HUB_OFFLINE: "1", BAM_CACHE_DIR: join(dir, "bam-cache") }, body);

describe("seeds from the Hugging Face cache", () => {
  test("id, id@branch, id@commit and repository root resolve to their snapshots, as huggingface_hub finds them", () =>
    withTempDir(async (dir) => {
      const cache = await makeCache(dir);
      const settings = { cacheDir: cache.dir, offline: true, endpoint: "http://127.0.0.1:9", token: undefined };
      const snapshot = (repo: string, commit: string) => resolve(repoDir(cache.dir, repo), "snapshots", commit);
      const byId = await resolveSeed("org/base", { settings });
      assert.deepEqual(byId, {
        dir: snapshot("org/base", cache.base),
        name: "org/base",
        repoId: "org/base",
        revision: "main",
        commit: cache.base,
      });
      assert.equal((await resolveSeed("org/code@v2", { settings })).dir, snapshot("org/code", cache.math));
      assert.equal((await resolveSeed(`org/code@${cache.code}`, { settings })).dir, snapshot("org/code", cache.code));
      const root = await resolveSeed(repoDir(cache.dir, "org/code"), { settings });
      assert.deepEqual([root.dir, root.name], [snapshot("org/code", cache.code), "org/code"]);
      const sharded = await resolveSeed("org/sharded", { settings });
      assert.equal(sharded.dir, snapshot("org/sharded", cache.sharded));
      if (HUB_PYTHON !== null) {
        assert.equal(pythonSnapshot(cache.dir, "org/code", "v2"), snapshot("org/code", cache.math));
        assert.equal(pythonSnapshot(cache.dir, "org/sharded", "main"), sharded.dir);
      }
      // An existing local path is a folder, always: a fixture folder keeps its folder name.
      assert.deepEqual(await resolveSeed(fixture("llama", "base"), { settings }), {
        dir: fixture("llama", "base"),
        name: "base",
      });
    }));

  test("the upcycle of ids equals the upcycle of the folders byte for byte, experts and card named by repo id", () =>
    withTempDir(async (dir) => {
      const cache = await makeCache(dir);
      await inCache(dir, async () => {
        const fromIds = await upcycle({
          seeds: ["org/sharded", "org/code@v2", repoDir(cache.dir, "org/code"), `org/base@${cache.base}`],
          output: join(dir, "ids"),
        });
        const fromFolders = await upcycle({
          seeds: ["sharded", "math", "code", "base"].map((v) => fixture("llama", v as "base")),
          output: join(dir, "folders"),
        });
        assert.deepEqual(await weights(fromIds.output), await weights(fromFolders.output));
        assert.ok((await weights(fromIds.output)).size > 0);
        const config = JSON.parse(await readFile(join(fromIds.output, "config.json"), "utf8")) as {
          upcycled_from: Array<{ name: string; sha256: string }>;
        };
        assert.deepEqual(
          config.upcycled_from.map((s) => s.name),
          ["org/sharded", "org/code", "org/code", "org/base"],
        );
        assert.deepEqual(
          config.upcycled_from.map((s) => s.sha256),
          fromFolders.seeds.map((s) => s.sha256),
          "the same files, hashed through the links",
        );
        const card = await readFile(join(fromIds.output, "README.md"), "utf8");
        assert.match(
          card,
          /^---\nbase_model:\n {2}- org\/sharded\n {2}- org\/code\n {2}- org\/base\nbase_model_relation: merge\n/,
          "each repository once, in seed order",
        );
        assert.equal(
          await readFile(join(fromIds.output, "tokenizer.json"), "utf8"),
          await readFile(join(fixture("llama", "sharded"), "tokenizer.json"), "utf8"),
        );
      });
    }));

  test("--dry-run shows each id and its snapshot folder", () =>
    withTempDir(async (dir) => {
      const cache = await makeCache(dir);
      const run = spawnSync(process.execPath, [CLI, "upcycle", "org/base", "org/code@v2", "--dry-run"], {
        encoding: "utf8",
        env: { ...process.env, HF_HUB_CACHE: cache.dir, HF_HUB_OFFLINE: "1", BAM_CACHE_DIR: join(dir, "bam-cache") },
      });
      assert.equal(run.status, 0, run.stderr);
      assert.ok(
        run.stdout.includes(`org/base (F32) <- ${resolve(repoDir(cache.dir, "org/base"), "snapshots", cache.base)}`),
        run.stdout,
      );
      assert.ok(
        run.stdout.includes(`org/code (F32) <- ${resolve(repoDir(cache.dir, "org/code"), "snapshots", cache.math)}`),
        run.stdout,
      );
      // A local folder of the same name wins: an existing path is a folder, always.
      await cp(fixture("llama", "math"), join(dir, "org", "base"), { recursive: true });
      const local = spawnSync(process.execPath, [CLI, "upcycle", "org/base", "--dry-run", "--json"], {
        encoding: "utf8",
        cwd: dir,
        env: { ...process.env, HF_HUB_CACHE: cache.dir, HF_HUB_OFFLINE: "1", BAM_CACHE_DIR: join(dir, "bam-cache") },
      });
      assert.equal(local.status, 0, local.stderr);
      assert.deepEqual(
        (JSON.parse(local.stdout) as { seeds: unknown[] }).seeds.map((s) => ({
          ...(s as object),
          dtypes: undefined,
          files: undefined,
        })),
        [{ dir: "org/base", name: "base", dtypes: undefined, files: undefined }],
      );
    }));

  test("offline, a missing id or a snapshot missing a shard is one line naming what is missing and how to fetch it (exit 1)", () =>
    withTempDir(async (dir) => {
      const cache = await makeCache(dir);
      const env = {
        ...process.env,
        HF_HUB_CACHE: cache.dir,
        HF_HUB_OFFLINE: "1",
        BAM_CACHE_DIR: join(dir, "bam-cache"),
      };
      const bam = (...args: string[]) =>
        spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env, cwd: dir });
      const missing = bam("upcycle", "org/base", "org/absent@v1", "-o", join(dir, "out"));
      assert.equal(missing.status, 1);
      assert.equal(missing.stderr.trimEnd().split("\n").length, 1, missing.stderr);
      assert.match(
        missing.stderr,
        /^bam: org\/absent@v1: no such folder, and not in the Hugging Face cache .* `hf download org\/absent --revision v1`, or unset HF_HUB_OFFLINE/,
      );
      // A blob gone from under its link: the shard is named.
      const shardLink = join(
        repoDir(cache.dir, "org/sharded"),
        "snapshots",
        cache.sharded,
        "model-00002-of-00003.safetensors",
      );
      await rm(resolve(join(shardLink, ".."), await readlink(shardLink)));
      const partial = bam("upcycle", "org/sharded", "org/base", "-o", join(dir, "out"));
      assert.equal(partial.status, 1);
      assert.match(
        partial.stderr,
        /^bam: org\/sharded: the cached snapshot .* lacks model-00002-of-00003\.safetensors \(HF_HUB_OFFLINE is set\); fetch it with `hf download org\/sharded`/,
      );
      // Not of the owner/name form and not a path: the usual missing-folder error.
      const plain = bam("upcycle", "no-such-seed", "-o", join(dir, "out"));
      assert.equal(plain.status, 1);
      assert.match(plain.stderr, /^bam: no-such-seed\/config\.json: not found/);
    }));
});
