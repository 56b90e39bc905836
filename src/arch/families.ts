/**
 * One declarative adapter per supported family: where config.json keeps each
 * setting (v4 and v5 spellings), the family's defaults when a key is absent,
 * the fixed traits of its architecture, and where its checkpoint keeps each
 * canonical tensor. Nothing here runs: config.ts and layout.ts are the one
 * engine that reads these entries. Adding a family is adding an entry.
 *
 * Defaults are transformers' (configuration_<family>.py, v4 and v5); tensor
 * names are those modeling_<family>.py saves.
 */
import type { Family, NormKind, RopeStyle } from "./types.js";

/**
 * A setting read from config.json: the first key holding a non-null value
 * wins, else `default`. For a nullable setting an explicit null means "none".
 */
export interface Keyed<T> {
  keys: readonly string[];
  default: T;
}

/** A trait fixed for the family, or switched by a boolean config key (with the family's default). */
export type Switch = boolean | Keyed<boolean>;

const key = <T>(name: string, fallback: T): Keyed<T> => ({ keys: [name], default: fallback });

/** Config keys of the model sizes; an empty list means the size is not configurable (derived). */
export interface SizeKeys {
  vocabSize: readonly string[];
  hiddenSize: readonly string[];
  intermediateSize: readonly string[];
  numLayers: readonly string[];
  numHeads: readonly string[];
  /** Empty: always numHeads. Unset: numHeads. */
  numKvHeads: readonly string[];
  /** Empty: always hidden / heads. Unset: hidden / heads. */
  headDim: readonly string[];
  maxPositions: readonly string[];
}

export interface RopeSpec {
  style: RopeStyle;
  /** v4 top-level keys of the base; v5 keeps it in rope_parameters.rope_theta. */
  theta: Keyed<number>;
  /** v4 top-level keys of the rotated fraction of head_dim; v5 keeps it in rope_parameters. null: full rotation only. */
  partial: Keyed<number> | null;
  /** Old names of scaling types that the family's config class renames on load. */
  typeAliases?: Readonly<Record<string, string>>;
}

export interface SlidingWindowSpec {
  /** The window length; an explicit null means full attention, an absent key the default. */
  window: Keyed<number | null>;
  /** Whether the window applies at all (qwen2/qwen3 `use_sliding_window`). */
  enabled: Switch;
  /**
   * qwen2/qwen3: only layers >= max_window_layers slide (or as `layer_types`
   * says in v5). We support all-or-nothing; a mix is FEATURE_UNSUPPORTED.
   */
  firstSlidingLayer?: Keyed<number>;
}

/**
 * Where a canonical tensor lives in the checkpoint: a module path ({l} = layer
 * index; ".weight"/".bias" are appended), optionally a Conv1D ([in, out],
 * transposed on read) and/or one part of a fused projection.
 */
export type SourceSpec = string | { module: string; conv1d?: boolean; fused?: FusedLayout };

/**
 * qkv: rows [q (heads*D) | k (kv*D) | v (kv*D)] (phi3 qkv_proj, gpt2 c_attn).
 * qkv_per_head: rows viewed as [heads, 3, D] (gpt_neox query_key_value).
 * gate_up: rows [gate (I) | up (I)] (phi3 gate_up_proj).
 */
export type FusedLayout = "qkv" | "qkv_per_head" | "gate_up";

export const LAYER_SLOTS = [
  "input_layernorm",
  "post_attention_layernorm",
  "attn.q_proj",
  "attn.k_proj",
  "attn.v_proj",
  "attn.o_proj",
  "attn.q_norm",
  "attn.k_norm",
  "mlp.gate_proj",
  "mlp.up_proj",
  "mlp.down_proj",
] as const;
export const GLOBAL_SLOTS = ["embed_tokens", "embed_positions", "norm", "lm_head"] as const;
export type LayerSlot = (typeof LAYER_SLOTS)[number];
export type GlobalSlot = (typeof GLOBAL_SLOTS)[number];
export type Slot = LayerSlot | GlobalSlot;

export interface TensorNames {
  /** The base model's prefix; checkpoints saved from the bare model (no LM head) lack it. */
  prefix: string;
  sources: Partial<Record<Slot, SourceSpec>>;
  /** Stored buffers that carry no weights (causal masks, rotary caches). */
  ignored: readonly string[];
}

