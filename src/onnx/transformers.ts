/**
 * The bridge to @huggingface/transformers (transformers.js): the model's own
 * tokenizer.json and its text streamer; generation runs our own loop (decoder.ts).
 * Local files only: nothing is ever fetched from a hub. The library takes a
 * second to import, so it is imported on first use.
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { PreTrainedTokenizer } from "@huggingface/transformers";
import { BamError } from "../errors.js";
import { DEFAULT_GENERATION, type Generation, type GenerationSettings } from "./generation.js";
import { argmax, Decoder, sample, uniformRandom } from "./decoder.js";
import { importEngine } from "./optional.js";
import { GENERATE_FILE } from "./write.js";

async function transformersJs() {
  const library = await importEngine("@huggingface/transformers", () => import("@huggingface/transformers"));
  library.env.allowRemoteModels = false;
  library.env.allowLocalModels = true;
  library.env.useFSCache = false;
  // onnxruntime's own warnings (several screens with colour codes) are not for our users; errors come back as exceptions we word.
  if (library.env.backends.onnx !== undefined) library.env.backends.onnx.logLevel = "fatal";
  return library;
}

/** The tokenizer of a model folder: tokenizer.json, with tokenizer_config.json when there is one. */
export async function loadTokenizer(dir: string): Promise<PreTrainedTokenizer> {
  const file = join(dir, "tokenizer.json");
  if (!existsSync(file)) {
    throw new BamError(
      "NOT_A_CHECKPOINT",
      `${dir}: no tokenizer.json; text needs the model's tokenizer (use --ids with token ids instead)`,
    );
  }
  const { AutoTokenizer, PreTrainedTokenizer } = await transformersJs();
  try {
    if (existsSync(join(dir, "tokenizer_config.json")))
      return await AutoTokenizer.from_pretrained(resolve(dir), { local_files_only: true });
    return new PreTrainedTokenizer(JSON.parse(await readFile(file, "utf8")), {}); // AutoTokenizer insists on the config
  } catch (error) {
    throw new BamError("CONFIG_INVALID", `${dir}: transformers.js cannot load the tokenizer (${firstLine(error)})`, {
      cause: error,
    });
  }
}

const invalid = (message: string): never => {
  throw new BamError("OPTIONS_INVALID", message);
};

/**
 * The checks of generateText that need no model, for callers that want them
 * before exporting one: the prompt, and each setting given (one left out, or
 * undefined, comes from the model or DEFAULT_GENERATION); messages name the
 * settings as the API spells them.
 */
export function checkGeneration(prompt: unknown, settings: Partial<GenerationSettings>): void {
  if (typeof prompt !== "string" || prompt === "")
    invalid(`prompt must be a non-empty string, not ${typeof prompt === "string" ? "empty" : typeof prompt}`);
  if (settings === null || typeof settings !== "object")
    invalid("generation settings must be an object { maxNewTokens, temperature, topK, topP, seed }");
  for (const [key, value] of Object.entries(settings)) {
    const problem = value === undefined ? undefined : SETTING_CHECKS[key as keyof typeof SETTING_CHECKS]?.(value);
    if (problem !== undefined) invalid(`${key} must be ${problem}, not ${String(value)}`);
  }
}

/** Each numeric setting's rule: undefined when `value` keeps it, else what it must be. */
const SETTING_CHECKS = {
  maxNewTokens: (value: unknown) =>
    Number.isSafeInteger(value) && (value as number) >= 1 ? undefined : "a positive integer",
  temperature: (value: unknown) =>
    typeof value === "number" && Number.isFinite(value) && value >= 0 ? undefined : "0 or more",
  topK: (value: unknown) =>
    Number.isSafeInteger(value) && (value as number) >= 0 ? undefined : "0 (all tokens) or a positive integer",
  topP: (value: unknown) => (typeof value === "number" && value > 0 && value <= 1 ? undefined : "in (0, 1]"),
  seed: (value: unknown) =>
    value === null || (Number.isSafeInteger(value) && (value as number) >= 0)
      ? undefined
      : "a non-negative integer or null",
} as const;

