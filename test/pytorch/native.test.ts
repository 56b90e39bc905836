/**
 * The native exports compute the gate the BAM folder computes: a real merge
 * ([base, code], distinct experts, the same deterministic routers) written
 * with --format qwen3-moe (each gate) or mixtral (renormalised), loaded by
 * stock transformers, gives modeling_bam.py's logits for --format bam with
 * the same options; our CPU engine reading the native folder itself (what
 * `bam eval` does) gives transformers' logits too; and the two gates give
 * visibly different functions, so the comparison can tell them apart.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { before, describe, test } from "node:test";
import type { Family } from "../../src/arch/types.js";
import { writeSafetensors } from "../../src/safetensors/index.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, FIXTURES, TOLERANCE, withTempDir } from "../helpers.js";
import { logitsOf, readTensors } from "../onnx/engine.js";
import { NO_TORCH, runPython } from "./python.js";

const CASES: Array<{
  label: string;
  family: Family;
  format: "qwen3-moe" | "mixtral";
  options: Partial<UpcycleOptions>;
}> = [
  {
    label: "qwen3-moe, top-1 with the paper's gate",
    family: "qwen3",
    format: "qwen3-moe",
    options: { normTopkProb: false },
  },
  {
    label: "qwen3-moe, top-2 of 3 with the paper's gate",
    family: "qwen3",
    format: "qwen3-moe",
    options: { normTopkProb: false, expertsPerToken: 2 },
  },
  {
    label: "qwen3-moe, top-2 of 3 renormalised",
    family: "qwen3",
    format: "qwen3-moe",
    options: { normTopkProb: true, expertsPerToken: 2 },
  },
  {
    label: "mixtral, top-2 of 3 renormalised",
    family: "mistral",
    format: "mixtral",
    options: { normTopkProb: true, expertsPerToken: 2 },
  },
];

describe("native exports and the BAM folder agree on the gate", { skip: NO_TORCH }, () => {
  let results: Array<{ max_abs_error: number; max_abs_logit: number }> = [];
  let engine: Array<{ max_abs_error: number; max_abs_logit: number }> = [];
  let gatesDiffer: { max_abs_error: number; max_abs_logit: number } | undefined;
  before(() =>
    withTempDir(async (dir) => {
      const pairs: string[] = [];
      for (const [i, { family, format, options }] of CASES.entries()) {
        const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
        const common = { seeds, attention: "merged", block: "sequential", seed: 3, ...options } as const;
        await upcycle({ ...common, output: join(dir, `native${i}`), format });
        await upcycle({ ...common, output: join(dir, `bam${i}`), format: "bam" });
        pairs.push(join(dir, `native${i}`), join(dir, `bam${i}`));
      }
      const reference = join(FIXTURES, "qwen3", "reference.safetensors");
      // The engine's logits of each native folder, as bam eval computes them (the fixtures share one vocabulary).
      const inputIds = (await readTensors(reference)).tensors.get("input_ids")!;
      const [batch, seq] = inputIds.shape as [number, number];
      for (const i of CASES.keys()) {
        const logits = await logitsOf(join(dir, `native${i}`), { ids: inputIds.data as BigInt64Array, batch, seq });
        const file = join(dir, `engine${i}.safetensors`);
        await writeSafetensors(file, [
          {
            name: "logits",
            dtype: "F32",
            shape: [batch, seq, logits.length / (batch * seq)],
            data: () => new Uint8Array(logits.buffer, logits.byteOffset, logits.byteLength),
          },
        ]);
        pairs.push(join(dir, `native${i}`), file);
      }
      // The paper's-gate qwen3-moe folder against the renormalised BAM folder of the same top-2 merge.
      pairs.push(join(dir, "native1"), join(dir, "bam2"));
      const lines = runPython(["test/python/native_folder.py", reference, ...pairs])
        .trim()
        .split("\n");
      const parsed = lines.map((line) => JSON.parse(line) as { max_abs_error: number; max_abs_logit: number });
      gatesDiffer = parsed.pop();
      results = parsed.slice(0, CASES.length);
      engine = parsed.slice(CASES.length);
    }),
  );
  for (const [i, { label }] of CASES.entries()) {
    test(`${label}: transformers gives modeling_bam.py's logits`, () => {
      const result = results[i]!;
      assert.ok(result.max_abs_logit > 0.1, "the logits are not trivial");
      assert.ok(result.max_abs_error <= TOLERANCE, `max |native - bam| = ${result.max_abs_error}`);
    });
  }
  for (const [i, { label }] of CASES.entries()) {
    test(`${label}: the engine reading the native folder gives transformers' logits`, () => {
      const result = engine[i]!;
      assert.ok(result.max_abs_logit > 0.1, "the logits are not trivial");
      assert.ok(result.max_abs_error <= TOLERANCE, `max |transformers - engine| = ${result.max_abs_error}`);
    });
  }
  test("the two gates are different functions on this merge", () => {
    assert.ok(
      gatesDiffer!.max_abs_error > 1e-2,
      `paper's gate vs renormalised: max |difference| = ${gatesDiffer!.max_abs_error}`,
    );
  });
});
