/**
 * The options of an upcycle, as the API takes them, as a recipe file holds
 * them, and resolved with every default filled in (what the plan records and
 * the output's recipe.yaml repeats, so a run can be reproduced).
 */
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import YAML, { Lexer } from "yaml";
import { BamError, ioError } from "../errors.js";
import { RECIPE_MARKER } from "../export/atomic.js";
import { OUTPUT_FORMATS, type OutputFormat } from "../export/formats.js";
import { ATTENTION_EXPERTS, BLOCK_KINDS, type AttentionExperts, type BlockKind } from "../arch/model.js";
import { parseSize, readTextFile } from "../safetensors/index.js";
import { parseRepoRef } from "../hub/index.js";
import { fromMergekit, isMergekitConfig } from "./mergekit.js";

export { OUTPUT_FORMATS, type OutputFormat } from "../export/formats.js";

/** Each list is the type's one source and the CLI flag's choices (`--dtype`, `--router-init`). */
export const OUTPUT_DTYPES = ["keep", "bf16", "f16", "f32"] as const;
export type OutputDType = (typeof OUTPUT_DTYPES)[number];
export const ROUTER_INITS = ["random", "zero", "hidden", "cheap-embed", "uniform-random"] as const;
export type RouterInit = (typeof ROUTER_INITS)[number];
/** Router inits computed from --prompts. */
export const PROMPT_ROUTER_INITS: readonly RouterInit[] = ["hidden", "cheap-embed"];
/**
 * The FFN gate when none is asked for: false is BAM's (section 3.3) and Switch's, each chosen expert
 * weighted by its softmax probability over all experts, so the router learns from the LM loss at k = 1.
 * docs/method.md ("FFN gating") says how this default was chosen.
 */
export const DEFAULT_NORM_TOPK_PROB = false;

export interface UpcycleOptions {
  /** Seed folders: E seeds (BAM/BTX), or one seed with `experts` (sparse upcycling, Drop-Upcycling). */
  seeds: string[];
  /** Output folder; must not exist or be empty unless `force`. upcycle() needs it; planUpcycle() plans without one. */
  output?: string;
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
  /** FFN gate: true renormalises the chosen probabilities to sum 1 (Mixtral; [s, s, s] reproduces s at any k); false weights each by its probability over all experts (BAM, Switch). Default: DEFAULT_NORM_TOPK_PROB. */
  normTopkProb?: boolean;
  /** Averaging weights for the shared tensors, one per seed; normalised to sum 1. Default uniform. */
  weights?: number[];
  /** Copy every shared tensor (embeddings, norms, head, merged or shared attention) from this model instead of averaging the seeds (mergekit-moe's base_model); a seed or another model of the same architecture. */
  sharedFrom?: string;
  /** How new routers start: ROUTER_INITS (default "random"). */
  routerInit?: RouterInit;
  /** With routerInit "hidden" or "cheap-embed": YAML file of prompts per expert (see ./router-init.ts), or the same mapping inline. */
  prompts?: string | PromptsMapping;
  /** Scale of the random router init relative to the fan-in init (Switch: 0.1). */
  routerScale?: number;
  /** Seed of every random choice (routers, Drop-Upcycling). */
  seed?: number;
  /** Output dtype: OUTPUT_DTYPES (default "keep": the seeds'). */
  dtype?: OutputDType;
  /** Largest shard, bytes or text such as "5GB" (default). */
  maxShardSize?: number | string;
  /** Output folder: OUTPUT_FORMATS (default "bam"). */
  format?: OutputFormat;
  /** Replace an existing output folder (it is only replaced once the new one is complete). */
  force?: boolean;
  /** Weight of the load-balancing loss written into config.json for fine-tuning (default 0.01). */
  routerAuxLossCoef?: number;
  /** Weight of the router z-loss written into config.json for fine-tuning (default 0.001). */
  routerZLossCoef?: number;
  /** Title of the model card; default: the output folder's name. */
  name?: string;
}

/** A prompts file's content as a mapping, `{ experts: [{ positive_prompts, negative_prompts }, ...] }`: what a recipe holds inline. */
export interface PromptsMapping {
  /** One entry per expert: `{ positive_prompts: [...], negative_prompts?: [...] }` (a mergekit config's also names its source_model). */
  experts: unknown[];
  /** Other keys, refused by the prompts reader. */
  [key: string]: unknown;
}

