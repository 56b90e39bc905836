/**
 * The native formats' table read both ways (src/arch/native.ts): the writer's
 * tensor names come back as the BAM names they were written from, and the
 * opener reads a native config.json as transformers does where a key is left
 * out, refusing one that holds more than a BAM model can.
 */
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import { fromNativeName, NATIVE_FORMATS, toNativeName } from "../../src/arch/native.js";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, refused, withTempDir } from "../helpers.js";

const SEEDS = { mixtral: "mistral", "qwen3-moe": "qwen3" } as const;

for (const format of NATIVE_FORMATS) {
  test(`${format}: every tensor the writer names comes back under its BAM name`, () =>
    withTempDir(async (dir) => {
      const seeds = ["base", "code"].map((v) => fixture(SEEDS[format], v as "base"));
      await upcycle({ seeds, output: join(dir, "bam"), attention: "merged", block: "sequential", normTopkProb: true });
      const model = await openModel(join(dir, "bam"));
      const names = [...model.tensors.keys()];
      await model.close();
      const native = names.map(toNativeName(format));
      assert.ok(
        native.some((name, i) => name !== names[i]),
        "the format renames something",
      );
      assert.equal(new Set(native).size, names.length, "no two tensors share a native name");
      assert.deepEqual(native.map(fromNativeName(format)), names);
    }));
}

test("a mixtral config.json without sliding_window or rope_theta reads as MixtralConfig's defaults", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    await upcycle({
      seeds: ["base", "code"].map((v) => fixture("mistral", v as "base")),
      output: out,
      format: "mixtral",
      expertsPerToken: 2,
    });
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"));
    delete config.sliding_window;
    delete config.rope_theta;
    delete config.rope_parameters;
    await writeFile(join(out, "config.json"), JSON.stringify(config));
    const model = await openModel(out);
    await model.close();
    assert.equal(model.features.slidingWindow, null);
    assert.equal(model.features.rope?.theta, 1e6);
    assert.equal(model.moe.normTopkProb, true);
    assert.equal(model.moe.numExperts, 2);
  }));

test("a qwen3_moe folder with dense layers is refused, naming the key", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    await upcycle({
      seeds: ["base", "code"].map((v) => fixture("qwen3", v as "base")),
      output: out,
      format: "qwen3-moe",
    });
    const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"));
    await writeFile(join(out, "config.json"), JSON.stringify({ ...config, mlp_only_layers: [1] }));
    await refused(
      openModel(out),
      "FEATURE_UNSUPPORTED",
      /config\.json: "mlp_only_layers" is \[1\]; qwen3_moe folders are read with \[\]/,
    );
    await writeFile(join(out, "config.json"), JSON.stringify({ ...config, num_experts: "2" }));
    await refused(openModel(out), "CONFIG_INVALID", /config\.json: "num_experts" must be an integer/);
  }));
