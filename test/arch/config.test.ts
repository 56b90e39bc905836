import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { featuresFromHfConfig } from "../../src/arch/config.js";
import { openSeed } from "../../src/arch/load.js";
import type { ArchFeatures, Family } from "../../src/arch/types.js";
import { type ErrorCode, isBamError } from "../../src/errors.js";
import { H, HEADS, L, randomTensors, synthetic, toV5, writeCheckpoint, writeSynthetic } from "./synthetic.js";

let root: string;
let count = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-arch-config-"));
});
after(() => rm(root, { recursive: true, force: true }));
const newDir = () => join(root, `seed-${++count}`);

const FILE = "/models/seed/config.json";

/** Features of a family's synthetic v4 config with `changes` applied (undefined deletes a key). */
function features(family: Family, changes: Record<string, unknown> = {}, style: "v4" | "v5" = "v4"): ArchFeatures {
  const v4 = { ...synthetic(family).v4, ...changes };
  for (const [key, value] of Object.entries(changes)) if (value === undefined) delete v4[key];
  return featuresFromHfConfig({ file: FILE, raw: style === "v4" ? v4 : toV5(v4) });
}

/** One-line BamError with this code whose message names every `mentions`. */
function assertBamError(error: unknown, code: ErrorCode, ...mentions: string[]): true {
  assert.ok(isBamError(error), `expected a BamError, got ${String(error)}`);
  assert.equal(error.code, code, error.message);
  assert.ok(!error.message.includes("\n"), `one line: ${error.message}`);
  for (const text of mentions) assert.ok(error.message.includes(text), `"${error.message}" should mention ${text}`);
  return true;
}

const rejects = (family: Family, changes: Record<string, unknown>, code: ErrorCode, ...mentions: string[]) =>
  assert.throws(
    () => features(family, changes),
    (e) => assertBamError(e, code, FILE, ...mentions),
  );

