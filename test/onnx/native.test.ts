/**
 * Native formats both ways: `bam upcycle --format mixtral|qwen3-moe` picks
 * the merged attention and sequential block it needs (and Mixtral's gate)
 * where the user chose none, and names every conflicting flag in one line;
 * the tools read the folders it writes: `bam inspect` reports the experts,
 * and `bam eval --ids --save-logits` gives the logits of the BAM folder of
 * the same merge (which the engine matches to modeling_bam.py elsewhere),
 * `bam generate` its greedy tokens, and `bam export-onnx` writes its graph.
 * test/pytorch/native.test.ts checks stock transformers on the same folders.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { access, readdir } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import type { Family } from "../../src/arch/types.js";
import { planUpcycle, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, FIXTURES, maxAbsDiff, refused, TOLERANCE, withTempDir } from "../helpers.js";
import { readTensors } from "./engine.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

function bam(
  env: Record<string, string>,
  ...args: string[]
): { status: number | null; stdout: string; stderr: string } {
  const run = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: { ...process.env, ...env } });
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

const FORMATS: Array<{ format: "mixtral" | "qwen3-moe"; family: Family; modelType: string; normTopkProb: boolean }> = [
  // Mixtral always renormalises; qwen3-moe keeps the default gate (the paper's).
  { format: "mixtral", family: "mistral", modelType: "mixtral", normTopkProb: true },
  { format: "qwen3-moe", family: "qwen3", modelType: "qwen3_moe", normTopkProb: false },
];

for (const { format, family, modelType, normTopkProb } of FORMATS) {
  describe(`--format ${format}`, () => {
    const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));

    test("picks merged attention, a sequential block and its gate where none is given", async () => {
      const plan = await planUpcycle({ seeds, output: "unused", format });
      assert.equal(plan.options.attention, "merged");
      assert.equal(plan.options.block, "sequential");
      assert.equal(plan.options.normTopkProb, normTopkProb);
    });

    test("bam inspect reports the experts; eval, generate and export-onnx run it as the BAM folder", () =>
      withTempDir(async (dir) => {
        const env = { BAM_CACHE_DIR: join(dir, "cache") };
        const native = join(dir, "native");
        const bamFolder = join(dir, "bam");
        const common = { seeds, expertsPerToken: 2, seed: 5 } satisfies Partial<UpcycleOptions>;
        const written = await upcycle({ ...common, output: native, format });
        // The same merge in the BAM folder, with the options the format picked.
        const { attention, block } = written.plan.options;
        await upcycle({
          ...common,
          output: bamFolder,
          attention,
          block,
          normTopkProb: written.plan.options.normTopkProb,
        });

        const run = bam(env, "inspect", native, "--json");
        assert.equal(run.status, 0, run.stderr);
        const summary = JSON.parse(run.stdout);
        assert.equal(summary.kind, modelType);
        assert.equal(summary.experts, 3);
        assert.equal(summary.expertsPerToken, 2);
        assert.equal(summary.attentionExperts, "merged");
        assert.equal(summary.block, "sequential");
        const text = bam(env, "inspect", native);
        assert.match(text.stdout, new RegExp(`${modelType} mixture`));
        assert.match(text.stdout, /experts\s+3 FFN experts, top-2; attention merged/);

        // The opener's BAM view of the native folder is the BAM folder's, tensor by tensor.
        const [a, b] = [await openModel(native), await openModel(bamFolder)];
        try {
          assert.deepEqual([...a.tensors.keys()].sort(), [...b.tensors.keys()].sort());
          assert.deepEqual(a.moe, { ...b.moe, routerZLossCoef: 0, upcycledFrom: [] });
        } finally {
          await Promise.all([a.close(), b.close()]);
        }

        const ids = join(FIXTURES, family, "reference.safetensors");
        const logits: Float32Array[] = [];
        for (const folder of [native, bamFolder]) {
          const out = `${folder}.logits.safetensors`;
          const evaluated = bam(env, "eval", folder, "--ids", ids, "--save-logits", out);
          assert.equal(evaluated.status, 0, evaluated.stderr);
          logits.push((await readTensors(out)).tensors.get("logits")!.data as Float32Array);
        }
        const [got, want] = logits as [Float32Array, Float32Array];
        assert.ok(maxAbsDiff(want, new Float32Array(want.length)) > 0.1, "the logits are not trivial");
        assert.ok(maxAbsDiff(got, want) <= TOLERANCE, `max |native - bam| = ${maxAbsDiff(got, want)}`);

        // generate runs the native folder greedily as the BAM folder; export-onnx writes its graph.
        const [nativeIds, bamIds] = [native, bamFolder].map((folder) => {
          const generated = bam(
            env,
            "generate",
            folder,
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "8",
            "--json",
          );
          assert.equal(generated.status, 0, generated.stderr);
          return (JSON.parse(generated.stdout) as { newIds: number[] }).newIds;
        });
        assert.equal(nativeIds!.length, 8);
        assert.deepEqual(nativeIds, bamIds);
        const exported = bam(env, "export-onnx", native, "-o", join(dir, "onnx"));
        assert.equal(exported.status, 0, exported.stderr);
        await access(join(dir, "onnx", "onnx", "model.onnx"));
      }));
  });
}

test("conflicting flags are all named in one line, and nothing is written", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    const seeds = ["base", "code"].map((v) => fixture("mistral", v as "base"));
    const run = bam(
      {},
      "upcycle",
      ...seeds,
      "-o",
      out,
      "--format",
      "mixtral",
      "--attention",
      "moa",
      "--block",
      "parallel",
      "--no-norm-topk-prob",
    );
    assert.equal(run.status, 2, run.stderr);
    const lines = run.stderr.trim().split("\n");
    assert.equal(lines.length, 1, run.stderr);
    for (const flag of ["--attention moa", "--block parallel", "--no-norm-topk-prob"])
      assert.ok(lines[0]!.includes(flag), `${flag} in: ${lines[0]}`);
    assert.match(lines[0]!, /--format mixtral cannot hold this model: .*change all of these, or use --format bam$/);
    assert.deepEqual(await readdir(dir), []);
  }));

test("an unknown format given to the API is refused as an option, not by what it would imply", () =>
  refused(
    planUpcycle({ seeds: [fixture("qwen3", "base")], output: "unused", format: "gguf" as "bam" }),
    "OPTIONS_INVALID",
    /format must be one of bam, mixtral, qwen3-moe, not "gguf"/,
  ));
