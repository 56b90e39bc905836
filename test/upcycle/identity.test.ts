/**
 * The identity property at the tensor level, for every fixture family and
 * every attention mode: upcycling [s, s, s] gives experts equal to s's
 * tensors byte for byte and averages equal to s; with [base, code, math]
 * expert e comes from seed e and the averages are the seeds' mean.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { openSeed, type Seed } from "../../src/arch/index.js";
import { describeModel } from "../../src/arch/describe.js";
import { openModel, type AttentionExperts, type OpenedModel } from "../../src/arch/model.js";
import { toFloat32 } from "../../src/safetensors/index.js";
import { upcycle } from "../../src/upcycle/index.js";
import { bytesEqual, fixture, fixtureFamilies, withTempDir } from "../helpers.js";

const MODES: AttentionExperts[] = ["moa", "shared-kv", "merged"];

/** The seed tensor an output tensor must equal, and from which seed (null = average of all). */
function expectedSource(name: string, mode: AttentionExperts): { tensor: string; seed: number | null } | null {
  if (name.endsWith(".router.weight")) return null;
  const expert = /^(model\.layers\.\d+\.(attn|mlp))\.experts\.(\d+)\.(.*)$/.exec(name);
  if (expert) return { tensor: `${expert[1]}.${expert[4]}`, seed: Number(expert[3]) };
  if (mode === "moa")
    assert.doesNotMatch(name, /\.attn\.(q|k|v|o)_proj|\.attn\.(q|k)_norm/, `${name} should be per expert in moa`);
  return { tensor: name, seed: null };
}

async function checkAgainstSeeds(output: OpenedModel, seeds: Seed[], mode: AttentionExperts): Promise<void> {
  let routers = 0;
  for (const tensor of output.tensors.values()) {
    const source = expectedSource(tensor.name, mode);
    if (source === null) {
      routers += 1;
      assert.deepEqual(tensor.shape, [seeds.length, output.features.hiddenSize], tensor.name);
      continue;
    }
    const actual = await output.read(tensor.name);
    if (source.seed !== null) {
      assert.ok(
        bytesEqual(actual, await seeds[source.seed]!.read(source.tensor)),
        `${tensor.name} must equal seed ${source.seed}'s ${source.tensor}`,
      );
      continue;
    }
    const dtype = seeds[0]!.tensors.get(source.tensor)!.dtype as "F32";
    const values = await Promise.all(seeds.map(async (s) => toFloat32(await s.read(source.tensor), dtype)));
    const got = toFloat32(actual, dtype);
    for (let i = 0; i < got.length; i++) {
      const mean = values.reduce((sum, v) => sum + v[i]!, 0) / values.length;
      const tolerance = Math.abs(mean) * 2 ** -23 + 1e-30; // one f32 rounding
      assert.ok(
        Math.abs(got[i]! - mean) <= tolerance,
        `${tensor.name}[${i}] = ${got[i]} but the seeds' mean is ${mean}`,
      );
    }
  }
  const expectedRouters = output.features.numLayers * (mode === "merged" ? 1 : 2);
  assert.equal(routers, expectedRouters, "one FFN router per layer, and one attention router unless merged");
}

for (const family of fixtureFamilies()) {
  describe(`upcycle ${family}`, () => {
    for (const mode of MODES) {
      test(`[s, s, s] in ${mode} is s, tensor for tensor`, () =>
        withTempDir(async (dir) => {
          const base = fixture(family, "base");
          const out = join(dir, "out");
          const seed = await openSeed(base);
          const block = seed.features.parallelBlock ? "parallel" : "sequential";
          await upcycle({ seeds: [base, base, base], output: out, attention: mode, block });
          const model = await openModel(out);
          try {
            await checkAgainstSeeds(model, [seed, seed, seed], mode);
            const summary = describeModel(model);
            assert.equal(summary.kind, "bam");
            assert.equal(summary.experts, 3);
            assert.equal(summary.attentionExperts, mode);
            assert.equal(summary.block, block);
            assert.deepEqual(model.features, seed.features);
          } finally {
            await model.close();
            await seed.close();
          }
        }));

      test(`[base, code, math] in ${mode}: expert e is seed e, the rest averaged`, () =>
        withTempDir(async (dir) => {
          const dirs = [fixture(family, "base"), fixture(family, "code"), fixture(family, "math")];
          const out = join(dir, "out");
          await upcycle({ seeds: dirs, output: out, attention: mode });
          const seeds = await Promise.all(dirs.map((d) => openSeed(d)));
          const model = await openModel(out);
          try {
            await checkAgainstSeeds(model, seeds, mode);
            assert.deepEqual(
              model.moe.upcycledFrom.map((s) => s.name),
              ["base", "code", "math"],
            );
            for (const s of model.moe.upcycledFrom) assert.match(s.sha256, /^[0-9a-f]{64}$/);
          } finally {
            await model.close();
            await Promise.all(seeds.map((s) => s.close()));
          }
        }));
    }

    test("a single-expert BAM folder of s is s again as a seed", () =>
      withTempDir(async (dir) => {
        const base = fixture(family, "base");
        const single = join(dir, "single");
        const seed = await openSeed(base);
        const block = seed.features.parallelBlock ? "parallel" : "sequential";
        await upcycle({ seeds: [base], output: single, experts: 1, block });
        const again = await openSeed(single);
        try {
          assert.deepEqual(again.features, seed.features);
          assert.deepEqual([...again.tensors.keys()], [...seed.tensors.keys()]);
          for (const name of seed.tensors.keys()) {
            assert.ok(bytesEqual(await again.read(name), await seed.read(name)), `${name} must read back unchanged`);
          }
          const mixture = join(dir, "mixture");
          await upcycle({ seeds: [single, base], output: mixture, block });
          await assert.rejects(openSeed(mixture), {
            code: "FEATURE_UNSUPPORTED",
            message: /num_experts 2 .* is not a dense seed/,
          });
        } finally {
          await again.close();
          await seed.close();
        }
      }));
  });
}