describe("config.json: defaults and both spellings", () => {
  test("num_key_value_heads and head_dim default to heads and hidden / heads", () => {
    const f = features("llama", { num_key_value_heads: undefined, head_dim: undefined });
    assert.equal(f.numKvHeads, HEADS);
    assert.equal(f.headDim, H / HEADS);
    assert.equal(features("llama", { num_key_value_heads: null }).numKvHeads, HEADS);
  });

  test("family defaults when keys are absent", () => {
    const llama = features("llama", {
      rms_norm_eps: undefined,
      hidden_act: undefined,
      tie_word_embeddings: undefined,
      rope_theta: undefined,
    });
    assert.equal(llama.normEps, 1e-6);
    assert.equal(llama.activation, "silu");
    assert.equal(llama.tiedEmbeddings, false);
    assert.equal(llama.rope?.theta, 10000);
    const neox = features("gpt_neox", {
      rotary_pct: undefined,
      rotary_emb_base: undefined,
      use_parallel_residual: undefined,
      hidden_act: undefined,
    });
    assert.deepEqual(neox.rope, { dim: 2, theta: 10000, style: "half", scaling: null });
    assert.equal(neox.parallelBlock, true);
    assert.equal(neox.activation, "gelu");
    assert.equal(features("phi", { partial_rotary_factor: undefined }).rope?.dim, 4);
    assert.equal(features("gpt2", { activation_function: undefined, n_inner: undefined }).intermediateSize, 4 * H);
    assert.equal(features("cohere", { use_qk_norm: undefined }).qkNorm, "none");
    assert.equal(features("mistral", { sliding_window: undefined }).slidingWindow, 4096);
    assert.equal(features("mistral", { sliding_window: null }).slidingWindow, null);
  });

  test("gpt_neox: use_parallel_residual=false is a sequential block (still two norms)", () => {
    const f = features("gpt_neox", { use_parallel_residual: false });
    assert.equal(f.parallelBlock, false);
    assert.equal(f.secondNorm, true);
    assert.equal(features("gpt_neox", { attention_bias: false }).qkvBias, false);
  });

  test("gemma: an explicit hidden_activation wins over hidden_act (v4), else hidden_act (v5)", () => {
    assert.equal(
      features("gemma", { hidden_act: "gelu", hidden_activation: "gelu_pytorch_tanh" }).activation,
      "gelu_tanh",
    );
    assert.equal(features("gemma", { hidden_act: "gelu", hidden_activation: null }).activation, "gelu");
    assert.equal(features("gemma", { hidden_act: "gelu_pytorch_tanh" }).activation, "gelu_tanh");
  });

  test("activation names", () => {
    for (const [name, want] of [
      ["swish", "silu"],
      ["gelu_fast", "gelu_tanh"],
      ["gelu_new", "gelu_tanh"],
      ["relu", "relu"],
      ["gelu", "gelu"],
    ]) {
      assert.equal(features("llama", { hidden_act: name }).activation, want, name);
    }
    rejects("llama", { hidden_act: "quick_gelu" }, "FEATURE_UNSUPPORTED", "hidden_act", "quick_gelu");
  });

  test("gpt2: scale_attn_weights=false means an attention scale of 1", () => {
    assert.equal(features("gpt2", { scale_attn_weights: false }).attentionScale, 1);
  });

  test("rope scaling is kept as given, v4 rope_scaling and v5 rope_parameters alike", () => {
    const llama3 = {
      rope_type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    };
    const v4 = features("llama", { rope_scaling: llama3 });
    assert.deepEqual(v4.rope?.scaling, {
      type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    });
    assert.deepEqual(features("llama", { rope_scaling: llama3 }, "v5"), v4);
    assert.deepEqual(features("llama", { rope_scaling: { type: "linear", factor: 2 } }).rope?.scaling, {
      type: "linear",
      factor: 2,
    });
    assert.equal(features("llama", { rope_scaling: { rope_type: "default" } }).rope?.scaling, null);
    rejects(
      "llama",
      { rope_scaling: { type: "mrope", mrope_section: [1, 2] } },
      "FEATURE_UNSUPPORTED",
      "rope_scaling.type",
      "mrope",
    );
  });

  test("phi3: su/yarn are longrope; top-level original_max_position_embeddings moves in", () => {
    const su = { type: "su", short_factor: [1, 1], long_factor: [2, 2] };
    const f = features("phi3", { rope_scaling: su, original_max_position_embeddings: 16 });
    assert.deepEqual(f.rope?.scaling, {
      type: "longrope",
      short_factor: [1, 1],
      long_factor: [2, 2],
      original_max_position_embeddings: 16,
    });
    assert.deepEqual(features("phi3", { rope_scaling: su, original_max_position_embeddings: 16 }, "v5"), f);
  });

  test("qwen sliding window: all layers or none", () => {
    assert.equal(features("qwen2", { use_sliding_window: true, max_window_layers: 0 }).slidingWindow, 32);
    assert.equal(features("qwen2", { use_sliding_window: true, max_window_layers: L }).slidingWindow, null);
    assert.equal(features("qwen2", { use_sliding_window: false, max_window_layers: 0 }).slidingWindow, null);
    assert.equal(
      features("qwen2", { use_sliding_window: true, layer_types: ["sliding_attention", "sliding_attention"] })
        .slidingWindow,
      32,
    );
    rejects(
      "qwen2",
      { use_sliding_window: true, max_window_layers: 1 },
      "FEATURE_UNSUPPORTED",
      "max_window_layers",
      "1 of 2",
    );
    rejects(
      "qwen3",
      { use_sliding_window: true, layer_types: ["full_attention", "sliding_attention"] },
      "FEATURE_UNSUPPORTED",
      "layer_types",
    );
    rejects("qwen2", { use_sliding_window: true, layer_types: ["full_attention"] }, "CONFIG_INVALID", "layer_types");
  });
});

