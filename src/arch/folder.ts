/**
 * The side files of a Hugging Face model folder: what travels with the
 * weights (the tokenizer and the generation defaults), in one list for every
 * path a model folder takes: a Hub seed downloads them (src/hub), the
 * upcycle copies the first seed's into its output, and the ONNX export
 * copies the model's into its cache folder (transformers.js reads them
 * there). Each is checked before it is copied, and a folder without a
 * generation_config.json gets one written from the config's token ids.
 */
import { copyFile, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ioError } from "../errors.js";
import { checkInsideFolder, openRegularFile } from "../safetensors/index.js";

const GENERATION_CONFIG = "generation_config.json";
/** The tokenizer's files (tokenizers, sentencepiece, GPT-2 BPE, v5 chat templates) and generation_config.json. */
const SIDE_FILES: ReadonlySet<string> = new Set([
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  GENERATION_CONFIG,
]);
/** The special-token ids of config.json that generation needs. */
const TOKEN_ID_KEYS = ["bos_token_id", "eos_token_id", "pad_token_id"] as const;

/** Whether a file of a model folder (by name) is a side file. */
export function isSideFile(name: string): boolean {
  return SIDE_FILES.has(name);
}

/**
 * The side files in `dir`, sorted, checked before anything is written: each
 * must be a regular file inside the folder (a link to a file of the user's
 * elsewhere would be copied along; a FIFO or /dev/zero would hang the copy
 * or fill the disk).
 */
export async function sideFiles(dir: string): Promise<string[]> {
  const names = (
    await readdir(dir).catch((error: unknown) => {
      throw ioError(dir, error);
    })
  )
    .filter(isSideFile)
    .sort();
  for (const name of names) {
    const file = join(dir, name);
    await checkInsideFolder(dir, file);
    const { handle } = await openRegularFile(file).catch((error: unknown) => {
      throw ioError(file, error);
    });
    await handle.close();
  }
  return names;
}

/**
 * Copies `names` (from sideFiles(from)) into `to`; without a
 * generation_config.json among them, writes one holding the token ids of
 * `config` (the source's config.json).
 */
export async function writeSideFiles(
  from: string,
  names: readonly string[],
  to: string,
  config: Record<string, unknown>,
): Promise<void> {
  for (const name of names) await writeInto(to, name, (path) => copyFile(join(from, name), path));
  if (!names.includes(GENERATION_CONFIG)) {
    await writeInto(to, GENERATION_CONFIG, (path) => writeFile(path, `${JSON.stringify(tokenIds(config), null, 2)}\n`));
  }
}

/**
 * Writes the file `name` of the folder `dir` with `write`; a failure names
 * that file (copyFile's own error names its source, which is not what ran
 * out of space).
 */
export async function writeInto(dir: string, name: string, write: (path: string) => Promise<void>): Promise<void> {
  const path = join(dir, name);
  await write(path).catch((error: unknown) => {
    throw ioError(path, error);
  });
}

/** The special-token ids `config` sets (null included), as a model's config.json and generation_config.json carry them. */
export function tokenIds(config: Record<string, unknown>): Record<string, unknown> {
  const ids: Record<string, unknown> = {};
  for (const key of TOKEN_ID_KEYS) if (config[key] !== undefined) ids[key] = config[key];
  return ids;
}

/** The special-token ids with null for each that `config` leaves out (transformers.js reads config.json's as set or null). */
export function tokenIdsOrNull(config: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(TOKEN_ID_KEYS.map((key) => [key, config[key] ?? null]));
}
