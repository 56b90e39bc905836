/**
 * Evaluation on CPU: perplexity of text files (the model's own tokenizer) or
 * of token-id files (flat .bin, as scripts/data writes them) over
 * non-overlapping windows, and raw logits for given token ids.
 */
import { readFile } from "node:fs/promises";
import { BamError, ioError } from "../errors.js";
import { SafetensorsReader, writeSafetensors } from "../safetensors/index.js";
import { openModel } from "../arch/model.js";
import { checkOutputFile, writeFileAtomically } from "../export/atomic.js";
import { prepareOnnx, type PrepareOptions } from "./export.js";
import { OnnxSession } from "./session.js";
import { BIN_DTYPES, type BinDType } from "./token-files.js";
import { loadTokenizer } from "./transformers.js";

export interface Perplexity {
  /** Tokens run through the model. */
  tokens: number;
  /** Tokens predicted: each window's tokens but its first. */
  predicted: number;
  /** Summed negative log-likelihood (nats). */
  nll: number;
  /** exp(nll / predicted). */
  perplexity: number;
}

export interface PerplexityReport {
  /** The model folder, as given. */
  model: string;
  /** Window length in tokens. */
  context: number;
  /** One result per input file, in order. */
  files: Array<
    Perplexity & {
      /** The input file, as given. */
      file: string;
    }
  >;
  /** All files together. */
  overall: Perplexity;
  /** Seconds in the model (tokenising and building the ONNX file excluded), and tokens per second there. */
  seconds: number;
  /** Tokens run through the model per second. */
  tokensPerSecond: number;
}

export interface EvalOptions extends Omit<PrepareOptions, "output" | "onProgress"> {
  /** Window length in tokens (default 512). */
  context?: number;
  /** Only the first this many tokens of each file (default: all). */
  maxTokens?: number;
  /** Tokens evaluated so far, of all. */
  onProgress?: (done: number, total: number) => void;
  /** Called when the ONNX file must be built first (bytes of weights written). */
  onBuild?: (written: number, total: number) => void;
}

/** Perplexity of text files, tokenised with the model's tokenizer.json. */
export async function evaluatePerplexity(
  modelDir: string,
  files: string[],
  options: EvalOptions = {},
): Promise<PerplexityReport> {
  if (files.length === 0) throw new BamError("OPTIONS_INVALID", "files: name at least one text file");
  await checkContext(modelDir, options);
  const tokenizer = await loadTokenizer(modelDir);
  const inputs = await Promise.all(
    files.map(async (file) => {
      let text: string;
      try {
        text = await readFile(file, "utf8");
      } catch (error) {
        throw ioError(file, error);
      }
      const ids = tokenizer.encode(text);
      return { file, ids: options.maxTokens === undefined ? ids : ids.slice(0, options.maxTokens) };
    }),
  );
  return scoreWindows(modelDir, inputs, options);
}

/**
 * Perplexity of token-id files: flat little-endian uint16 or uint32 ids
 * (default: uint16 when the vocabulary fits), the layout scripts/data writes
 * and scripts/finetune.py reads, so both engines score the same windows.
 */