describe("config.json: errors name the file and the key", () => {
  test("absurd and mistyped sizes are CONFIG_INVALID", () => {
    rejects("llama", { num_hidden_layers: 1e12 }, "CONFIG_INVALID", "num_hidden_layers", "1000000000000");
    rejects("llama", { vocab_size: 2 ** 40 }, "CONFIG_INVALID", "vocab_size");
    rejects("llama", { hidden_size: "32" }, "CONFIG_INVALID", "hidden_size", '"32"');
    rejects("llama", { intermediate_size: -4 }, "CONFIG_INVALID", "intermediate_size");
    rejects("llama", { num_attention_heads: 2.5 }, "CONFIG_INVALID", "num_attention_heads");
    rejects("llama", { num_hidden_layers: undefined }, "CONFIG_INVALID", "num_hidden_layers", "missing");
    rejects("gpt2", { n_embd: 1e9 }, "CONFIG_INVALID", "n_embd");
    rejects("llama", { rms_norm_eps: 0 }, "CONFIG_INVALID", "rms_norm_eps");
    rejects("llama", { rope_theta: "big" }, "CONFIG_INVALID", "rope_theta");
    rejects("llama", { tie_word_embeddings: "yes" }, "CONFIG_INVALID", "tie_word_embeddings");
    rejects("mistral", { sliding_window: 0 }, "CONFIG_INVALID", "sliding_window");
  });

  test("heads must divide the hidden size, kv heads the heads", () => {
    rejects(
      "llama",
      { num_attention_heads: 5, num_key_value_heads: undefined },
      "CONFIG_INVALID",
      "num_attention_heads",
      "32",
    );
    rejects("llama", { num_key_value_heads: 3 }, "CONFIG_INVALID", "num_key_value_heads");
    rejects("gpt_neox", { num_attention_heads: 3 }, "CONFIG_INVALID", "num_attention_heads");
    // An explicit head_dim frees the heads from dividing the hidden size.
    assert.equal(features("qwen3", { num_attention_heads: 6, num_key_value_heads: 3 }).numHeads, 6);
  });

  test("unknown and missing model_type", () => {
    assert.throws(
      () => featuresFromHfConfig({ file: FILE, raw: { model_type: "mamba" } }),
      (e) => assertBamError(e, "FAMILY_UNSUPPORTED", FILE, "mamba", "llama", "gpt_neox", "phi3"),
    );
    assert.throws(
      () => featuresFromHfConfig({ file: FILE, raw: {} }),
      (e) => assertBamError(e, "CONFIG_INVALID", FILE, "model_type"),
    );
  });

  test("features we cannot represent are FEATURE_UNSUPPORTED", () => {
    rejects("phi", { qk_layernorm: true }, "FEATURE_UNSUPPORTED", "qk_layernorm");
    rejects(
      "gpt2",
      { scale_attn_by_inverse_layer_idx: true },
      "FEATURE_UNSUPPORTED",
      "scale_attn_by_inverse_layer_idx",
    );
    rejects("gpt2", { reorder_and_upcast_attn: true }, "FEATURE_UNSUPPORTED", "reorder_and_upcast_attn");
    rejects("gemma", { use_bidirectional_attention: true }, "FEATURE_UNSUPPORTED", "use_bidirectional_attention");
    rejects("llama", { partial_rotary_factor: 0.5 }, "FEATURE_UNSUPPORTED", "partial_rotary_factor");
    rejects("llama", { quantization_config: { quant_method: "gptq" } }, "FEATURE_UNSUPPORTED", "quantization_config");
    rejects("gpt_neox", { rotary_pct: 0.1 }, "FEATURE_UNSUPPORTED", "rotary_pct");
    assert.throws(
      () => featuresFromHfConfig({ file: FILE, raw: toV5({ ...synthetic("llama").v4, partial_rotary_factor: 0.5 }) }),
      (e) => assertBamError(e, "FEATURE_UNSUPPORTED", "rope_parameters.partial_rotary_factor"),
    );
    // Accepted values of the same keys load.
    assert.equal(features("phi", { qk_layernorm: false }).family, "phi");
    assert.equal(features("gemma", { use_bidirectional_attention: null }).family, "gemma");
  });
});

