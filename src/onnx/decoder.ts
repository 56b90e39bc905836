/**
 * Generation's own loop over an export's generate.onnx (BuildOptions.cache
 * "slots"): the KV cache lives in buffers of ours that the graph reads in
 * place, keys stored transposed [heads, head_dim, slots] and values
 * [heads, slots, head_dim]; each step returns only its tokens' keys and
 * values, which are written into the next free slots. The buffers double when
 * full, so a step costs the model plus one read of the cache, and nothing is
 * copied or re-created per token in proportion to the context.
 * (transformers.js's loop fed the whole cache back each step as new tensors,
 * and onnxruntime-node copies every output it returns: per-token time grew
 * tenfold from 50 to 3000 tokens of context.)
 */
import type * as Ort from "onnxruntime-node";
import { BamError } from "../errors.js";
import { slotNames } from "./build.js";
import { RandomStream } from "../random.js";
import { engineError, openEngineSession } from "./session.js";

/** Slots a cache starts with; it doubles from there. */
const FIRST_SLOTS = 64;

interface LayerCache {
  /** [heads, headDim, slots] */
  key: Float32Array;
  /** [heads, slots, headDim] */
  value: Float32Array;
}

export class Decoder {
  private caches: LayerCache[] = [];
  private slots = 0;
  /** Slots holding tokens: positions 0..filled-1. */
  private filled = 0;

  private constructor(
    private readonly ort: typeof Ort,
    private readonly session: Ort.InferenceSession,
    private readonly layers: number,
    private readonly heads: number,
    private readonly headDim: number,
    private readonly file: string,
  ) {}

  /** `profile`: onnxruntime's per-node timings go to `<profile>_<date>.json` on close (bench/onnx). */
  static async open(file: string, options: { threads?: number; profile?: string } = {}): Promise<Decoder> {
    const { ort, session } = await openEngineSession(file, { ...options, advice: "; export the model again" });
    const keys = session.inputMetadata.filter((meta) => /^cache\.\d+\.key$/.test(meta.name));
    const shape = keys[0]?.isTensor ? keys[0].shape : [];
    const [, heads, headDim] = shape;
    if (typeof heads !== "number" || typeof headDim !== "number") {
      await session.release();
      throw new BamError(
        "IO_ERROR",
        `${file}: not a generation graph (no cache.0.key input with fixed heads and head_dim); export the model again`,
      );
    }
    return new Decoder(ort, session, keys.length, heads, headDim, file);
  }

  /** Bytes of the cache's buffers (every slot, filled or not): what each step reads besides the weights. */
  get cacheBytes(): number {
    return this.layers * 2 * this.heads * this.headDim * this.slots * Float32Array.BYTES_PER_ELEMENT;
  }

  /** Tokens in the cache. */
  get length(): number {
    return this.filled;
  }

  /** Runs `ids` after the tokens so far; returns the logits of the last one. */
  async step(ids: number[]): Promise<Float32Array> {
    const ort = this.ort;
    const T = ids.length;
    if (this.filled + T > this.slots) this.grow(this.filled + T);
    const { slots, filled, heads, headDim } = this;
    const mask = new BigInt64Array(slots + T);
    mask.fill(1n, 0, filled).fill(1n, slots);
    const feeds: Record<string, Ort.Tensor> = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, T]),
      attention_mask: new ort.Tensor("int64", mask, [1, slots + T]),
      position_ids: new ort.Tensor(
        "int64",
        BigInt64Array.from({ length: T }, (_, i) => BigInt(filled + i)),
        [1, T],
      ),
    };
    const fetches = ["logits"];
    for (const [l, cache] of this.caches.entries()) {
      const names = slotNames(l);
      feeds[names.key] = new ort.Tensor("float32", cache.key, [1, heads, headDim, slots]);
      feeds[names.value] = new ort.Tensor("float32", cache.value, [1, heads, slots, headDim]);
      fetches.push(names.newKey, names.newValue);
    }
    let out: Ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds, fetches);
    } catch (error) {
      throw new BamError("IO_ERROR", `${this.file}: onnxruntime failed at position ${filled} (${engineError(error)})`, {
        cause: error,
      });
    }
    for (const [l, cache] of this.caches.entries()) {
      const names = slotNames(l);
      const newKey = out[names.newKey]!.data as Float32Array; // [1, heads, T, headDim]
      const newValue = out[names.newValue]!.data as Float32Array;
      for (let h = 0; h < heads; h++) {
        for (let t = 0; t < T; t++) {
          const from = (h * T + t) * headDim;
          for (let d = 0; d < headDim; d++) cache.key[(h * headDim + d) * slots + filled + t] = newKey[from + d]!;
        }
        cache.value.set(newValue.subarray(h * T * headDim, (h + 1) * T * headDim), (h * slots + filled) * headDim);
      }
    }
    this.filled += T;
    const logits = out.logits!.data as Float32Array;
    const vocab = logits.length / T;
    return logits.subarray((T - 1) * vocab);
  }

  /** Doubles the buffers until `needed` slots fit, keeping what they hold. */
  private grow(needed: number): void {
    let slots = Math.max(this.slots, FIRST_SLOTS);
    while (slots < needed) slots *= 2;
    const { heads, headDim } = this;
    const old = this.slots;
    this.caches = Array.from({ length: this.layers }, (_, l) => {
      const cache = {
        key: new Float32Array(heads * headDim * slots),
        value: new Float32Array(heads * slots * headDim),
      };
      const previous = this.caches[l];
      if (previous !== undefined) {
        for (let row = 0; row < heads * headDim; row++)
          cache.key.set(previous.key.subarray(row * old, row * old + this.filled), row * slots);
        for (let h = 0; h < heads; h++)
          cache.value.set(
            previous.value.subarray(h * old * headDim, (h * old + this.filled) * headDim),
            h * slots * headDim,
          );
      }
      return cache;
    });
    this.slots = slots;
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

/** The index of the largest logit (the first of equals, as argmax in transformers). */
export function argmax(logits: Float32Array): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
  return best;
}

/**
 * A token drawn from softmax(logits / temperature), limited as transformers
 * limits it: to the `topK` most probable tokens (0: all), then to the
 * smallest set of those whose probability among them reaches `topP`;
 * `random` returns uniform numbers in [0, 1).
 */
export function sample(
  logits: Float32Array,
  temperature: number,
  topK: number,
  topP: number,
  random: () => number,
): number {
  const max = logits[argmax(logits)]!;
  const weights = Float64Array.from(logits, (x) => Math.exp((x - max) / temperature));
  const order = Array.from(weights.keys())
    .sort((a, b) => weights[b]! - weights[a]!)
    .slice(0, topK > 0 ? topK : undefined);
  const total = order.reduce((sum, token) => sum + weights[token]!, 0);
  let kept = 0;
  let mass = 0;
  while (kept < order.length && mass < topP * total) mass += weights[order[kept++]!]!;
  let draw = random() * mass;
  for (let i = 0; i < kept; i++) {
    draw -= weights[order[i]!]!;
    if (draw < 0) return order[i]!;
  }
  return order[kept - 1]!;
}

/** Uniform numbers in [0, 1) for sampling: the seed's own stream (src/random.ts), or Math.random for no seed. */
export function uniformRandom(seed: number | null): () => number {
  if (seed === null) return Math.random;
  const stream = new RandomStream(seed, "generate");
  return () => stream.nextUniform();
}