export async function evaluateTokenFiles(
  modelDir: string,
  files: string[],
  options: EvalOptions & {
    /** Element type of the files (default: uint16 when the vocabulary fits, else uint32, as scripts/data writes them). */
    binDType?: BinDType;
  } = {},
): Promise<PerplexityReport> {
  if (files.length === 0) throw new BamError("OPTIONS_INVALID", "files: name at least one token file");
  if (options.binDType !== undefined && !BIN_DTYPES.includes(options.binDType)) {
    throw new BamError(
      "OPTIONS_INVALID",
      `binDType must be one of ${BIN_DTYPES.join(", ")}, not ${JSON.stringify(options.binDType)}`,
    );
  }
  const vocab = await checkContext(modelDir, options);
  const binDType = options.binDType ?? (vocab <= 65536 ? "uint16" : "uint32");
  const width = binDType === "uint16" ? 2 : 4;
  const inputs = await Promise.all(
    files.map(async (file) => {
      let bytes: Buffer;
      try {
        bytes = await readFile(file);
      } catch (error) {
        throw ioError(file, error);
      }
      if (bytes.length % width !== 0)
        throw new BamError(
          "DATA_INCOMPLETE",
          `${file}: ${bytes.length} bytes is not a whole number of ${binDType} token ids`,
        );
      const count = Math.min(bytes.length / width, options.maxTokens ?? Infinity);
      const ids = new Array<number>(count);
      for (let i = 0; i < count; i++) ids[i] = width === 2 ? bytes.readUInt16LE(2 * i) : bytes.readUInt32LE(4 * i);
      const bad = ids.findIndex((id) => id >= vocab);
      if (bad >= 0)
        throw new BamError(
          "TENSOR_INVALID",
          `${file}: token ${bad} is ${ids[bad]}, outside the vocabulary [0, ${vocab}) (is binDType ${binDType} right?)`,
        );
      return { file, ids };
    }),
  );
  return scoreWindows(modelDir, inputs, options);
}

/** Sums each input's NLL over windows of `context` tokens (each window predicts all its tokens but the first). */
async function scoreWindows(
  modelDir: string,
  tokens: Array<{ file: string; ids: number[] }>,
  options: EvalOptions,
): Promise<PerplexityReport> {
  // A perplexity of nothing is NaN; refused before the model is built.
  const short = tokens.find(({ ids }) => ids.length < 2);
  if (short !== undefined) {
    throw new BamError(
      "DATA_INCOMPLETE",
      `${short.file}: ${short.ids.length} token(s); perplexity needs at least 2 (one to predict from the other): give a longer file`,
    );
  }
  const context = options.context ?? 512;
  const total = tokens.reduce((sum, { ids }) => sum + ids.length, 0);
  const prepared = await prepareOnnx(modelDir, { ...options, onProgress: options.onBuild });
  const session = await OnnxSession.open(prepared.scoreFile);
  try {
    let done = 0;
    let seconds = 0;
    const perFile = [];
    for (const { file, ids } of tokens) {
      const sum = { tokens: 0, predicted: 0, nll: 0 };
      for (let start = 0; start < ids.length; start += context) {
        if (options.signal?.aborted) throw new BamError("ABORTED", "evaluation interrupted");
        const window = ids.slice(start, start + context);
        if (window.length >= 2) {
          const started = performance.now();
          sum.nll += windowNll(await session.score(window), window);
          seconds += (performance.now() - started) / 1000;
          sum.predicted += window.length - 1;
        }
        sum.tokens += window.length;
        done += window.length;
        options.onProgress?.(done, total);
      }
      perFile.push({ file, ...withPerplexity(sum) });
    }
    const overall = withPerplexity({
      tokens: perFile.reduce((s, f) => s + f.tokens, 0),
      predicted: perFile.reduce((s, f) => s + f.predicted, 0),
      nll: perFile.reduce((s, f) => s + f.nll, 0),
    });
    return {
      model: modelDir,
      context,
      files: perFile,
      overall,
      seconds,
      tokensPerSecond: overall.tokens / Math.max(seconds, 1e-9),
    };
  } finally {
    await session.close();
  }
}

/**
 * Checks the window options; learned absolute positions end at
 * max_position_embeddings, rotary models run past it. Returns the vocabulary size.
 */
async function checkContext(modelDir: string, options: EvalOptions): Promise<number> {
  const context = options.context ?? 512;
  if (!Number.isInteger(context) || context < 2)
    throw new BamError("OPTIONS_INVALID", `context must be an integer of at least 2, not ${context}`);
  const { maxTokens } = options;
  if (maxTokens !== undefined && (!Number.isInteger(maxTokens) || maxTokens < 2))
    throw new BamError("OPTIONS_INVALID", `maxTokens must be an integer of at least 2, not ${maxTokens}`);
  const model = await openModel(modelDir);
  await model.close();
  if (model.features.learnedPositions && context > model.features.maxPositions) {
    throw new BamError(
      "OPTIONS_INVALID",
      `context ${context} is longer than the ${model.features.maxPositions} positions ${modelDir} has learned`,
    );
  }
  return model.features.vocabSize;
}

