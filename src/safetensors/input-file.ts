/**
 * Opening the files of a model folder, which come from strangers: only
 * regular files are read. A FIFO would block the open forever, /dev/zero or
 * /dev/urandom (a link is enough) would never end, so both are refused
 * before a byte is read; small text files are read whole only up to a limit.
 */
import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { BamError, type ErrorCode } from "../errors.js";

/** O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for regular files. */
const READ_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0);

/**
 * Opens `path` (links followed) for reading and checks it is a regular file.
 * OS errors are thrown as they are, for the caller to wrap; a folder, device,
 * FIFO or socket is IO_ERROR.
 */
export async function openRegularFile(path: string): Promise<{ handle: FileHandle; size: number }> {
  const handle = await open(path, READ_FLAGS);
  try {
    const info = await handle.stat();
    if (!info.isFile()) {
      const kind = info.isDirectory()
        ? "a folder"
        : info.isFIFO()
          ? "a FIFO"
          : info.isCharacterDevice() || info.isBlockDevice()
            ? "a device"
            : "not a regular file";
      throw new BamError("IO_ERROR", `${path}: is ${kind}, expected a regular file`);
    }
    return { handle, size: info.size };
  } catch (error) {
    await handle.close().catch(() => undefined);
    throw error;
  }
}

/**
 * A whole regular file of at most `maxBytes` as UTF-8 text (invalid bytes
 * become U+FFFD and a byte-order mark is kept, as readFile does). A larger file is `tooLarge`, refused
 * before it is read.
 */
export async function readTextFile(path: string, maxBytes: number, tooLarge: ErrorCode): Promise<string> {
  const { handle, size } = await openRegularFile(path);
  try {
    if (size > maxBytes)
      throw new BamError(
        tooLarge,
        `${path}: ${size} bytes is over the ${maxBytes}-byte limit for this file; it cannot be what it claims`,
      );
    const bytes = new Uint8Array(size);
    let done = 0;
    while (done < size) {
      const { bytesRead } = await handle.read(bytes, done, size - done, done);
      if (bytesRead === 0) break; // shrank while we read
      done += bytesRead;
    }
    return new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes.subarray(0, done));
  } finally {
    await handle.close().catch(() => undefined);
  }
}