/**
 * One of an export's JSON files (config.json, generation_config.json) as an
 * object; undefined for an optional file that is absent. A file that cannot be
 * read as a JSON object is CONFIG_INVALID, with `advice`.
 */
async function readJsonObject(
  file: string,
  advice: string,
  optional: boolean,
): Promise<Record<string, unknown> | undefined> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, "utf8"));
  } catch (error) {
    if (optional && (error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new BamError("CONFIG_INVALID", `${file}: cannot read it (${firstLine(error)}); ${advice}`, { cause: error });
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed))
    throw new BamError("CONFIG_INVALID", `${file}: not a JSON object; ${advice}`);
  return parsed as Record<string, unknown>;
}

/** The settings a model's generation_config.json gives generation, as transformers' generate takes them. */
type ModelSettings = Partial<Pick<GenerationSettings, "maxNewTokens" | "temperature" | "topK" | "topP">>;

/** What an exported folder's config.json and generation_config.json tell generation (each file read once). */
interface ModelGeneration {
  positions: number;
  /** Tokens that end generation: eos_token_id of generation_config.json, else of config.json (a number or a list). */
  stop: Set<number>;
  /** generation_config.json's repetition_penalty (1: none), which transformers applies to every generation. */
  penalty: number;
  /**
   * With do_sample true: its temperature (default 1), top_k (50) and top_p (1), as transformers samples;
   * without, none (greedy, transformers' default); max_new_tokens where it sets one.
   */
  settings: ModelSettings;
}

async function modelGeneration(folder: string): Promise<ModelGeneration> {
  const configFile = join(folder, "config.json");
  const config = (await readJsonObject(configFile, "export the model again", false))!;
  const positions = config.max_position_embeddings;
  if (!Number.isSafeInteger(positions) || (positions as number) < 1)
    throw new BamError("CONFIG_INVALID", `${configFile}: max_position_embeddings must be a positive integer`);
  const file = join(folder, "generation_config.json");
  const generation = (await readJsonObject(file, "fix the model's generation_config.json", true)) ?? {};
  const wrong = (key: string, what: string): never => {
    throw new BamError("CONFIG_INVALID", `${file}: ${key} must be ${what}, not ${JSON.stringify(generation[key])}`);
  };
  const eosFile = generation.eos_token_id != null ? file : configFile;
  const eos = generation.eos_token_id ?? config.eos_token_id;
  const eosIds = eos == null ? [] : Array.isArray(eos) ? eos : [eos];
  if (!eosIds.every((id) => Number.isSafeInteger(id)))
    throw new BamError("CONFIG_INVALID", `${eosFile}: eos_token_id must be a token id or a list of them`);
  const penalty = generation.repetition_penalty ?? 1;
  if (typeof penalty !== "number" || !(penalty > 0 && Number.isFinite(penalty)))
    wrong("repetition_penalty", "a positive number");
  const settings: ModelSettings = {};
  if (generation.max_new_tokens != null) {
    if (SETTING_CHECKS.maxNewTokens(generation.max_new_tokens)) wrong("max_new_tokens", "a positive integer");
    settings.maxNewTokens = generation.max_new_tokens as number;
  }
  if (generation.do_sample != null && typeof generation.do_sample !== "boolean") wrong("do_sample", "true or false");
  if (generation.do_sample === true) {
    // absent: transformers' defaults; null: that filter off (temperature 1, every token, all the mass)
    const setting = (key: string, absent: number, off: number) =>
      generation[key] === undefined ? absent : generation[key] === null ? off : generation[key];
    const [temperature, topK, topP] = [setting("temperature", 1, 1), setting("top_k", 50, 0), setting("top_p", 1, 1)];
    // transformers refuses a temperature of 0 when sampling; greedy is do_sample false
    if (!(typeof temperature === "number" && temperature > 0 && Number.isFinite(temperature)))
      wrong("temperature", "a positive number when do_sample is true");
    if (SETTING_CHECKS.topK(topK)) wrong("top_k", "0 (all tokens) or a positive integer");
    if (SETTING_CHECKS.topP(topP)) wrong("top_p", "in (0, 1]");
    Object.assign(settings, { temperature, topK, topP });
  }
  return { positions: positions as number, stop: new Set(eosIds as number[]), penalty: penalty as number, settings };
}

