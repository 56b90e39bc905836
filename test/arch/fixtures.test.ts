/**
 * The real checkpoints saved by transformers (scripts/make_fixtures.py):
 * every family loads completely, the same way whether single-file, sharded
 * or bf16, and whether its config.json is spelled v5 or v4.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { copyFile, cp } from "node:fs/promises";
import { join } from "node:path";
import type { Seed } from "../../src/arch/load.js";
import { FAMILIES } from "../../src/arch/types.js";
import { bytesEqual, fixture, FIXTURES, withSeed, withTempDir } from "../helpers.js";

const layout = (seed: Seed) => [...seed.tensors.values()].map((t) => `${t.name} [${t.shape.join(", ")}]`);

for (const family of FAMILIES) {
  test(`fixtures: ${family}`, async (t) => {
    if (!existsSync(join(fixture(family, "base"), "config.json"))) {
      t.skip(`no fixtures/${family} yet`);
      return;
    }
    await withSeed(fixture(family, "base"), async (base) => {
      assert.equal(base.features.family, family);
      assert.deepEqual(base.unusedTensors, [], "base: unused tensors");

      await withSeed(fixture(family, "sharded"), async (sharded) => {
        assert.deepEqual(sharded.unusedTensors, [], "sharded: unused tensors");
        assert.deepEqual(sharded.features, base.features);
        assert.deepEqual(layout(sharded), layout(base));
        for (const name of base.tensors.keys()) {
          assert.ok(bytesEqual(await sharded.read(name), await base.read(name)), `sharded bytes differ: ${name}`);
        }
      });

      await withSeed(fixture(family, "bf16"), async (bf16) => {
        assert.deepEqual(bf16.unusedTensors, [], "bf16: unused tensors");
        assert.deepEqual(bf16.features, base.features);
        assert.deepEqual(layout(bf16), layout(base));
        assert.ok(
          [...bf16.tensors.values()].every((tensor) => tensor.dtype === "BF16"),
          "bf16: every tensor BF16",
        );
      });

      const v4Config = join(FIXTURES, family, "config.v4.json");
      if (!existsSync(v4Config)) return;
      await withTempDir(async (dir) => {
        await cp(fixture(family, "base"), dir, { recursive: true });
        await copyFile(v4Config, join(dir, "config.json"));
        await withSeed(dir, async (v4) => {
          assert.deepEqual(v4.features, base.features, "config.v4.json gives the same features");
          assert.deepEqual(layout(v4), layout(base));
        });
      });
    });
  });
}
