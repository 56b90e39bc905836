/**
 * The identity property end to end in PyTorch, for every fixture family and
 * every attention mode: `bam upcycle s s s` (the seed's own block), loaded
 * into modeling_bam.py's pure-torch core, gives the logits transformers
 * itself computed for s. Also the dense layout (one expert), and the
 * sharded and bf16 copies of s.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { before, describe, test } from "node:test";
import { openSeed } from "../../src/arch/index.js";
import type { AttentionExperts } from "../../src/arch/model.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, fixtureFamilies, FIXTURES, TOLERANCE, withTempDir } from "../helpers.js";
import { NO_TORCH, runPython } from "./python.js";

interface Comparison {
  max_abs_error: number;
  max_abs_reference: number;
}

/** One python process per family: [folder, reference, key] triples -> one comparison each. */
function compareAll(triples: Array<[string, string, string]>): Comparison[] {
  return runPython(["test/python/bam_folder.py", ...triples.flat()])
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line) as Comparison);
}

for (const family of fixtureFamilies()) {
  describe(`pytorch ${family}`, { skip: NO_TORCH }, () => {
    const cases: Array<{ label: string; options: (base: string) => Partial<UpcycleOptions>; key: string }> = [
      ...(["moa", "shared-kv", "merged"] as AttentionExperts[]).map((attention) => ({
        label: `[s, s, s] in ${attention}`,
        options: (base: string) => ({ seeds: [base, base, base], attention, expertsPerToken: 2, normTopkProb: true }),
        key: "logits_base",
      })),
      { label: "the dense layout (one expert)", options: (base) => ({ seeds: [base] }), key: "logits_base" },
      // k = E with the paper's gate keeps s's function (the probabilities over all experts sum to 1).
      {
        label: "[sharded, sharded] in moa, top-2 with the paper's gate",
        options: () => ({
          seeds: [fixture(family, "sharded"), fixture(family, "sharded")],
          expertsPerToken: 2,
          normTopkProb: false,
        }),
        key: "logits_base",
      },
      {
        label: "[bf16, bf16] in shared-kv, top-1 renormalised",
        options: () => ({
          seeds: [fixture(family, "bf16"), fixture(family, "bf16")],
          attention: "shared-kv",
          normTopkProb: true,
        }),
        key: "logits_bf16",
      },
    ];
    let results: Comparison[] = [];
    before(() =>
      withTempDir(async (dir) => {
        const base = fixture(family, "base");
        const seed = await openSeed(base);
        const block = seed.features.parallelBlock ? "parallel" : "sequential";
        await seed.close();
        const reference = join(FIXTURES, family, "reference.safetensors");
        const triples: Array<[string, string, string]> = [];
        for (const [i, { options, key }] of cases.entries()) {
          const out = join(dir, `out${i}`);
          await upcycle({ output: out, block, ...options(base) } as UpcycleOptions);
          triples.push([out, reference, key]);
        }
        results = compareAll(triples);
      }),
    );
    for (const [i, { label }] of cases.entries()) {
      test(`${label} gives transformers' logits`, () => {
        const result = results[i];
        assert.ok(result !== undefined, "compared");
        assert.ok(result.max_abs_reference > 0.1, "the reference logits are not trivial");
        assert.ok(result.max_abs_error <= TOLERANCE, `max |logits - transformers| = ${result.max_abs_error}`);
      });
    }
  });
}
