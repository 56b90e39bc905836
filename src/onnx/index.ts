/**
 * The CPU engine: any model we read (dense seed or BAM folder) as an ONNX
 * graph that onnxruntime-node and transformers.js run; perplexity, logits,
 * generation, and the hidden-state probes of prompt-based router init.
 */
export { prepareOnnx, type PrepareOptions, type PreparedOnnx } from "./export.js";
export {
  evaluatePerplexity,
  evaluateTokenFiles,
  saveLogits,
  type EvalOptions,
  type Perplexity,
  type PerplexityReport,
  type SaveLogitsOptions,
} from "./evaluate.js";
export { BIN_DTYPES, type BinDType } from "./token-files.js";
export { checkGeneration, generateFromExport, loadTokenizer } from "./transformers.js";
export { generateText, type GenerateOptions } from "./generate.js";
export { DEFAULT_GENERATION, type Generation, type GenerationSettings } from "./generation.js";
export { meanLayerInputs, type LayerInputMeans } from "./probe.js";
