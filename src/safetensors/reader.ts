/**
 * Strict safetensors reader. `open` reads only the header and validates every
 * entry and the whole data layout before any tensor can be read; tensor data
 * is then read lazily, by offset, through one file handle.
 */
import type { BigIntStats } from "node:fs";
import { stat, type FileHandle } from "node:fs/promises";
import { resolve } from "node:path";
import { BamError, ioError } from "../errors.js";
import { type DType, isDType, isShape, tensorByteLength } from "./dtype.js";
import { openRegularFile } from "./input-file.js";

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** Absolute offset in the file. */
  byteOffset: number;
  byteLength: number;
  /** Absolute path. */
  file: string;
}

/** Same limit as the reference implementation. */
export const MAX_HEADER_BYTES = 100_000_000;
/**
 * Most tensors one file may hold: a real shard holds hundreds to a few
 * thousand. Each entry costs about 1 KB resident once parsed (measured: 900k
 * zero-size entries, 63 MB of header, took 633 MB), so the count is bounded
 * on the raw header, before it is parsed.
 */
export const MAX_TENSORS_PER_FILE = 100_000;
/** Resident bytes an open tensor entry costs, parsed header included (measured, rounded up): for memory estimates. */
export const TENSOR_ENTRY_BYTES = 1024;
/** Node's fs calls take at most 2 GiB at a time. */
export const MAX_IO_BYTES = 1 << 30;

const METADATA_KEY = "__metadata__";

export class SafetensorsReader {
  private constructor(
    readonly path: string,
    /** N, the JSON header's byte length; data starts at 8 + N. */
    readonly headerLength: number,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Readonly<Record<string, string>> | null,
    private readonly handle: FileHandle,
    /** Device, inode, size, mtime and ctime when opened: any write, truncate, touch or replacement changes one. */
    private readonly identity: string,
  ) {}

  static async open(path: string): Promise<SafetensorsReader> {
    const file = resolve(path);
    const { handle, size } = await openRegularFile(file).catch((error: unknown) => {
      throw ioError(file, error);
    });
    try {
      const headerLength = await readHeaderLength(handle, file, size);
      const headerBytes = await readExactly(handle, file, 8, headerLength, "header");
      checkEntryCount(headerBytes, file);
      const header = parseHeader(headerBytes, file);
      const { tensors, metadata } = validateHeader(header, file, headerLength, size);
      return new SafetensorsReader(
        file,
        headerLength,
        tensors,
        metadata,
        handle,
        identityOf(await handle.stat({ bigint: true })),
      );
    } catch (error) {
      await handle.close();
      throw ioError(file, error);
    }
  }

  async read(name: string): Promise<Uint8Array> {
    const info = this.info(name);
    return readExactly(this.handle, this.path, info.byteOffset, info.byteLength, `tensor "${name}"`);
  }

  /** Bytes [start, start + length) of a tensor, into `into` (exactly `length` bytes) when given, else a fresh buffer. */
  async readBytes(name: string, start: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const info = this.info(name);
    if (!isRange(start, length, info.byteLength)) {
      throw new BamError(
        "INVALID_OFFSET",
        `${this.path}: tensor "${name}": bytes ${start}..${start + length} are outside its ${info.byteLength} bytes`,
      );
    }
    return readExactly(this.handle, this.path, info.byteOffset + start, length, `tensor "${name}"`, into);
  }

  /**
   * Refuses a file that changed since it was opened (rewritten in place, or
   * replaced at its path): what was read of it may mix two versions, and a
   * hash of it would describe neither.
   */
  async checkUnchanged(): Promise<void> {
    const now = await stat(this.path, { bigint: true }).catch((error: unknown) => {
      throw ioError(this.path, error);
    });
    if (identityOf(now) !== this.identity) {
      throw new BamError(
        "IO_ERROR",
        `${this.path}: changed while it was being read; nothing was written: run again once the file is left alone`,
      );
    }
  }

  /** Safe to call more than once. */
  close(): Promise<void> {
    return this.handle.close();
  }

  private info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (info === undefined) throw new BamError("TENSOR_NOT_FOUND", `${this.path}: no tensor named "${name}"`);
    return info;
  }
}

function identityOf(info: BigIntStats): string {
  return [info.dev, info.ino, info.size, info.mtimeNs, info.ctimeNs].join(":");
}

function isRange(start: number, length: number, size: number): boolean {
  return (
    Number.isSafeInteger(start) && Number.isSafeInteger(length) && start >= 0 && length >= 0 && start + length <= size
  );
}

