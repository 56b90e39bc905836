/** bam-upcycle's programmatic API. */
export { upcycle, planUpcycle, readRecipe } from "./upcycle/index.js";
export type { UpcycleOptions, ResolvedOptions, UpcyclePlan, PlannedTensor, Operation, PlanSummary, UpcycleProgress, UpcycleStage, UpcycleResult, SeedHooks, DownloadProgress } from "./upcycle/index.js";
export { openModel, type OpenedModel, type MoeSettings, type AttentionExperts, type BlockKind } from "./arch/model.js";
export { describeModel, scanModel, type ModelSummary } from "./arch/describe.js";
export { openSeed, type Seed } from "./arch/index.js";
export type { ArchFeatures, Family } from "./arch/types.js";
export { FAMILIES } from "./arch/types.js";
export { BamError, isBamError, type ErrorCode } from "./errors.js";
export { prepareOnnx, evaluatePerplexity, evaluateTokenFiles, saveLogits, generateText } from "./onnx/index.js";
