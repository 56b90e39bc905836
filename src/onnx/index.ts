/**
 * The CPU engine: any model we read (dense seed or BAM folder) as an ONNX
 * graph that onnxruntime-node and transformers.js run; perplexity, logits,
 * generation, and the hidden-state probes of prompt-based router init.
 */
export { prepareOnnx, type PrepareOptions, type PreparedOnnx } from "./export.js";
export { evaluatePerplexity, evaluateTokenFiles, saveLogits, type BinDType, type EvalOptions, type Perplexity, type PerplexityReport } from "./evaluate.js";
export { checkGeneration, generateText, loadTokenizer, type Generation, type GenerationSettings } from "./transformers.js";
export { meanLayerInputs, type LayerInputMeans } from "./probe.js";
