/**
 * The API's text generation: a model folder (dense seed, BAM, Mixtral or
 * Qwen3-MoE) in, text out. The folder is exported to ONNX on demand
 * (prepareOnnx, reused while up to date) and run by transformers.js
 * (transformers.ts). This file's declarations name no transformers.js type,
 * so the package's root `.d.ts` needs none of that optional dependency.
 */
import { prepareOnnx } from "./export.js";
import { checkGeneration, generateFromExport } from "./transformers.js";

export interface GenerationSettings {
  /** Tokens to generate at most (default 64). */
  maxNewTokens: number;
  /** 0 = greedy (default); above 0 samples. */
  temperature: number;
  /** Nucleus sampling: keep the smallest set of tokens with this much probability (default 1). */
  topP: number;
  /** Seeds transformers.js's sampler; null (default) leaves it seeded from the OS. */
  seed: number | null;
  /** Each piece of text as soon as it decodes. */
  onText?: (text: string) => void;
  /** Checked between tokens: generation stops and throws ABORTED. */
  signal?: AbortSignal;
}

export interface Generation {
  /** The prompt's token ids. */
  promptIds: number[];
  /** The generated token ids. */
  newIds: number[];
  /** The generated text, special tokens skipped. */
  text: string;
  /** Seconds spent generating (tokenising and loading excluded). */
  seconds: number;
}

/** The settings `bam generate` and generateText use where none are given. */
export const DEFAULT_GENERATION: Readonly<GenerationSettings> = { maxNewTokens: 64, temperature: 0, topP: 1, seed: null };

export interface GenerateOptions extends Partial<GenerationSettings> {
  /** Bytes of weights written, when the ONNX export must be built first. */
  onExportProgress?: (written: number, total: number) => void;
}

/**
 * Generates a continuation of `prompt` with the model in `modelDir`, streaming text
 * through `onText`; settings default to DEFAULT_GENERATION (greedy, 64 tokens).
 */
export async function generateText(modelDir: string, prompt: string, options: GenerateOptions = {}): Promise<Generation> {
  const { onExportProgress, ...given } = options ?? {};
  const settings: GenerationSettings = { ...DEFAULT_GENERATION, ...given };
  checkGeneration(prompt, settings); // before an export that can take minutes
  const prepared = await prepareOnnx(modelDir, { signal: settings.signal, onProgress: onExportProgress });
  return generateFromExport(prepared.folder, prompt, settings);
}
