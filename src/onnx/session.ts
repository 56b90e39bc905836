/**
 * Runs an exported graph with onnxruntime-node: whole sequences, no padding,
 * an empty cache (what evaluation and router init need; generation goes
 * through decoder.ts, which feeds its own cache slots). onnxruntime is
 * loaded on first use, so commands that never run a model do not pay for it.
 */
import type * as Ort from "onnxruntime-node";
import { BamError } from "../errors.js";
import { SCORE_CHUNKS } from "./build.js";
import { importEngine } from "./optional.js";

/**
 * onnxruntime (loaded on first use) and a session of `file`, logging fatal
 * errors only; a file it cannot load is IO_ERROR in one line, `advice` after it.
 */
export async function openEngineSession(
  file: string,
  options: {
    threads?: number;
    advice?: string;
    /** onnxruntime's per-node timings, written to `<profile>_<date>.json` when the session is released. */
    profile?: string;
  } = {},
): Promise<{ ort: typeof Ort; session: Ort.InferenceSession }> {
  const ort = await importEngine("onnxruntime-node", () => import("onnxruntime-node"));
  try {
    const session = await ort.InferenceSession.create(file, {
      graphOptimizationLevel: "all",
      logSeverityLevel: 4,
      ...(options.threads ? { intraOpNumThreads: options.threads } : {}),
      ...(options.profile ? { enableProfiling: true, profileFilePrefix: options.profile } : {}),
    });
    return { ort, session };
  } catch (error) {
    throw new BamError(
      "IO_ERROR",
      `${file}: onnxruntime cannot load it (${engineError(error, Infinity)})${options.advice ?? ""}`,
      {
        cause: error,
      },
    );
  }
}

/** An onnxruntime error's first line, cut at `length`: its own words are pages of dumps. */
export function engineError(error: unknown, length = 300): string {
  return String((error as Error).message ?? error)
    .split("\n")[0]!
    .slice(0, length);
}

export class OnnxSession {
  private constructor(
    private readonly ort: typeof Ort,
    private readonly session: Ort.InferenceSession,
    /** Empty past_key_values.* inputs: [batch, heads, 0, head_dim] per name. */
    private readonly pastShapes: Map<string, [number, number]>,
  ) {}

  /** `options` as openEngineSession's (default threads: onnxruntime's, one per physical core). */
  static async open(modelFile: string, options: { threads?: number; profile?: string } = {}): Promise<OnnxSession> {
    const { ort, session } = await openEngineSession(modelFile, options);
    const pastShapes = new Map<string, [number, number]>();
    for (const meta of session.inputMetadata) {
      if (!meta.name.startsWith("past_key_values.") || !meta.isTensor) continue;
      const [, heads, , headDim] = meta.shape;
      if (typeof heads !== "number" || typeof headDim !== "number")
        throw new BamError("IO_ERROR", `${modelFile}: input ${meta.name} has no fixed heads and head_dim`);
      pastShapes.set(meta.name, [heads, headDim]);
    }
    return new OnnxSession(ort, session, pastShapes);
  }

  /**
   * Runs `ids` [batch, seq] (nothing masked; `positions` [batch, seq], default
   * 0..seq-1 in every row) and returns the named outputs' data (float32),
   * e.g. "logits" [batch, seq, vocab].
   */
  async forward(
    ids: BigInt64Array,
    batch: number,
    seq: number,
    outputs: string[],
    positions: BigInt64Array = BigInt64Array.from({ length: batch * seq }, (_, i) => BigInt(i % seq)),
  ): Promise<Float32Array[]> {
    if (ids.length !== batch * seq || positions.length !== batch * seq)
      throw new BamError(
        "TENSOR_SHAPE",
        `${ids.length} token ids, ${positions.length} positions for [${batch}, ${seq}]`,
      );
    const ort = this.ort;
    const feeds: Record<string, Ort.Tensor> = {
      input_ids: new ort.Tensor("int64", ids, [batch, seq]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(batch * seq).fill(1n), [batch, seq]),
      position_ids: new ort.Tensor("int64", positions, [batch, seq]),
    };
    for (const [name, [heads, headDim]] of this.pastShapes)
      feeds[name] = new ort.Tensor("float32", new Float32Array(0), [batch, heads, 0, headDim]);
    let result: Ort.InferenceSession.OnnxValueMapType;
    try {
      result = await this.session.run(feeds, outputs);
    } catch (error) {
      // one line, with the input's shape, is what the caller can act on
      throw new BamError("IO_ERROR", `onnxruntime failed on ${batch} x ${seq} tokens (${engineError(error)})`, {
        cause: error,
      });
    }
    return outputs.map((name) => result[name]!.data as Float32Array);
  }

  /**
   * The logits [T, vocab] of one unpadded window through a scoring graph
   * (score.onnx, BuildOptions.cache "none"), whose length must be a multiple
   * of SCORE_CHUNKS: the window is padded at its end, which no earlier position
   * attends to (causal), and the padding's rows are dropped. The padding sits
   * at the last token's position, so rope scalings that depend on the longest
   * position (dynamic, longrope) see the window's own length.
   */
  async score(window: readonly number[]): Promise<Float32Array> {
    const padded = Math.ceil(window.length / SCORE_CHUNKS) * SCORE_CHUNKS;
    const ids = new BigInt64Array(padded); // padding: token 0
    const positions = new BigInt64Array(padded);
    for (let i = 0; i < padded; i++) {
      ids[i] = i < window.length ? BigInt(window[i]!) : 0n;
      positions[i] = BigInt(Math.min(i, window.length - 1));
    }
    const [logits] = await this.forward(ids, 1, padded, ["logits"], positions);
    return logits!.subarray(0, (logits!.length / padded) * window.length);
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}
