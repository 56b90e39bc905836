/**
 * The options of an upcycle, as the API takes them, as a recipe file holds
 * them, and resolved with every default filled in (what the plan records and
 * the output's recipe.yaml repeats, so a run can be reproduced).
 */
import YAML from "yaml";
import { BamError, ioError } from "../errors.js";
import { ATTENTION_EXPERTS, BLOCK_KINDS, type AttentionExperts, type BlockKind } from "../arch/model.js";
import { parseSize, readTextFile } from "../safetensors/index.js";

export type OutputDType = "keep" | "bf16" | "f16" | "f32";
export type RouterInit = "random" | "zero" | "hidden";
export type OutputFormat = "bam" | "mixtral" | "qwen3-moe";

export const OUTPUT_DTYPES: readonly OutputDType[] = ["keep", "bf16", "f16", "f32"];
export const ROUTER_INITS: readonly RouterInit[] = ["random", "zero", "hidden"];
export const OUTPUT_FORMATS: readonly OutputFormat[] = ["bam", "mixtral", "qwen3-moe"];
/**
 * The FFN gate when none is asked for: false is BAM's (section 3.3) and Switch's, each chosen expert
 * weighted by its softmax probability over all experts, so the router learns from the LM loss at k = 1.
 * docs/method.md ("FFN gating") says how this default was chosen.
 */
export const DEFAULT_NORM_TOPK_PROB = false;

export interface UpcycleOptions {
  /** Seed folders: E seeds (BAM/BTX), or one seed with `experts` (sparse upcycling, Drop-Upcycling). */
  seeds: string[];
  /** Output folder; must not exist or be empty unless `force`. */
  output: string;
  /** Attention experts: "moa" (default with several seeds: soft Mixture-of-Attention), "shared-kv", or "merged" (BTX; default with one seed). */
  attention?: AttentionExperts;
  /** "parallel" (default with several seeds, as BAM) or "sequential"; one seed defaults to its own block. */
  block?: BlockKind;
  /** With one seed: how many copies of its FFN to make. */
  experts?: number;
  /** Drop-Upcycling: fraction of each expert's intermediate dimensions re-initialised (0.5 is best in the paper). */
  dropRatio?: number;
  /** Top-k of the FFN router (default 1, as BAM; BTX used 2). */
  expertsPerToken?: number;
  /** FFN gate: true renormalises the chosen probabilities to sum 1 (Mixtral; [s, s, s] reproduces s at any k); false (default, DEFAULT_NORM_TOPK_PROB) weights each by its probability over all experts (BAM, Switch). */
  normTopkProb?: boolean;
  /** Averaging weights for the shared tensors, one per seed; normalised to sum 1. Default uniform. */
  weights?: number[];
  routerInit?: RouterInit;
  /** With routerInit "hidden": YAML file of prompts per expert (see ./router-init.ts). */
  prompts?: string;
  /** Scale of the random router init relative to the fan-in init (Switch: 0.1). */
  routerScale?: number;
  /** Seed of every random choice (routers, Drop-Upcycling). */
  seed?: number;
  dtype?: OutputDType;
  /** Largest shard, bytes or text such as "5GB" (default). */
  maxShardSize?: number | string;
  format?: OutputFormat;
  /** Replace an existing output folder (it is only replaced once the new one is complete). */
  force?: boolean;
  routerAuxLossCoef?: number;
  routerZLossCoef?: number;
}

export interface ResolvedOptions {
  seeds: string[];
  output: string;
  attention: AttentionExperts;
  block: BlockKind;
  experts: number;
  dropRatio: number;
  expertsPerToken: number;
  normTopkProb: boolean;
  weights: number[];
  routerInit: RouterInit;
  prompts: string | null;
  routerScale: number;
  seed: number;
  dtype: OutputDType;
  maxShardBytes: number;
  format: OutputFormat;
  force: boolean;
  routerAuxLossCoef: number;
  routerZLossCoef: number;
}

const invalid = (message: string): never => {
  throw new BamError("OPTIONS_INVALID", message);
};

function oneOf<T extends string>(name: string, value: T | undefined, options: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  return options.includes(value) ? value : invalid(`--${name} must be one of ${options.join(", ")}, not "${String(value)}"`);
}

function integer(name: string, value: number | undefined, min: number, max: number, fallback: number): number {
  if (value === undefined) return fallback;
  return Number.isInteger(value) && value >= min && value <= max ? value : invalid(`--${name} must be an integer from ${min} to ${max}, not ${value}`);
}