/** One expert's prompts, as read. */
export interface ExpertPrompts {
  /** Prompts whose hidden states (or token embeddings) the expert's router row points towards. */
  positive: string[];
  /** Prompts it points away from. */
  negative: string[];
}

export interface ResolvedOptions {
  /** Seed folders or Hugging Face ids, as given. */
  seeds: string[];
  /** Output folder, or null in a plan made without one (planUpcycle only: nothing can be written). */
  output: string | null;
  /** Attention experts. */
  attention: AttentionExperts;
  /** Block kind. */
  block: BlockKind;
  /** FFN experts per layer. */
  experts: number;
  /** Drop-Upcycling ratio (0: plain copies). */
  dropRatio: number;
  /** Top-k of the FFN router. */
  expertsPerToken: number;
  /** FFN gate renormalised (true) or the paper's (false). */
  normTopkProb: boolean;
  /** Averaging weights, one per seed, summing to 1. */
  weights: number[];
  /** Model the shared tensors are copied from, or null (averaged). */
  sharedFrom: string | null;
  /** How new routers start. */
  routerInit: RouterInit;
  /** Prompts of a prompt-based router init (a file, or the mapping inline), or null. */
  prompts: string | PromptsMapping | null;
  /** Scale of the random router init. */
  routerScale: number;
  /** Seed of every random choice. */
  seed: number;
  /** Output dtype. */
  dtype: OutputDType;
  /** Largest shard in bytes. */
  maxShardBytes: number;
  /** Output folder format. */
  format: OutputFormat;
  /** Replace an existing output folder. */
  force: boolean;
  /** Weight of the load-balancing loss in config.json. */
  routerAuxLossCoef: number;
  /** Weight of the router z-loss in config.json. */
  routerZLossCoef: number;
  /** Title of the model card, or null for the default. */
  name: string | null;
}

const invalid = (message: string): never => {
  throw new BamError("OPTIONS_INVALID", message);
};

/** What each option holds; a new option gets its line here (the compiler insists), and the recipe key below. */
type ValueKind = "paths" | "path" | "prompts" | "string" | "number" | "numbers" | "size" | "boolean";
const OPTION_KINDS: Readonly<Record<keyof UpcycleOptions, ValueKind>> = {
  seeds: "paths",
  output: "path",
  attention: "string",
  block: "string",
  experts: "number",
  dropRatio: "number",
  expertsPerToken: "number",
  normTopkProb: "boolean",
  weights: "numbers",
  sharedFrom: "path",
  routerInit: "string",
  prompts: "prompts",
  routerScale: "number",
  seed: "number",
  dtype: "string",
  maxShardSize: "size",
  format: "string",
  force: "boolean",
  routerAuxLossCoef: "number",
  routerZLossCoef: "number",
  name: "string",
};
/** Most seeds an upcycle takes; checked before any seed is opened. */
const MAX_SEEDS = 256;

const KIND_TEXT: Readonly<Record<ValueKind, string>> = {
  paths: "a list of folder paths",
  path: "a path",
  prompts: "a path or a mapping with experts: [...]",
  string: "a string",
  number: "a number",
  numbers: "a list of numbers",
  size: 'a number of bytes or a size such as "5GB"',
  boolean: "true or false",
};

/** A value as a message shows it: the type a caller can act on, and the value when short. */
function describeValue(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return `a list of ${value.length}`;
  if (typeof value === "string")
    return `the string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value)}`;
  if (typeof value === "object" || typeof value === "function")
    return `a${typeof value === "object" ? "n object" : " function"}`;
  return `${typeof value} ${String(value)}`;
}

const isPath = (value: unknown) => typeof value === "string" && value !== "" && !value.includes("\0");
const isPromptsMapping = (value: unknown): value is PromptsMapping =>
  value !== null &&
  typeof value === "object" &&
  !Array.isArray(value) &&
  Array.isArray((value as { experts?: unknown }).experts);

