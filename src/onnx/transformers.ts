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
import { BamError } from "../errors.js";

async function transformersJs() {
  const library = await import("@huggingface/transformers");
  library.env.allowRemoteModels = false;
  library.env.allowLocalModels = true;
  library.env.useFSCache = false;
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

export interface GenerationSettings {
  maxNewTokens: number;
  /** 0 = greedy. */
  temperature: number;
  topP: number;
  /** Seeds transformers.js's sampler; null leaves it seeded from the OS. */
  seed: number | null;
  /** Each piece of text as soon as it decodes. */
  onText?: (text: string) => void;
}

export interface Generation {
  /** Prompt and generated token ids. */
  promptIds: number[];
  newIds: number[];
  text: string;
  seconds: number;
}

/** Generates from `prompt` with the exported folder `folder` (see prepareOnnx), streaming text. */
export async function generateText(folder: string, prompt: string, settings: GenerationSettings): Promise<Generation> {
  const tokenizer = await loadTokenizer(folder);
  const { AutoModelForCausalLM, random, TextStreamer } = await transformersJs();
  let model;
  try {
    model = await AutoModelForCausalLM.from_pretrained(resolve(folder), { local_files_only: true, device: "cpu", dtype: "fp32" });
  } catch (error) {
    throw new BamError("IO_ERROR", `${folder}: transformers.js cannot load the model (${firstLine(error)})`, { cause: error });
  }
  try {
    if (settings.seed !== null) random.seed(settings.seed);
    const inputs = tokenizer(prompt);
    const promptIds = Array.from(inputs.input_ids.data as BigInt64Array, Number);
    const streamer = settings.onText ? new TextStreamer(tokenizer, { skip_prompt: true, skip_special_tokens: true, callback_function: settings.onText }) : undefined;
    const started = performance.now();
    const output = (await model.generate({
      ...inputs,
      max_new_tokens: settings.maxNewTokens,
      do_sample: settings.temperature > 0,
      ...(settings.temperature > 0 ? { temperature: settings.temperature, top_p: settings.topP } : {}),
      streamer,
    })) as { data: BigInt64Array };
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
