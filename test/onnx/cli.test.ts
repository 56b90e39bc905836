/**
 * The commands end to end, as a user runs them: `bam eval --ids
 * --save-logits` round trip, `bam eval --text` perplexity against logits
 * computed here, `bam eval --tokens` against transformers' logits, `bam export-onnx` and the cache (reused while the weights
 * are unchanged, rebuilt when they change), `bam generate`, and the error
 * paths: one line on stderr, exit 1 for errors, 2 for bad usage.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { cp, mkdir, readdir, stat, utimes, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, test } from "node:test";
import type { BamError } from "../../src/errors.js";
import { evaluatePerplexity, evaluateTokenFiles, prepareOnnx, saveLogits } from "../../src/onnx/index.js";
import { loadTokenizer } from "../../src/onnx/transformers.js";
import { writeSafetensors } from "../../src/safetensors/index.js";
import { fixture, FIXTURES, maxAbsDiff, TOLERANCE, withTempDir } from "../helpers.js";
import { readTensors, withSession } from "./engine.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const TEXT =
  "The quick brown fox jumps over the lazy dog near the quiet river bank.\nA small model can still learn useful patterns when the data is clean.\n";

/** -sum over t of log softmax(logits[t])[ids[t + 1]] of one window, computed here, independently of the engine. */
function windowNll(logits: Float32Array, ids: number[]): number {
  const vocab = logits.length / ids.length;
  let nll = 0;
  for (let t = 0; t + 1 < ids.length; t++) {
    const row = Array.from(logits.subarray(t * vocab, (t + 1) * vocab));
    const max = Math.max(...row);
    nll += max + Math.log(row.reduce((sum, v) => sum + Math.exp(v - max), 0)) - row[ids[t + 1]!]!;
  }
  return nll;
}

/** Runs the CLI; exports go under `cacheDir` (BAM_CACHE_DIR), or, with null, into the model folders. */
function bam(args: string[], cacheDir: string | null): { status: number | null; stdout: string; stderr: string } {
  const env = { ...process.env, BAM_CACHE_DIR: cacheDir ?? undefined };
  if (cacheDir === null) delete env.BAM_CACHE_DIR;
  const run = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env });
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

/** As `bam`, without waiting: several runs at once. */
function bamAsync(args: string[], cacheDir: string): Promise<ReturnType<typeof bam>> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, BAM_CACHE_DIR: cacheDir } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("error", reject);
    child.on("close", (status) => resolve({ status, stdout, stderr }));
  });
}

/** An error exit: the code, and exactly one line on stderr naming the problem. */
function assertFails(run: ReturnType<typeof bam>, status: number, pattern: RegExp): void {
  assert.equal(run.status, status, `exit code (stderr: ${run.stderr})`);
  const lines = run.stderr.trimEnd().split("\n");
  assert.match(lines[0]!, /^bam: /);
  assert.match(run.stderr, pattern);
  if (status === 1) assert.equal(lines.length, 1, `one line: ${run.stderr}`);
}

