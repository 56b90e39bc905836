/**
 * BAM tensor names (src/arch/names.ts, docs/format.md "Tensor names"): every
 * name the upcycler plans, for every fixture family and attention mode, and
 * every dense seed's canonical name, parses and rebuilds to itself; names
 * the format does not define are refused.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import { fromNativeName, NATIVE_FORMATS, toNativeName } from "../../src/arch/native.js";
import {
  denseToBamName,
  moduleName,
  parseTensorName,
  siteOf,
  tensorName,
  type TensorName,
} from "../../src/arch/names.js";
import type { Family } from "../../src/arch/types.js";
import { planUpcycle } from "../../src/upcycle/index.js";
import type { UpcycleOptions } from "../../src/upcycle/options.js";
import { fixture, fixtureFamilies, withSeed } from "../helpers.js";

/** Every way a plan names its tensors: three attention modes, Drop-Upcycling from one seed, and one expert. */
function runs(family: Family): Array<[string, UpcycleOptions]> {
  const three = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
  const output = "/nonexistent/names-test";
  return [
    ["moa", { seeds: three, output, attention: "moa" }],
    ["shared-kv", { seeds: three, output, attention: "shared-kv" }],
    ["merged", { seeds: three, output, attention: "merged" }],
    ["drop", { seeds: [three[0]!], output, experts: 2, dropRatio: 0.5 }],
    ["one expert", { seeds: [three[0]!], output }],
  ];
}

/** Which kind of name a parsed one is, to check that every kind is met. */
function kindOf(t: TensorName): string {
  const site = siteOf(t.slot);
  if (t.layer === null) return `global ${t.part}`;
  if (t.slot.endsWith(".router")) return t.slot;
  if (site === null) return `layer norm ${t.part}`;
  return `${site} ${t.expert === null ? "shared" : "expert"} ${t.part}`;
}

test("every planned tensor name of every fixture family and mode parses and rebuilds to itself", async () => {
  const kinds = new Set<string>();
  for (const family of fixtureFamilies()) {
    for (const [mode, options] of runs(family)) {
      const plan = await planUpcycle(options);
      for (const tensor of plan.tensors) {
        const parsed = parseTensorName(tensor.name);
        assert.ok(parsed !== undefined, `${family} ${mode}: ${tensor.name} does not parse`);
        assert.equal(tensorName(parsed), tensor.name, `${family} ${mode}: ${tensor.name}`);
        assert.deepEqual(parseTensorName(tensorName(parsed)), parsed);
        kinds.add(kindOf(parsed));
        const { operation } = tensor;
        if (operation.kind === "router")
          assert.equal(operation.key, moduleName(parsed), `${family} ${mode}: router key of ${tensor.name}`);
        if (operation.kind === "drop")
          assert.equal(`${operation.key}.${parsed.slot.slice("mlp.".length)}.${parsed.part}`, tensor.name);
        // the planned expert is the seed tensor's slot and layer, with no expert
        if (operation.kind === "copy" || operation.kind === "drop") {
          assert.deepEqual(
            parseTensorName(operation.from.tensor),
            { ...parsed, expert: null },
            `${family} ${mode}: ${tensor.name} from ${operation.from.tensor}`,
          );
        }
      }
    }
  }
  const expected = [
    "global weight",
    "global bias",
    "layer norm weight",
    "layer norm bias",
    "attn.router",
    "mlp.router",
    "attn expert weight",
    "attn expert bias",
    "attn shared weight",
    "attn shared bias",
    "mlp expert weight",
    "mlp expert bias",
  ];
  assert.deepEqual([...kinds].sort(), expected.sort());
});