function fraction(name: string, value: number | undefined, fallback: number, allowOne: boolean): number {
  if (value === undefined) return fallback;
  const ok = Number.isFinite(value) && value >= 0 && (allowOne ? value <= 1 : value < 1);
  return ok ? value : invalid(`--${name} must be a number from 0 to ${allowOne ? "1" : "below 1"}, not ${value}`);
}

/**
 * Fills in defaults and checks ranges. With one seed (sparse upcycling) the
 * defaults keep the seed's function: merged attention and the seed's own block.
 */
export function resolveOptions(options: UpcycleOptions, seedBlock: BlockKind): ResolvedOptions {
  if (!Array.isArray(options.seeds) || options.seeds.length === 0) invalid("name at least one seed folder");
  if (typeof options.output !== "string" || options.output === "") invalid("name the output folder (-o DIR)");
  const seedCount = options.seeds.length;
  if (options.experts !== undefined && seedCount > 1) {
    invalid(`--experts is for sparse upcycling from one seed; with ${seedCount} seeds there is one expert per seed`);
  }
  const experts = seedCount === 1 ? integer("experts", options.experts, 1, 256, 1) : seedCount;
  if (seedCount > 256) invalid(`at most 256 seeds, not ${seedCount}`);
  const dropRatio = fraction("drop-ratio", options.dropRatio, 0, false);
  if (dropRatio > 0 && seedCount > 1) invalid("--drop-ratio is Drop-Upcycling from one seed; name a single seed with --experts N");
  const expertsPerToken = integer("experts-per-token", options.expertsPerToken, 1, experts, 1);
  const normTopkProb = options.normTopkProb ?? DEFAULT_NORM_TOPK_PROB;
  if (typeof normTopkProb !== "boolean") invalid(`--norm-topk-prob must be true or false, not ${String(normTopkProb)}`);
  const weights = options.weights ?? new Array<number>(seedCount).fill(1);
  if (weights.length !== seedCount) invalid(`--weights needs one weight per seed: ${seedCount} seeds, ${weights.length} weights`);
  if (weights.some((w) => !Number.isFinite(w) || w < 0) || weights.every((w) => w === 0)) {
    invalid("--weights must be non-negative numbers, not all zero");
  }
  const weightSum = weights.reduce((a, b) => a + b, 0);
  // 1e308 + 1e308 overflows: every weight would normalise to 0 and every average to zeros.
  if (!Number.isFinite(weightSum)) invalid(`--weights add up to ${weightSum}; use smaller numbers (only their ratios matter)`);
  const maxShardBytes = typeof options.maxShardSize === "string" ? parseSize(options.maxShardSize) : (options.maxShardSize ?? 5e9);
  if (!Number.isSafeInteger(maxShardBytes) || maxShardBytes < 1) invalid(`--max-shard-size must be a positive size, not ${String(options.maxShardSize)}`);
  const routerScale = options.routerScale ?? 0.1;
  if (!Number.isFinite(routerScale) || routerScale <= 0) invalid(`--router-scale must be a positive number, not ${routerScale}`);
  const routerInit = oneOf("router-init", options.routerInit, ROUTER_INITS, "random");
  if (routerInit === "hidden" && typeof options.prompts !== "string") invalid("--router-init hidden needs --prompts FILE (prompts per expert)");
  if (routerInit !== "hidden" && options.prompts !== undefined) invalid("--prompts goes with --router-init hidden");
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) invalid(`--seed must be a non-negative integer, not ${seed}`);
  const coefficient = (name: string, value: number | undefined, fallback: number) =>
    value === undefined ? fallback : Number.isFinite(value) && value >= 0 ? value : invalid(`${name} must be a non-negative number, not ${value}`);
  return {
    seeds: options.seeds,
    output: options.output,
    attention: oneOf("attention", options.attention, ATTENTION_EXPERTS, seedCount > 1 ? "moa" : "merged"),
    block: oneOf("block", options.block, BLOCK_KINDS, seedCount > 1 ? "parallel" : seedBlock),
    experts,
    dropRatio,
    expertsPerToken,
    normTopkProb,
    weights: weights.map((w) => w / weightSum),
    routerInit,
    prompts: options.prompts ?? null,
    routerScale,
    seed,
    dtype: oneOf("dtype", options.dtype, OUTPUT_DTYPES, "keep"),
    maxShardBytes,
    format: oneOf("format", options.format, OUTPUT_FORMATS, "bam"),
    force: options.force ?? false,
    routerAuxLossCoef: coefficient("router_aux_loss_coef", options.routerAuxLossCoef, 0.01),
    routerZLossCoef: coefficient("router_z_loss_coef", options.routerZLossCoef, 0.001),
  };
}