describe("bam eval, generate, export-onnx", () => {
  test("eval --ids --save-logits writes transformers' logits", () =>
    withTempDir(async (dir) => {
      const out = join(dir, "logits.safetensors");
      const [model, ids] = [fixture("qwen3", "base"), join(FIXTURES, "qwen3", "reference.safetensors")];
      const run = bam(["eval", model, "--ids", ids, "--save-logits", out], dir);
      assert.equal(run.status, 0, run.stderr);
      const { tensors } = await readTensors(out);
      const { tensors: reference } = await readTensors(ids);
      assert.deepEqual(tensors.get("logits")!.shape, [2, 12, 320]);
      const error = maxAbsDiff(
        tensors.get("logits")!.data as Float32Array,
        reference.get("logits_base")!.data as Float32Array,
      );
      assert.ok(error <= TOLERANCE, `max |saved - transformers| = ${error}`);
      // the API replaces the file only with force, the option OUTPUT_EXISTS names (as the CLI's --force)
      await assert.rejects(
        saveLogits(model, ids, out, { cacheDir: dir }),
        (e: BamError) => e.code === "OUTPUT_EXISTS" && /--force/.test(e.message),
      );
      await writeFile(out, "not logits");
      await saveLogits(model, ids, out, { force: true, cacheDir: dir });
      assert.deepEqual((await readTensors(out)).tensors.get("logits")!.data, tensors.get("logits")!.data);
    }));

  test("eval --text: perplexity is exp(mean NLL) of the model's logits on the tokenised file", () =>
    withTempDir(async (dir) => {
      const model = fixture("llama", "base");
      const text = join(dir, "a.txt");
      await writeFile(text, TEXT);
      const run = bam(["eval", model, "--text", text, text, "--context", "16", "--json"], dir);
      assert.equal(run.status, 0, run.stderr);
      const report = JSON.parse(run.stdout);
      // the same windows by hand: tokenise, logits per window, NLL here
      const ids = (await loadTokenizer(model)).encode(TEXT);
      let nll = 0;
      let predicted = 0;
      await withSession(model, async (session) => {
        for (let start = 0; start < ids.length; start += 16) {
          const window = ids.slice(start, start + 16);
          if (window.length < 2) continue;
          const [logits] = await session.forward(BigInt64Array.from(window, BigInt), 1, window.length, ["logits"]);
          nll += windowNll(logits!, window);
          predicted += window.length - 1;
        }
      });
      assert.equal(report.files.length, 2);
      assert.equal(report.overall.tokens, 2 * ids.length);
      assert.equal(report.overall.predicted, 2 * predicted);
      assert.ok(Math.abs(report.files[0].perplexity - Math.exp(nll / predicted)) <= 1e-6 * report.files[0].perplexity);
      assert.equal(report.files[1].perplexity, report.files[0].perplexity);
      assert.ok(Math.abs(report.overall.perplexity - report.files[0].perplexity) <= 1e-9 * report.overall.perplexity);
    }));

  test("eval --tokens: perplexity of a token file from transformers' own logits", () =>
    withTempDir(async (dir) => {
      const { tensors: reference } = await readTensors(join(FIXTURES, "qwen3", "reference.safetensors"));
      const ids = Array.from(reference.get("input_ids")!.data as BigInt64Array, Number);
      const [rows, seq] = reference.get("input_ids")!.shape as [number, number];
      const logits = reference.get("logits_base")!.data as Float32Array;
      const vocab = logits.length / ids.length;
      const file = join(dir, "ids.bin");
      await writeFile(file, Buffer.from(Uint16Array.from(ids).buffer));
      // each row of the reference is one window: NLL of transformers' logits, computed here
      const expected = Array.from({ length: rows }, (_, r) =>
        windowNll(logits.subarray(r * seq * vocab, (r + 1) * seq * vocab), ids.slice(r * seq, (r + 1) * seq)),
      );
      const all = bam(["eval", fixture("qwen3", "base"), "--tokens", file, "--context", String(seq), "--json"], dir);
      assert.equal(all.status, 0, all.stderr);
      const report = JSON.parse(all.stdout);
      assert.equal(report.overall.predicted, rows * (seq - 1));
      const total = expected.reduce((a, b) => a + b, 0);
      // Each token's NLL, logsumexp(l) - l[y], moves by at most 2 max|l - l'|: the logits' tolerance bounds the sum.
      assert.ok(
        Math.abs(report.overall.nll - total) <= 2 * TOLERANCE * report.overall.predicted,
        `nll ${report.overall.nll} vs transformers ${total}`,
      );
      const first = JSON.parse(
        bam(
          [
            "eval",
            fixture("qwen3", "base"),
            "--tokens",
            file,
            "--context",
            String(seq),
            "--max-tokens",
            String(seq),
            "--json",
          ],
          dir,
        ).stdout,
      );
      assert.equal(first.overall.tokens, seq);
      assert.ok(
        Math.abs(first.overall.nll - expected[0]!) <= 2 * TOLERANCE * first.overall.predicted,
        `nll ${first.overall.nll} vs transformers ${expected[0]}`,
      );
    }));

  test("export-onnx writes a transformers.js folder into the user cache, not the model folder; reused, and rebuilt when the weights change", () =>
    withTempDir(async (dir) => {
      const model = join(dir, "model");
      const cacheDir = join(dir, "cache");
      await cp(fixture("gpt2", "base"), model, { recursive: true });
      const before = (await readdir(model)).sort();
      const first = bam(["export-onnx", model, "--json"], cacheDir);
      assert.equal(first.status, 0, first.stderr);
      const result = JSON.parse(first.stdout);
      assert.equal(result.built, true);
      assert.equal(dirname(result.folder), join(cacheDir, "onnx"), "in BAM_CACHE_DIR");
      assert.deepEqual((await readdir(model)).sort(), before, "nothing written into the model folder");
      assert.deepEqual((await readdir(result.folder)).sort(), [
        "bam-onnx.json",
        "config.json",
        "generation_config.json",
        "onnx",
        "tokenizer.json",
        "tokenizer_config.json",
      ]);
      assert.deepEqual((await readdir(join(result.folder, "onnx"))).sort(), [
        "generate.onnx",
        "model.onnx",
        "model.onnx_data",
        "score.onnx",
      ]);
      assert.equal((await prepareOnnx(model, { cacheDir })).built, false, "unchanged weights: reused");
      const weights = join(model, "model.safetensors");
      const later = new Date((await stat(weights)).mtimeMs + 5000);
      await utimes(weights, later, later);
      assert.equal((await prepareOnnx(model, { cacheDir })).built, true, "touched weights: rebuilt");
      assert.equal((await prepareOnnx(model, { cacheDir, force: true })).built, true, "--force: rebuilt");
      const generate = bam(["generate", model, "--prompt", "The experts", "--max-new-tokens", "4", "--json"], cacheDir);
      assert.equal(generate.status, 0, generate.stderr);
      assert.equal(JSON.parse(generate.stdout).newIds.length, 4);
    }));

  test("error paths of the commands: one line on stderr, exit 1 (error) or 2 (usage)", () =>
    withTempDir(async (dir) => {
      const model = fixture("llama", "base");
      const taken = join(dir, "taken");
      await mkdir(taken);
      await writeFile(join(taken, "file"), "x");
      const odd = join(dir, "odd.bin");
      await writeFile(odd, Buffer.of(1, 0, 2));
      const big = join(dir, "big.bin");
      await writeFile(big, Buffer.of(255, 255, 1, 0));
      const cases: Array<[string[], number, RegExp]> = [
        [["eval", join(dir, "missing"), "--text", "a.txt"], 1, /missing/],
        [["eval", model], 2, /--text FILE/],
        [["eval", model, "--ids", "ids.safetensors"], 2, /--save-logits/],
        [["eval", model, "--text", "a.txt", "--ids", "ids.safetensors"], 2, /mutually exclusive/],
        [["eval", model, "--tokens", odd], 1, /odd\.bin: 3 bytes is not a whole number of uint16 token ids/],
        [
          ["eval", model, "--tokens", big],
          1,
          /big\.bin: token 0 is 65535, outside the vocabulary \[0, \d+\) \(is --bin-dtype uint16 right\?\)/,
        ],
        [["eval", model, "--tokens", big, "--max-tokens", "1"], 2, /--max-tokens must be an integer of at least 2/],
        [["generate", model], 2, /prompt/],
        [["generate", model, "--prompt", "x", "--max-new-tokens", "0"], 2, /--max-new-tokens/],
        [["export-onnx", model, "-o", taken], 1, /exists and is not empty/],
      ];
      const runs = await Promise.all(cases.map(([args]) => bamAsync(args, dir)));
      for (const [i, run] of runs.entries()) assertFails(run, cases[i]![1], cases[i]![2]);
    }));

  test("error paths of the API: each failure has its code and names the file", () =>
    withTempDir(async (dir) => {
      const model = fixture("llama", "base");
      const text = join(dir, "a.txt");
      await writeFile(text, TEXT);
      const floatIds = join(dir, "float-ids.safetensors");
      await writeSafetensors(floatIds, [
        { name: "input_ids", dtype: "F32", shape: [1, 2], data: () => new Uint8Array(8) },
      ]);
      const outOfVocab = join(dir, "big-ids.safetensors");
      await writeSafetensors(outOfVocab, [
        {
          name: "input_ids",
          dtype: "I64",
          shape: [1, 1],
          data: () => new Uint8Array(BigInt64Array.of(100000n).buffer),
        },
      ]);
      process.env.BAM_CACHE_DIR = dir; // nothing may land in the fixtures
      const rejects = (promise: Promise<unknown>, code: string, pattern: RegExp) =>
        assert.rejects(promise, (e: BamError) => e.code === code && pattern.test(e.message));
      await rejects(evaluatePerplexity(model, [join(dir, "nope.txt")]), "IO_ERROR", /nope\.txt: no such file/);
      // the API's own names; bam eval says --context (test/cli/usage.test.ts)
      await rejects(evaluatePerplexity(model, [text], { context: 1 }), "OPTIONS_INVALID", /^context must be/);
      await rejects(evaluatePerplexity(model, []), "OPTIONS_INVALID", /^files: name at least one text file$/);
      const big = join(dir, "big.bin");
      await writeFile(big, Buffer.of(255, 255, 1, 0));
      await rejects(evaluateTokenFiles(model, [big]), "TENSOR_INVALID", /\(is binDType uint16 right\?\)$/);
      await rejects(
        evaluatePerplexity(fixture("gpt2", "base"), [text], { context: 1000 }),
        "OPTIONS_INVALID",
        /128 positions/,
      );
      await rejects(
        saveLogits(model, floatIds, join(dir, "o")),
        "TENSOR_INVALID",
        /float-ids\.safetensors: input_ids must be I64/,
      );
      await rejects(saveLogits(model, outOfVocab, join(dir, "o")), "TENSOR_INVALID", /outside the vocabulary/);
      await rejects(
        prepareOnnx(model, { output: model, force: true }),
        "OPTIONS_INVALID",
        /would replace the model folder/,
      );
      await rejects(prepareOnnx(join(model, "..")), "NOT_A_CHECKPOINT", /config\.json: not found/);
    }));
});
