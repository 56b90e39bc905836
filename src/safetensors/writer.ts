/**
 * Safetensors writer. As in the reference implementation, all offsets are
 * computed first, then header and data go out in one sequential pass; small
 * tensors are coalesced into large writes.
 */
import { open, writeFile, type FileHandle } from "node:fs/promises";
import { resolve } from "node:path";
import { BamError, ioError } from "../errors.js";
import { type DType, isDType, isShape, tensorByteLength } from "./dtype.js";
import { MAX_HEADER_BYTES, MAX_IO_BYTES } from "./reader.js";

export interface TensorToWrite {
  name: string;
  dtype: DType;
  shape: number[];
  /**
   * Produces exactly product(shape) * size bytes, whole or as a stream of
   * chunks (which bounds memory for large tensors); called once, in write order.
   */
  data: () => Uint8Array | Promise<Uint8Array> | AsyncIterable<Uint8Array>;
}

export interface WriteOptions {
  metadata?: Record<string, string>;
  /** Checked between tensors. */
  signal?: AbortSignal;
  /** Called after each write with the bytes it put on disk, header included. */
  onBytes?: (bytesJustWritten: number) => void;
}

export interface ShardPlan { file: string; tensors: string[]; bytes: number }

type TensorLayout = Pick<TensorToWrite, "name" | "dtype" | "shape">;

const SINGLE_FILE = "model.safetensors";
const INDEX_FILE = "model.safetensors.index.json";
const WRITE_BUFFER_BYTES = 16 * 1024 * 1024;
const HEADER_PADDING = 0x20;

export function safetensorsHeader(tensors: TensorLayout[], metadata?: Record<string, string>): { header: Uint8Array; dataBytes: number } {
  const { header, dataBytes } = layout(tensors, metadata);
  return { header, dataBytes };
}

function layout(tensors: TensorLayout[], metadata: Record<string, string> | undefined) {
  const sizes = tensorSizes(tensors);
  const entries = metadata === undefined ? [] : [`"__metadata__":${JSON.stringify(checkMetadata(metadata))}`];
  let offset = 0;
  tensors.forEach(({ name, dtype, shape }, i) => {
    const end = offset + sizes[i]!;
    // Built entry by entry: JSON.stringify of one object would move integer-like names to the front.
    entries.push(`${JSON.stringify(name)}:${JSON.stringify({ dtype, shape, data_offsets: [offset, end] })}`);
    offset = end;
  });
  if (!Number.isSafeInteger(offset)) throw new BamError("TENSOR_INVALID", `tensors total ${offset} bytes, too many to address`);
  return { header: frameHeader(`{${entries.join(",")}}`), dataBytes: offset, sizes };
}

/** 8-byte little-endian length, then the JSON padded with spaces so that data starts 8-byte aligned. */
function frameHeader(json: string): Uint8Array {
  const text = new TextEncoder().encode(json);
  const padded = Math.ceil(text.length / 8) * 8;
  if (padded > MAX_HEADER_BYTES) {
    throw new BamError("HEADER_TOO_LARGE", `header of ${padded} bytes is over the ${MAX_HEADER_BYTES}-byte limit readers accept`);
  }
  const header = new Uint8Array(8 + padded).fill(HEADER_PADDING, 8 + text.length);
  new DataView(header.buffer).setBigUint64(0, BigInt(padded), true);
  header.set(text, 8);
  return header;
}

/** Byte size of each tensor, after checking names are unique and dtypes and shapes valid. */
function tensorSizes(tensors: TensorLayout[]): number[] {
  const seen = new Set<string>();
  return tensors.map(({ name, dtype, shape }) => {
    const invalid = (reason: string) => new BamError("TENSOR_INVALID", `tensor "${name}": ${reason}`);
    if (name === "__metadata__") throw invalid("name is reserved for metadata");
    if (seen.has(name)) throw invalid("name given twice");
    seen.add(name);
    if (!isDType(dtype)) throw new BamError("DTYPE_UNSUPPORTED", `tensor "${name}": dtype ${String(dtype)} is not supported`);
    if (!isShape(shape)) throw invalid("shape is not an array of non-negative integers");
    const bytes = tensorByteLength(dtype, shape);
    if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`${bytes} bytes is too large to address`);
    return Number(bytes);
  });
}

