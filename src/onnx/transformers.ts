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
import type { Generation, GenerationSettings } from "./generation.js";
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
 * before exporting one; messages name the settings as the API spells them.
 */
export function checkGeneration(prompt: unknown, settings: GenerationSettings): void {
  if (typeof prompt !== "string" || prompt === "")
    invalid(`prompt must be a non-empty string, not ${typeof prompt === "string" ? "empty" : typeof prompt}`);
  if (settings === null || typeof settings !== "object")
    invalid("generation settings must be an object { maxNewTokens, temperature, topK, topP, seed }");
  const { maxNewTokens, temperature, topK, topP, seed } = settings;
  if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 1)
    invalid(`maxNewTokens must be a positive integer, not ${String(maxNewTokens)}`);
  if (typeof temperature !== "number" || !Number.isFinite(temperature) || temperature < 0)
    invalid(`temperature must be 0 or more, not ${String(temperature)}`);
  if (!Number.isSafeInteger(topK) || topK < 0)
    invalid(`topK must be 0 (all tokens) or a positive integer, not ${String(topK)}`);
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1)) invalid(`topP must be in (0, 1], not ${String(topP)}`);
  if (seed !== null && !(Number.isSafeInteger(seed) && seed >= 0))
    invalid(`seed must be a non-negative integer or null, not ${String(seed)}`);
}

/**
 * A key of one of an export's JSON files (config.json, generation_config.json);
 * undefined where the key, or an optional file, is absent. A file that cannot
 * be read as a JSON object is CONFIG_INVALID, naming the key sought and `advice`.
 */
async function jsonKey(file: string, key: string, advice: string, optional: boolean): Promise<unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, "utf8"));
  } catch (error) {
    if (optional && (error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new BamError("CONFIG_INVALID", `${file}: cannot read ${key} (${firstLine(error)}); ${advice}`, {
      cause: error,
    });
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed))
    throw new BamError("CONFIG_INVALID", `${file}: cannot read ${key} (not a JSON object); ${advice}`);
  return (parsed as Record<string, unknown>)[key];
}

/** Positions of an exported folder's model (its config.json, as prepareOnnx writes it). */
async function modelPositions(folder: string): Promise<number> {
  const file = join(folder, "config.json");
  const positions = await jsonKey(file, "max_position_embeddings", "export the model again", false);
  if (!Number.isSafeInteger(positions) || (positions as number) < 1)
    throw new BamError("CONFIG_INVALID", `${file}: max_position_embeddings must be a positive integer`);
  return positions as number;
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
  settings: GenerationSettings,
): Promise<Generation> {
  checkGeneration(prompt, settings);
  const positions = await modelPositions(folder);
  const tokenizer = await loadTokenizer(folder);
  const inputs = tokenizer(prompt);
  const promptIds = Array.from(inputs.input_ids.data as BigInt64Array, Number);
  if (promptIds.length === 0) invalid("prompt encodes to no tokens; give some text");
  if (promptIds.length + settings.maxNewTokens > positions) {
    invalid(
      promptIds.length >= positions
        ? `prompt is ${promptIds.length} tokens, past the ${positions} positions of the model; shorten it`
        : `prompt (${promptIds.length} tokens) and maxNewTokens (${settings.maxNewTokens}) exceed the ${positions} positions of the model; ask for at most ${positions - promptIds.length} new tokens`,
    );
  }
  const { TextStreamer } = await transformersJs();
  const { signal } = settings;
  const interrupted = () => new BamError("ABORTED", "generation interrupted");
  if (signal?.aborted) throw interrupted();
  const stop = await stopTokens(folder);
  const penalty = await repetitionPenalty(folder);
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
    return { promptIds, newIds, text: tokenizer.decode(newIds, { skip_special_tokens: true }), seconds };
  } finally {
    await decoder.close();
  }
}

/** The model's generation_config.json `repetition_penalty` (1: none), which transformers applies to every generation. */
async function repetitionPenalty(folder: string): Promise<number> {
  const file = join(folder, "generation_config.json");
  const penalty = await jsonKey(file, "repetition_penalty", "fix the model's generation_config.json", true);
  if (penalty == null) return 1;
  if (typeof penalty !== "number" || !(penalty > 0 && Number.isFinite(penalty)))
    throw new BamError(
      "CONFIG_INVALID",
      `${file}: repetition_penalty must be a positive number, not ${String(penalty)}`,
    );
  return penalty;
}

/** transformers' repetition penalty: the logit of every token seen so far, divided by `penalty` above 0, multiplied below. */
export function penalise(logits: Float32Array, seen: readonly number[], penalty: number): void {
  for (const id of new Set(seen)) {
    const x = logits[id]!;
    logits[id] = x < 0 ? x * penalty : x / penalty;
  }
}

/** The tokens that end generation: eos_token_id of generation_config.json, else of config.json (a number or a list). */
async function stopTokens(folder: string): Promise<Set<number>> {
  for (const name of ["generation_config.json", "config.json"]) {
    const file = join(folder, name);
    const eos = await jsonKey(file, "eos_token_id", "export the model again", true);
    if (eos == null) continue;
    const ids = Array.isArray(eos) ? eos : [eos];
    if (!ids.every((id) => Number.isSafeInteger(id)))
      throw new BamError("CONFIG_INVALID", `${file}: eos_token_id must be a token id or a list of them`);
    return new Set(ids as number[]);
  }
  return new Set();
}

function firstLine(error: unknown): string {
  return String((error as Error)?.message ?? error).split("\n")[0]!;
}