test("a dense seed's canonical names parse with no expert; its BAM view puts the FFN under expert 0", async () => {
  for (const family of fixtureFamilies()) {
    const dir = fixture(family, "base");
    const names = await withSeed(dir, async (seed) => [...seed.tensors.keys()]);
    const model = await openModel(dir);
    await model.close();
    assert.deepEqual(names.map(denseToBamName), [...model.tensors.keys()], family);
    for (const name of names) {
      const parsed = parseTensorName(name);
      assert.ok(parsed !== undefined && parsed.expert === null, `${family}: ${name}`);
      assert.equal(tensorName(parsed), name);
      const bam = parseTensorName(denseToBamName(name))!;
      assert.deepEqual(bam, siteOf(parsed.slot) === "mlp" ? { ...parsed, expert: 0 } : parsed, `${family}: ${name}`);
    }
  }
});

test("names docs/format.md does not define are refused", () => {
  for (const name of [
    "",
    "weight",
    "model.norm",
    "lm_head.scale",
    "model.embed_tokens.weight.extra",
    "model.layers.0.self_attn.q_proj.weight", // a seed's own spelling
    "model.layers.0.attn.rotary_emb.inv_freq",
    "model.layers.0.attn.qkv_proj.weight",
    "model.layers.00.input_layernorm.weight", // zero-padded index
    "model.layers.0.mlp.experts.01.up_proj.weight",
    "model.layers.-1.input_layernorm.weight",
    "model.layers.0.attn.router.bias", // routers have no bias
    "model.layers.0.mlp.experts.0.router.weight",
    "model.layers.0.mlp.experts.0.experts.1.up_proj.weight",
    "model.layers.0.input_layernorm.experts.0.weight",
    "model.layers.0.attn.experts.0.up_proj.weight", // an FFN projection under attention
    "model.layers.0.mlp.q_proj.weight",
    "model.layers.0.embed_tokens.weight", // a global slot in a layer
    "model.layers.0.mlp.experts.0.gate_proj.weight ",
  ]) {
    assert.equal(parseTensorName(name), undefined, JSON.stringify(name));
  }
  for (const t of [
    { layer: 0, slot: "input_layernorm", expert: 0, part: "weight" },
    { layer: 0, slot: "mlp.router", expert: null, part: "bias" },
    { layer: 0, slot: "mlp.router", expert: 1, part: "weight" },
    { layer: null, slot: "mlp.up_proj", expert: null, part: "weight" },
    { layer: 1, slot: "norm", expert: null, part: "weight" },
    { layer: 0, slot: "mlp.up_proj", expert: -1, part: "weight" },
    { layer: 0.5, slot: "mlp.up_proj", expert: null, part: "weight" },
  ] as TensorName[]) {
    assert.throws(() => tensorName(t), /is no BAM tensor/, JSON.stringify(t));
  }
});

test("native names (src/arch/native.ts) map to BAM names one to one, and leave what no BAM tensor is as it was", () => {
  const mixtralToBam = fromNativeName("mixtral");
  assert.equal(
    mixtralToBam("model.layers.3.block_sparse_moe.experts.2.w1.weight"),
    "model.layers.3.mlp.experts.2.gate_proj.weight",
  );
  assert.equal(mixtralToBam("model.layers.3.self_attn.o_proj.weight"), "model.layers.3.attn.o_proj.weight");
  for (const format of NATIVE_FORMATS) {
    const toBam = fromNativeName(format);
    const toNative = toNativeName(format);
    for (const name of [
      "model.layers.0.block_sparse_moe.gate.bias", // routers have no bias
      "model.layers.0.mlp.gate.bias",
      "model.layers.01.self_attn.q_proj.weight", // zero-padded: not the format's spelling
      "model.layers.0.block_sparse_moe.experts.01.w1.weight",
      "model.layers.0.self_attn.rotary_emb.inv_freq",
    ]) {
      assert.equal(toBam(name), name, `${format}: ${name}`);
    }
    // an attention expert has no native name: it is not folded onto the merged attention's
    assert.equal(
      toNative("model.layers.0.attn.experts.1.q_proj.weight"),
      "model.layers.0.attn.experts.1.q_proj.weight",
    );
  }
});
