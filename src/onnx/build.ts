/**
 * The ONNX graph of any model we read (a dense seed or a BAM folder, through
 * its BAM view), driven only by its architecture features and MoE settings:
 * one builder, no per-family code. Numerics follow python/modeling_bam.py.
 *
 * Layout. Hidden states stay 2-D [N, H], N = batch x tokens, so every
 * projection is one Gemm on the stored [out, in] weights (transB). Per layer:
 *   attention: one Gemm for every expert's q, k and v (their rows stacked),
 *     heads [B, T, heads, D], rotary, grouped-query attention with the cache
 *     (onnxruntime's GroupQueryAttention; for generation's "slots" graph and
 *     for scoring, MatMuls over [B, kv_heads, group x T, ...]), the soft router's weights
 *     applied per head, one Gemm over every expert's o rows;
 *   FFN: dense, or top-k routing that is sparse in compute: per expert,
 *     NonZero finds its tokens, Gather takes them, its MLP runs on them
 *     alone, and ScatterND adds them back weighted by its gate (the router
 *     probability, renormalised over the top k where norm_topk_prob: see
 *     docs/method.md, "FFN gating"), so the work grows with k, not with the
 *     number of experts.
 *
 * Two weight reorderings keep the graph simple and change no result:
 *   - interleaved rotary (cohere, gpt-j) becomes rotate-half by permuting the
 *     rotated dims of every q and k head (rows of q_proj/k_proj and the qk-norm
 *     weights); q.k is unchanged, and the cache holds the permuted keys;
 *   - shared-kv orders query heads kv-major ((kv, expert, group) instead of
 *     (expert, kv, group)), as modeling_bam.py does, so every kv head's
 *     queries are contiguous; o_proj's columns follow the same order.
 *
 * KV cache: `past_key_values.{l}.key|value` in, `present.{l}.key|value` out,
 * [batch, cacheHeads, sequence, head_dim] with cacheHeads = E x kv_heads for
 * moa and kv_heads otherwise (shared-kv: one cache for every expert); or
 * generation's slots; or none, for scoring (BuildOptions.cache).
 */
import type { GlobalSlot } from "../arch/families.js";
import type { OpenedModel } from "../arch/model.js";
import { expertModule, moduleName, type RouterSlot, tensorName } from "../arch/names.js";
import type { ArchFeatures } from "../arch/types.js";
import { BamError } from "../errors.js";
import { concat } from "../safetensors/index.js";
import { float, Graph } from "./graph.js";
import { DataType } from "./proto.js";
import { ropeFrequencies } from "./rope.js";
import { gatherColumns, gatherRows, WeightSource } from "./weights.js";

export const OPSET = 18;
/**
 * A scoring graph's causal attention runs in this many query chunks, chunk i
 * attending to the keys of chunks 0..i only: scores of every query against
 * every key, then masked, would be twice the work causality needs; four
 * chunks do 5/8 of it.
 */
export const SCORE_CHUNKS = 4;
/** Fills masked attention scores: finite, so a fully masked row (left padding) stays finite and uniform. */
const MASKED = -3.4028234663852886e38;
/** The weight of a global tensor (embeddings, head), by docs/format.md's names. */
const globalWeight = (slot: GlobalSlot) => tensorName({ layer: null, slot, expert: null, part: "weight" });

export interface BuildOptions {
  /** Also output each layer's attention input `attn_input.{l}` and FFN input `ffn_input.{l}` ([B, T, H]), for router init. */
  probes?: boolean;
  /**
   * The cache's inputs and outputs. "append" (default; transformers.js's
   * convention): `past_key_values.{l}.key|value` in, the same with this call's
   * tokens appended out as `present.{l}.key|value`. "slots" (generation's own
   * loop, generate.ts): the caller's buffers `cache.{l}.key` [B, cacheHeads,
   * head_dim, slots] (keys transposed) and `cache.{l}.value` [B, cacheHeads,
   * slots, head_dim], read in place, with `attention_mask` [B, slots + T]
   * marking the filled slots; out only this call's `new.{l}.key|value`
   * [B, cacheHeads, T, head_dim], which the caller writes into free slots. No
   * step copies the cache, and onnxruntime-node copies every output it returns.
   * "none" (scoring: bam eval): no cache in or out, one unpadded sequence
   * (batch 1) whose length is a multiple of SCORE_CHUNKS, attention in
   * SCORE_CHUNKS causal query chunks.
   */
  cache?: "append" | "slots" | "none";
}

/** Names of the inputs and outputs of a "slots" graph's cache (see BuildOptions.cache). */
export const slotNames = (l: number) => ({
  key: `cache.${l}.key`,
  value: `cache.${l}.value`,
  newKey: `new.${l}.key`,
  newValue: `new.${l}.value`,
});

/** What transformers.js must know of the cache: its heads per layer. */
export interface CacheLayout {
  layers: number;
  heads: number;
  headDim: number;
  /** Query heads of all experts, for config.json's num_attention_heads. */
  queryHeads: number;
}

/** Layout of one layer's attention heads across experts. */
interface HeadLayout {
  /** Query head j is head `head` of expert `expert` (both of the source tensors). */
  query: Array<{ expert: number; head: number }>;
  /** Cache head c is kv head `head` of expert `expert`. */
  kv: Array<{ expert: number; head: number }>;
}

export function cacheLayout(model: OpenedModel): CacheLayout {
  const f = model.features;
  const { numExperts, attentionExperts } = model.moe;
  const queryExperts = attentionExperts === "merged" ? 1 : numExperts;
  const kvExperts = attentionExperts === "moa" ? numExperts : 1;
  return {
    layers: f.numLayers,
    heads: kvExperts * f.numKvHeads,
    headDim: f.headDim,
    queryHeads: queryExperts * f.numHeads,
  };
}

