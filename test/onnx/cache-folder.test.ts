/**
 * Where eval keeps its ONNX build: in the cache folder (the API's cacheDir,
 * as BAM_CACHE_DIR), named by the model's content, never inside the model
 * folder. A read-only model folder evaluates and is left exactly as it was;
 * a second eval reuses the build; a changed weight file gets a new build and
 * the old one is removed, as are the builds of model folders deleted since.
 */
import assert from "node:assert/strict";
import { chmod, copyFile, cp, mkdir, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { test } from "node:test";
import { evaluatePerplexity, prepareOnnx } from "../../src/onnx/index.js";
import { fixture, withTempDir } from "../helpers.js";

/** Every entry under `dir` with its size and modification time: what a write would change. */
async function tree(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true });
  return Promise.all(
    entries.sort().map(async (entry) => {
      const info = await stat(join(dir, entry));
      return `${entry} ${info.size} ${info.mtimeMs} ${info.mode.toString(8)}`;
    }),
  );
}

test("eval of a read-only model folder builds into cacheDir, writes nothing in the folder, reuses the build, rebuilds on a changed weight file", () =>
  withTempDir(async (dir) => {
    const model = join(dir, "model");
    const cacheDir = join(dir, "cache");
    await cp(fixture("llama", "base"), model, { recursive: true });
    const text = join(dir, "a.txt");
    await writeFile(text, "The experts of a mixture route each token to one of them, and the routers learn which.");
    const readOnly = async () => {
      for (const entry of await readdir(model)) await chmod(join(model, entry), 0o444);
      await chmod(model, 0o555);
    };
    await readOnly();
    const before = await tree(model);

    const built: boolean[] = [];
    const first = await evaluatePerplexity(model, [text], { cacheDir, onBuild: () => void built.push(true) });
    assert.ok(Number.isFinite(first.overall.perplexity));
    assert.ok(built.length > 0, "the first eval builds");
    assert.deepEqual(await tree(model), before, "the model folder is untouched");
    const exports = await readdir(join(cacheDir, "onnx"));
    assert.equal(exports.length, 1);
    assert.match(exports[0]!, /^model-[0-9a-f]{16}$/);

    built.length = 0;
    const second = await evaluatePerplexity(model, [text], { cacheDir, onBuild: () => void built.push(true) });
    assert.equal(built.length, 0, "the second eval reuses the build");
    assert.equal(second.overall.nll, first.overall.nll);

    // Other weights in the same file (the code seed's, same shapes): a new build, and the old one goes.
    await chmod(model, 0o755);
    await chmod(join(model, "model.safetensors"), 0o644);
    await copyFile(join(fixture("llama", "code"), "model.safetensors"), join(model, "model.safetensors"));
    await readOnly();
    const third = await prepareOnnx(model, { cacheDir });
    assert.equal(third.built, true, "a changed weight file rebuilds");
    assert.deepEqual(
      await readdir(join(cacheDir, "onnx")),
      [third.folder.split("/").pop()],
      "only the current build is kept",
    );
    assert.notEqual(third.folder, join(cacheDir, "onnx", exports[0]!));
    const changed = await evaluatePerplexity(model, [text], { cacheDir });
    assert.notEqual(changed.overall.nll, first.overall.nll, "the new build runs the new weights");
    await chmod(model, 0o755); // withTempDir removes it
  }));

test("a new build removes the exports of model folders that no longer exist, and nothing else", () =>
  withTempDir(async (dir) => {
    const cacheDir = join(dir, "cache");
    const gone = join(dir, "gone");
    const kept = join(dir, "kept");
    const current = join(dir, "current");
    await cp(fixture("llama", "base"), gone, { recursive: true });
    await cp(fixture("llama", "code"), kept, { recursive: true });
    await cp(fixture("llama", "math"), current, { recursive: true });
    const goneExport = (await prepareOnnx(gone, { cacheDir })).folder;
    // `bam export-onnx -o` into the cache folder, named like a build: the user's export, kept with its source gone
    const chosen = join(cacheDir, "onnx", "gone-fedcba9876543210");
    await prepareOnnx(gone, { cacheDir, output: chosen });
    const keptExport = (await prepareOnnx(kept, { cacheDir })).folder;
    // a folder named like an export without our stamp: the user's, whatever it is
    const foreign = join(cacheDir, "onnx", "notes-0123456789abcdef");
    await mkdir(foreign);
    await writeFile(join(foreign, "bam-onnx.txt"), "the user's");
    await rm(gone, { recursive: true });

    const built = await prepareOnnx(current, { cacheDir });
    assert.equal(built.built, true);
    assert.deepEqual(
      (await readdir(join(cacheDir, "onnx"))).sort(),
      [basename(built.folder), basename(keptExport), basename(foreign), basename(chosen)].sort(),
      "the deleted folder's build goes; the existing folder's, the unstamped one and an -o export stay",
    );
    assert.ok(!(await readdir(join(cacheDir, "onnx"))).includes(basename(goneExport)));
    assert.equal(await readFile(join(foreign, "bam-onnx.txt"), "utf8"), "the user's");
    assert.equal((await prepareOnnx(kept, { cacheDir })).built, false, "the kept export is reused");
  }));