/**
 * Reads exactly `length` bytes into `into` or a fresh buffer; a short file is
 * DATA_INCOMPLETE. Reusing buffers matters: a fresh one costs a page fault per 4 KiB.
 */
async function readExactly(
  handle: FileHandle,
  file: string,
  position: number,
  length: number,
  what: string,
  into?: Uint8Array,
): Promise<Uint8Array> {
  if (into !== undefined && into.length !== length)
    throw new BamError("INVALID_OFFSET", `${file}: ${what}: a ${into.length}-byte buffer cannot take ${length} bytes`);
  const out = into ?? new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const chunk = Math.min(length - done, MAX_IO_BYTES);
    const { bytesRead } = await handle.read(out, done, chunk, position + done).catch((error: unknown) => {
      throw ioError(file, error);
    });
    if (bytesRead === 0) {
      throw new BamError(
        "DATA_INCOMPLETE",
        `${file}: ${what} is cut off at byte ${position + done}; the file is truncated`,
      );
    }
    done += bytesRead;
  }
  return out;
}

/** The u64 header length, checked against the limit and the file size before anything is allocated. */
async function readHeaderLength(handle: FileHandle, file: string, fileSize: number): Promise<number> {
  if (fileSize < 8)
    throw new BamError("HEADER_INVALID", `${file}: ${fileSize} bytes is too short for a safetensors file`);
  const prefix = Buffer.from(await readExactly(handle, file, 0, 8, "header length"));
  const length = prefix.readBigUInt64LE(0);
  if (length > BigInt(MAX_HEADER_BYTES)) {
    throw new BamError(
      "HEADER_TOO_LARGE",
      `${file}: header claims ${length} bytes, over the ${MAX_HEADER_BYTES}-byte limit`,
    );
  }
  if (length > BigInt(fileSize - 8)) {
    throw new BamError(
      "HEADER_INVALID",
      `${file}: header claims ${length} bytes but the file has only ${fileSize - 8} after the length; truncated or not safetensors`,
    );
  }
  return Number(length);
}

const DATA_OFFSETS_KEY = Buffer.from('"data_offsets"');

