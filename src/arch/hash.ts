import { createHash } from "node:crypto";
import { ioError } from "../errors.js";
import { openRegularFile } from "../safetensors/index.js";

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