export function buildGraph(model: OpenedModel, options: BuildOptions = {}): Graph {
  checkSupported(model);
  return new Builder(model, options).build();
}

function checkSupported(model: OpenedModel): void {
  const f = model.features;
  if (model.kind === "bam" && model.rawConfig.capacity_factor != null) {
    throw new BamError(
      "FEATURE_UNSUPPORTED",
      `${model.dir}: config.json sets capacity_factor; the CPU engine routes without dropping tokens (set it to null to evaluate)`,
    );
  }
  if (f.numHeads % f.numKvHeads !== 0) {
    throw new BamError(
      "FEATURE_UNSUPPORTED",
      `${model.dir}: ${f.numHeads} query heads are not a multiple of ${f.numKvHeads} key/value heads`,
    );
  }
  if (f.rope && (f.rope.dim % 2 !== 0 || f.rope.dim > f.headDim)) {
    throw new BamError(
      "FEATURE_UNSUPPORTED",
      `${model.dir}: rotary dim ${f.rope.dim} must be even and at most head_dim ${f.headDim}`,
    );
  }
}

/** One query chunk of a scoring graph: its queries' positions, the positions of the keys it sees, and its mask. */
interface ScoreChunk {
  queryRows: string;
  keyRows: string;
  mask: string;
}

class Builder {
  private readonly g = new Graph();
  private readonly f: ArchFeatures;
  private readonly src: WeightSource;
  private readonly layout: CacheLayout;
  private readonly heads: HeadLayout;
  /** Source dim of a head's rotated layout: identity, or interleaved pairs split into halves. */
  private readonly dimOrder: number[];
  // graph-wide values, set in build()
  private batch = "";
  private cos = "";
  private sin = "";
  private bias = "";
  private slotsMask = "";
  private slotsSplit = "";
  private pastLengths = "";
  private totalLength = "";
  private queryShape = "";
  private kvShape = "";
  private readonly declared = new Set<string>();
  private readonly slots: boolean;
  private readonly scoring: boolean;
  /** A scoring graph's query chunks (see chunkedAttention), shared by every layer. */
  private scoreChunks: ScoreChunk[] = [];
  /** A scoring graph's RotaryEmbedding inputs, shared by every layer: position ids [1, T], cos and sin [T, rotary/2]. */
  private scoreRotary: [string, string, string] = ["", "", ""];

  constructor(
    private readonly model: OpenedModel,
    private readonly options: BuildOptions,
  ) {
    this.f = model.features;
    this.src = new WeightSource(model);
    this.layout = cacheLayout(model);
    this.heads = headLayout(model);
    this.dimOrder = rotaryDimOrder(this.f);
    this.slots = options.cache === "slots";
    this.scoring = options.cache === "none";
  }

  build(): Graph {
    const { g, f } = this;
    const { heads, headDim, layers } = this.layout;
    const ids = g.input("input_ids", DataType.INT64, ["batch_size", "sequence_length"]);
    const attentionMask = g.input("attention_mask", DataType.INT64, ["batch_size", "total_sequence_length"]);
    const positions = g.input("position_ids", DataType.INT64, ["batch_size", "sequence_length"]);
    const past: Array<[string, string]> = [];
    for (let l = 0; l < layers; l++) {
      if (this.scoring) {
        past.push(["", ""]);
        continue;
      }
      if (this.slots) {
        const names = slotNames(l);
        past.push([
          g.input(names.key, DataType.FLOAT, ["batch_size", heads, headDim, "slots"]),
          g.input(names.value, DataType.FLOAT, ["batch_size", heads, "slots", headDim]),
        ]);
        continue;
      }
      const shape = ["batch_size", heads, "past_sequence_length", headDim];
      past.push([
        g.input(`past_key_values.${l}.key`, DataType.FLOAT, shape),
        g.input(`past_key_values.${l}.value`, DataType.FLOAT, shape),
      ]);
    }

    const idsShape = g.op("Shape", [ids]);
    this.batch = g.op("Gather", [idsShape, g.int64([0])]);
    const tokens = g.op("Gather", [idsShape, g.int64([1])]);
    this.queryShape = g.op("Concat", [this.batch, g.int64([-1, this.layout.queryHeads, headDim])], { axis: 0 });
    this.kvShape = g.op("Concat", [this.batch, g.int64([-1, heads, headDim])], { axis: 0 });
    const flatPositions = g.op("Reshape", [positions, g.int64([-1])]);
    if (this.slots) {
      this.slotsMask = this.slotMask(attentionMask, positions, tokens);
    } else if (!this.scoring) {
      this.bias = this.attentionBias(attentionMask, tokens);
      // GroupQueryAttention's lengths (int32): every row spans the whole mask, whose padding is in the bias
      const total = g.op("Gather", [g.op("Shape", [attentionMask]), g.int64([1], [])]);
      this.totalLength = g.op("Cast", [total], { to: DataType.INT32 });
      this.pastLengths = g.op("Cast", [g.op("Expand", [g.op("Sub", [total, g.int64([1], [])]), this.batch])], {
        to: DataType.INT32,
      });
    }
    if (f.rope) [this.cos, this.sin] = this.rotary(flatPositions);
    if (this.scoring) this.scoreChunks = this.chunksOf(tokens);
    if (this.scoring && f.rope) {
      // RotaryEmbedding's caches are rotary()'s rows, row t for the sequence's token t
      const rows = g.op("Range", [g.int64([0], []), g.op("Squeeze", [tokens, g.int64([0])]), g.int64([1], [])]);
      const [cos, sin] = [this.cos, this.sin].map((w) => g.op("Reshape", [w, g.int64([-1, f.rope!.dim / 2])]));
      this.scoreRotary = [g.op("Unsqueeze", [rows, g.int64([0])]), cos!, sin!];
    }

    let x = g.op("Gather", [this.weight(globalWeight("embed_tokens")), g.op("Reshape", [ids, g.int64([-1])])], {
      axis: 0,
    });
    if (f.embeddingScale !== null) x = g.op("Mul", [x, g.scalar(f.embeddingScale)]);
    if (f.learnedPositions)
      x = g.op("Add", [x, g.op("Gather", [this.weight(globalWeight("embed_positions")), flatPositions], { axis: 0 })]);

    for (let l = 0; l < layers; l++) {
      x = g.scope(`layer${l}`, () => this.block(l, x, past[l]!));
    }
    x = this.norm(x, moduleName({ layer: null, slot: "norm", expert: null }));
    const head = this.weight(globalWeight(f.tiedEmbeddings ? "embed_tokens" : "lm_head"));
    let logits = g.op("Gemm", [x, head, f.lmHeadBias ? this.weight("lm_head.bias") : ""], { transB: 1 });
    if (f.logitScale !== null) logits = g.op("Mul", [logits, g.scalar(f.logitScale)]);
    g.output(this.unflatten(logits, f.vocabSize), "logits", DataType.FLOAT, [
      "batch_size",
      "sequence_length",
      f.vocabSize,
    ]);
    return g;
  }

