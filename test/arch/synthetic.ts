/**
 * Tiny fake checkpoints for every family, described independently of
 * src/arch: each family's config.json (v4 spelling; v5 derived from it the
 * way transformers 5 saves it) and the tensor names and shapes that
 * transformers' modeling_<family>.py saves.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { ArchFeatures, Family } from "../../src/arch/types.js";
import { type DType, fromFloat32, type TensorToWrite, writeSafetensors } from "../../src/safetensors/index.js";

/** Small sizes that still exercise GQA, partial rotary and head_dim != hidden/heads. */
export const V = 40,
  H = 32,
  I = 48,
  L = 2,
  HEADS = 4,
  D = 8,
  KV = 2,
  P = 32;
/** gemma and qwen3 set head_dim explicitly, unlike hidden / heads. */
export const WIDE_D = 16;

export interface SyntheticFamily {
  family: Family;
  /** config.json as transformers 4 writes it. */
  v4: Record<string, unknown>;
  /** HF tensor name -> shape. */
  tensors: Record<string, number[]>;
  /** Features the loader must derive (beyond the sizes). */
  expect: Partial<ArchFeatures>;
}

const layers = (
  fn: (prefix: (l: number) => string, l: number) => Record<string, number[]>,
  prefix: (l: number) => string,
) => Object.assign({}, ...Array.from({ length: L }, (_, l) => fn(prefix, l))) as Record<string, number[]>;

const llamaSizes = (kv = KV, headDim?: number) => ({
  vocab_size: V,
  hidden_size: H,
  intermediate_size: I,
  num_hidden_layers: L,
  num_attention_heads: HEADS,
  num_key_value_heads: kv,
  max_position_embeddings: P,
  ...(headDim === undefined ? {} : { head_dim: headDim }),
});

/** llama-style names: model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj. */
function llamaTensors(
  options: { d?: number; qkvBias?: boolean; qkNorm?: "shared" | "per_head"; tied?: boolean; secondNorm?: boolean } = {},
) {
  const d = options.d ?? D;
  const bias = (shape: number[]) => (options.qkvBias ? shape : null);
  return {
    "model.embed_tokens.weight": [V, H],
    ...layers(
      (p, l) => {
        const t: Record<string, number[] | null> = {
          [`${p(l)}.input_layernorm.weight`]: [H],
          [`${p(l)}.post_attention_layernorm.weight`]: options.secondNorm === false ? null : [H],
          [`${p(l)}.self_attn.q_proj.weight`]: [HEADS * d, H],
          [`${p(l)}.self_attn.q_proj.bias`]: bias([HEADS * d]),
          [`${p(l)}.self_attn.k_proj.weight`]: [KV * d, H],
          [`${p(l)}.self_attn.k_proj.bias`]: bias([KV * d]),
          [`${p(l)}.self_attn.v_proj.weight`]: [KV * d, H],
          [`${p(l)}.self_attn.v_proj.bias`]: bias([KV * d]),
          [`${p(l)}.self_attn.o_proj.weight`]: [H, HEADS * d],
          [`${p(l)}.self_attn.q_norm.weight`]:
            options.qkNorm === "shared" ? [d] : options.qkNorm === "per_head" ? [HEADS, d] : null,
          [`${p(l)}.self_attn.k_norm.weight`]:
            options.qkNorm === "shared" ? [d] : options.qkNorm === "per_head" ? [KV, d] : null,
          [`${p(l)}.mlp.gate_proj.weight`]: [I, H],
          [`${p(l)}.mlp.up_proj.weight`]: [I, H],
          [`${p(l)}.mlp.down_proj.weight`]: [H, I],
        };
        return Object.fromEntries(Object.entries(t).filter(([, s]) => s !== null)) as Record<string, number[]>;
      },
      (l) => `model.layers.${l}`,
    ),
    "model.norm.weight": [H],
    ...(options.tied ? {} : { "lm_head.weight": [V, H] }),
  };
}

