/**
 * A Hugging Face config.json -> ArchFeatures, for every family in
 * families.ts. Reads both spellings seen in the wild: transformers v4
 * (top-level rope_theta / rope_scaling, gpt_neox rotary_pct and
 * rotary_emb_base, phi partial_rotary_factor) and v5 (rope_parameters).
 * Everything is validated before any tensor is touched, so a corrupt config
 * fails fast with one line naming the file and the key.
 */
import { join } from "node:path";
import { BamError, ioError, type ErrorCode } from "../errors.js";
import { readTextFile } from "../safetensors/index.js";
import { FAMILY_SPECS, specForModelType, type FamilySpec, type Keyed, type Switch } from "./families.js";
import type { Activation, ArchFeatures, Rope, RopeScaling } from "./types.js";

/** config.json files are a few KB; this is far beyond any real one. */
const MAX_CONFIG_BYTES = 16_000_000;

/** Bounds no real checkpoint comes near; past them the config is corrupt. */
export const CONFIG_LIMITS = {
  vocabSize: 1 << 22,
  hiddenSize: 1 << 17,
  intermediateSize: 1 << 20,
  numLayers: 1024,
  numHeads: 1024,
  headDim: 1 << 12,
  maxPositions: 1 << 27,
} as const;

/** transformers' ACT2FN names -> ours. gelu_new, gelu_fast and gelu_accurate are all the tanh formula. */
const ACTIVATIONS: Readonly<Record<string, Activation>> = {
  silu: "silu",
  swish: "silu",
  gelu: "gelu",
  gelu_python: "gelu",
  gelu_new: "gelu_tanh",
  gelu_pytorch_tanh: "gelu_tanh",
  gelu_fast: "gelu_tanh",
  gelu_accurate: "gelu_tanh",
  relu: "relu",
};

/** Scaling types modeling_bam.py implements; anything else is FEATURE_UNSUPPORTED. */
export const ROPE_SCALING_TYPES = ["linear", "dynamic", "yarn", "llama3", "longrope"] as const;

/** Keys of a rope dict that are not scaling parameters. */
const ROPE_NON_SCALING_KEYS = new Set(["rope_type", "type", "rope_theta", "partial_rotary_factor"]);

export interface HfConfig {
  /** Path of config.json, for messages. */
  file: string;
  raw: Record<string, unknown>;
}