function hasKind(value: unknown, kind: ValueKind): boolean {
  switch (kind) {
    case "paths":
      return Array.isArray(value) && value.every(isPath);
    case "path":
      return isPath(value);
    case "prompts":
      return isPath(value) || isPromptsMapping(value);
    case "string":
      return typeof value === "string";
    case "number":
      return typeof value === "number";
    case "numbers":
      return Array.isArray(value) && value.every((v) => typeof v === "number");
    case "size":
      return typeof value === "number" || typeof value === "string";
    case "boolean":
      return typeof value === "boolean";
  }
}

/** Edit distance, for "did you mean": option names are short, so the quadratic table is nothing. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++)
      row[j] = Math.min(previous[j]! + 1, row[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    previous = row;
  }
  return previous[b.length]!;
}

function closestName(key: string, names: readonly string[]): string | undefined {
  const lower = key.toLowerCase();
  let best: { name: string; distance: number } | undefined;
  for (const name of names) {
    const distance = editDistance(lower, name.toLowerCase());
    if (best === undefined || distance < best.distance) best = { name, distance };
  }
  return best !== undefined && best.distance <= Math.max(2, Math.floor(key.length / 4)) ? best.name : undefined;
}

/**
 * The one run-time check of what a caller passed, before any file is opened:
 * the API (TypeScript types do not reach JavaScript callers or YAML) and the
 * CLI both come through here. Unknown keys, wrong types and too many seeds
 * are OPTIONS_INVALID, named as the caller wrote them; ranges are checked by
 * resolveOptions once the seeds are known. A plan needs no output folder;
 * checkWriteOptions adds that check for a run that writes one.
 */
export function checkOptions(options: unknown): asserts options is UpcycleOptions {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    invalid(
      `upcycle options must be an object such as { seeds: ["base", "code"], output: "out" }, not ${describeValue(options)}`,
    );
  }
  const given = options as Record<string, unknown>;
  const names = Object.keys(OPTION_KINDS);
  for (const [key, value] of Object.entries(given)) {
    const kind = Object.hasOwn(OPTION_KINDS, key) ? OPTION_KINDS[key as keyof UpcycleOptions] : undefined;
    if (kind === undefined) {
      const near = closestName(key, names);
      return invalid(
        `unknown option "${key}"${near === undefined ? `; known options: ${names.join(", ")}` : `; did you mean "${near}"?`}`,
      );
    }
    if (value !== undefined && !hasKind(value, kind))
      invalid(`${key} must be ${KIND_TEXT[kind]}, not ${describeValue(value)}`);
  }
  if (!Array.isArray(given.seeds) || given.seeds.length === 0) invalid("seeds: name at least one seed folder");
  if ((given.seeds as unknown[]).length > MAX_SEEDS)
    invalid(`seeds: at most ${MAX_SEEDS} seed folders, not ${(given.seeds as unknown[]).length}`);
}

/** checkOptions, and an output folder named: what upcycle() checks before any file is opened. */
export function checkWriteOptions(options: unknown): asserts options is UpcycleOptions & { output: string } {
  checkOptions(options);
  if (options.output === undefined) invalid("output: name the output folder");
}

function oneOf<T extends string>(name: string, value: T | undefined, options: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  return options.includes(value)
    ? value
    : invalid(`${name} must be one of ${options.join(", ")}, not "${String(value)}"`);
}

function integer(name: string, value: number | undefined, min: number, max: number, fallback: number): number {
  if (value === undefined) return fallback;
  return Number.isInteger(value) && value >= min && value <= max
    ? value
    : invalid(`${name} must be an integer from ${min} to ${max}, not ${value}`);
}

function fraction(name: string, value: number | undefined, fallback: number, allowOne: boolean): number {
  if (value === undefined) return fallback;
  const ok = Number.isFinite(value) && value >= 0 && (allowOne ? value <= 1 : value < 1);
  return ok ? value : invalid(`${name} must be a number from 0 to ${allowOne ? "1" : "below 1"}, not ${value}`);
}

/**
 * Fills in defaults and checks ranges (after checkOptions). With one seed (sparse upcycling) the
 * defaults keep the seed's function: merged attention and the seed's own block.
 */