function checkMetadata(metadata: Record<string, string>): Record<string, string> {
  const nonString = Object.keys(metadata).find((key) => typeof metadata[key] !== "string");
  if (nonString !== undefined) {
    throw new BamError("METADATA_INVALID", `metadata "${nonString}" is not a string; safetensors metadata maps strings to strings`);
  }
  return metadata;
}

export async function writeSafetensors(path: string, tensors: TensorToWrite[], options: WriteOptions = {}): Promise<{ bytes: number }> {
  const { header, dataBytes, sizes } = layout(tensors, options.metadata);
  throwIfAborted(options.signal, path);
  const handle = await open(path, "w").catch((error: unknown) => { throw ioError(path, error); });
  try {
    const out = new BufferedWriter(handle, path, Math.min(WRITE_BUFFER_BYTES, header.length + dataBytes), options.onBytes);
    await out.write(header);
    for (const [i, tensor] of tensors.entries()) {
      throwIfAborted(options.signal, path);
      await writeTensorData(out, tensor, sizes[i]!, path, options.signal);
    }
    await out.flush();
  } catch (error) {
    await handle.close().catch(() => undefined); // the first error is the one to report
    throw error;
  }
  await handle.close().catch((error: unknown) => { throw ioError(path, error); });
  return { bytes: header.length + dataBytes };
}

function throwIfAborted(signal: AbortSignal | undefined, path: string): void {
  if (signal?.aborted) throw new BamError("ABORTED", `${path}: writing interrupted`, { cause: signal.reason });
}

/** Writes a tensor's data, whole or chunk by chunk, checking it adds up to `size` bytes. */
async function writeTensorData(out: BufferedWriter, tensor: TensorToWrite, size: number, path: string, signal: AbortSignal | undefined): Promise<void> {
  const wrongSize = (got: string) => new BamError("TENSOR_INVALID", `${path}: tensor "${tensor.name}": expected ${size} bytes of data, got ${got}`);
  const data = await tensor.data();
  if (data instanceof Uint8Array) {
    if (data.length !== size) throw wrongSize(`${data.length} bytes`);
    await out.write(data);
    return;
  }
  if (data === null || typeof data !== "object" || !(Symbol.asyncIterator in data)) throw wrongSize("no Uint8Array");
  // The next chunk is produced (read from the seeds) while this one is written.
  const chunks = data[Symbol.asyncIterator]();
  let written = 0;
  let next = chunks.next();
  for (;;) {
    const { value: chunk, done } = await next;
    if (done) break;
    throwIfAborted(signal, path);
    if (!(chunk instanceof Uint8Array) || written + chunk.length > size) throw wrongSize(`more than ${size} bytes`);
    next = chunks.next();
    next.catch(() => undefined); // reported when awaited; a write error may come first
    await out.write(chunk);
    written += chunk.length;
  }
  if (written !== size) throw wrongSize(`${written} bytes`);
}

/** Sequential writes through one handle, gathering small pieces into one buffer. */
class BufferedWriter {
  private readonly buffer: Uint8Array;
  private used = 0;

  constructor(
    private readonly handle: FileHandle,
    private readonly path: string,
    capacity: number,
    private readonly onBytes?: (bytes: number) => void,
  ) {
    this.buffer = new Uint8Array(capacity);
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (this.used + bytes.length > this.buffer.length) await this.flush();
    if (bytes.length >= this.buffer.length) {
      await this.writeThrough(bytes); // large tensors skip the copy
      return;
    }
    this.buffer.set(bytes, this.used);
    this.used += bytes.length;
  }

  async flush(): Promise<void> {
    await this.writeThrough(this.buffer.subarray(0, this.used));
    this.used = 0;
  }

  private async writeThrough(bytes: Uint8Array): Promise<void> {
    for (let done = 0; done < bytes.length;) {
      const { bytesWritten } = await this.handle.write(bytes, done, Math.min(bytes.length - done, MAX_IO_BYTES))
        .catch((error: unknown) => { throw ioError(this.path, error); });
      done += bytesWritten;
      this.onBytes?.(bytesWritten);
    }
  }
}

