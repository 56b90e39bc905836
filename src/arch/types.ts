/**
 * The canonical description of a model: every loader maps its family into
 * this, and the upcycler, the exporter, the ONNX builder and modeling_bam.py
 * all work from it and nothing else.
 *
 * config.json of a BAM folder stores these features under the snake_case keys
 * given in `FEATURE_CONFIG_KEYS` (src/arch/features.ts), which is also what
 * python/configuration_bam.py reads.
 */
import type { DType } from "../safetensors/dtype.js";

export const FAMILIES = [
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma",
  "gpt_neox",
  "phi",
  "cohere",
  "gpt2",
  "phi3",
] as const;
export type Family = (typeof FAMILIES)[number];

export type NormKind = "rms" | "layer";
/** gelu = exact erf gelu; gelu_tanh = tanh approximation (gelu_new, gelu_pytorch_tanh). */
export type Activation = "silu" | "gelu" | "gelu_tanh" | "relu";
/** half: rotate_half on [x1, x2] halves (llama, neox); interleaved: pairs (x0, x1), (x2, x3) (cohere, gpt-j). */
export type RopeStyle = "half" | "interleaved";

export interface RopeScaling {
  /** "linear" | "dynamic" | "yarn" | "llama3" | "longrope"; the remaining fields are kept as the seed wrote them. */
  type: string;
  [field: string]: unknown;
}

export interface Rope {
  /** Rotated dimensions per head (head_dim x partial factor, floored, even). */
  dim: number;
  /** Base of the rotary frequencies (rope_theta). */
  theta: number;
  /** Which dimensions rotate together. */
  style: RopeStyle;
  /** The seed's rope_scaling, or null. */
  scaling: RopeScaling | null;
}

export interface ArchFeatures {
  /** The seed's transformers model_type. */
  family: Family;
  /** Rows of the embedding. */
  vocabSize: number;
  /** Width of the residual stream. */
  hiddenSize: number;
  /** Width of the FFN. */
  intermediateSize: number;
  /** Transformer blocks. */
  numLayers: number;
  /** Query heads. */
  numHeads: number;
  /** Key/value heads (fewer than numHeads: grouped-query attention). */
  numKvHeads: number;
  /** Width of one head. */
  headDim: number;
  /** Longest sequence the model was configured for (max_position_embeddings). */
  maxPositions: number;

  /** RMSNorm or LayerNorm. */
  norm: NormKind;
  /** Epsilon of every norm. */
  normEps: number;
  /** LayerNorm carries a bias (gpt2, gpt_neox, phi); cohere's LayerNorm has none. */
  normBias: boolean;
  /** gemma: the stored weight w is applied as (1 + w). */
  normUnitOffset: boolean;
  /** The layer has a second norm (post_attention_layernorm) that feeds the FFN. */
  secondNorm: boolean;
  /** The seed's own block: x + attn(Na x) + mlp(Nf x) (gpt_neox parallel residual, phi, cohere). */
  parallelBlock: boolean;

  /** Activation of the FFN. */
  activation: Activation;
  /** down(act(gate x) * up x) when true; down(act(up x)) when false. */
  gatedMlp: boolean;
  /** Biases on q, k, v projections. */
  qkvBias: boolean;
  /** Bias on the attention output projection. */
  attnOutBias: boolean;
  /** Biases on every MLP projection. */
  mlpBias: boolean;
  /** Bias on the language-model head. */
  lmHeadBias: boolean;

  /**
   * Normalisation of queries and keys per head before rotary, with the
   * model's norm kind and eps. "shared": one weight [head_dim] for all heads
   * (qwen3); "per_head": weight [heads, head_dim] (cohere).
   */
  qkNorm: "none" | "shared" | "per_head";
  /** Rotary position embedding, or null for none. */
  rope: Rope | null;
  /** gpt2: learned absolute positions, model.embed_positions.weight [maxPositions, hidden]. */
  learnedPositions: boolean;
  /** Embeddings are multiplied by this (gemma: sqrt(hidden)); null for none. */
  embeddingScale: number | null;
  /** Logits are multiplied by this (cohere); null for none. */
  logitScale: number | null;
  /** The head shares the embedding's weight. */
  tiedEmbeddings: boolean;
  /** Sliding-window attention length (mistral, qwen2), or null for full attention. */
  slidingWindow: number | null;
  /** Softmax scale of attention; null means 1/sqrt(headDim). */
  attentionScale: number | null;
}

/**
 * How one canonical tensor is read from the seed's files: the bytes of
 * `sourceName` in `file`, optionally transposed (Conv1D weights), then the
 * listed row ranges gathered along the first axis (fused q/k/v or gate/up
 * splits). A 1-D tensor (bias) is gathered by element.
 */
export interface TensorSource {
  file: string;
  sourceName: string;
  dtype: DType;
  /** Shape of the stored source tensor. */
  sourceShape: number[];
  transpose: boolean;
  /** [start, count] row ranges gathered, in order, after the transpose; null = all rows. */
  rows: Array<[number, number]> | null;
}

export interface CanonicalTensor {
  /** Canonical name (docs/format.md naming for a dense model, see below). */
  name: string;
  /** Shape after transform. */
  shape: number[];
  dtype: DType;
  source: TensorSource;
}

/**
 * A loaded dense checkpoint. Canonical names:
 *   model.embed_tokens.weight, model.embed_positions.weight,
 *   model.layers.{l}.input_layernorm.{weight,bias},
 *   model.layers.{l}.post_attention_layernorm.{weight,bias},
 *   model.layers.{l}.attn.{q,k,v,o}_proj.{weight,bias}, model.layers.{l}.attn.{q,k}_norm.weight,
 *   model.layers.{l}.mlp.{gate,up,down}_proj.{weight,bias},
 *   model.norm.{weight,bias}, lm_head.{weight,bias} (absent when tied).
 */
export interface DenseModel {
  dir: string;
  /** Folder name, used to name the seed in messages and in upcycled_from. */
  name: string;
  features: ArchFeatures;
  /** Canonical name -> tensor, in canonical order. */
  tensors: Map<string, CanonicalTensor>;
  /** The parsed config.json as written. */
  rawConfig: Record<string, unknown>;
  /** sha256 (hex) of tokenizer.json, or null when the folder has none. */
  tokenizerHash: string | null;
}
