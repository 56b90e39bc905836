/**
 * The API's text generation: a model folder (a dense seed or a mixture that
 * `bam inspect` reads) in, text out. The folder is exported to ONNX on demand
 * (prepareOnnx, reused while up to date) and run by our loop over its
 * generate.onnx (decoder.ts), with transformers.js's tokenizer (transformers.ts). These declarations name no transformers.js type, so the
 * package's root `.d.ts` needs none of that optional dependency.
 */
import { prepareOnnx } from "./export.js";
import type { Generation, GenerationSettings } from "./generation.js";
import { checkGeneration, generateFromExport } from "./transformers.js";

export interface GenerateOptions extends Partial<GenerationSettings> {
  /** Bytes of weights written, when the ONNX export must be built first. */
  onExportProgress?: (written: number, total: number) => void;
}

/**
 * Generates a continuation of `prompt` with the model in `modelDir`, streaming text
 * through `onText`; a setting not given comes from the model's generation_config.json
 * as transformers takes it (do_sample: its temperature, top_k, top_p), else from
 * DEFAULT_GENERATION (greedy, 64 tokens). `Generation.settings` says what ran.
 */
export async function generateText(
  modelDir: string,
  prompt: string,
  options: GenerateOptions = {},
): Promise<Generation> {
  const { onExportProgress, ...given } = options ?? {};
  checkGeneration(prompt, given); // before an export that can take minutes
  const prepared = await prepareOnnx(modelDir, { signal: given.signal, onProgress: onExportProgress });
  return generateFromExport(prepared.folder, prompt, given);
}