export function resolveOptions(options: UpcycleOptions, seedBlock: BlockKind): ResolvedOptions {
  checkOptions(options);
  const seedCount = options.seeds.length;
  if (options.experts !== undefined && seedCount > 1) {
    invalid(`experts is for sparse upcycling from one seed; with ${seedCount} seeds there is one expert per seed`);
  }
  const experts = seedCount === 1 ? integer("experts", options.experts, 1, 256, 1) : seedCount;
  const dropRatio = fraction("dropRatio", options.dropRatio, 0, false);
  if (dropRatio > 0 && seedCount > 1)
    invalid("dropRatio is Drop-Upcycling from one seed; name a single seed with experts: N");
  const expertsPerToken = integer("expertsPerToken", options.expertsPerToken, 1, experts, 1);
  const normTopkProb = options.normTopkProb ?? DEFAULT_NORM_TOPK_PROB;
  if (typeof normTopkProb !== "boolean") invalid(`normTopkProb must be true or false, not ${String(normTopkProb)}`);
  const weights = options.weights ?? new Array<number>(seedCount).fill(1);
  if (weights.length !== seedCount)
    invalid(`weights needs one weight per seed: ${seedCount} seeds, ${weights.length} weights`);
  if (weights.some((w) => !Number.isFinite(w) || w < 0) || weights.every((w) => w === 0)) {
    invalid("weights must be non-negative numbers, not all zero");
  }
  const weightSum = weights.reduce((a, b) => a + b, 0);
  // 1e308 + 1e308 overflows: every weight would normalise to 0 and every average to zeros.
  if (!Number.isFinite(weightSum))
    invalid(`weights add up to ${weightSum}; use smaller numbers (only their ratios matter)`);
  const maxShardBytes =
    typeof options.maxShardSize === "string" ? parseSize(options.maxShardSize) : (options.maxShardSize ?? 5e9);
  if (!Number.isSafeInteger(maxShardBytes) || maxShardBytes < 1)
    invalid(`maxShardSize must be a positive size, not ${String(options.maxShardSize)}`);
  const routerScale = options.routerScale ?? 0.1;
  if (!Number.isFinite(routerScale) || routerScale <= 0)
    invalid(`routerScale must be a positive number, not ${routerScale}`);
  const routerInit = oneOf("routerInit", options.routerInit, ROUTER_INITS, "random");
  const fromPrompts = PROMPT_ROUTER_INITS.includes(routerInit);
  if (fromPrompts && options.prompts === undefined)
    invalid(`routerInit "${routerInit}" needs prompts (a YAML file of prompts per expert)`);
  if (!fromPrompts && options.prompts !== undefined) invalid('prompts goes with routerInit "hidden" or "cheap-embed"');
  const sharedFrom = options.sharedFrom ?? null;
  if (sharedFrom !== null && (typeof sharedFrom !== "string" || sharedFrom === "" || sharedFrom.includes("\0")))
    invalid("sharedFrom must be a model folder");
  if (sharedFrom !== null && options.weights !== undefined)
    invalid("weights average the shared tensors, sharedFrom copies them from one model; give one of them");
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) invalid(`seed must be a non-negative integer, not ${seed}`);
  const coefficient = (name: string, value: number | undefined, fallback: number) =>
    value === undefined
      ? fallback
      : Number.isFinite(value) && value >= 0
        ? value
        : invalid(`${name} must be a non-negative number, not ${value}`);
  return {
    seeds: [...options.seeds], // copies: the plan that holds these is frozen, the caller's own objects are not
    output: options.output ?? null,
    attention: oneOf("attention", options.attention, ATTENTION_EXPERTS, seedCount > 1 ? "moa" : "merged"),
    block: oneOf("block", options.block, BLOCK_KINDS, seedCount > 1 ? "parallel" : seedBlock),
    experts,
    dropRatio,
    expertsPerToken,
    normTopkProb,
    weights: weights.map((w) => w / weightSum),
    sharedFrom,
    routerInit,
    prompts:
      options.prompts === undefined || typeof options.prompts === "string"
        ? (options.prompts ?? null)
        : promptsCopy(options.prompts),
    routerScale,
    seed,
    dtype: oneOf("dtype", options.dtype, OUTPUT_DTYPES, "keep"),
    maxShardBytes,
    format: oneOf("format", options.format, OUTPUT_FORMATS, "bam"),
    force: options.force ?? false,
    routerAuxLossCoef: coefficient("routerAuxLossCoef", options.routerAuxLossCoef, 0.01),
    routerZLossCoef: coefficient("routerZLossCoef", options.routerZLossCoef, 0.001),
    name: modelName(options.name),
  };
}

