/**
 * Logits of the CPU engine against transformers itself (fixtures/<family>/
 * reference.safetensors): every family's dense seed, also sharded and bf16;
 * and the identity property end to end: `bam upcycle s s s` in every
 * attention mode (the seed's own block), and sparse upcycling to 4 experts,
 * give s's logits.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { openSeed } from "../../src/arch/index.js";
import type { AttentionExperts } from "../../src/arch/model.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, fixtureFamilies, FIXTURES, maxAbsDiff, withTempDir } from "../helpers.js";
import { idsOf, logitsOf, readTensors, TOLERANCE } from "./engine.js";

for (const family of fixtureFamilies()) {
  describe(`onnx ${family}`, async () => {
    const { tensors } = await readTensors(join(FIXTURES, family, "reference.safetensors"));
    const ids = idsOf(tensors);
    const expect = async (folder: string, key: string) => {
      const want = tensors.get(key)!.data as Float32Array;
      const got = await logitsOf(folder, ids);
      const error = maxAbsDiff(got, want);
      assert.ok(error <= TOLERANCE, `max |logits - transformers ${key}| = ${error}`);
    };

    for (const [variant, key] of [["base", "logits_base"], ["sharded", "logits_base"], ["bf16", "logits_bf16"]] as const) {
      test(`the ${variant} seed gives transformers' ${key}`, () => expect(fixture(family, variant), key));
    }

    const base = fixture(family, "base");
    const seed = await openSeed(base);
    const block = seed.features.parallelBlock ? "parallel" : "sequential";
    await seed.close();
    const upcycled: Array<[string, Partial<UpcycleOptions>]> = [
      ...(["moa", "shared-kv", "merged"] as AttentionExperts[]).map((attention): [string, Partial<UpcycleOptions>] => [`[s, s, s] in ${attention}, top-2`, { seeds: [base, base, base], attention, expertsPerToken: 2 }]),
      ["sparse upcycling of s to 4 experts, top-3", { seeds: [base], experts: 4, expertsPerToken: 3 }],
    ];
    for (const [label, options] of upcycled) {
      test(`${label} gives s's logits`, () =>
        withTempDir(async (dir) => {
          const out = join(dir, "out");
          await upcycle({ output: out, block, ...options } as UpcycleOptions);
          await expect(out, "logits_base");
        }));
    }
  });
}