  // ------------------------------------------------------------------ graph-wide pieces

  /** [N, width] -> [B, T, width]. */
  private unflatten(value: string, width: number): string {
    const shape = this.g.op("Concat", [this.batch, this.g.int64([-1, width])], { axis: 0 });
    return this.g.op("Reshape", [value, shape]);
  }

  /** Bool: a query at queryPos may see the key at keyPos (causal, and within the sliding window). */
  private visible(keyPos: string, queryPos: string): string {
    const g = this.g;
    const causal = g.op("LessOrEqual", [keyPos, queryPos]);
    if (this.f.slidingWindow === null) return causal;
    return g.op("And", [causal, g.op("Less", [g.op("Sub", [queryPos, keyPos]), g.int64([this.f.slidingWindow], [])])]);
  }

  /**
   * Added to the attention scores, [B, 1, T, Tk]: 0 where query i (at cache
   * slot Tk - T + i) may see a slot (causal, within the sliding window, not
   * padding), MASKED elsewhere.
   */
  private attentionBias(attentionMask: string, tokens: string): string {
    const g = this.g;
    const total = g.op("Gather", [g.op("Shape", [attentionMask]), g.int64([1])]);
    const scalar = (v: string) => g.op("Squeeze", [v, g.int64([0])]);
    const queryPos = g.op("Unsqueeze", [
      g.op("Range", [scalar(g.op("Sub", [total, tokens])), scalar(total), g.int64([1], [])]),
      g.int64([1]),
    ]);
    const keyPos = g.op("Range", [g.int64([0], []), scalar(total), g.int64([1], [])]);
    const allowed = this.visible(keyPos, queryPos); // [T, Tk]
    const notPadding = g.op("Unsqueeze", [g.op("Cast", [attentionMask], { to: DataType.BOOL }), g.int64([1, 2])]); // [B, 1, 1, Tk]
    const mask = g.op("And", [allowed, notPadding]); // [B, 1, T, Tk]
    return g.op("Where", [mask, g.scalar(0), g.scalar(MASKED)]);
  }

  /**
   * A scoring graph's SCORE_CHUNKS query chunks of T/SCORE_CHUNKS tokens: chunk i's query positions, the
   * positions of the keys of chunks 0..i (one sequence from position 0), and its mask [T/SCORE_CHUNKS, keys]
   * added to its scores: 0 where the query may see the key (causal, within the sliding window), MASKED elsewhere.
   */
  private chunksOf(tokens: string): ScoreChunk[] {
    const g = this.g;
    const scalar = (v: string) => g.op("Squeeze", [v, g.int64([0])]);
    const size = g.op("Div", [tokens, g.int64([SCORE_CHUNKS])]); // [1]
    return Array.from({ length: SCORE_CHUNKS }, (_, i) => {
      const [start, end] = [i, i + 1].map((j) => g.op("Mul", [size, g.int64([j])])) as [string, string];
      const queryRows = g.op("Range", [scalar(start), scalar(end), g.int64([1], [])]);
      const keyRows = g.op("Range", [g.int64([0], []), scalar(end), g.int64([1], [])]);
      const mask = g.op("Where", [
        this.visible(keyRows, g.op("Unsqueeze", [queryRows, g.int64([1])])),
        g.scalar(0),
        g.scalar(MASKED),
      ]);
      return { queryRows, keyRows, mask };
    });
  }

