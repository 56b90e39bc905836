/**
 * The side files of a model folder (src/arch/folder.ts), one contract for
 * both paths that copy them: the upcycle (first seed -> output) and the ONNX
 * export (model -> cache folder) copy exactly the same files byte for byte,
 * write the same generation_config.json when the folder has none, refuse
 * the same odd files before anything is written, and the export is rebuilt
 * when a side file it copied changes. Weight headers reach the export's key
 * through the validating reader only.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { cp, open, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { isBamError, type ErrorCode } from "../../src/errors.js";
import { prepareOnnx } from "../../src/onnx/export.js";
import { SafetensorsReader } from "../../src/safetensors/index.js";
import { upcycle } from "../../src/upcycle/index.js";
import { runCli } from "../reliability/synth.js";
import { fixture, withTempDir } from "../helpers.js";

/** Files of an ONNX export folder that are not copied side files. */
const EXPORT_OWN = ["bam-onnx.json", "config.json", "onnx"];
/** Files of a BAM output folder that are not copied side files. */
const UPCYCLE_OWN = [
  "README.md",
  "config.json",
  "configuration_bam.py",
  "model.safetensors",
  "modeling_bam.py",
  "recipe.yaml",
];

/** A copy of the llama base seed under `dir`, with extra side files and a file that is none. */
async function seedCopy(dir: string): Promise<string> {
  const seed = join(dir, "seed");
  await cp(fixture("llama", "base"), seed, { recursive: true });
  await writeFile(join(seed, "special_tokens_map.json"), `${JSON.stringify({ eos_token: "<eos>" })}\n`);
  await writeFile(join(seed, "chat_template.jinja"), "{% for m in messages %}{{ m.content }}{% endfor %}\n");
  await writeFile(join(seed, "notes.txt"), "not a side file\n");
  return seed;
}

async function filesOf(dir: string, own: readonly string[]): Promise<Map<string, string>> {
  const names = (await readdir(dir)).filter((name) => !own.includes(name)).sort();
  return new Map(
    await Promise.all(names.map(async (name) => [name, await readFile(join(dir, name), "utf8")] as const)),
  );
}

test("the output and the ONNX export hold exactly the seed's side files, byte for byte", () =>
  withTempDir(async (dir) => {
    const seed = await seedCopy(dir);
    const expected = await filesOf(seed, ["config.json", "model.safetensors", "notes.txt"]);
    assert.ok(expected.size >= 5, [...expected.keys()].join(", "));
    const output = join(dir, "bam");
    await upcycle({ seeds: [seed, fixture("llama", "code")], output });
    assert.deepEqual(await filesOf(output, UPCYCLE_OWN), expected);
    const exported = await prepareOnnx(output, { output: join(dir, "onnx") });
    assert.deepEqual(await filesOf(exported.folder, EXPORT_OWN), expected);
  }));

test("a folder without generation_config.json gets the config's token ids, the same from the upcycle and the ONNX export", () =>
  withTempDir(async (dir) => {
    const seed = await seedCopy(dir);
    await rm(join(seed, "generation_config.json"));
    const config = JSON.parse(await readFile(join(seed, "config.json"), "utf8")) as Record<string, unknown>;
    const ids = Object.fromEntries(Object.entries(config).filter(([key]) => key.endsWith("_token_id")));
    assert.ok(Object.values(ids).includes(null), "the fixture leaves a token id null: both paths must keep it alike");
    const output = join(dir, "bam");
    await upcycle({ seeds: [seed, fixture("llama", "code")], output });
    assert.deepEqual(JSON.parse(await readFile(join(output, "generation_config.json"), "utf8")), ids);
    const exported = await prepareOnnx(seed, { output: join(dir, "onnx") });
    assert.deepEqual(JSON.parse(await readFile(join(exported.folder, "generation_config.json"), "utf8")), ids);
  }));