export interface FamilySpec {
  family: Family;
  /** config.json `model_type` values this adapter reads. */
  modelTypes: readonly string[];
  sizes: SizeKeys;
  /** gpt2: an unset n_inner means this many times the hidden size. */
  intermediateFactorWhenUnset?: number;
  normEps: Keyed<number>;
  /** transformers activation name (ACT2FN key). */
  activation: Keyed<string>;
  norm: NormKind;
  normBias: boolean;
  normUnitOffset: boolean;
  secondNorm: boolean;
  parallelBlock: Switch;
  gatedMlp: boolean;
  qkvBias: Switch;
  attnOutBias: Switch;
  mlpBias: Switch;
  lmHeadBias: boolean;
  qkNorm: { kind: "shared" | "per_head"; when: Switch } | null;
  rope: RopeSpec | null;
  learnedPositions: boolean;
  embeddingScale: "sqrt_hidden" | null;
  logitScale: Keyed<number | null> | null;
  tiedEmbeddings: Switch;
  slidingWindow: SlidingWindowSpec | null;
  /** gpt2 scale_attn_weights=false: no 1/sqrt(D) in the attention softmax. */
  scaledAttention: Switch;
  /**
   * Config keys that switch on something we cannot represent, with the one
   * value we accept (absent or null is accepted too); others: FEATURE_UNSUPPORTED.
   */
  unsupportedUnless: Readonly<Record<string, unknown>>;
  tensors: TensorNames;
}

// ---------------------------------------------------------------- shared parts

const LLAMA_SIZES: SizeKeys = {
  vocabSize: ["vocab_size"],
  hiddenSize: ["hidden_size"],
  intermediateSize: ["intermediate_size"],
  numLayers: ["num_hidden_layers"],
  numHeads: ["num_attention_heads"],
  numKvHeads: ["num_key_value_heads"],
  headDim: ["head_dim"],
  maxPositions: ["max_position_embeddings"],
};

const LLAMA_TENSORS: TensorNames = {
  prefix: "model.",
  sources: {
    embed_tokens: "model.embed_tokens",
    input_layernorm: "model.layers.{l}.input_layernorm",
    post_attention_layernorm: "model.layers.{l}.post_attention_layernorm",
    "attn.q_proj": "model.layers.{l}.self_attn.q_proj",
    "attn.k_proj": "model.layers.{l}.self_attn.k_proj",
    "attn.v_proj": "model.layers.{l}.self_attn.v_proj",
    "attn.o_proj": "model.layers.{l}.self_attn.o_proj",
    "attn.q_norm": "model.layers.{l}.self_attn.q_norm",
    "attn.k_norm": "model.layers.{l}.self_attn.k_norm",
    "mlp.gate_proj": "model.layers.{l}.mlp.gate_proj",
    "mlp.up_proj": "model.layers.{l}.mlp.up_proj",
    "mlp.down_proj": "model.layers.{l}.mlp.down_proj",
    norm: "model.norm",
    lm_head: "lm_head",
  },
  ignored: ["model.layers.{l}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"],
};

const FULL_ROPE: RopeSpec = { style: "half", theta: key("rope_theta", 10000), partial: null };

/** llama and the families built from its modeling code. */
const LLAMA: FamilySpec = {
  family: "llama",
  modelTypes: ["llama"],
  sizes: LLAMA_SIZES,
  normEps: key("rms_norm_eps", 1e-6),
  activation: key("hidden_act", "silu"),
  norm: "rms",
  normBias: false,
  normUnitOffset: false,
  secondNorm: true,
  parallelBlock: false,
  gatedMlp: true,
  qkvBias: key("attention_bias", false),
  attnOutBias: key("attention_bias", false),
  mlpBias: key("mlp_bias", false),
  lmHeadBias: false,
  qkNorm: null,
  rope: FULL_ROPE,
  learnedPositions: false,
  embeddingScale: null,
  logitScale: null,
  tiedEmbeddings: key("tie_word_embeddings", false),
  slidingWindow: null,
  scaledAttention: true,
  unsupportedUnless: {},
  tensors: LLAMA_TENSORS,
};

/** qwen2/qwen3: the window applies only when enabled, and only from max_window_layers on. */
const QWEN_SLIDING_WINDOW: SlidingWindowSpec = {
  window: key("sliding_window", 4096),
  enabled: key("use_sliding_window", false),
  firstSlidingLayer: key("max_window_layers", 28),
};

// ---------------------------------------------------------------- the table