  /**
   * Bool [B, 1, group x T, slots + T] of a "slots" graph: slot s holds position
   * s (generation starts at 0, unpadded) and is seen where attention_mask marks
   * it filled; this call's tokens are seen causally; both within the sliding
   * window. Tiled over the query heads that share a cache head, as the scores
   * are laid out. Also sets the split of the scores into slots and tokens.
   */
  private slotMask(attentionMask: string, positions: string, tokens: string): string {
    const g = this.g;
    const slots = g.op("Sub", [g.op("Gather", [g.op("Shape", [attentionMask]), g.int64([1])]), tokens]); // [1]
    this.slotsSplit = g.op("Concat", [slots, tokens], { axis: 0 });
    const slotPositions = g.op("Expand", [
      g.op("Range", [g.int64([0], []), g.op("Squeeze", [slots, g.int64([0])]), g.int64([1], [])]),
      g.op("Concat", [this.batch, slots], { axis: 0 }),
    ]);
    const keyPos = g.op("Unsqueeze", [g.op("Concat", [slotPositions, positions], { axis: 1 }), g.int64([1])]); // [B, 1, slots + T]
    const queryPos = g.op("Unsqueeze", [positions, g.int64([2])]); // [B, T, 1]
    const allowed = this.visible(keyPos, queryPos); // [B, T, slots + T]
    const filled = g.op("Unsqueeze", [g.op("Cast", [attentionMask], { to: DataType.BOOL }), g.int64([1])]); // [B, 1, slots + T]
    const mask = g.op("Unsqueeze", [g.op("And", [allowed, filled]), g.int64([1])]); // [B, 1, T, slots + T]
    const group = this.layout.queryHeads / this.layout.heads;
    return group === 1 ? mask : g.op("Tile", [mask, g.int64([1, 1, group, 1])]);
  }

  /** cos, sin [B, T, 1, rotary/2] (the scale of yarn/longrope included). */
  private rotary(flatPositions: string): [string, string] {
    const g = this.g;
    const rope = ropeFrequencies(this.f);
    const half = this.f.rope!.dim / 2;
    const positions = g.op("Cast", [flatPositions], { to: DataType.FLOAT });
    // seq_len of the call, for the scalings that depend on it: longest position + 1
    const seqLen = () => g.op("Add", [g.op("ReduceMax", [positions, g.int64([0])], { keepdims: 0 }), g.scalar(1)]);
    let inv: string;
    let scale = 1;
    if (rope.kind === "fixed") {
      inv = g.float32(rope.inv);
      scale = rope.scale;
    } else if (rope.kind === "longrope") {
      inv = g.op("Where", [
        g.op("Greater", [seqLen(), g.scalar(rope.original)]),
        g.float32(rope.long),
        g.float32(rope.short),
      ]);
      scale = rope.scale;
    } else {
      // base * ((factor * seq / maxPos) - (factor - 1)) ^ (dim / (dim - 2)), seq = max(seq_len, maxPos)
      const seq = g.op("Max", [seqLen(), g.scalar(rope.maxPositions)]);
      const growth = g.op("Sub", [
        g.op("Mul", [seq, g.scalar(rope.factor / rope.maxPositions)]),
        g.scalar(rope.factor - 1),
      ]);
      const dim = this.f.rope!.dim;
      const base = g.op("Mul", [g.scalar(rope.base), g.op("Pow", [growth, g.scalar(dim / (dim - 2))])]);
      inv = g.op("Reciprocal", [g.op("Pow", [base, g.float32(rope.exponents)])]);
    }
    const freqs = g.op("Mul", [g.op("Unsqueeze", [positions, g.int64([1])]), inv]); // [N, half]
    const shape = g.op("Concat", [this.batch, g.int64([-1, 1, half])], { axis: 0 });
    const wave = (op: "Cos" | "Sin") => {
      const w = g.op(op, [freqs]);
      return g.op("Reshape", [scale === 1 ? w : g.op("Mul", [w, g.scalar(scale)]), shape]);
    };
    return [wave("Cos"), wave("Sin")];
  }

  // ------------------------------------------------------------------ one block

  private block(l: number, x: string, [pastKey, pastValue]: [string, string]): string {
    const g = this.g;
    const inputNorm = moduleName({ layer: l, slot: "input_layernorm", expert: null });
    const h = this.norm(x, inputNorm);
    this.probe(`attn_input.${l}`, h);
    const attention = g.scope("attn", () => this.attention(l, h, pastKey, pastValue));
    const ffnNorm = (input: string) =>
      this.f.secondNorm
        ? this.norm(input, moduleName({ layer: l, slot: "post_attention_layernorm", expert: null }))
        : input === x
          ? h
          : this.norm(input, inputNorm);
    if (this.model.moe.block === "parallel") {
      const m = ffnNorm(x);
      this.probe(`ffn_input.${l}`, m);
      return g.op("Add", [g.op("Add", [x, attention]), g.scope("mlp", () => this.ffn(l, m))]);
    }
    const mid = g.op("Add", [x, attention]);
    const m = ffnNorm(mid);
    this.probe(`ffn_input.${l}`, m);
    return g.op("Add", [mid, g.scope("mlp", () => this.ffn(l, m))]);
  }

  private probe(name: string, value: string): void {
    if (this.options.probes)
      this.g.output(this.unflatten(value, this.f.hiddenSize), name, DataType.FLOAT, [
        "batch_size",
        "sequence_length",
        this.f.hiddenSize,
      ]);
  }

  /** The model's norm over the last axis of x, with `${prefix}.weight` (and .bias). */
  private norm(x: string, prefix: string): string {
    const weight = this.normWeight(`${prefix}.weight`);
    const bias = this.src.has(`${prefix}.bias`) ? this.weight(`${prefix}.bias`) : "";
    if (this.f.norm === "layer") {
      // an explicit zero bias when there is none (cohere): onnxruntime 1.30's SkipLayerNormFusion crashes without one
      const shift = bias === "" ? this.g.float32(new Float32Array(this.f.hiddenSize)) : bias;
      return this.g.op("LayerNormalization", [x, weight, shift], { axis: -1, epsilon: float(this.f.normEps) });
    }
    return this.scaleShift(this.rmsNormalize(x), weight, bias);
  }

