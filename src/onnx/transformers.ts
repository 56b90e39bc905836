/**
 * The bridge to @huggingface/transformers (transformers.js): the model's own
 * tokenizer.json, and generation with its KV cache on an exported folder.
 * Local files only: nothing is ever fetched from a hub. The library takes a
 * second to import, so it is imported on first use.
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { PreTrainedTokenizer } from "@huggingface/transformers";
import { BamError, isBamError } from "../errors.js";
import type { Generation, GenerationSettings } from "./generation.js";
import { importEngine } from "./optional.js";

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
    throw new BamError("NOT_A_CHECKPOINT", `${dir}: no tokenizer.json; text needs the model's tokenizer (use --ids with token ids instead)`);
  }
  const { AutoTokenizer, PreTrainedTokenizer } = await transformersJs();
  try {
    if (existsSync(join(dir, "tokenizer_config.json"))) return await AutoTokenizer.from_pretrained(resolve(dir), { local_files_only: true });
    return new PreTrainedTokenizer(JSON.parse(await readFile(file, "utf8")), {}); // AutoTokenizer insists on the config
  } catch (error) {
    throw new BamError("CONFIG_INVALID", `${dir}: transformers.js cannot load the tokenizer (${firstLine(error)})`, { cause: error });
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
  if (typeof prompt !== "string" || prompt === "") invalid(`prompt must be a non-empty string, not ${typeof prompt === "string" ? "empty" : typeof prompt}`);
  if (settings === null || typeof settings !== "object") invalid("generation settings must be an object { maxNewTokens, temperature, topP, seed }");
  const { maxNewTokens, temperature, topP, seed } = settings;
  if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 1) invalid(`maxNewTokens must be a positive integer, not ${String(maxNewTokens)}`);
  if (typeof temperature !== "number" || !Number.isFinite(temperature) || temperature < 0) invalid(`temperature must be 0 or more, not ${String(temperature)}`);
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1)) invalid(`topP must be in (0, 1], not ${String(topP)}`);
  if (seed !== null && !(Number.isSafeInteger(seed) && seed >= 0)) invalid(`seed must be a non-negative integer or null, not ${String(seed)}`);
}

/** Positions of an exported folder's model (its config.json, as prepareOnnx writes it). */
async function modelPositions(folder: string): Promise<number> {
  const file = join(folder, "config.json");
  let positions: unknown;
  try {
    positions = (JSON.parse(await readFile(file, "utf8")) as { max_position_embeddings?: unknown }).max_position_embeddings;
  } catch (error) {
    throw new BamError("CONFIG_INVALID", `${file}: cannot read max_position_embeddings (${firstLine(error)}); export the model again`, { cause: error });
  }
  if (!Number.isSafeInteger(positions) || (positions as number) < 1) throw new BamError("CONFIG_INVALID", `${file}: max_position_embeddings must be a positive integer`);
  return positions as number;
}

/**
 * Generates from `prompt` with the exported folder `folder` (see prepareOnnx), streaming text
 * (generate.ts's generateText takes the model folder itself).
 * The prompt and maxNewTokens together must fit the model's positions: checked on the
 * prompt's tokens before the model is loaded, so a long prompt costs nothing.
 */
export async function generateFromExport(folder: string, prompt: string, settings: GenerationSettings): Promise<Generation> {
  checkGeneration(prompt, settings);
  const positions = await modelPositions(folder);
  const tokenizer = await loadTokenizer(folder);
  const inputs = tokenizer(prompt);
  const promptIds = Array.from(inputs.input_ids.data as BigInt64Array, Number);
  if (promptIds.length === 0) invalid("prompt encodes to no tokens; give some text");
  if (promptIds.length + settings.maxNewTokens > positions) {
    invalid(promptIds.length >= positions
      ? `prompt is ${promptIds.length} tokens, past the ${positions} positions of the model; shorten it`
      : `prompt (${promptIds.length} tokens) and maxNewTokens (${settings.maxNewTokens}) exceed the ${positions} positions of the model; ask for at most ${positions - promptIds.length} new tokens`);
  }
  const { AutoModelForCausalLM, random, TextStreamer } = await transformersJs();
  const { signal } = settings;
  const interrupted = () => new BamError("ABORTED", "generation interrupted");
  if (signal?.aborted) throw interrupted();
  let model;
  try {
    model = await AutoModelForCausalLM.from_pretrained(resolve(folder), { local_files_only: true, device: "cpu", dtype: "fp32", session_options: { logSeverityLevel: 4 } });
  } catch (error) {
    throw new BamError("IO_ERROR", `${folder}: transformers.js cannot load the model (${firstLine(error)})`, { cause: error });
  }
  try {
    if (settings.seed !== null) random.seed(settings.seed);
    // The streamer sees every new token: the one place between tokens where a signal can stop generation.
    const streamer = new TextStreamer(tokenizer, {
      skip_prompt: true,
      skip_special_tokens: true,
      callback_function: (text: string) => settings.onText?.(text),
    });
    const put = streamer.put.bind(streamer);
    streamer.put = (value) => {
      if (signal?.aborted) throw interrupted();
      put(value);
    };
    const started = performance.now();
    let output: { data: BigInt64Array };
    try {
      output = (await model.generate({
        ...inputs,
        max_new_tokens: settings.maxNewTokens,
        do_sample: settings.temperature > 0,
        ...(settings.temperature > 0 ? { temperature: settings.temperature, top_p: settings.topP } : {}),
        streamer,
      })) as { data: BigInt64Array };
    } catch (error) {
      if (signal?.aborted || isBamError(error, "ABORTED")) throw interrupted();
      throw new BamError("IO_ERROR", `${folder}: onnxruntime failed while generating (${firstLine(error)})`, { cause: error });
    }
    const seconds = (performance.now() - started) / 1000;
    const newIds = Array.from(output.data, Number).slice(promptIds.length);
    return { promptIds, newIds, text: tokenizer.decode(newIds, { skip_special_tokens: true }), seconds };
  } finally {
    await model.dispose();
  }
}

function firstLine(error: unknown): string {
  return String((error as Error)?.message ?? error).split("\n")[0]!;
}