describe("openSeed: folder errors", () => {
  const openFails = async (dir: string, code: ErrorCode, ...mentions: string[]) =>
    assert.rejects(openSeed(dir), (e) => assertBamError(e, code, ...mentions));

  test("no config.json is NOT_A_CHECKPOINT", async () => {
    const dir = newDir();
    await mkdir(dir);
    await openFails(dir, "NOT_A_CHECKPOINT", join(dir, "config.json"));
    await openFails(join(dir, "nowhere"), "NOT_A_CHECKPOINT", "config.json");
  });

  test("bad JSON and non-object configs are CONFIG_INVALID", async () => {
    const dir = newDir();
    await mkdir(dir);
    await writeFile(join(dir, "config.json"), '{ "model_type": "llama",');
    await openFails(dir, "CONFIG_INVALID", join(dir, "config.json"), "JSON");
    await writeFile(join(dir, "config.json"), "[1, 2]");
    await openFails(dir, "CONFIG_INVALID", join(dir, "config.json"));
  });

  test("unknown family", async () => {
    const dir = newDir();
    await writeCheckpoint(dir, { model_type: "t5" }, new Map());
    await openFails(dir, "FAMILY_UNSUPPORTED", join(dir, "config.json"), "t5", "llama");
  });

  test("a config error is reported before the weights are looked at", async () => {
    const dir = newDir();
    await mkdir(dir);
    await writeFile(join(dir, "config.json"), JSON.stringify({ ...synthetic("llama").v4, num_hidden_layers: 1e12 }));
    await openFails(dir, "CONFIG_INVALID", "num_hidden_layers");
  });

  test("a pickle-only folder is PICKLE_REFUSED", async () => {
    const dir = newDir();
    await mkdir(dir);
    await writeFile(join(dir, "config.json"), JSON.stringify(synthetic("llama").v4));
    await writeFile(join(dir, "pytorch_model.bin"), "not really a pickle");
    await openFails(dir, "PICKLE_REFUSED", "pytorch_model.bin");
  });

  test("a missing tensor is TENSOR_MISSING naming the file and every absent tensor", async () => {
    const dir = newDir();
    const s = synthetic("gpt_neox");
    const tensors = randomTensors(s.tensors);
    tensors.delete("gpt_neox.layers.1.attention.query_key_value.bias");
    tensors.delete("embed_out.weight");
    await writeCheckpoint(dir, s.v4, tensors);
    await openFails(
      dir,
      "TENSOR_MISSING",
      join(dir, "model.safetensors"),
      '"gpt_neox.layers.1.attention.query_key_value.bias" [96]',
      '"embed_out.weight" [40, 32]',
      "2 tensor(s)",
    );
  });

  test("untied config without a head: TENSOR_MISSING", async () => {
    const dir = newDir();
    const s = synthetic("gemma");
    await writeCheckpoint(dir, { ...s.v4, tie_word_embeddings: false }, randomTensors(s.tensors));
    await openFails(dir, "TENSOR_MISSING", "lm_head.weight");
  });

  test("a wrong shape is TENSOR_SHAPE naming file, tensor, expected and found", async () => {
    const dir = newDir();
    const s = synthetic("phi3");
    const tensors = randomTensors({ ...s.tensors, "model.layers.0.self_attn.qkv_proj.weight": [3 * H, H] });
    await writeCheckpoint(dir, s.v4, tensors);
    await openFails(
      dir,
      "TENSOR_SHAPE",
      join(dir, "model.safetensors"),
      "model.layers.0.self_attn.qkv_proj.weight",
      "[96, 32]",
      "[64, 32]",
    );
  });

  test("Conv1D shapes are checked in their stored [in, out] layout", async () => {
    const dir = newDir();
    const s = synthetic("gpt2");
    const tensors = randomTensors({ ...s.tensors, "transformer.h.1.mlp.c_fc.weight": [4 * H, H] });
    await writeCheckpoint(dir, s.v4, tensors);
    await openFails(dir, "TENSOR_SHAPE", "transformer.h.1.mlp.c_fc.weight", "[128, 32]", "expected [32, 128]");
  });

  test("integer weights are DTYPE_UNSUPPORTED", async () => {
    const dir = newDir();
    const s = synthetic("llama");
    const tensors = randomTensors(s.tensors);
    await writeCheckpoint(
      dir,
      s.v4,
      new Map([...tensors].map(([n, t]) => [n, { shape: t.shape, bytes: t.bytes }])),
      "I32",
    );
    await openFails(dir, "DTYPE_UNSUPPORTED", "I32");
  });

  test("read() of an unknown canonical name", async () => {
    const dir = newDir();
    await writeSynthetic(dir, "llama");
    const seed = await openSeed(dir);
    try {
      await assert.rejects(seed.read("model.layers.9.attn.q_proj.weight"), (e) =>
        assertBamError(e, "TENSOR_NOT_FOUND", "model.layers.9"),
      );
    } finally {
      await seed.close();
    }
  });
});