export const SYNTHETIC: readonly SyntheticFamily[] = [
  {
    family: "llama",
    v4: {
      model_type: "llama",
      ...llamaSizes(),
      hidden_act: "silu",
      rms_norm_eps: 1e-5,
      rope_theta: 500000,
      rope_scaling: null,
      tie_word_embeddings: false,
      attention_bias: false,
      mlp_bias: false,
    },
    tensors: llamaTensors(),
    expect: {
      norm: "rms",
      normEps: 1e-5,
      activation: "silu",
      gatedMlp: true,
      secondNorm: true,
      parallelBlock: false,
      qkvBias: false,
      tiedEmbeddings: false,
      rope: { dim: D, theta: 500000, style: "half", scaling: null },
    },
  },
  {
    family: "mistral",
    // sliding_window is written; rms_norm_eps left to the default.
    v4: {
      model_type: "mistral",
      ...llamaSizes(),
      hidden_act: "silu",
      rope_theta: 10000,
      sliding_window: 16,
      tie_word_embeddings: false,
    },
    tensors: llamaTensors(),
    expect: { normEps: 1e-6, slidingWindow: 16, qkvBias: false },
  },
  {
    family: "qwen2",
    v4: {
      model_type: "qwen2",
      ...llamaSizes(),
      hidden_act: "silu",
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      use_sliding_window: false,
      sliding_window: 32,
      max_window_layers: 28,
      tie_word_embeddings: true,
    },
    tensors: llamaTensors({ qkvBias: true, tied: true }),
    expect: { qkvBias: true, attnOutBias: false, mlpBias: false, slidingWindow: null, tiedEmbeddings: true },
  },
  {
    family: "qwen3",
    v4: {
      model_type: "qwen3",
      ...llamaSizes(KV, WIDE_D),
      hidden_act: "silu",
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      attention_bias: false,
      tie_word_embeddings: true,
    },
    tensors: llamaTensors({ d: WIDE_D, qkNorm: "shared", tied: true }),
    expect: {
      headDim: WIDE_D,
      qkNorm: "shared",
      qkvBias: false,
      tiedEmbeddings: true,
      rope: { dim: WIDE_D, theta: 1000000, style: "half", scaling: null },
    },
  },
  {
    family: "gemma",
    // hidden_act and tie_word_embeddings left out: gelu_pytorch_tanh and tied by default.
    v4: { model_type: "gemma", ...llamaSizes(KV, WIDE_D), rms_norm_eps: 1e-6, rope_theta: 10000 },
    tensors: llamaTensors({ d: WIDE_D, tied: true }),
    expect: {
      activation: "gelu_tanh",
      normUnitOffset: true,
      embeddingScale: Math.sqrt(H),
      tiedEmbeddings: true,
      headDim: WIDE_D,
    },
  },
  {
    family: "gpt_neox",
    v4: {
      model_type: "gpt_neox",
      vocab_size: V,
      hidden_size: H,
      intermediate_size: I,
      num_hidden_layers: L,
      num_attention_heads: HEADS,
      max_position_embeddings: P,
      hidden_act: "gelu",
      layer_norm_eps: 1e-5,
      rotary_pct: 0.25,
      rotary_emb_base: 10000,
      use_parallel_residual: true,
      tie_word_embeddings: false,
    },
    tensors: {
      "gpt_neox.embed_in.weight": [V, H],
      ...layers(
        (p, l) => ({
          [`${p(l)}.input_layernorm.weight`]: [H],
          [`${p(l)}.input_layernorm.bias`]: [H],
          [`${p(l)}.post_attention_layernorm.weight`]: [H],
          [`${p(l)}.post_attention_layernorm.bias`]: [H],
          [`${p(l)}.attention.query_key_value.weight`]: [3 * H, H],
          [`${p(l)}.attention.query_key_value.bias`]: [3 * H],
          [`${p(l)}.attention.dense.weight`]: [H, H],
          [`${p(l)}.attention.dense.bias`]: [H],
          [`${p(l)}.mlp.dense_h_to_4h.weight`]: [I, H],
          [`${p(l)}.mlp.dense_h_to_4h.bias`]: [I],
          [`${p(l)}.mlp.dense_4h_to_h.weight`]: [H, I],
          [`${p(l)}.mlp.dense_4h_to_h.bias`]: [H],
          // Buffers old transformers saved: ignored, not "unused".
          [`${p(l)}.attention.rotary_emb.inv_freq`]: [1],
        }),
        (l) => `gpt_neox.layers.${l}`,
      ),
      "gpt_neox.final_layer_norm.weight": [H],
      "gpt_neox.final_layer_norm.bias": [H],
      "embed_out.weight": [V, H],
    },
    expect: {
      norm: "layer",
      normBias: true,
      secondNorm: true,
      parallelBlock: true,
      gatedMlp: false,
      activation: "gelu",
      qkvBias: true,
      attnOutBias: true,
      mlpBias: true,
      numKvHeads: HEADS,
      rope: { dim: 2, theta: 10000, style: "half", scaling: null },
    },
  },
  {
    family: "phi",
    v4: {
      model_type: "phi",
      ...llamaSizes(),
      hidden_act: "gelu_new",
      layer_norm_eps: 1e-5,
      partial_rotary_factor: 0.5,
      rope_theta: 10000,
      qk_layernorm: false,
      tie_word_embeddings: false,
    },
    tensors: {
      "model.embed_tokens.weight": [V, H],
      ...layers(
        (p, l) => ({
          [`${p(l)}.input_layernorm.weight`]: [H],
          [`${p(l)}.input_layernorm.bias`]: [H],
          [`${p(l)}.self_attn.q_proj.weight`]: [HEADS * D, H],
          [`${p(l)}.self_attn.q_proj.bias`]: [HEADS * D],
          [`${p(l)}.self_attn.k_proj.weight`]: [KV * D, H],
          [`${p(l)}.self_attn.k_proj.bias`]: [KV * D],
          [`${p(l)}.self_attn.v_proj.weight`]: [KV * D, H],
          [`${p(l)}.self_attn.v_proj.bias`]: [KV * D],
          [`${p(l)}.self_attn.dense.weight`]: [H, HEADS * D],
          [`${p(l)}.self_attn.dense.bias`]: [H],
          [`${p(l)}.mlp.fc1.weight`]: [I, H],
          [`${p(l)}.mlp.fc1.bias`]: [I],
          [`${p(l)}.mlp.fc2.weight`]: [H, I],
          [`${p(l)}.mlp.fc2.bias`]: [H],
        }),
        (l) => `model.layers.${l}`,
      ),
      "model.final_layernorm.weight": [H],
      "model.final_layernorm.bias": [H],
      "lm_head.weight": [V, H],
      "lm_head.bias": [V],
    },
    expect: {
      norm: "layer",
      normBias: true,
      secondNorm: false,
      parallelBlock: true,
      gatedMlp: false,
      activation: "gelu_tanh",
      qkvBias: true,
      attnOutBias: true,
      mlpBias: true,
      lmHeadBias: true,
      rope: { dim: D / 2, theta: 10000, style: "half", scaling: null },
    },
  },
  {
    family: "cohere",
    // logit_scale and tie_word_embeddings left out: 0.0625 and tied by default.
    v4: {
      model_type: "cohere",
      ...llamaSizes(),
      hidden_act: "silu",
      layer_norm_eps: 1e-5,
      rope_theta: 8000000,
      use_qk_norm: true,
    },
    tensors: llamaTensors({ qkNorm: "per_head", tied: true, secondNorm: false }),
    expect: {
      norm: "layer",
      normBias: false,
      secondNorm: false,
      parallelBlock: true,
      logitScale: 0.0625,
      tiedEmbeddings: true,
      qkNorm: "per_head",
      rope: { dim: D, theta: 8000000, style: "interleaved", scaling: null },
    },
  },
  {
    family: "gpt2",
    v4: {
      model_type: "gpt2",
      vocab_size: V,
      n_embd: H,
      n_layer: L,
      n_head: HEADS,
      n_positions: P,
      n_inner: null,
      activation_function: "gelu_new",
      layer_norm_epsilon: 1e-5,
      scale_attn_weights: true,
    },
    tensors: {
      "transformer.wte.weight": [V, H],
      "transformer.wpe.weight": [P, H],
      ...layers(
        (p, l) => ({
          [`${p(l)}.ln_1.weight`]: [H],
          [`${p(l)}.ln_1.bias`]: [H],
          [`${p(l)}.attn.c_attn.weight`]: [H, 3 * H],
          [`${p(l)}.attn.c_attn.bias`]: [3 * H],
          [`${p(l)}.attn.c_proj.weight`]: [H, H],
          [`${p(l)}.attn.c_proj.bias`]: [H],
          [`${p(l)}.ln_2.weight`]: [H],
          [`${p(l)}.ln_2.bias`]: [H],
          [`${p(l)}.mlp.c_fc.weight`]: [H, 4 * H],
          [`${p(l)}.mlp.c_fc.bias`]: [4 * H],
          [`${p(l)}.mlp.c_proj.weight`]: [4 * H, H],
          [`${p(l)}.mlp.c_proj.bias`]: [H],
          [`${p(l)}.attn.bias`]: [1, 1, P, P],
        }),
        (l) => `transformer.h.${l}`,
      ),
      "transformer.ln_f.weight": [H],
      "transformer.ln_f.bias": [H],
    },
    expect: {
      intermediateSize: 4 * H,
      learnedPositions: true,
      rope: null,
      tiedEmbeddings: true,
      activation: "gelu_tanh",
      gatedMlp: false,
      attentionScale: null,
      numKvHeads: HEADS,
    },
  },
  {
    family: "phi3",
    v4: {
      model_type: "phi3",
      ...llamaSizes(),
      hidden_act: "silu",
      rms_norm_eps: 1e-5,
      rope_theta: 10000,
      rope_scaling: null,
      sliding_window: 24,
      original_max_position_embeddings: P,
      tie_word_embeddings: false,
    },
    tensors: {
      "model.embed_tokens.weight": [V, H],
      ...layers(
        (p, l) => ({
          [`${p(l)}.input_layernorm.weight`]: [H],
          [`${p(l)}.post_attention_layernorm.weight`]: [H],
          [`${p(l)}.self_attn.qkv_proj.weight`]: [(HEADS + 2 * KV) * D, H],
          [`${p(l)}.self_attn.o_proj.weight`]: [H, HEADS * D],
          [`${p(l)}.mlp.gate_up_proj.weight`]: [2 * I, H],
          [`${p(l)}.mlp.down_proj.weight`]: [H, I],
        }),
        (l) => `model.layers.${l}`,
      ),
      "model.norm.weight": [H],
      "lm_head.weight": [V, H],
    },
    expect: { normEps: 1e-5, slidingWindow: 24, gatedMlp: true, qkvBias: false },
  },
];

