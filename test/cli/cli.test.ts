/**
 * The `bam` command as users run it: inspect describes every fixture family
 * (also from its v4-style config) as transformers saved it; errors are one
 * line with a non-zero exit and no stack trace; --json and --dry-run.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { cp, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, test } from "node:test";
import { fixture, fixtureFamilies, FIXTURES, withTempDir } from "../helpers.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

function bam(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const run = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8" });
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

interface SavedFamily {
  tied: boolean;
  tensors: Array<[string, number[], string]>;
}
const versions = JSON.parse(readFileSync(join(FIXTURES, "versions.json"), "utf8")) as {
  sizes: { hidden: number; layers: number };
  tokenizer_vocab_size: number;
  families: Record<string, SavedFamily>;
};

describe("bam inspect", () => {
  for (const family of fixtureFamilies()) {
    test(`${family}: the family, sizes and parameters transformers saved, from v5 and v4 configs alike`, () =>
      withTempDir(async (dir) => {
        const saved = versions.families[family]!;
        const stored = saved.tensors.reduce((n, [, shape]) => n + shape.reduce((a, b) => a * b, 1), 0);
        const v5 = JSON.parse(bam("inspect", fixture(family, "base"), "--json").stdout);
        assert.equal(v5.family, family);
        assert.equal(v5.kind, "dense");
        assert.equal(v5.layers, versions.sizes.layers);
        assert.equal(v5.hiddenSize, versions.sizes.hidden);
        assert.equal(v5.vocabSize, versions.tokenizer_vocab_size);
        assert.equal(v5.tiedEmbeddings, saved.tied);
        assert.equal(v5.parameters.total, stored, "every stored value counted once");
        assert.deepEqual(Object.keys(v5.dtypes), ["F32"]);
        const v4dir = join(dir, "v4");
        await cp(fixture(family, "base"), v4dir, { recursive: true });
        await cp(join(FIXTURES, family, "config.v4.json"), join(v4dir, "config.json"));
        const v4 = JSON.parse(bam("inspect", v4dir, "--json").stdout);
        assert.deepEqual({ ...v4, dir: null }, { ...v5, dir: null });
        const text = bam("inspect", fixture(family, "sharded"));
        assert.equal(text.status, 0);
        assert.match(text.stdout, new RegExp(`family ${family}`));
        assert.match(text.stdout, /shards\s+\d+: model-00001-of-/);
      }));
  }

  test("--scan reads every tensor and finds a NaN", () =>
    withTempDir(async (dir) => {
      assert.equal(bam("inspect", fixture("llama", "base"), "--scan").status, 0);
      const broken = join(dir, "broken");
      await cp(fixture("llama", "base"), broken, { recursive: true });
      const file = join(broken, "model.safetensors");
      const bytes = readFileSync(file);
      const dataStart = 8 + Number(bytes.readBigUInt64LE(0));
      bytes.writeFloatLE(Number.NaN, dataStart + 4 * 7); // one value of the first tensor
      await writeFile(file, bytes);
      const run = bam("inspect", broken, "--scan", "--json");
      assert.equal(run.status, 1);
      assert.equal(JSON.parse(run.stdout).scan.length, 1);
      assert.match(run.stderr, /^bam: .*NaN or Inf/);
    }));
});

describe("bam errors", () => {
  const oneLine = (stderr: string) => {
    assert.match(stderr, /^bam: /);
    assert.equal(stderr.trim().split("\n").length, 1, `one line, got: ${stderr}`);
    assert.doesNotMatch(stderr, /\n\s+at /, "no stack trace");
  };

  test("a missing folder, a pickle checkpoint, a truncated file, an unknown family", () =>
    withTempDir(async (dir) => {
      let run = bam("inspect", join(dir, "nowhere"));
      assert.equal(run.status, 1);
      oneLine(run.stderr);
      assert.match(run.stderr, /nowhere.*config\.json/);

      const pickle = join(dir, "pickle");
      await cp(fixture("llama", "base"), pickle, { recursive: true, filter: (src) => !src.endsWith(".safetensors") });
      await writeFile(join(pickle, "pytorch_model.bin"), "not really");
      run = bam("inspect", pickle);
      assert.equal(run.status, 1);
      oneLine(run.stderr);
      assert.match(run.stderr, /pickle|execute code/i);

      const truncated = join(dir, "truncated");
      await cp(fixture("llama", "base"), truncated, { recursive: true });
      const file = join(truncated, "model.safetensors");
      await writeFile(file, readFileSync(file).subarray(0, 5000));
      run = bam("inspect", truncated);
      assert.equal(run.status, 1);
      oneLine(run.stderr);
      assert.match(run.stderr, /model\.safetensors/);

      const unknown = join(dir, "unknown");
      await cp(fixture("llama", "base"), unknown, { recursive: true });
      const config = JSON.parse(readFileSync(join(unknown, "config.json"), "utf8"));
      await writeFile(join(unknown, "config.json"), JSON.stringify({ ...config, model_type: "mamba" }));
      run = bam("inspect", unknown);
      assert.equal(run.status, 1);
      oneLine(run.stderr);
      assert.match(run.stderr, /mamba.*llama/);
    }));

  test("upcycle refusals: mismatched seeds, existing output, bad flags; nothing written", () =>
    withTempDir(async (dir) => {
      const out = join(dir, "out");
      let run = bam("upcycle", fixture("llama", "base"), fixture("gpt2", "base"), "-o", out);
      assert.equal(run.status, 1);
      oneLine(run.stderr);
      run = bam("upcycle", fixture("llama", "base"), "-o", out, "--experts", "4", "--drop-ratio", "1.5");
      assert.equal(run.status, 2);
      oneLine(run.stderr);
      assert.match(run.stderr, /--drop-ratio/);
      run = bam("upcycle", fixture("llama", "base"), "-o", out, "--attention", "sideways");
      assert.equal(run.status, 2, "bad usage");
      assert.deepEqual(await readdir(dir), []);
      run = bam("upcycle", fixture("llama", "base"), "-o", out, "--format", "mixtral", "--experts", "2");
      assert.equal(run.status, 2);
      assert.match(run.stderr, /--format mixtral cannot hold this model/);
    }));
});

describe("bam upcycle", () => {
  test("--dry-run --json prints the plan and writes nothing; a run prints a summary", () =>
    withTempDir(async (dir) => {
      const seeds = ["base", "code", "math"].map((v) => fixture("gpt_neox", v as "base"));
      const out = join(dir, "out");
      const plan = JSON.parse(bam("upcycle", ...seeds, "-o", out, "--dry-run", "--json").stdout);
      assert.equal(plan.summary.experts, 3);
      assert.equal(plan.summary.attention, "moa");
      assert.ok(plan.summary.flopsPerTokenRatio > 1);
      assert.ok(plan.tensors.some((t: { name: string }) => t.name === "model.layers.0.attn.router.weight"));
      assert.deepEqual(await readdir(dir), []);
      const run = bam("upcycle", ...seeds, "-o", out, "--json");
      assert.equal(run.status, 0, run.stderr);
      const result = JSON.parse(run.stdout);
      assert.equal(result.seeds.length, 3);
      assert.ok(result.bytesWritten > 0);
      assert.ok((await readdir(out)).includes("modeling_bam.py"));
    }));
});