/** Odd side files: [label, error code, make it at `path` (false: cannot here)]. */
const ODD_FILES: Array<[string, ErrorCode, (path: string, dir: string) => Promise<boolean>]> = [
  [
    "a link out of the folder",
    "PATH_ESCAPE",
    async (path, dir) => {
      await writeFile(join(dir, "private.txt"), "the user's own file\n");
      await symlink(join(dir, "private.txt"), path);
      return true;
    },
  ],
  [
    "a FIFO",
    "IO_ERROR",
    async (path) => {
      try {
        execFileSync("mkfifo", [path], { stdio: "ignore" });
        return true;
      } catch {
        return false;
      }
    },
  ],
];

for (const [label, code, make] of ODD_FILES) {
  test(
    `a side file that is ${label} is refused by the upcycle and the ONNX export, before anything is written`,
    { timeout: 60_000 },
    (t) =>
      withTempDir(async (dir) => {
        const seed = await seedCopy(dir);
        const file = join(seed, "special_tokens_map.json");
        await rm(file);
        if (!(await make(file, dir))) return t.skip("no mkfifo here");
        const refused = (error: unknown) => isBamError(error, code) && error.message.startsWith(file);
        await assert.rejects(upcycle({ seeds: [seed, fixture("llama", "code")], output: join(dir, "bam") }), refused);
        await assert.rejects(prepareOnnx(seed, { output: join(dir, "onnx") }), refused);
        await assert.rejects(prepareOnnx(seed, { cacheDir: join(dir, "cache") }), refused);
        assert.deepEqual(
          (await readdir(dir)).filter((name) => ["bam", "onnx", "cache"].includes(name)),
          [],
        );
      }),
  );
}

test("a changed generation_config.json rebuilds the ONNX export, which then holds the new one", () =>
  withTempDir(async (dir) => {
    const seed = await seedCopy(dir);
    const cacheDir = join(dir, "cache");
    assert.equal((await prepareOnnx(seed, { cacheDir })).built, true);
    assert.equal((await prepareOnnx(seed, { cacheDir })).built, false, "unchanged: reused");
    const file = join(seed, "generation_config.json");
    const changed = `${JSON.stringify({ ...JSON.parse(await readFile(file, "utf8")), do_sample: true }, null, 2)}\n`;
    await writeFile(file, changed);
    const rebuilt = await prepareOnnx(seed, { cacheDir });
    assert.equal(rebuilt.built, true, "a changed generation_config.json rebuilds");
    assert.equal(await readFile(join(rebuilt.folder, "generation_config.json"), "utf8"), changed);
  }));

/** Damaged weights files: each rewrites the seed copy's model.safetensors. */
const DAMAGE: Array<[string, (file: string) => Promise<void>]> = [
  [
    "cut off in its data",
    async (file) => {
      const handle = await open(file, "r+");
      await handle.truncate((await stat(file)).size - 4);
      await handle.close();
    },
  ],
  [
    "whose header length is larger than the file",
    async (file) => {
      const handle = await open(file, "r+");
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt((await stat(file)).size));
      await handle.write(length, 0, 8, 0);
      await handle.close();
    },
  ],
];

for (const [label, damage] of DAMAGE) {
  test(`bam eval of a model with a weights file ${label} fails with the validating reader's error, and builds nothing`, () =>
    withTempDir(async (dir) => {
      const seed = await seedCopy(dir);
      const weights = join(seed, "model.safetensors");
      await damage(weights);
      const expected = await SafetensorsReader.open(weights).then(
        (reader) => reader.close(),
        (error: unknown) => error,
      );
      assert.ok(isBamError(expected), "the reader refuses the damaged file");
      const text = join(dir, "a.txt");
      await writeFile(text, "Some words to score.");
      const run = await runCli(["eval", seed, "--text", text], { env: { BAM_CACHE_DIR: join(dir, "cache") } });
      assert.equal(run.code, 1, run.stderr);
      assert.equal(run.stderr, `bam: ${expected.message}\n`);
      assert.equal(existsSync(join(dir, "cache", "onnx")) ? (await readdir(join(dir, "cache", "onnx"))).length : 0, 0);
    }));
}