/**
 * The settings a generation runs with: those given (an undefined one is not
 * given), then the model's generation_config.json, then DEFAULT_GENERATION.
 */
function resolveSettings(given: Partial<GenerationSettings>, model: ModelSettings): GenerationSettings {
  const defined = Object.fromEntries(Object.entries(given).filter(([, value]) => value !== undefined));
  return { ...DEFAULT_GENERATION, ...model, ...defined };
}

/**
 * Generates from `prompt` with the exported folder `folder` (see prepareOnnx), streaming text
 * (generate.ts's generateText takes the model folder itself).
 * The prompt and maxNewTokens together must fit the model's positions: checked on the
 * prompt's tokens before the model is loaded, so a long prompt costs nothing.
 */
export async function generateFromExport(
  folder: string,
  prompt: string,
  given: Partial<GenerationSettings>,
): Promise<Generation> {
  checkGeneration(prompt, given);
  const model = await modelGeneration(folder);
  const settings = resolveSettings(given, model.settings);
  const { positions, stop, penalty } = model;
  const tokenizer = await loadTokenizer(folder);
  const inputs = tokenizer(prompt);
  const promptIds = Array.from(inputs.input_ids.data as BigInt64Array, Number);
  if (promptIds.length === 0) invalid("prompt encodes to no tokens; give some text");
  if (promptIds.length + settings.maxNewTokens > positions) {
    const budget =
      given.maxNewTokens === undefined && model.settings.maxNewTokens !== undefined
        ? "the max_new_tokens of the model's generation_config.json" // not a maxNewTokens the caller never gave
        : "maxNewTokens";
    invalid(
      promptIds.length >= positions
        ? `prompt is ${promptIds.length} tokens, past the ${positions} positions of the model; shorten it`
        : `prompt (${promptIds.length} tokens) and ${budget} (${settings.maxNewTokens}) exceed the ${positions} positions of the model; ask for at most ${positions - promptIds.length} new tokens with maxNewTokens`,
    );
  }
  const { TextStreamer } = await transformersJs();
  const { signal } = settings;
  const interrupted = () => new BamError("ABORTED", "generation interrupted");
  if (signal?.aborted) throw interrupted();
  const decoder = await Decoder.open(join(folder, "onnx", GENERATE_FILE));
  try {
    const streamer = new TextStreamer(tokenizer, {
      skip_prompt: false,
      skip_special_tokens: true,
      callback_function: (text: string) => settings.onText?.(text),
    });
    const random = uniformRandom(settings.seed);
    const newIds: number[] = [];
    const started = performance.now();
    while (newIds.length < settings.maxNewTokens) {
      // between tokens: the one place a signal stops generation
      if (signal?.aborted) throw interrupted();
      const logits = await decoder.step(newIds.length === 0 ? promptIds : [newIds.at(-1)!]);
      if (penalty !== 1) penalise(logits, [...promptIds, ...newIds], penalty);
      const next =
        settings.temperature > 0
          ? sample(logits, settings.temperature, settings.topK, settings.topP, random)
          : argmax(logits);
      newIds.push(next);
      streamer.put([[BigInt(next)]]);
      if (stop.has(next)) break;
    }
    streamer.end();
    const seconds = (performance.now() - started) / 1000;
    const { maxNewTokens, temperature, topK, topP, seed } = settings;
    return {
      promptIds,
      newIds,
      text: tokenizer.decode(newIds, { skip_special_tokens: true }),
      seconds,
      settings: { maxNewTokens, temperature, topK, topP, seed },
      modelSettings: (Object.keys(model.settings) as Array<keyof ModelSettings>).filter(
        (key) => given[key] === undefined,
      ),
    };
  } finally {
    await decoder.close();
  }
}

/** transformers' repetition penalty: the logit of every token seen so far, divided by `penalty` above 0, multiplied below. */
export function penalise(logits: Float32Array, seen: readonly number[], penalty: number): void {
  for (const id of new Set(seen)) {
    const x = logits[id]!;
    logits[id] = x < 0 ? x * penalty : x / penalty;
  }
}

function firstLine(error: unknown): string {
  return String((error as Error)?.message ?? error).split("\n")[0]!;
}