/** Each entry after llama lists only how the family differs from llama. */
export const FAMILY_SPECS: readonly FamilySpec[] = [
  LLAMA,
  {
    ...LLAMA,
    family: "mistral",
    modelTypes: ["mistral"],
    qkvBias: false,
    attnOutBias: false,
    mlpBias: false,
    slidingWindow: { window: key("sliding_window", 4096), enabled: true },
  },
  {
    ...LLAMA,
    family: "qwen2",
    modelTypes: ["qwen2"],
    qkvBias: true,
    attnOutBias: false,
    mlpBias: false,
    slidingWindow: QWEN_SLIDING_WINDOW,
  },
  {
    ...LLAMA,
    family: "qwen3",
    modelTypes: ["qwen3"],
    mlpBias: false,
    qkNorm: { kind: "shared", when: true },
    slidingWindow: QWEN_SLIDING_WINDOW,
  },
  {
    ...LLAMA,
    family: "gemma",
    modelTypes: ["gemma"],
    // v4 read hidden_activation and ignored hidden_act (Gemma 1.0 configs say "gelu" there,
    // but the model was trained with the tanh gelu); v5 dropped hidden_activation.
    activation: { keys: ["hidden_activation", "hidden_act"], default: "gelu_pytorch_tanh" },
    normUnitOffset: true,
    mlpBias: false,
    embeddingScale: "sqrt_hidden",
    tiedEmbeddings: key("tie_word_embeddings", true),
    unsupportedUnless: { use_bidirectional_attention: false },
  },
  {
    ...LLAMA,
    family: "gpt_neox",
    modelTypes: ["gpt_neox"],
    sizes: { ...LLAMA_SIZES, numKvHeads: [], headDim: [] },
    normEps: key("layer_norm_eps", 1e-5),
    activation: key("hidden_act", "gelu"),
    norm: "layer",
    normBias: true,
    // Two norms even when parallel: x + attn(ln1 x) + mlp(ln2 x).
    parallelBlock: key("use_parallel_residual", true),
    gatedMlp: false,
    qkvBias: key("attention_bias", true),
    attnOutBias: key("attention_bias", true),
    mlpBias: true,
    rope: {
      style: "half",
      theta: { keys: ["rotary_emb_base", "rope_theta"], default: 10000 },
      partial: { keys: ["rotary_pct", "partial_rotary_factor"], default: 0.25 },
    },
    tiedEmbeddings: key("tie_word_embeddings", false),
    tensors: {
      prefix: "gpt_neox.",
      sources: {
        embed_tokens: "gpt_neox.embed_in",
        input_layernorm: "gpt_neox.layers.{l}.input_layernorm",
        post_attention_layernorm: "gpt_neox.layers.{l}.post_attention_layernorm",
        "attn.q_proj": { module: "gpt_neox.layers.{l}.attention.query_key_value", fused: "qkv_per_head" },
        "attn.k_proj": { module: "gpt_neox.layers.{l}.attention.query_key_value", fused: "qkv_per_head" },
        "attn.v_proj": { module: "gpt_neox.layers.{l}.attention.query_key_value", fused: "qkv_per_head" },
        "attn.o_proj": "gpt_neox.layers.{l}.attention.dense",
        "mlp.up_proj": "gpt_neox.layers.{l}.mlp.dense_h_to_4h",
        "mlp.down_proj": "gpt_neox.layers.{l}.mlp.dense_4h_to_h",
        norm: "gpt_neox.final_layer_norm",
        lm_head: "embed_out",
      },
      ignored: [
        "gpt_neox.layers.{l}.attention.bias",
        "gpt_neox.layers.{l}.attention.masked_bias",
        "gpt_neox.layers.{l}.attention.rotary_emb.inv_freq",
        "gpt_neox.rotary_emb.inv_freq",
      ],
    },
  },
  {
    ...LLAMA,
    family: "phi",
    modelTypes: ["phi"],
    normEps: key("layer_norm_eps", 1e-5),
    activation: key("hidden_act", "gelu_new"),
    norm: "layer",
    normBias: true,
    // One norm feeds both branches: x + attn(ln x) + mlp(ln x).
    secondNorm: false,
    parallelBlock: true,
    gatedMlp: false,
    qkvBias: true,
    attnOutBias: true,
    mlpBias: true,
    lmHeadBias: true,
    rope: { ...FULL_ROPE, partial: key("partial_rotary_factor", 0.5) },
    unsupportedUnless: { qk_layernorm: false },
    tensors: {
      prefix: "model.",
      sources: {
        embed_tokens: "model.embed_tokens",
        input_layernorm: "model.layers.{l}.input_layernorm",
        "attn.q_proj": "model.layers.{l}.self_attn.q_proj",
        "attn.k_proj": "model.layers.{l}.self_attn.k_proj",
        "attn.v_proj": "model.layers.{l}.self_attn.v_proj",
        "attn.o_proj": "model.layers.{l}.self_attn.dense",
        "mlp.up_proj": "model.layers.{l}.mlp.fc1",
        "mlp.down_proj": "model.layers.{l}.mlp.fc2",
        norm: "model.final_layernorm",
        lm_head: "lm_head",
      },
      ignored: LLAMA_TENSORS.ignored,
    },
  },
  {
    ...LLAMA,
    family: "cohere",
    modelTypes: ["cohere"],
    normEps: key("layer_norm_eps", 1e-5),
    norm: "layer",
    normBias: false,
    secondNorm: false,
    parallelBlock: true,
    mlpBias: false,
    qkNorm: { kind: "per_head", when: key("use_qk_norm", false) },
    rope: { ...FULL_ROPE, style: "interleaved" },
    logitScale: key("logit_scale", 0.0625),
    tiedEmbeddings: key("tie_word_embeddings", true),
  },
  {
    ...LLAMA,
    family: "gpt2",
    modelTypes: ["gpt2"],
    sizes: {
      vocabSize: ["vocab_size"],
      hiddenSize: ["n_embd", "hidden_size"],
      intermediateSize: ["n_inner"],
      numLayers: ["n_layer", "num_hidden_layers"],
      numHeads: ["n_head", "num_attention_heads"],
      numKvHeads: [],
      headDim: [],
      maxPositions: ["n_positions", "max_position_embeddings"],
    },
    intermediateFactorWhenUnset: 4,
    normEps: key("layer_norm_epsilon", 1e-5),
    activation: key("activation_function", "gelu_new"),
    norm: "layer",
    normBias: true,
    gatedMlp: false,
    qkvBias: true,
    attnOutBias: true,
    mlpBias: true,
    rope: null,
    learnedPositions: true,
    tiedEmbeddings: key("tie_word_embeddings", true),
    scaledAttention: key("scale_attn_weights", true),
    unsupportedUnless: {
      scale_attn_by_inverse_layer_idx: false,
      reorder_and_upcast_attn: false,
      add_cross_attention: false,
    },
    tensors: {
      prefix: "transformer.",
      sources: {
        embed_tokens: "transformer.wte",
        embed_positions: "transformer.wpe",
        input_layernorm: "transformer.h.{l}.ln_1",
        post_attention_layernorm: "transformer.h.{l}.ln_2",
        "attn.q_proj": { module: "transformer.h.{l}.attn.c_attn", conv1d: true, fused: "qkv" },
        "attn.k_proj": { module: "transformer.h.{l}.attn.c_attn", conv1d: true, fused: "qkv" },
        "attn.v_proj": { module: "transformer.h.{l}.attn.c_attn", conv1d: true, fused: "qkv" },
        "attn.o_proj": { module: "transformer.h.{l}.attn.c_proj", conv1d: true },
        "mlp.up_proj": { module: "transformer.h.{l}.mlp.c_fc", conv1d: true },
        "mlp.down_proj": { module: "transformer.h.{l}.mlp.c_proj", conv1d: true },
        norm: "transformer.ln_f",
        lm_head: "lm_head",
      },
      // The causal-mask buffers older transformers saved with every layer.
      ignored: ["transformer.h.{l}.attn.bias", "transformer.h.{l}.attn.masked_bias"],
    },
  },
  {
    ...LLAMA,
    family: "phi3",
    modelTypes: ["phi3"],
    normEps: key("rms_norm_eps", 1e-5),
    qkvBias: false,
    attnOutBias: false,
    mlpBias: false,
    rope: { ...FULL_ROPE, partial: key("partial_rotary_factor", 1), typeAliases: { su: "longrope", yarn: "longrope" } },
    slidingWindow: { window: key("sliding_window", null), enabled: true },
    tensors: {
      prefix: "model.",
      sources: {
        ...LLAMA_TENSORS.sources,
        "attn.q_proj": { module: "model.layers.{l}.self_attn.qkv_proj", fused: "qkv" },
        "attn.k_proj": { module: "model.layers.{l}.self_attn.qkv_proj", fused: "qkv" },
        "attn.v_proj": { module: "model.layers.{l}.self_attn.qkv_proj", fused: "qkv" },
        "mlp.gate_proj": { module: "model.layers.{l}.mlp.gate_up_proj", fused: "gate_up" },
        "mlp.up_proj": { module: "model.layers.{l}.mlp.gate_up_proj", fused: "gate_up" },
      },
      ignored: LLAMA_TENSORS.ignored,
    },
  },
];

export function familySpec(family: Family): FamilySpec {
  const spec = FAMILY_SPECS.find((s) => s.family === family);
  if (spec === undefined) throw new Error(`no adapter for family ${family}`);
  return spec;
}

/** The adapter reading `model_type`, or undefined. */
export function specForModelType(modelType: string): FamilySpec | undefined {
  return FAMILY_SPECS.find((s) => s.modelTypes.includes(modelType));
}