export function synthetic(family: Family): SyntheticFamily {
  const found = SYNTHETIC.find((s) => s.family === family);
  if (found === undefined) throw new Error(`no synthetic ${family}`);
  return found;
}

/** The v4 config as transformers 5 saves it: rope settings gathered into rope_parameters. */
export function toV5(v4: Record<string, unknown>): Record<string, unknown> {
  const { rope_theta, rotary_emb_base, partial_rotary_factor, rotary_pct, rope_scaling, ...rest } = v4;
  if (v4.model_type === "gpt2") return rest;
  const scaling = (rope_scaling ?? {}) as Record<string, unknown>;
  const { type, rope_type, ...scalingFields } = scaling;
  const parameters: Record<string, unknown> = {
    rope_type: rope_type ?? type ?? "default",
    ...scalingFields,
    rope_theta: rope_theta ?? rotary_emb_base ?? 10000,
  };
  const partial = partial_rotary_factor ?? rotary_pct;
  if (partial !== undefined) parameters.partial_rotary_factor = partial;
  return { ...rest, rope_parameters: parameters };
}

/** Deterministic values in [-1, 1): mulberry32. */
export function randomValues(count: number, seed: number): Float32Array {
  let state = seed >>> 0;
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1;
  }
  return out;
}

export const product = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** Random tensors for the given names and shapes, encoded in `dtype`. */
export function randomTensors(
  shapes: Record<string, number[]>,
  dtype: DType = "F32",
  seed = 1,
): Map<string, { shape: number[]; bytes: Uint8Array }> {
  const out = new Map<string, { shape: number[]; bytes: Uint8Array }>();
  let n = seed;
  for (const [name, shape] of Object.entries(shapes)) {
    out.set(name, { shape, bytes: fromFloat32(randomValues(product(shape), n++), dtype as "F32" | "F16" | "BF16") });
  }
  return out;
}

/** Writes config.json and model.safetensors; returns the tensors written. */
export async function writeCheckpoint(
  dir: string,
  config: Record<string, unknown>,
  tensors: Map<string, { shape: number[]; bytes: Uint8Array }>,
  dtype: DType = "F32",
): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, "config.json"), JSON.stringify(config, null, 2));
  const toWrite: TensorToWrite[] = [...tensors].map(([name, t]) => ({
    name,
    dtype,
    shape: t.shape,
    data: () => t.bytes,
  }));
  await writeSafetensors(join(dir, "model.safetensors"), toWrite);
}

/** A family's synthetic checkpoint in `dir` (v4 or v5 config); returns the HF tensors. */
export async function writeSynthetic(dir: string, family: Family, style: "v4" | "v5" = "v4", dtype: DType = "F32") {
  const s = synthetic(family);
  const tensors = randomTensors(s.tensors, dtype);
  await writeCheckpoint(dir, style === "v4" ? s.v4 : toV5(s.v4), tensors, dtype);
  return tensors;
}

/** Row-major [rows, cols] float matrix helpers for building fused tensors by hand. */
export function f32(bytes: Uint8Array): Float32Array {
  return new Float32Array(bytes.slice().buffer);
}
