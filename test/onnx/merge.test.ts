/**
 * Real merges ([base, code, math]) against python/modeling_bam.py: the
 * logits of fixtures/merge/<family>-<mode>.safetensors were computed by the
 * PyTorch model on the folder `bam upcycle` writes with the options stored
 * in the file (scripts/make_merge_reference.py); the same folder, rebuilt
 * here (routers are deterministic from --seed), must give them through ONNX.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { FIXTURES, maxAbsDiff, TOLERANCE, withTempDir } from "../helpers.js";
import { idsOf, logitsOf, readTensors } from "./engine.js";

const MERGES = join(FIXTURES, "merge");
const files = existsSync(MERGES)
  ? readdirSync(MERGES)
      .filter((f) => f.endsWith(".safetensors"))
      .sort()
  : [];

describe("onnx real merges", {
  skip: files.length === 0 ? "no fixtures/merge (python3 scripts/make_merge_reference.py)" : false,
}, () => {
  for (const file of files) {
    const family = file.slice(0, file.indexOf("-"));
    test(`${file}: ONNX logits equal modeling_bam.py's`, async () => {
      const { tensors, metadata } = await readTensors(join(MERGES, file));
      const options = JSON.parse(metadata.options!) as Partial<UpcycleOptions>;
      await withTempDir(async (dir) => {
        const out = join(dir, "bam");
        const seeds = ["base", "code", "math"].map((v) => join(FIXTURES, family, v));
        await upcycle({ ...options, seeds, output: out });
        const error = maxAbsDiff(await logitsOf(out, idsOf(tensors)), tensors.get("logits")!.data as Float32Array);
        assert.ok(error <= TOLERANCE, `max |onnx - pytorch| = ${error}`);
      });
    });
  }
});
