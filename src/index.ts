/**
 * bam-upcycle's programmatic API: every function a user calls, every type
 * they take and return, and the allowed values of every option. Engine
 * functions (eval, generate, prepareOnnx) need the optional dependencies
 * named in ENGINE_PACKAGES; their declarations name none of those packages'
 * types, so this file's types check without them.
 */
export { upcycle, planUpcycle, executePlan, readRecipe, recipeYaml } from "./upcycle/index.js";
export type {
  UpcycleOptions,
  ResolvedOptions,
  UpcyclePlan,
  PlannedTensor,
  Operation,
  SourceRef,
  SeedInfo,
  SeedFile,
  PlanSummary,
  FormatPlan,
  FormatMoe,
  UpcycleProgress,
  UpcycleStage,
  UpcycleResult,
  SeedHooks,
  UpcycleHooks,
  DownloadProgress,
} from "./upcycle/index.js";
export type { HashedSeed } from "./upcycle/hash-seeds.js";
export {
  OUTPUT_DTYPES,
  OUTPUT_FORMATS,
  ROUTER_INITS,
  type ExpertPrompts,
  type OutputDType,
  type OutputFormat,
  type PromptsMapping,
  type RouterInit,
} from "./upcycle/options.js";
export {
  ATTENTION_EXPERTS,
  BLOCK_KINDS,
  type AttentionExperts,
  type BlockKind,
  type ModelKind,
  type MoeSettings,
  type SeedRecord,
} from "./arch/model.js";
export {
  inspectModel,
  type Inspection,
  type InspectOptions,
  type ModelSummary,
  type ParameterCounts,
  type ScanFinding,
} from "./arch/describe.js";
export {
  FAMILIES,
  type Activation,
  type ArchFeatures,
  type Family,
  type NormKind,
  type Rope,
  type RopeScaling,
  type RopeStyle,
} from "./arch/types.js";
export type { DType, FloatDType } from "./safetensors/dtype.js";
export { BamError, isBamError, type ErrorCode } from "./errors.js";
export { prepareOnnx, type PrepareOptions, type PreparedOnnx } from "./onnx/export.js";
export {
  evaluatePerplexity,
  evaluateTokenFiles,
  saveLogits,
  type EvalOptions,
  type Perplexity,
  type PerplexityReport,
  type SaveLogitsOptions,
} from "./onnx/evaluate.js";
export { BIN_DTYPES, type BinDType } from "./onnx/token-files.js";
export { generateText, type GenerateOptions } from "./onnx/generate.js";
export { DEFAULT_GENERATION, type Generation, type GenerationSettings } from "./onnx/generation.js";
export { ENGINE_PACKAGES, type EnginePackage } from "./onnx/optional.js";
