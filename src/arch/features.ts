/**
 * ArchFeatures <-> the snake_case keys of a BAM config.json. This table is the
 * contract with python/configuration_bam.py: change both together.
 */
import { BamError } from "../errors.js";
import { CONFIG_LIMITS, isScalingValue, show } from "./config.js";
import {
  FAMILIES,
  type Activation,
  type ArchFeatures,
  type Family,
  type NormKind,
  type Rope,
  type RopeStyle,
} from "./types.js";

/** The architecture part of a BAM config.json. */
export interface FeatureConfig {
  seed_model_type: Family;
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  max_position_embeddings: number;
  norm_type: NormKind;
  norm_eps: number;
  norm_bias: boolean;
  norm_unit_offset: boolean;
  second_norm: boolean;
  seed_parallel_block: boolean;
  hidden_act: Activation;
  gated_mlp: boolean;
  qkv_bias: boolean;
  attn_out_bias: boolean;
  mlp_bias: boolean;
  lm_head_bias: boolean;
  qk_norm: "none" | "shared" | "per_head";
  /** 0 when the model has no rotary embedding. */
  rotary_dim: number;
  rope_theta: number;
  rope_style: RopeStyle;
  rope_scaling: Rope["scaling"];
  learned_positions: boolean;
  embedding_scale: number | null;
  logit_scale: number | null;
  tie_word_embeddings: boolean;
  sliding_window: number | null;
  attention_scale: number | null;
}

/** The size keys, named as every transformers config names them. */
export function sizeConfig(f: ArchFeatures) {
  return {
    vocab_size: f.vocabSize,
    hidden_size: f.hiddenSize,
    intermediate_size: f.intermediateSize,
    num_hidden_layers: f.numLayers,
    num_attention_heads: f.numHeads,
    num_key_value_heads: f.numKvHeads,
    head_dim: f.headDim,
    max_position_embeddings: f.maxPositions,
  };
}

export function featuresToConfig(f: ArchFeatures): FeatureConfig {
  return {
    seed_model_type: f.family,
    ...sizeConfig(f),
    norm_type: f.norm,
    norm_eps: f.normEps,
    norm_bias: f.normBias,
    norm_unit_offset: f.normUnitOffset,
    second_norm: f.secondNorm,
    seed_parallel_block: f.parallelBlock,
    hidden_act: f.activation,
    gated_mlp: f.gatedMlp,
    qkv_bias: f.qkvBias,
    attn_out_bias: f.attnOutBias,
    mlp_bias: f.mlpBias,
    lm_head_bias: f.lmHeadBias,
    qk_norm: f.qkNorm,
    rotary_dim: f.rope?.dim ?? 0,
    rope_theta: f.rope?.theta ?? 10000,
    rope_style: f.rope?.style ?? "half",
    rope_scaling: f.rope?.scaling ?? null,
    learned_positions: f.learnedPositions,
    embedding_scale: f.embeddingScale,
    logit_scale: f.logitScale,
    tie_word_embeddings: f.tiedEmbeddings,
    sliding_window: f.slidingWindow,
    attention_scale: f.attentionScale,
  };
}

/** Reads the features back from a BAM config.json; `file` names it in errors. */
export function featuresFromConfig(config: Record<string, unknown>, file: string): ArchFeatures {
  const bad = (key: string, want: string): never => {
    throw new BamError("CONFIG_INVALID", `${file}: "${key}" must be ${want}, found ${show(config[key])}`);
  };
  const int = (key: string, min = 1, max = Number.MAX_SAFE_INTEGER): number => {
    const v = config[key];
    return typeof v === "number" && Number.isInteger(v) && v >= min && v <= max
      ? v
      : bad(key, `an integer from ${min} to ${max}`);
  };
  const num = (key: string): number => {
    const v = config[key];
    return typeof v === "number" && Number.isFinite(v) ? v : bad(key, "a number");
  };
  const numOrNull = (key: string): number | null => (config[key] == null ? null : num(key));
  const bool = (key: string): boolean => {
    const v = config[key];
    return typeof v === "boolean" ? v : bad(key, "true or false");
  };
  const oneOf = <T extends string>(key: string, options: readonly T[]): T => {
    const v = config[key];
    return options.includes(v as T) ? (v as T) : bad(key, `one of ${options.join(", ")}`);
  };
  const L = CONFIG_LIMITS;
  const rotaryDim = int("rotary_dim", 0, L.headDim);
  const scaling = config.rope_scaling;
  if (
    scaling != null &&
    (typeof scaling !== "object" ||
      typeof (scaling as { type?: unknown }).type !== "string" ||
      !Object.values(scaling).every(isScalingValue))
  ) {
    bad("rope_scaling", 'null or an object with a string "type" and numbers, strings, booleans or lists of numbers');
  }
  return {
    family: oneOf("seed_model_type", FAMILIES),
    vocabSize: int("vocab_size", 1, L.vocabSize),
    hiddenSize: int("hidden_size", 1, L.hiddenSize),
    intermediateSize: int("intermediate_size", 1, L.intermediateSize),
    numLayers: int("num_hidden_layers", 1, L.numLayers),
    numHeads: int("num_attention_heads", 1, L.numHeads),
    numKvHeads: int("num_key_value_heads", 1, L.numHeads),
    headDim: int("head_dim", 1, L.headDim),
    maxPositions: int("max_position_embeddings", 1, L.maxPositions),
    norm: oneOf("norm_type", ["rms", "layer"] as const),
    normEps: num("norm_eps"),
    normBias: bool("norm_bias"),
    normUnitOffset: bool("norm_unit_offset"),
    secondNorm: bool("second_norm"),
    parallelBlock: bool("seed_parallel_block"),
    activation: oneOf("hidden_act", ["silu", "gelu", "gelu_tanh", "relu"] as const),
    gatedMlp: bool("gated_mlp"),
    qkvBias: bool("qkv_bias"),
    attnOutBias: bool("attn_out_bias"),
    mlpBias: bool("mlp_bias"),
    lmHeadBias: bool("lm_head_bias"),
    qkNorm: oneOf("qk_norm", ["none", "shared", "per_head"] as const),
    rope:
      rotaryDim === 0
        ? null
        : {
            dim: rotaryDim,
            theta: num("rope_theta"),
            style: oneOf("rope_style", ["half", "interleaved"] as const),
            scaling: (scaling ?? null) as Rope["scaling"],
          },
    learnedPositions: bool("learned_positions"),
    embeddingScale: numOrNull("embedding_scale"),
    logitScale: numOrNull("logit_scale"),
    tiedEmbeddings: bool("tie_word_embeddings"),
    slidingWindow: config.sliding_window == null ? null : int("sliding_window"),
    attentionScale: numOrNull("attention_scale"),
  };
}
