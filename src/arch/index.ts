/** Model loaders: dense Hugging Face checkpoints -> the canonical description. */
export { chatSettingWarnings, openSeed, type Seed } from "./load.js";
export {
  featuresFromHfConfig,
  familyOf,
  readConfigFile,
  CONFIG_LIMITS,
  ROPE_SCALING_TYPES,
  type HfConfig,
} from "./config.js";
export { canonicalLayout, type LayoutEntry } from "./layout.js";
export {
  denseToBamName,
  expertModule,
  moduleName,
  parseTensorName,
  siteOf,
  tensorName,
  ROUTER_SLOTS,
  type Part,
  type RouterSlot,
  type Site,
  type TensorName,
} from "./names.js";
export type { FamilySpec } from "./families.js";
export { featuresToConfig, featuresFromConfig, type FeatureConfig } from "./features.js";
export * from "./types.js";
export * from "./model.js";
export * from "./describe.js";