/** A prompts mapping as plain data, which a plan holds (src/upcycle/router-init.ts checks what it says). */
function promptsCopy(prompts: PromptsMapping): PromptsMapping {
  try {
    return structuredClone(prompts);
  } catch {
    return invalid("prompts must be plain data: a mapping with experts: [{ positive_prompts: [...] }, ...]");
  }
}

/** The card's title: one line of printable text (it becomes a Markdown heading). */
function modelName(name: string | undefined): string | null {
  if (name === undefined) return null;
  const title = name.trim();
  if (title === "" || title.length > 200 || /[\p{Cc}\p{Zl}\p{Zp}]/u.test(title))
    invalid(`name must be one line of at most 200 printable characters, not ${JSON.stringify(name).slice(0, 60)}`);
  return title;
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
  "shared-from": "sharedFrom",
  "router-init": "routerInit",
  prompts: "prompts",
  "router-scale": "routerScale",
  seed: "seed",
  dtype: "dtype",
  "max-shard-size": "maxShardSize",
  format: "format",
  "router-aux-loss-coef": "routerAuxLossCoef",
  "router-z-loss-coef": "routerZLossCoef",
  name: "name",
};

/** A recipe (or a prompts file) is a screenful of options; this is far beyond any. */
const MAX_RECIPE_BYTES = 16_000_000;
/** Nesting a recipe or prompts file needs is 3 or 4 levels; the parser and toJS recurse, so depth is bounded before them. */
const MAX_YAML_DEPTH = 64;

/**
 * The YAML nesting depth of `text`, bounded before the parser builds and
 * walks its tree (which recurses): flow collections counted exactly by the
 * lexer (brackets inside quotes or comments are not tokens), block
 * collections bounded by a line's indent plus its leading "- " and "? "
 * indicators, halved since a block level takes at least two columns or one
 * indicator and a space. Stops at the first line past `limit`.
 */
function yamlDepth(text: string, limit: number): number {
  let flow = 0;
  let deepest = 0;
  let lineStart = true;
  let columns = 0;
  for (const token of new Lexer().lex(text)) {
    if (token === "[" || token === "{") flow++;
    else if ((token === "]" || token === "}") && flow > 0) flow--;
    if (token === "\n") {
      lineStart = true;
      columns = 0;
    } else if (lineStart && (/^[ \t]+$/.test(token) || token === "-" || token === "?")) {
      columns += token.length + (token.length === 1 && token !== " " ? 1 : 0);
    } else {
      lineStart = false;
    }
    deepest = Math.max(deepest, flow + Math.ceil(columns / 2));
    if (deepest > limit) break;
  }
  return deepest;
}

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
  if (yamlDepth(text, MAX_YAML_DEPTH) > MAX_YAML_DEPTH) {
    throw new BamError(
      "RECIPE_INVALID",
      `${path}: nested more than ${MAX_YAML_DEPTH} levels deep; a recipe or prompts file needs three or four`,
    );
  }
  try {
    // logLevel "error" keeps toJS quiet about a list or mapping used as a key: it becomes a string,
    // which the callers refuse as an unknown key.
    const document = YAML.parseDocument(text, { logLevel: "error" });
    const problem = document.errors[0] ?? document.warnings[0];
    if (problem !== undefined) throw problem;
    return document.toJS({ maxAliasCount: 100 });
  } catch (error) {
    throw new BamError(
      "RECIPE_INVALID",
      `${path}: not valid YAML (${(error as Error).message.split("\n")[0]!.replace(/:$/, "")})`,
    );
  }
}

/**
 * A model named in a recipe: a path relative to the recipe's folder when
 * one exists there; else a Hugging Face id owner/name[@revision] stays an
 * id; else the path (reported missing when opened). The hub's rule
 * (src/hub), with the recipe's folder in place of the current one.
 */
function recipeModel(value: string, recipePath: string): string {
  const local = resolve(dirname(recipePath), value);
  return existsSync(local) || parseRepoRef(value) === undefined ? local : value;
}

/**
 * Reads a recipe file into options; flags given on the command line override
 * it. Paths (seeds, shared-from, a prompts file) are relative to the recipe's
 * folder; prompts may also be inline, the prompts file's mapping itself.
 */