/** Sum over t of -log softmax(logits[t])[ids[t + 1]], in float64. */
function windowNll(logits: Float32Array, ids: number[]): number {
  const vocab = logits.length / ids.length;
  let nll = 0;
  for (let t = 0; t + 1 < ids.length; t++) {
    const row = logits.subarray(t * vocab, (t + 1) * vocab);
    let max = -Infinity;
    for (const v of row) if (v > max) max = v;
    let sum = 0;
    for (const v of row) sum += Math.exp(v - max);
    nll += max + Math.log(sum) - row[ids[t + 1]!]!;
  }
  return nll;
}

function withPerplexity(sum: { tokens: number; predicted: number; nll: number }): Perplexity {
  return { ...sum, perplexity: sum.predicted > 0 ? Math.exp(sum.nll / sum.predicted) : NaN };
}

export interface SaveLogitsOptions extends Omit<EvalOptions, "context" | "onProgress" | "force"> {
  /**
   * Replace an existing file at the output path (`bam eval --force`, which OUTPUT_EXISTS names); a path that is or
   * lies inside the model folder, or is the ids file, is refused whatever this says. The ONNX export is rebuilt
   * when it is stale, as for evaluatePerplexity.
   */
  force?: boolean;
}

/**
 * Runs `input_ids` (int64 [batch, seq]) of `idsFile` and writes `logits` (f32 [batch, seq, vocab]) to `outFile`,
 * which may not be an existing file (unless `force`) nor one of the model's or the ids file: checked first.
 */
export async function saveLogits(
  modelDir: string,
  idsFile: string,
  outFile: string,
  options: SaveLogitsOptions = {},
): Promise<{
  /** Shape of the logits written: [batch, seq, vocab]. */
  shape: number[];
}> {
  await checkOutputFile(outFile, { force: options.force ?? false, inputs: [modelDir, idsFile] });
  const { ids, batch, seq } = await readInputIds(idsFile);
  const model = await openModel(modelDir);
  await model.close();
  const vocab = model.features.vocabSize;
  const bad = ids.find((id) => id < 0n || id >= BigInt(vocab));
  if (bad !== undefined)
    throw new BamError("TENSOR_INVALID", `${idsFile}: input_ids holds ${bad}, outside the vocabulary [0, ${vocab})`);
  const prepared = await prepareOnnx(modelDir, {
    cacheDir: options.cacheDir,
    signal: options.signal,
    onProgress: options.onBuild,
  });
  const session = await OnnxSession.open(prepared.modelFile);
  let logits: Float32Array;
  try {
    [logits] = (await session.forward(ids, batch, seq, ["logits"])) as [Float32Array];
  } finally {
    await session.close();
  }
  const shape = [batch, seq, vocab];
  await writeFileAtomically(outFile, options.force ?? false, (path) =>
    writeSafetensors(
      path,
      [
        {
          name: "logits",
          dtype: "F32",
          shape,
          data: () => new Uint8Array(logits.buffer, logits.byteOffset, logits.byteLength),
        },
      ],
      { metadata: { format: "pt" } },
    ).then(() => undefined),
  );
  return { shape };
}

async function readInputIds(file: string): Promise<{ ids: BigInt64Array; batch: number; seq: number }> {
  const reader = await SafetensorsReader.open(file);
  try {
    const info = reader.tensors.get("input_ids");
    if (info === undefined) throw new BamError("TENSOR_MISSING", `${file}: no tensor "input_ids"`);
    if (info.dtype !== "I64" || info.shape.length !== 2 || info.shape[0] === 0 || info.shape[1] === 0) {
      throw new BamError(
        "TENSOR_INVALID",
        `${file}: input_ids must be I64 [batch, seq], found ${info.dtype} [${info.shape.join(", ")}]`,
      );
    }
    const bytes = await reader.read("input_ids");
    const ids = new BigInt64Array(bytes.slice().buffer);
    return { ids, batch: info.shape[0]!, seq: info.shape[1]! };
  } finally {
    await reader.close();
  }
}
