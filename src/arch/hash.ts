import { createHash } from "node:crypto";
import { ioError } from "../errors.js";
import { openRegularFile, readTextFile } from "../safetensors/index.js";

/**
 * sha256 (hex) of a file, streamed; null when the file does not exist. Only
 * a regular file is read: a FIFO or a link to /dev/zero is IO_ERROR, not a
 * hang.
 */
export async function sha256File(path: string): Promise<string | null> {
  const hash = createHash("sha256");
  try {
    const { handle } = await openRegularFile(path);
    try {
      for await (const chunk of handle.createReadStream({ autoClose: false })) hash.update(chunk as Buffer);
    } finally {
      await handle.close();
    }
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw ioError(path, error);
  }
  return hash.digest("hex");
}

/** tokenizer.json of real models is a few to tens of MB. */
const MAX_TOKENIZER_BYTES = 512_000_000;

/**
 * sha256 of a tokenizer.json's content, not its bytes: the parsed JSON
 * written again with sorted keys and no whitespace, so a file re-saved with
 * other indentation or key order is the same tokenizer. A file that is not
 * JSON (or too deeply nested to walk) is hashed as bytes. Null when absent.
 */
export async function tokenizerHash(path: string): Promise<string | null> {
  let text: string;
  try {
    text = await readTextFile(path, MAX_TOKENIZER_BYTES, "CONFIG_INVALID");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw ioError(path, error);
  }
  let canonical: string;
  try {
    canonical = canonicalJson(JSON.parse(text));
  } catch {
    return sha256File(path);
  }
  return createHash("sha256").update(canonical).digest("hex");
}

function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const record = value as Record<string, unknown>;
    return `{${Object.keys(record)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${canonicalJson(record[key])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}