  /** x * rsqrt(mean(x^2) + eps) over the last axis (float32, as modeling_bam.py). */
  private rmsNormalize(x: string): string {
    const g = this.g;
    const meanSquare = g.op("ReduceMean", [g.op("Mul", [x, x]), g.int64([-1])], { keepdims: 1 });
    return g.op("Mul", [x, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [meanSquare, g.scalar(this.f.normEps)])])])]);
  }

  private scaleShift(x: string, weight: string, bias: string): string {
    const scaled = this.g.op("Mul", [x, weight]);
    return bias === "" ? scaled : this.g.op("Add", [scaled, bias]);
  }

  /** A norm weight, as (1 + w) for gemma's unit offset. */
  private normWeight(name: string): string {
    if (!this.f.normUnitOffset) return this.weight(name);
    return this.derived(`${name}+1`, this.src.shape(name), async () =>
      (await this.src.f32(name)).map((w) => Math.fround(1 + w)),
    );
  }

  // ------------------------------------------------------------------ attention

  private attention(l: number, h: string, pastKey: string, pastValue: string): string {
    const g = this.g;
    const f = this.f;
    const D = f.headDim;
    const { heads: kvHeads, queryHeads } = this.layout;
    const at = expertModule(l, "attn", null);
    const mode = this.model.moe.attentionExperts;
    const qOwner = (e: number) => expertModule(l, "attn", mode === "merged" ? null : e);
    const kvOwner = (e: number) => expertModule(l, "attn", mode === "moa" ? e : null);

    const qExperts = mode === "merged" ? 1 : this.model.moe.numExperts;
    const kvExperts = mode === "moa" ? this.model.moe.numExperts : 1;
    const load = (owner: (e: number) => string, count: number, tensor: string) =>
      Promise.all(Array.from({ length: count }, (_, e) => this.src.f32(`${owner(e)}.${tensor}`)));
    // one Gemm for every expert's q, k, v: rows in graph head order, rotary dims in rotate-half order
    const H = f.hiddenSize;
    const qkvOut = (queryHeads + 2 * kvHeads) * D;
    const fused = async (part: "weight" | "bias") => {
      const rows = async (
        heads: HeadLayout["kv"],
        owner: (e: number) => string,
        count: number,
        proj: string,
        rotary: boolean,
      ) => {
        const mats = await load(owner, count, `${proj}.${part}`);
        return heads.flatMap(({ expert, head }) =>
          Array.from({ length: D }, (_, d) => ({
            from: mats[expert]!,
            row: head * D + (rotary ? this.dimOrder[d]! : d),
          })),
        );
      };
      return gatherRows(
        [
          ...(await rows(this.heads.query, qOwner, qExperts, "q_proj", true)),
          ...(await rows(this.heads.kv, kvOwner, kvExperts, "k_proj", true)),
          ...(await rows(this.heads.kv, kvOwner, kvExperts, "v_proj", false)),
        ],
        part === "weight" ? H : 1,
      );
    };
    const qkv = this.derived(`${at}.qkv.weight`, [qkvOut, H], () => fused("weight"));
    const qkvBias = f.qkvBias ? this.derived(`${at}.qkv.bias`, [qkvOut], () => fused("bias")) : "";
    const [q, k, v] = g.opN(
      "Split",
      [g.op("Gemm", [h, qkv, qkvBias], { transB: 1 }), g.int64([queryHeads * D, kvHeads * D, kvHeads * D])],
      3,
      { axis: 1 },
    );
    let q4 = g.op("Reshape", [q!, this.queryShape]); // [B, T, heads, D]
    let k4 = g.op("Reshape", [k!, this.kvShape]);
    if (f.qkNorm !== "none") {
      q4 = this.qkNorm(q4, `${at}.q_norm`, this.heads.query, (e) => `${qOwner(e)}.q_norm`);
      k4 = this.qkNorm(k4, `${at}.k_norm`, this.heads.kv, (e) => `${kvOwner(e)}.k_norm`);
    }
    if (f.rope) {
      q4 = this.scoring ? this.rotaryKernel(q4, queryHeads) : this.applyRotary(q4);
      k4 = this.scoring ? this.rotaryKernel(k4, kvHeads) : this.applyRotary(k4);
    }
    const scale = f.attentionScale ?? 1 / Math.sqrt(D);
    let y = this.slots
      ? this.slotAttention(l, q4, k4, g.op("Reshape", [v!, this.kvShape]), pastKey, pastValue, scale)
      : this.scoring
        ? this.chunkedAttention(q4, k4, v!, scale)
        : this.fusedAttention(l, q4, k4, v!, pastKey, pastValue, scale);

    // every expert's o_proj side by side, columns in graph head order: one Gemm
    const o = this.derived(`${at}.o.weight`, [H, queryHeads * D], async () => {
      const mats = await load(qOwner, qExperts, "o_proj.weight");
      return gatherColumns(
        this.heads.query.map(({ expert, head }) => ({
          from: mats[expert]!,
          width: f.numHeads * D,
          start: head * D,
          count: D,
        })),
        H,
      );
    });
    let outBias = "";
    if (qExperts > 1) {
      // soft routing: every expert's output weighted by softmax(W_ar h), per query head
      const gates = this.routerProbabilities(l, "attn.router", h); // [N, E]
      const headGates = g.op("Gather", [gates, g.int64(this.heads.query.map((q) => q.expert))], { axis: 1 }); // [N, heads]
      y = g.op("Mul", [y, g.op("Unsqueeze", [headGates, g.int64([2])])]);
      if (f.attnOutBias) {
        const stacked = this.derived(`${at}.o.bias_per_expert`, [qExperts, H], async () =>
          concat(await load(qOwner, qExperts, "o_proj.bias")),
        );
        outBias = g.op("MatMul", [gates, stacked]);
      }
    } else if (f.attnOutBias) {
      outBias = this.weight(`${at}.o_proj.bias`);
    }
    const out = g.op("Gemm", [g.op("Reshape", [y, g.int64([-1, queryHeads * D])]), o], { transB: 1 });
    return outBias === "" ? out : g.op("Add", [out, outBias]);
  }

  /**
   * Attention of an "append" graph by onnxruntime's GroupQueryAttention on
   * q, k, v [B, T, heads, D]: the queries of cache head c are heads
   * c x group .. (c + 1) x group - 1, as laid out; it writes the cache with
   * this call's keys appended. Returns [N, heads, D].
   */
  private fusedAttention(
    l: number,
    q: string,
    k: string,
    v: string,
    pastKey: string,
    pastValue: string,
    scale: number,
  ): string {
    const g = this.g;
    const { heads: kvHeads, queryHeads, headDim: D } = this.layout;
    const [context, key, value] = g.contribOpN(
      "GroupQueryAttention",
      [
        g.op("Reshape", [q, g.int64([0, 0, queryHeads * D])]), // [B, T, heads x D]
        g.op("Reshape", [k, g.int64([0, 0, kvHeads * D])]),
        this.unflatten(v, kvHeads * D),
        pastKey,
        pastValue,
        this.pastLengths,
        this.totalLength,
        "",
        "",
        "",
        this.bias, // no cos/sin cache (rotary is applied before), no position ids
      ],
      3,
      { num_heads: queryHeads, kv_num_heads: kvHeads, scale: float(scale) },
    );
    g.output(key!, `present.${l}.key`, DataType.FLOAT, ["batch_size", kvHeads, "total_sequence_length", D]);
    g.output(value!, `present.${l}.value`, DataType.FLOAT, ["batch_size", kvHeads, "total_sequence_length", D]);
    return g.op("Reshape", [context!, g.int64([-1, queryHeads, D])]);
  }

  /**
   * Causal attention of a scoring graph (batch 1, T a multiple of SCORE_CHUNKS) on
   * q, k [B, T, heads, D] and v [N, kvHeads x D], over SCORE_CHUNKS query chunks:
   * chunk i's scores [B, kvHeads, group, T/SCORE_CHUNKS, keys] against the keys of
   * chunks 0..i, plus its mask (chunksOf), softmax, times their values. MatMuls,
   * not GroupQueryAttention, whose CPU kernel gives each head one thread: bam eval
   * went from 0.97x to 1.03x PyTorch on 16 cores, 1.11x faster on 2 (bench/results/onnx-matmul/).
   * Returns [N, heads, D].
   */
  private chunkedAttention(q: string, k: string, v: string, scale: number): string {
    const g = this.g;
    const { heads: kvHeads, queryHeads, headDim: D } = this.layout;
    // [B, kvHeads, group, T, D] for the queries (those of one kv head together), [B, kvHeads, 1, T, D] for
    // keys and values: a chunk's queries and the keys before its end are contiguous rows of each head
    const headsFirst = (x: string) => g.op("Transpose", [x], { perm: [0, 2, 1, 3] });
    const queries = g.op("Reshape", [headsFirst(q), g.int64([0, kvHeads, queryHeads / kvHeads, -1, D])]);
    const keys = g.op("Unsqueeze", [headsFirst(k), g.int64([2])]);
    const values = g.op("Unsqueeze", [headsFirst(g.op("Reshape", [v, this.kvShape])), g.int64([2])]);
    // rows by Gather, not Slice: onnxruntime copies a Slice on one thread, a Gather on all of them
    // (1.02x a window on 16 cores, equal on 2: bench/results/onnx-matmul/)
    const rows = (x: string, positions: string) => g.op("Gather", [x, positions], { axis: 3 });
    const outputs: string[] = [];
    for (const [i, { queryRows, keyRows, mask }] of this.scoreChunks.entries()) {
      // the keys and values before the chunk's end (a copy: the last chunk takes them whole)
      const seen = (x: string) => (i === SCORE_CHUNKS - 1 ? x : rows(x, keyRows));
      // scale x q k^T by onnxruntime's FusedMatMul: the keys' transpose and the scale ride on the product
      const [scores] = g.contribOpN("FusedMatMul", [rows(queries, queryRows), seen(keys)], 1, {
        alpha: float(scale),
        transB: 1,
      });
      const probs = g.op("Softmax", [g.op("Add", [scores!, mask])], { axis: -1 });
      outputs.push(g.op("MatMul", [probs, seen(values)])); // [B, kvHeads, group, chunk, D]
    }
    const context = g.op("Reshape", [g.op("Concat", outputs, { axis: 3 }), g.int64([0, queryHeads, -1, D])]);
    return g.op("Reshape", [headsFirst(context), g.int64([-1, queryHeads, D])]);
  }

  /**
   * Attention of a "slots" graph on q, k, v [B, T, heads, D]: the scores over
   * the cache slots and over this call's tokens are two MatMuls that read the
   * caller's buffers where they lie (keys stored transposed, so no Transpose
   * copies them), softmax over both, and the two context MatMuls summed; the
   * queries of one cache head are contiguous, [B, kvHeads, group x T, D].
   * Outputs this call's k and v; returns [N, heads, D].
   */
  private slotAttention(
    l: number,
    q: string,
    k: string,
    v: string,
    cacheKey: string,
    cacheValue: string,
    scale: number,
  ): string {
    const g = this.g;
    const { heads: kvHeads, queryHeads, headDim: D } = this.layout;
    const transpose = (value: string) => g.op("Transpose", [value], { perm: [0, 2, 1, 3] });
    const grouped = g.op("Reshape", [transpose(q), g.int64([0, kvHeads, -1, D])]);
    const newKey = transpose(k); // [B, kvHeads, T, D]
    const newValue = transpose(v);
    const names = slotNames(l);
    g.output(newKey, names.newKey, DataType.FLOAT, ["batch_size", kvHeads, "sequence_length", D]);
    g.output(newValue, names.newValue, DataType.FLOAT, ["batch_size", kvHeads, "sequence_length", D]);
    const scores = g.op(
      "Concat",
      [
        g.op("MatMul", [grouped, cacheKey]),
        g.op("MatMul", [grouped, g.op("Transpose", [newKey], { perm: [0, 1, 3, 2] })]),
      ],
      { axis: -1 },
    );
    const probs = g.op(
      "Softmax",
      [g.op("Where", [this.slotsMask, g.op("Mul", [scores, g.scalar(scale)]), g.scalar(MASKED)])],
      { axis: -1 },
    );
    const [toSlots, toTokens] = g.opN("Split", [probs, this.slotsSplit], 2, { axis: -1 });
    const context = g.op("Add", [g.op("MatMul", [toSlots!, cacheValue]), g.op("MatMul", [toTokens!, newValue])]);
    return g.op("Reshape", [
      transpose(g.op("Reshape", [context, g.int64([0, queryHeads, -1, D])])),
      g.int64([-1, queryHeads, D]),
    ]);
  }

  /**
   * qk-norm over head_dim of x [B, T, heads, D]; each graph head gets its
   * expert's weight (and head's, per_head) as one weight [heads, D].
   */
  private qkNorm(x: string, name: string, heads: HeadLayout["query"], normOf: (expert: number) => string): string {
    const D = this.f.headDim;
    const perHead = this.f.qkNorm === "per_head";
    const stacked = (part: "weight" | "bias", offset: number) =>
      this.derived(`${name}.${part}_per_head`, [heads.length, D], async () => {
        const cache = new Map<number, Float32Array>();
        const out = new Float32Array(heads.length * D);
        for (const [j, { expert, head }] of heads.entries()) {
          if (!cache.has(expert)) cache.set(expert, await this.src.f32(`${normOf(expert)}.${part}`));
          const w = cache.get(expert)!;
          for (let d = 0; d < D; d++)
            out[j * D + d] = Math.fround(offset + w[(perHead ? head * D : 0) + this.dimOrder[d]!]!);
        }
        return out;
      });
    const weight = stacked("weight", this.f.normUnitOffset ? 1 : 0);
    const bias = this.src.has(`${normOf(0)}.bias`) ? stacked("bias", 0) : "";
    return this.scaleShift(this.f.norm === "layer" ? this.layerNormalize(x) : this.rmsNormalize(x), weight, bias);
  }

  /** (x - mean) * rsqrt(var + eps) over the last axis, by primitives (the weight is per head, not per axis). */
  private layerNormalize(x: string): string {
    const g = this.g;
    return this.rmsNormalize(g.op("Sub", [x, g.op("ReduceMean", [x, g.int64([-1])], { keepdims: 1 })]));
  }

  /** Rotate-half rotary on the first rotary dims of x [B, T, heads, D]. */
  private applyRotary(x: string): string {
    const g = this.g;
    const D = this.f.headDim;
    const half = this.f.rope!.dim / 2;
    const pass = D - 2 * half;
    const parts = g.opN("Split", [x, g.int64(pass > 0 ? [half, half, pass] : [half, half])], pass > 0 ? 3 : 2, {
      axis: -1,
    });
    const [x1, x2] = [parts[0]!, parts[1]!];
    const first = g.op("Sub", [g.op("Mul", [x1, this.cos]), g.op("Mul", [x2, this.sin])]);
    const second = g.op("Add", [g.op("Mul", [x2, this.cos]), g.op("Mul", [x1, this.sin])]);
    return g.op("Concat", pass > 0 ? [first, second, parts[2]!] : [first, second], { axis: -1 });
  }

  /**
   * Rotary of a scoring graph on x [B, T, heads, D] by onnxruntime's RotaryEmbedding: one kernel
   * instead of applyRotary's split, products and concat.
   */
  private rotaryKernel(x: string, heads: number): string {
    const g = this.g;
    const [rotated] = g.contribOpN(
      "RotaryEmbedding",
      [g.op("Reshape", [x, g.int64([0, 0, -1])]), ...this.scoreRotary],
      1,
      {
        interleaved: 0,
        num_heads: heads,
        rotary_embedding_dim: this.f.rope!.dim,
      },
    );
    return g.op("Reshape", [rotated!, g.op("Shape", [x])]);
  }

  // ------------------------------------------------------------------ FFN

  private ffn(l: number, x: string): string {
    const g = this.g;
    const E = this.model.moe.numExperts;
    if (E === 1) return this.expert(expertModule(l, "mlp", 0), x);
    const k = this.model.moe.expertsPerToken;
    const probs = this.routerProbabilities(l, "mlp.router", x); // [N, E]
    const [top, chosen] = g.opN("TopK", [probs, g.int64([k])], 2, { axis: -1, largest: 1, sorted: 1 });
    // [N, k]: renormalised to sum 1 (Mixtral), or each chosen expert's probability over all E (BAM, Switch)
    const weights = this.model.moe.normTopkProb
      ? g.op("Div", [top!, g.op("ReduceSum", [top!, g.int64([1])], { keepdims: 1 })])
      : top!;
    let y = g.op("Expand", [g.scalar(0), g.op("Shape", [x])]);
    for (let e = 0; e < E; e++) {
      y = g.scope(`expert${e}`, () => {
        const hit = g.op("Cast", [g.op("Equal", [chosen!, g.int64([e], [])])], { to: DataType.FLOAT }); // [N, k]
        const weight = g.op("ReduceSum", [g.op("Mul", [hit, weights]), g.int64([1])], { keepdims: 0 }); // [N]
        const picked = g.op("Greater", [g.op("ReduceSum", [hit, g.int64([1])], { keepdims: 0 }), g.scalar(0.5)]);
        const rows = g.op("NonZero", [picked]); // [1, M]: this expert's tokens
        const tokens = g.op("Reshape", [rows, g.int64([-1])]);
        const out = this.expert(expertModule(l, "mlp", e), g.op("Gather", [x, tokens], { axis: 0 }));
        const weighted = g.op("Mul", [
          out,
          g.op("Unsqueeze", [g.op("Gather", [weight, tokens], { axis: 0 }), g.int64([1])]),
        ]);
        return g.op("ScatterND", [y, g.op("Transpose", [rows], { perm: [1, 0] }), weighted], { reduction: "add" });
      });
    }
    return y;
  }

  /** One FFN: down(act(gate x) * up x), or down(act(up x)); gate and up in one Gemm. */
  private expert(prefix: string, x: string): string {
    const g = this.g;
    const f = this.f;
    const I = f.intermediateSize;
    const bias = (name: string) => (f.mlpBias ? this.weight(name) : "");
    let hidden: string;
    if (f.gatedMlp) {
      const rows = 2 * I;
      const w = this.derived(`${prefix}.gate_up.weight`, [rows, f.hiddenSize], async () =>
        concat([await this.src.f32(`${prefix}.gate_proj.weight`), await this.src.f32(`${prefix}.up_proj.weight`)]),
      );
      const b = !f.mlpBias
        ? ""
        : this.derived(`${prefix}.gate_up.bias`, [rows], async () =>
            concat([await this.src.f32(`${prefix}.gate_proj.bias`), await this.src.f32(`${prefix}.up_proj.bias`)]),
          );
      const [gate, up] = g.opN("Split", [g.op("Gemm", [x, w, b], { transB: 1 }), g.int64([I, I])], 2, { axis: 1 });
      hidden = g.op("Mul", [this.activation(gate!), up!]);
    } else {
      hidden = this.activation(
        g.op("Gemm", [x, this.weight(`${prefix}.up_proj.weight`), bias(`${prefix}.up_proj.bias`)], { transB: 1 }),
      );
    }
    return g.op("Gemm", [hidden, this.weight(`${prefix}.down_proj.weight`), bias(`${prefix}.down_proj.bias`)], {
      transB: 1,
    });
  }

  private activation(x: string): string {
    const g = this.g;
    switch (this.f.activation) {
      case "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])]);
      case "relu":
        return g.op("Relu", [x]);
      case "gelu": // exact: x/2 (1 + erf(x / sqrt 2))
        return g.op("Mul", [
          g.op("Mul", [x, g.scalar(0.5)]),
          g.op("Add", [g.op("Erf", [g.op("Mul", [x, g.scalar(Math.SQRT1_2)])]), g.scalar(1)]),
        ]);
      case "gelu_tanh": {
        // x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        const cube = g.op("Mul", [g.op("Mul", [x, x]), x]);
        const inner = g.op("Mul", [
          g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715)])]),
          g.scalar(Math.sqrt(2 / Math.PI)),
        ]);
        return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5)]), g.op("Add", [g.op("Tanh", [inner]), g.scalar(1)])]);
      }
    }
  }

  /** A model tensor used as is (float32). */
  /** softmax(W_router x) of a layer's attention or FFN router: [N, E]. */
  private routerProbabilities(layer: number, slot: RouterSlot, x: string): string {
    const router = this.weight(tensorName({ layer, slot, expert: null, part: "weight" }));
    return this.g.op("Softmax", [this.g.op("Gemm", [x, router], { transB: 1 })], { axis: -1 });
  }

  private weight(name: string): string {
    return this.derived(name, this.src.shape(name), () => this.src.f32(name));
  }

  /** A weight computed from model tensors, declared once however often it is used. */
  private derived(name: string, dims: number[], produce: () => Promise<Float32Array>): string {
    if (!this.declared.has(name)) this.declared.add(this.g.weight(name, dims, produce));
    return name;
  }
}

