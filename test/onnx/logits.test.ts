/**
 * Logits of the CPU engine against transformers itself (fixtures/<family>/
 * reference.safetensors): every family's dense seed, also sharded and bf16;
 * and the identity property end to end: `bam upcycle s s s` in every
 * attention mode (the seed's own block), and sparse upcycling to 4 experts,
 * give s's logits with the renormalised gate, and with the paper's gate where
 * k = E; the paper's gate at k < E does not (docs/method.md, "The identity property").
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { openSeed } from "../../src/arch/index.js";
import type { AttentionExperts } from "../../src/arch/model.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, fixtureFamilies, FIXTURES, maxAbsDiff, TOLERANCE, withTempDir } from "../helpers.js";
import { idsOf, logitsOf, readTensors } from "./engine.js";

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

    for (const [variant, key] of [
      ["base", "logits_base"],
      ["sharded", "logits_base"],
      ["bf16", "logits_bf16"],
    ] as const) {
      test(`the ${variant} seed gives transformers' ${key}`, () => expect(fixture(family, variant), key));
    }

    const base = fixture(family, "base");
    const seed = await openSeed(base);
    const block = seed.features.parallelBlock ? "parallel" : "sequential";
    await seed.close();
    const upcycled: Array<[string, Partial<UpcycleOptions>]> = [
      // The renormalised gate keeps s's function at any k; the paper's gate only where k = E (all probabilities, summing to 1).
      ...(["moa", "shared-kv", "merged"] as AttentionExperts[]).map((attention): [string, Partial<UpcycleOptions>] => [
        `[s, s, s] in ${attention}, top-2 renormalised`,
        { seeds: [base, base, base], attention, expertsPerToken: 2, normTopkProb: true },
      ]),
      [
        "sparse upcycling of s to 4 experts, top-3 renormalised",
        { seeds: [base], experts: 4, expertsPerToken: 3, normTopkProb: true },
      ],
      [
        "[s, s, s] in moa, top-3 with the paper's gate",
        { seeds: [base, base, base], expertsPerToken: 3, normTopkProb: false },
      ],
    ];
    for (const [label, options] of upcycled) {
      test(`${label} gives s's logits`, () =>
        withTempDir(async (dir) => {
          const out = join(dir, "out");
          await upcycle({ output: out, block, ...options } as UpcycleOptions);
          await expect(out, "logits_base");
        }));
    }

    test("[s, s, s] in moa, top-2 with the paper's gate, is not s: the gate changes the function", () =>
      withTempDir(async (dir) => {
        const out = join(dir, "out");
        await upcycle({ output: out, block, seeds: [base, base, base], expertsPerToken: 2, normTopkProb: false });
        const want = tensors.get("logits_base")!.data as Float32Array;
        const error = maxAbsDiff(await logitsOf(out, ids), want);
        // Each token's FFN output is scaled by p1 + p2 < 1 (router probabilities over all 3 experts).
        assert.ok(error > 1e-2, `max |logits - transformers| = ${error}, expected a visible difference`);
      }));
  });
}