export async function readRecipe(path: string): Promise<Partial<UpcycleOptions>> {
  const parsed = await readYamlFile(path);
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new BamError("RECIPE_INVALID", `${path}: must be a mapping of option: value`);
  }
  if (isMergekitConfig(parsed)) return fromMergekit(parsed as Record<string, unknown>, path);
  const options: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    const name = Object.hasOwn(RECIPE_KEYS, key) ? RECIPE_KEYS[key] : undefined; // not "constructor" or "toString" from the prototype
    if (name === undefined) {
      throw new BamError(
        "RECIPE_INVALID",
        `${path}: unknown key "${key}"; known keys: ${Object.keys(RECIPE_KEYS).join(", ")}`,
      );
    }
    if (name === "prompts" && isPromptsMapping(value)) {
      options.prompts = value;
      continue;
    }
    const wantsList = name === "seeds" || name === "weights";
    const typeOk = wantsList ? Array.isArray(value) : ["string", "number", "boolean"].includes(typeof value);
    if (!typeOk)
      throw new BamError(
        "RECIPE_INVALID",
        `${path}: "${key}" must be ${wantsList ? "a list" : name === "prompts" ? "a path or a mapping with experts: [...]" : "a single value"}`,
      );
    const item = name === "seeds" ? "string" : "number";
    if (wantsList && !(value as unknown[]).every((v) => typeof v === item)) {
      throw new BamError(
        "RECIPE_INVALID",
        `${path}: "${key}" must be a list of ${name === "seeds" ? "folder names" : "numbers"}`,
      );
    }
    options[name] =
      name === "seeds"
        ? (value as string[]).map((seed) => (seed === "" ? seed : recipeModel(seed, path)))
        : name === "sharedFrom" && typeof value === "string" && value !== ""
          ? recipeModel(value, path)
          : name === "prompts" && typeof value === "string" && value !== ""
            ? resolve(dirname(path), value)
            : value;
  }
  return options as Partial<UpcycleOptions>;
}

/**
 * Each option's flag, for `bam upcycle`'s wording of the library's messages
 * (expertsPerToken -> --experts-per-token): the recipe keys are the flags.
 * seeds are positional: "seeds: name at least one seed folder" stays as it is.
 */
export const UPCYCLE_FLAGS: ReadonlyMap<string, string> = new Map([
  ...Object.entries(RECIPE_KEYS)
    .filter(([key]) => key !== "seeds")
    .map(([key, name]) => [name, `--${key}`] as [string, string]),
  ["force", "--force"],
]);

/**
 * The recipe written into the output folder: every resolved option, in
 * recipe keys, reproducing the model from any folder: seeds and shared-from
 * as absolute paths (a Hugging Face id, which names no local path, as it is),
 * and the experts' prompts (as read) inline.
 */
export function recipeYaml(options: ResolvedOptions, prompts?: readonly ExpertPrompts[]): string {
  const absolute = (model: string) => (existsSync(model) ? resolve(model) : model); // the hub's rule: an existing path is a folder
  const byKey: Record<string, unknown> = {};
  for (const [key, name] of Object.entries(RECIPE_KEYS)) {
    byKey[key] = name === "maxShardSize" ? options.maxShardBytes : options[name as keyof ResolvedOptions];
  }
  byKey.seeds = options.seeds.map(absolute);
  if (options.seeds.length > 1) delete byKey.experts; // implied by the seeds, and refused beside them
  if (options.prompts === null)
    delete byKey.prompts; // only with --router-init hidden, and refused without it
  else if (prompts !== undefined) {
    byKey.prompts = {
      experts: prompts.map((p) => ({
        positive_prompts: p.positive,
        ...(p.negative.length > 0 ? { negative_prompts: p.negative } : {}),
      })),
    };
  }
  if (options.name === null) delete byKey.name;
  if (options.sharedFrom === null) delete byKey["shared-from"];
  else {
    byKey["shared-from"] = absolute(options.sharedFrom);
    delete byKey.weights; // unused, and refused beside it
  }
  return `${RECIPE_MARKER}: \`bam upcycle --recipe recipe.yaml\` reproduces this model\n${YAML.stringify(byKey)}`;
}