/** Query and cache heads in graph order (see the file comment). */
function headLayout(model: OpenedModel): HeadLayout {
  const { numHeads, numKvHeads } = model.features;
  const E = model.moe.numExperts;
  const group = numHeads / numKvHeads;
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  switch (model.moe.attentionExperts) {
    case "merged":
      return {
        query: range(numHeads).map((head) => ({ expert: 0, head })),
        kv: range(numKvHeads).map((head) => ({ expert: 0, head })),
      };
    case "moa":
      return {
        query: range(E).flatMap((expert) => range(numHeads).map((head) => ({ expert, head }))),
        kv: range(E).flatMap((expert) => range(numKvHeads).map((head) => ({ expert, head }))),
      };
    case "shared-kv":
      return {
        query: range(numKvHeads).flatMap((kv) =>
          range(E).flatMap((expert) => range(group).map((i) => ({ expert, head: kv * group + i }))),
        ),
        kv: range(numKvHeads).map((head) => ({ expert: 0, head })),
      };
  }
}

/** Graph dim d of a q/k head holds source dim order[d]: interleaved rotary pairs regrouped as halves. */
function rotaryDimOrder(f: ArchFeatures): number[] {
  const order = Array.from({ length: f.headDim }, (_, d) => d);
  if (f.rope?.style !== "interleaved") return order;
  const half = f.rope.dim / 2;
  for (let i = 0; i < half; i++) {
    order[i] = 2 * i;
    order[half + i] = 2 * i + 1;
  }
  return order;
}