/** Greedy split in the given order; a tensor larger than the limit gets a shard of its own. */
export function planShards(tensors: TensorLayout[], maxShardBytes: number): ShardPlan[] {
  if (!(Number.isSafeInteger(maxShardBytes) && maxShardBytes > 0)) {
    throw new BamError("OPTIONS_INVALID", `maximum shard size ${maxShardBytes} is not a positive whole number of bytes`);
  }
  const sizes = tensorSizes(tensors);
  const shards: Omit<ShardPlan, "file">[] = [];
  tensors.forEach(({ name }, i) => {
    const size = sizes[i]!;
    const last = shards.at(-1);
    if (last !== undefined && last.bytes + size <= maxShardBytes) {
      last.tensors.push(name);
      last.bytes += size;
    } else {
      shards.push({ tensors: [name], bytes: size });
    }
  });
  if (shards.length > 1) return shards.map((shard, i) => ({ file: shardName(i + 1, shards.length), ...shard }));
  return [{ file: SINGLE_FILE, tensors: tensors.map(({ name }) => name), bytes: sizes.reduce((sum, size) => sum + size, 0) }];
}

function shardName(index: number, count: number): string {
  const pad = (n: number) => String(n).padStart(5, "0");
  return `model-${pad(index)}-of-${pad(count)}.safetensors`;
}

export async function writeShardedSafetensors(
  dir: string,
  tensors: TensorToWrite[],
  options: WriteOptions & { maxShardBytes: number },
): Promise<{ files: string[]; totalSize: number }> {
  const plan = planShards(tensors, options.maxShardBytes);
  const files: string[] = [];
  let next = 0;
  for (const shard of plan) {
    const file = resolve(dir, shard.file);
    await writeSafetensors(file, tensors.slice(next, next + shard.tensors.length), options);
    next += shard.tensors.length;
    files.push(file);
  }
  const totalSize = plan.reduce((sum, shard) => sum + shard.bytes, 0);
  if (plan.length > 1) await writeIndex(resolve(dir, INDEX_FILE), plan, totalSize);
  return { files, totalSize };
}

/** Bytes writeShardedSafetensors will put in its shard files, headers included (for progress). */
export function shardedFileBytes(tensors: TensorLayout[], maxShardBytes: number, metadata?: Record<string, string>): number {
  const byName = new Map(tensors.map((t) => [t.name, t]));
  return planShards(tensors, maxShardBytes).reduce((sum, shard) => {
    const { header, dataBytes } = layout(shard.tensors.map((name) => byName.get(name)!), metadata);
    return sum + header.length + dataBytes;
  }, 0);
}

/** Index laid out like transformers' save_pretrained: indent 2, keys sorted. */
async function writeIndex(path: string, plan: ShardPlan[], totalSize: number): Promise<void> {
  const weightMap = plan.flatMap((shard) => shard.tensors.map((name) => [name, shard.file] as const))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([name, file]) => `    ${JSON.stringify(name)}: ${JSON.stringify(file)}`);
  const text = `{\n  "metadata": {\n    "total_size": ${totalSize}\n  },\n  "weight_map": {\n${weightMap.join(",\n")}\n  }\n}\n`;
  await writeFile(path, text).catch((error: unknown) => { throw ioError(path, error); });
}

const SIZE_UNITS: ReadonlyMap<string, number> = new Map([
  ["", 1], ["b", 1],
  ["kb", 1e3], ["mb", 1e6], ["gb", 1e9], ["tb", 1e12],
  ["kib", 2 ** 10], ["mib", 2 ** 20], ["gib", 2 ** 30], ["tib", 2 ** 40],
]);

/** "5GB" (5e9, as Hugging Face counts), "500MB", "2GiB", "1024"; case-insensitive, rounded to whole bytes. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const unit = match ? SIZE_UNITS.get(match[2]!.toLowerCase()) : undefined;
  const bytes = unit === undefined ? NaN : Math.round(Number(match![1]) * unit);
  if (!Number.isSafeInteger(bytes)) {
    throw new BamError("OPTIONS_INVALID", `"${text}" is not a size; write bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB`);
  }
  return bytes;
}