/** Reads and parses `<dir>/config.json`: NOT_A_CHECKPOINT when absent, CONFIG_INVALID when not a JSON object. */
export async function readConfigFile(dir: string): Promise<HfConfig> {
  const file = join(dir, "config.json");
  let text: string;
  try {
    text = await readTextFile(file, MAX_CONFIG_BYTES, "CONFIG_INVALID");
  } catch (error) {
    const errno = (error as NodeJS.ErrnoException).code;
    if (errno === "ENOENT" || errno === "ENOTDIR") {
      throw new BamError(
        "NOT_A_CHECKPOINT",
        `${file}: not found; point at a Hugging Face model folder (config.json + *.safetensors)`,
      );
    }
    throw ioError(file, error);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new BamError("CONFIG_INVALID", `${file}: not valid JSON (${(error as Error).message})`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new BamError("CONFIG_INVALID", `${file}: must hold a JSON object`);
  }
  return { file, raw: raw as Record<string, unknown> };
}

/** The adapter for the config's model_type: FAMILY_UNSUPPORTED naming the supported ones. */
export function familyOf(config: HfConfig): FamilySpec {
  const modelType = config.raw.model_type;
  if (typeof modelType !== "string") {
    throw new BamError("CONFIG_INVALID", `${config.file}: "model_type" must be a string, found ${show(modelType)}`);
  }
  const spec = specForModelType(modelType);
  if (spec === undefined) {
    const supported = FAMILY_SPECS.flatMap((s) => s.modelTypes).join(", ");
    throw new BamError(
      "FAMILY_UNSUPPORTED",
      `${config.file}: "model_type" ${show(modelType)} is not supported; supported: ${supported}`,
    );
  }
  return spec;
}

/** The canonical features of a dense seed, from its config.json (read by `spec`: its family's adapter unless given). */
export function featuresFromHfConfig(config: HfConfig, spec: FamilySpec = familyOf(config)): ArchFeatures {
  const cfg = new ConfigReader(config.raw, config.file);
  const family = spec.family;

  for (const [name, accepted] of Object.entries(spec.unsupportedUnless)) {
    const value = config.raw[name];
    if (value != null && value !== accepted) {
      cfg.fail("FEATURE_UNSUPPORTED", name, `${show(value)} is not supported for ${family} (only ${show(accepted)})`);
    }
  }
  if (config.raw.quantization_config != null) {
    cfg.fail(
      "FEATURE_UNSUPPORTED",
      "quantization_config",
      "quantized checkpoints are not supported; use the unquantized weights",
    );
  }

  const { sizes } = spec;
  const L = CONFIG_LIMITS;
  const vocabSize = cfg.int(sizes.vocabSize, 1, L.vocabSize);
  const hiddenSize = cfg.int(sizes.hiddenSize, 1, L.hiddenSize);
  const numLayers = cfg.int(sizes.numLayers, 1, L.numLayers);
  const numHeads = cfg.int(sizes.numHeads, 1, L.numHeads);
  const maxPositions = cfg.int(sizes.maxPositions, 1, L.maxPositions);
  const intermediateSize =
    spec.intermediateFactorWhenUnset === undefined
      ? cfg.int(sizes.intermediateSize, 1, L.intermediateSize)
      : (cfg.optionalInt(sizes.intermediateSize, 1, L.intermediateSize) ??
        spec.intermediateFactorWhenUnset * hiddenSize);

  const numKvHeads = cfg.optionalInt(sizes.numKvHeads, 1, L.numHeads) ?? numHeads;
  if (numHeads % numKvHeads !== 0) {
    cfg.fail(
      "CONFIG_INVALID",
      cfg.keyOf(sizes.numKvHeads),
      `${numKvHeads} must divide the number of attention heads (${numHeads})`,
    );
  }
  let headDim = cfg.optionalInt(sizes.headDim, 1, L.headDim);
  if (headDim === undefined) {
    // head_dim derived from hidden / heads, so the heads must split the hidden size evenly.
    if (hiddenSize % numHeads !== 0) {
      cfg.fail("CONFIG_INVALID", cfg.keyOf(sizes.numHeads), `${numHeads} must divide the hidden size (${hiddenSize})`);
    }
    headDim = hiddenSize / numHeads;
  }

  const activationName = cfg.string(spec.activation);
  const activation =
    ACTIVATIONS[activationName] ??
    cfg.fail(
      "FEATURE_UNSUPPORTED",
      cfg.keyOf(spec.activation.keys),
      `${show(activationName)} is not a supported activation (supported: ${Object.keys(ACTIVATIONS).join(", ")})`,
    );

  return {
    family,
    vocabSize,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    maxPositions,
    norm: spec.norm,
    normEps: cfg.positive(spec.normEps),
    normBias: spec.normBias,
    normUnitOffset: spec.normUnitOffset,
    secondNorm: spec.secondNorm,
    parallelBlock: cfg.switch(spec.parallelBlock),
    activation,
    gatedMlp: spec.gatedMlp,
    qkvBias: cfg.switch(spec.qkvBias),
    attnOutBias: cfg.switch(spec.attnOutBias),
    mlpBias: cfg.switch(spec.mlpBias),
    lmHeadBias: spec.lmHeadBias,
    qkNorm: spec.qkNorm !== null && cfg.switch(spec.qkNorm.when) ? spec.qkNorm.kind : "none",
    rope: readRope(cfg, spec, headDim),
    learnedPositions: spec.learnedPositions,
    embeddingScale: spec.embeddingScale === "sqrt_hidden" ? Math.sqrt(hiddenSize) : null,
    logitScale: spec.logitScale === null ? null : cfg.nullableNumber(spec.logitScale),
    tiedEmbeddings: cfg.switch(spec.tiedEmbeddings),
    slidingWindow: readSlidingWindow(cfg, spec, numLayers),
    attentionScale: cfg.switch(spec.scaledAttention) ? null : 1,
  };
}

/** v5 `rope_parameters` first, then the v4 top-level keys, then the family's defaults. */
function readRope(cfg: ConfigReader, spec: FamilySpec, headDim: number): Rope | null {
  const ropeSpec = spec.rope;
  if (ropeSpec === null) return null;
  const v5 = cfg.optionalObject("rope_parameters");
  if (v5 !== undefined && Object.values(v5.raw).some((v) => v !== null && typeof v === "object" && !Array.isArray(v))) {
    cfg.fail("FEATURE_UNSUPPORTED", "rope_parameters", "per-layer-type rope parameters are not supported");
  }
  // Where a rope value lives: inside rope_parameters (v5) or at the top level under the family's keys (v4).
  const locate = (v5Key: string, v4: Keyed<number>): [ConfigReader, Keyed<number>] =>
    v5?.has(v5Key) ? [v5, { keys: [v5Key], default: v4.default }] : [cfg, v4];

  const [thetaIn, thetaAt] = locate("rope_theta", ropeSpec.theta);
  const theta = thetaIn.positive(thetaAt);
  // A config that states the base twice, differently, describes two models: which one was trained is unknown.
  const v4Theta = cfg.raw[cfg.keyOf(ropeSpec.theta.keys)];
  if (thetaIn === v5 && typeof v4Theta === "number" && v4Theta !== theta) {
    cfg.fail(
      "CONFIG_INVALID",
      cfg.keyOf(ropeSpec.theta.keys),
      `is ${v4Theta} but "rope_parameters.rope_theta" is ${theta}; make them agree (or remove one)`,
    );
  }

  const [partialIn, partialAt] = locate(
    "partial_rotary_factor",
    ropeSpec.partial ?? { keys: ["partial_rotary_factor"], default: 1 },
  );
  const partial = partialIn.number(partialAt);
  const partialKey = partialIn.keyOf(partialAt.keys);
  if (!(partial > 0 && partial <= 1)) {
    partialIn.fail("CONFIG_INVALID", partialKey, `must be in (0, 1], found ${partial}`);
  }
  if (ropeSpec.partial === null && partial !== 1) {
    partialIn.fail(
      "FEATURE_UNSUPPORTED",
      partialKey,
      `${partial}: ${spec.family} rotates the whole head (partial rotary is not supported)`,
    );
  }
  const dim = Math.floor(headDim * partial);
  if (dim < 2 || dim % 2 !== 0) {
    partialIn.fail(
      "FEATURE_UNSUPPORTED",
      partialKey,
      `${partial} x head_dim ${headDim} gives ${dim} rotary dimensions; an even number >= 2 is required`,
    );
  }
  return {
    dim,
    theta,
    style: ropeSpec.style,
    scaling: readRopeScaling(cfg, v5 ?? cfg.optionalObject("rope_scaling"), spec),
  };
}

function readRopeScaling(cfg: ConfigReader, source: ConfigReader | undefined, spec: FamilySpec): RopeScaling | null {
  if (source === undefined) return null;
  const typeKey = source.has("rope_type") ? "rope_type" : "type";
  const given = source.optionalString([typeKey]) ?? "default";
  const type = spec.rope?.typeAliases?.[given] ?? given;
  if (type === "default") return null;
  if (!(ROPE_SCALING_TYPES as readonly string[]).includes(type)) {
    source.fail(
      "FEATURE_UNSUPPORTED",
      typeKey,
      `${show(given)} is not supported (supported: ${ROPE_SCALING_TYPES.join(", ")})`,
    );
  }
  const scaling: RopeScaling = { type };
  for (const [name, value] of Object.entries(source.raw)) {
    if (ROPE_NON_SCALING_KEYS.has(name)) continue;
    // Kept as written and repeated in the output's config.json, so only flat values: no nesting to blow up on.
    if (!isScalingValue(value))
      source.fail("CONFIG_INVALID", name, `must be a number, string, boolean or list of numbers, found ${show(value)}`);
    // Factors scale frequencies or lengths: zero or negative ones divide by zero or flip positions.
    if (
      /factor$/.test(name) &&
      value !== null &&
      (Array.isArray(value) ? value : [value]).some((v) => typeof v === "number" && !(v > 0))
    ) {
      source.fail("CONFIG_INVALID", name, `must be positive, found ${show(value)}`);
    }
    scaling[name] = value;
  }
  // v4 phi3 keeps it at the top level; v5 moves it inside. Same model either way.
  const originalMax = cfg.raw.original_max_position_embeddings;
  if (scaling.original_max_position_embeddings === undefined && typeof originalMax === "number") {
    scaling.original_max_position_embeddings = originalMax;
  }
  return scaling;
}

/** What rope scaling parameters hold in real configs: factors, lengths, flags (yarn's truncate), longrope's factor lists. */
export function isScalingValue(value: unknown): boolean {
  if (value === null || typeof value === "boolean" || typeof value === "string") return true;
  if (typeof value === "number") return Number.isFinite(value);
  return Array.isArray(value) && value.every((v) => typeof v === "number" && Number.isFinite(v));
}

function readSlidingWindow(cfg: ConfigReader, spec: FamilySpec, numLayers: number): number | null {
  const sliding = spec.slidingWindow;
  if (sliding === null || !cfg.switch(sliding.enabled)) return null;
  const window = cfg.nullableInt(sliding.window, 1, CONFIG_LIMITS.maxPositions);
  if (window === null || sliding.firstSlidingLayer === undefined) return window;

  // qwen: v5 spells out layer_types; v4 slides the layers from max_window_layers on.
  const layerTypes = cfg.raw.layer_types;
  const key = layerTypes != null ? "layer_types" : cfg.keyOf(sliding.firstSlidingLayer.keys);
  let slidingLayers: number;
  if (layerTypes != null) {
    const valid =
      Array.isArray(layerTypes) &&
      layerTypes.length === numLayers &&
      layerTypes.every((t) => t === "full_attention" || t === "sliding_attention");
    if (!valid)
      cfg.fail(
        "CONFIG_INVALID",
        key,
        `must list "full_attention" or "sliding_attention" for each of the ${numLayers} layers`,
      );
    slidingLayers = (layerTypes as unknown[]).filter((t) => t === "sliding_attention").length;
  } else {
    const first = cfg.int(
      sliding.firstSlidingLayer.keys,
      0,
      Number.MAX_SAFE_INTEGER,
      sliding.firstSlidingLayer.default,
    );
    slidingLayers = Math.max(0, numLayers - first);
  }
  if (slidingLayers === 0) return null;
  if (slidingLayers === numLayers) return window;
  return cfg.fail(
    "FEATURE_UNSUPPORTED",
    key,
    `sliding-window attention on ${slidingLayers} of ${numLayers} layers is not supported (all or none)`,
  );
}

/**
 * Typed, bounded access to one JSON object; every failure is one line:
 * `<file>: "<key>" <what is wrong>`.
 */
class ConfigReader {
  constructor(
    readonly raw: Record<string, unknown>,
    readonly file: string,
    /** Path of this object inside config.json, for messages ("rope_parameters."). */
    readonly path = "",
  ) {}

  fail(code: ErrorCode, key: string, problem: string): never {
    throw new BamError(code, `${this.file}: "${this.path}${key}" ${problem}`);
  }

  has(key: string): boolean {
    return this.raw[key] != null;
  }

  /** The first key holding a non-null value, else the first key (for messages). */
  keyOf(keys: readonly string[]): string {
    return keys.find((k) => this.raw[k] != null) ?? keys[0] ?? "?";
  }

  private find(keys: readonly string[]): { key: string; value: unknown } | undefined {
    const key = keys.find((k) => this.raw[k] != null);
    return key === undefined ? undefined : { key, value: this.raw[key] };
  }

  private checkInt(key: string, value: unknown, min: number, max: number): number {
    if (typeof value === "number" && Number.isInteger(value) && value >= min && value <= max) return value;
    return this.fail("CONFIG_INVALID", key, `must be an integer from ${min} to ${max}, found ${show(value)}`);
  }

  /** Required unless a fallback is given. */
  int(keys: readonly string[], min: number, max: number, fallback?: number): number {
    const found = this.find(keys);
    if (found === undefined) {
      if (fallback !== undefined) return fallback;
      return this.fail("CONFIG_INVALID", keys[0] ?? "?", `is missing (an integer from ${min} to ${max})`);
    }
    return this.checkInt(found.key, found.value, min, max);
  }

  /** undefined when absent or null. */
  optionalInt(keys: readonly string[], min: number, max: number): number | undefined {
    const found = this.find(keys);
    return found === undefined ? undefined : this.checkInt(found.key, found.value, min, max);
  }

  /** An explicit null means "none"; only an absent key takes the default. */
  nullableInt(setting: Keyed<number | null>, min: number, max: number): number | null {
    const found = this.find(setting.keys);
    if (found !== undefined) return this.checkInt(found.key, found.value, min, max);
    return setting.keys.some((k) => this.raw[k] === null) ? null : setting.default;
  }

  optionalNumber(keys: readonly string[]): number | undefined {
    const found = this.find(keys);
    if (found === undefined) return undefined;
    if (typeof found.value === "number" && Number.isFinite(found.value)) return found.value;
    return this.fail("CONFIG_INVALID", found.key, `must be a number, found ${show(found.value)}`);
  }

  number(setting: Keyed<number>): number {
    return this.optionalNumber(setting.keys) ?? setting.default;
  }

  positive(setting: Keyed<number>): number {
    const value = this.number(setting);
    if (value > 0) return value;
    return this.fail("CONFIG_INVALID", this.keyOf(setting.keys), `must be a positive number, found ${value}`);
  }

  nullableNumber(setting: Keyed<number | null>): number | null {
    const value = this.optionalNumber(setting.keys);
    if (value !== undefined) return value;
    return setting.keys.some((k) => this.raw[k] === null) ? null : setting.default;
  }

  optionalString(keys: readonly string[]): string | undefined {
    const found = this.find(keys);
    if (found === undefined) return undefined;
    if (typeof found.value === "string") return found.value;
    return this.fail("CONFIG_INVALID", found.key, `must be a string, found ${show(found.value)}`);
  }

  string(setting: Keyed<string>): string {
    return this.optionalString(setting.keys) ?? setting.default;
  }

  switch(setting: Switch): boolean {
    if (typeof setting === "boolean") return setting;
    const found = this.find(setting.keys);
    if (found === undefined) return setting.default;
    if (typeof found.value === "boolean") return found.value;
    return this.fail("CONFIG_INVALID", found.key, `must be true or false, found ${show(found.value)}`);
  }

  optionalObject(key: string): ConfigReader | undefined {
    const value = this.raw[key];
    if (value == null) return undefined;
    if (typeof value !== "object" || Array.isArray(value)) {
      return this.fail("CONFIG_INVALID", key, `must be an object or null, found ${show(value)}`);
    }
    return new ConfigReader(value as Record<string, unknown>, this.file, `${this.path}${key}.`);
  }
}

/** A config value for a message, kept short; a value too deep to serialise is described, not serialised. */
export function show(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = Array.isArray(value) ? "[a list nested too deep]" : "{an object nested too deep}";
  }
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}
