/**
 * The scoring graph (score.onnx: attention in SCORE_CHUNKS causal query
 * chunks, windows padded at their end to a multiple of SCORE_CHUNKS) that
 * `bam eval` runs: every family's seed gives transformers' own logits
 * (fixtures/<family>/reference.safetensors) on whole rows and on prefixes whose
 * length needs padding; with a sliding window shorter than the window (the
 * chunks' own masks), the logits of model.onnx, whose mask
 * applies the window as a bias; with dynamic rope past the learned positions,
 * model.onnx's logits of the unpadded window.
 */
import assert from "node:assert/strict";
import { cp, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { SCORE_FILE } from "../../src/onnx/write.js";
import { fixture, fixtureFamilies, FIXTURES, maxAbsDiff, TOLERANCE, withTempDir } from "../helpers.js";
import { idsOf, readTensors, withSession } from "./engine.js";

/** model.onnx's logits of one unpadded window (positions 0..T-1). */
const modelLogits = (model: string, window: number[]) =>
  withSession(model, async (session) => {
    const [logits] = await session.forward(BigInt64Array.from(window, BigInt), 1, window.length, ["logits"]);
    return logits!;
  });

describe("score.onnx", () => {
  for (const family of fixtureFamilies()) {
    test(`${family}: transformers' logits on whole rows and on padded prefixes`, async () => {
      const { tensors } = await readTensors(join(FIXTURES, family, "reference.safetensors"));
      const { ids, batch, seq } = idsOf(tensors);
      const want = tensors.get("logits_base")!.data as Float32Array;
      const vocab = want.length / (batch * seq);
      await withSession(
        fixture(family, "base"),
        async (session) => {
          for (let row = 0; row < batch; row++) {
            // seq, then lengths that are not multiples of the chunk count (padding), down to 2
            for (const length of [seq, seq - 1, seq - 5, 2]) {
              const window = Array.from(ids.subarray(row * seq, row * seq + length), Number);
              const got = await session.score(window);
              assert.equal(got.length, length * vocab);
              const error = maxAbsDiff(got, want.subarray(row * seq * vocab, (row * seq + length) * vocab));
              assert.ok(error <= TOLERANCE, `row ${row}, ${length} tokens: max |logits - transformers| = ${error}`);
            }
          }
        },
        SCORE_FILE,
      );
    });
  }

  test("rope that scales with the sequence's length (dynamic) sees the window's length, not the padded one", () =>
    withTempDir(async (dir) => {
      const model = join(dir, "llama");
      await cp(fixture("llama", "base"), model, { recursive: true });
      const config = JSON.parse(await readFile(join(model, "config.json"), "utf8"));
      // 10 learned positions, dynamic scaling past them: 11 tokens (padded to 12) scale as 11
      const rope = { ...config.rope_parameters, rope_type: "dynamic", factor: 2.0 };
      const scaled = { ...config, max_position_embeddings: 10, rope_parameters: rope };
      await writeFile(join(model, "config.json"), JSON.stringify(scaled));
      const window = Array.from({ length: 11 }, (_, i) => (i * 29 + 5) % config.vocab_size);
      const unpadded = await modelLogits(model, window);
      const padded = await withSession(model, async (session) => {
        const ids = BigInt64Array.from([...window, 0], BigInt);
        return (await session.forward(ids, 1, ids.length, ["logits"]))[0]!.subarray(0, unpadded.length);
      });
      const scored = await withSession(model, (session) => session.score(window), SCORE_FILE);
      assert.ok(
        maxAbsDiff(scored, unpadded) <= TOLERANCE,
        `max |score - model.onnx| = ${maxAbsDiff(scored, unpadded)}`,
      );
      // the length matters here: 12 positions would scale otherwise
      assert.ok(maxAbsDiff(padded, unpadded) > 1e-3, "the padded length changed nothing");
    }));

  test("a sliding window shorter than the sequence: the logits of model.onnx", () =>
    withTempDir(async (dir) => {
      const model = join(dir, "mistral");
      await cp(fixture("mistral", "base"), model, { recursive: true });
      const config = JSON.parse(await readFile(join(model, "config.json"), "utf8"));
      await writeFile(join(model, "config.json"), JSON.stringify({ ...config, sliding_window: 5 }));
      const window = Array.from({ length: 23 }, (_, i) => (i * 37 + 11) % config.vocab_size);
      const full = await modelLogits(model, window);
      const unwindowed = await modelLogits(fixture("mistral", "base"), window);
      const scored = await withSession(model, (session) => session.score(window), SCORE_FILE);
      assert.ok(maxAbsDiff(scored, full) <= TOLERANCE, `max |score - model.onnx| = ${maxAbsDiff(scored, full)}`);
      // the window matters here: without it the logits differ
      assert.ok(maxAbsDiff(full, unwindowed) > 1e-3, "the sliding window changed nothing");
    }));
});