/** Every entry has a "data_offsets" key: counting them bounds the entries (a name holding the text only adds to the count). */
function checkEntryCount(bytes: Uint8Array, file: string): void {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  let count = 0;
  for (
    let at = buffer.indexOf(DATA_OFFSETS_KEY);
    at >= 0;
    at = buffer.indexOf(DATA_OFFSETS_KEY, at + DATA_OFFSETS_KEY.length)
  ) {
    if (++count > MAX_TENSORS_PER_FILE) {
      throw new BamError(
        "HEADER_INVALID",
        `${file}: header lists more than ${MAX_TENSORS_PER_FILE} tensors; no real checkpoint file holds so many (shard it, or it is not a model)`,
      );
    }
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function parseHeader(bytes: Uint8Array, file: string): Record<string, unknown> {
  let text: string;
  let header: unknown;
  try {
    text = utf8.decode(bytes);
    header = JSON.parse(text);
  } catch (error) {
    throw new BamError("HEADER_INVALID", `${file}: header is not UTF-8 JSON (${(error as Error).message})`, {
      cause: error,
    });
  }
  if (!isPlainObject(header)) throw new BamError("HEADER_INVALID", `${file}: header is not a JSON object`);
  const duplicate = findDuplicateKey(text);
  if (duplicate !== undefined) throw new BamError("HEADER_INVALID", `${file}: header repeats the key "${duplicate}"`);
  return header;
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

interface Entry {
  name: string;
  dtype: DType;
  shape: number[];
  begin: number;
  end: number;
}

function validateHeader(header: Record<string, unknown>, file: string, headerLength: number, fileSize: number) {
  const entries: Entry[] = [];
  let metadata: Readonly<Record<string, string>> | null = null;
  for (const [name, value] of Object.entries(header)) {
    if (name === METADATA_KEY) metadata = parseMetadata(value, file);
    else entries.push(parseEntry(name, value, file));
  }
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  checkLayout(entries, file, fileSize - 8 - headerLength);
  const tensors = new Map<string, TensorInfo>();
  for (const { name, dtype, shape, begin, end } of entries) {
    tensors.set(
      name,
      Object.freeze({
        name,
        dtype,
        shape: Object.freeze(shape) as number[],
        byteOffset: 8 + headerLength + begin,
        byteLength: end - begin,
        file,
      }),
    );
  }
  return { tensors, metadata };
}

function parseMetadata(value: unknown, file: string): Readonly<Record<string, string>> {
  const invalid = (reason: string) =>
    new BamError("METADATA_INVALID", `${file}: ${METADATA_KEY} ${reason}; it must map strings to strings`);
  if (!isPlainObject(value)) throw invalid("is not an object");
  const nonString = Object.keys(value).find((key) => typeof value[key] !== "string");
  if (nonString !== undefined) throw invalid(`holds a non-string value at "${nonString}"`);
  return Object.freeze(value as Record<string, string>);
}

function parseEntry(name: string, value: unknown, file: string): Entry {
  const invalid = (reason: string) => new BamError("TENSOR_INVALID", `${file}: tensor "${name}": ${reason}`);
  if (!isPlainObject(value)) throw invalid("entry is not an object");
  const { dtype, shape, data_offsets: offsets } = value;
  if (typeof dtype !== "string") throw invalid("dtype is not a string");
  if (!isDType(dtype))
    throw new BamError("DTYPE_UNSUPPORTED", `${file}: tensor "${name}": dtype ${dtype} is not supported`);
  if (!isShape(shape)) throw invalid("shape is not an array of non-negative integers");
  if (!isOffsetPair(offsets)) throw invalid("data_offsets is not [begin, end] with integers 0 <= begin <= end");
  const [begin, end] = offsets;
  const needed = tensorByteLength(dtype, shape);
  if (needed !== BigInt(end - begin)) {
    throw invalid(`${dtype} [${shape.join(", ")}] needs ${needed} bytes but data_offsets span ${end - begin}`);
  }
  return { name, dtype, shape, begin, end };
}

function isOffsetPair(value: unknown): value is [number, number] {
  return Array.isArray(value) && value.length === 2 && isShape(value) && value[0]! <= value[1]!;
}

/** Tensors, sorted by offset, must tile the data section exactly: no gap, no overlap, nothing after. */
function checkLayout(entries: Entry[], file: string, dataLength: number): void {
  let expected = 0;
  for (const { name, begin, end } of entries) {
    if (begin !== expected) {
      const problem = begin > expected ? `leaves a gap after data byte ${expected}` : "overlaps the previous tensor";
      throw new BamError("INVALID_OFFSET", `${file}: tensor "${name}" at data bytes ${begin}..${end} ${problem}`);
    }
    expected = end;
  }
  const cut = entries.find((entry) => entry.end > dataLength);
  if (cut !== undefined) {
    throw new BamError(
      "DATA_INCOMPLETE",
      `${file}: tensor "${cut.name}" ends at data byte ${cut.end} but the file holds ${dataLength} data bytes; the file is truncated`,
    );
  }
  if (expected < dataLength) {
    throw new BamError(
      "INVALID_OFFSET",
      `${file}: ${dataLength - expected} bytes after the last tensor belong to no tensor`,
    );
  }
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COLON = 0x3a;
const JSON_SPACE = new Set([0x20, 0x09, 0x0a, 0x0d]);

/**
 * First key that appears twice in one object of `text`, which must already be
 * valid JSON (JSON.parse silently keeps the last of duplicates).
 */
export function findDuplicateKey(text: string): string | undefined {
  const objects: (Set<string> | null)[] = []; // null for arrays
  for (let i = 0; i < text.length; i++) {
    const char = text[i];
    if (char === "{") objects.push(new Set());
    else if (char === "[") objects.push(null);
    else if (char === "}" || char === "]") objects.pop();
    else if (char === '"') {
      const end = closingQuote(text, i);
      const keys = objects.at(-1);
      if (keys && nextNonSpace(text, end + 1) === COLON) {
        const key = decodeKey(text.slice(i, end + 1));
        if (keys.has(key)) return key;
        keys.add(key);
      }
      i = end;
    }
  }
  return undefined;
}

function closingQuote(text: string, open: number): number {
  let i = open + 1;
  while (text.charCodeAt(i) !== QUOTE) i += text.charCodeAt(i) === BACKSLASH ? 2 : 1;
  return i;
}

function nextNonSpace(text: string, from: number): number {
  let i = from;
  while (JSON_SPACE.has(text.charCodeAt(i))) i++;
  return text.charCodeAt(i);
}

/** Escapes are decoded so that "a" and "\u0061" count as the same key. */
function decodeKey(quoted: string): string {
  return quoted.includes("\\") ? (JSON.parse(quoted) as string) : quoted.slice(1, -1);
}
