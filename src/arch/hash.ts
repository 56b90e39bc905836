import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { ioError } from "../errors.js";

/** sha256 (hex) of a file, streamed; null when the file does not exist. */
export async function sha256File(path: string): Promise<string | null> {
  const hash = createHash("sha256");
  try {
    for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw ioError(path, error);
  }
  return hash.digest("hex");
}