/** Recipe keys (YAML, kebab-case as the CLI flags) -> option names. */
const RECIPE_KEYS: Record<string, keyof UpcycleOptions> = {
  seeds: "seeds",
  output: "output",
  attention: "attention",
  block: "block",
  experts: "experts",
  "drop-ratio": "dropRatio",
  "experts-per-token": "expertsPerToken",
  "norm-topk-prob": "normTopkProb",
  weights: "weights",
  "router-init": "routerInit",
  prompts: "prompts",
  "router-scale": "routerScale",
  seed: "seed",
  dtype: "dtype",
  "max-shard-size": "maxShardSize",
  format: "format",
  "router-aux-loss-coef": "routerAuxLossCoef",
  "router-z-loss-coef": "routerZLossCoef",
};

/** A recipe (or a prompts file) is a screenful of options; this is far beyond any. */
const MAX_RECIPE_BYTES = 16_000_000;

/**
 * A YAML file from elsewhere (a recipe, --prompts), read strictly: a regular
 * file of bounded size, and refused (RECIPE_INVALID) where the parser would
 * warn and go on with a guess, such as an unknown tag (!!python/object/apply).
 */
export async function readYamlFile(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readTextFile(path, MAX_RECIPE_BYTES, "RECIPE_INVALID");
  } catch (error) {
    throw ioError(path, error);
  }
  try {
    // logLevel "error" keeps toJS quiet about a list or mapping used as a key: it becomes a string,
    // which the callers refuse as an unknown key.
    const document = YAML.parseDocument(text, { logLevel: "error" });
    const problem = document.errors[0] ?? document.warnings[0];
    if (problem !== undefined) throw problem;
    return document.toJS({ maxAliasCount: 100 });
  } catch (error) {
    throw new BamError("RECIPE_INVALID", `${path}: not valid YAML (${(error as Error).message.split("\n")[0]!.replace(/:$/, "")})`);
  }
}

/** Reads a recipe file into options; flags given on the command line override it. */
export async function readRecipe(path: string): Promise<Partial<UpcycleOptions>> {
  const parsed = await readYamlFile(path);
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new BamError("RECIPE_INVALID", `${path}: must be a mapping of option: value`);
  }
  const options: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    const name = Object.hasOwn(RECIPE_KEYS, key) ? RECIPE_KEYS[key] : undefined; // not "constructor" or "toString" from the prototype
    if (name === undefined) {
      throw new BamError("RECIPE_INVALID", `${path}: unknown key "${key}"; known keys: ${Object.keys(RECIPE_KEYS).join(", ")}`);
    }
    const wantsList = name === "seeds" || name === "weights";
    const typeOk = wantsList ? Array.isArray(value) : ["string", "number", "boolean"].includes(typeof value);
    if (!typeOk) throw new BamError("RECIPE_INVALID", `${path}: "${key}" must be ${wantsList ? "a list" : "a single value"}`);
    const item = name === "seeds" ? "string" : "number";
    if (wantsList && !(value as unknown[]).every((v) => typeof v === item)) {
      throw new BamError("RECIPE_INVALID", `${path}: "${key}" must be a list of ${name === "seeds" ? "folder names" : "numbers"}`);
    }
    options[name] = value;
  }
  return options as Partial<UpcycleOptions>;
}

/** The recipe written into the output folder: every resolved option, in recipe keys. */
export function recipeYaml(options: ResolvedOptions): string {
  const byKey: Record<string, unknown> = {};
  for (const [key, name] of Object.entries(RECIPE_KEYS)) {
    byKey[key] = name === "maxShardSize" ? options.maxShardBytes : options[name as keyof ResolvedOptions];
  }
  if (options.seeds.length > 1) delete byKey.experts; // implied by the seeds, and refused beside them
  if (options.prompts === null) delete byKey.prompts; // only with --router-init hidden, and refused without it
  return `# bam-upcycle recipe: \`bam upcycle --recipe recipe.yaml\` reproduces this model\n${YAML.stringify(byKey)}`;
}
