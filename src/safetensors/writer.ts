/**
 * Safetensors writer. As in the reference implementation, all offsets are
 * computed first; then the file is written as batches of up to
 * WRITE_BATCH_BYTES, each at its own position: small tensors share a batch,
 * large ones are split across batches. Many batches are produced at once (a
 * compute-bound average is started early, to overlap the copies before it)
 * and written one at a time as they complete (concurrent writes to one file
 * only spin on its lock). Batch buffers are reused: a fresh buffer costs a
 * page fault per 4 KiB.
 */
import { open, writeFile, type FileHandle } from "node:fs/promises";
import { resolve } from "node:path";
import { BamError, ioError } from "../errors.js";
import { type DType, isDType, isShape, tensorByteLength } from "./dtype.js";
import { MAX_HEADER_BYTES, MAX_IO_BYTES } from "./reader.js";

interface TensorLayout {
  name: string;
  dtype: DType;
  shape: number[];
}

/**
 * A tensor to write and where its bytes come from: `data`, the whole tensor
 * (called once, in write order), or `fill`, which produces any byte range of
 * it into a buffer the writer lends (backed by a SharedArrayBuffer, so a
 * worker thread can fill it). Ranges start at multiples of WRITE_BATCH_BYTES,
 * so they are whole elements; ranges of one tensor may be requested
 * concurrently and in any order, each once.
 */
export type TensorToWrite = TensorLayout &
  (
    | { data: () => Uint8Array | Promise<Uint8Array> }
    | {
        fill: (offset: number, into: Uint8Array) => Promise<void>;
        /** Production is arithmetic more than I/O: the writer starts it early, to overlap other tensors' I/O. */
        computeBound?: boolean;
      }
  );

export interface WriteOptions {
  metadata?: Record<string, string>;
  /** Checked between batches. */
  signal?: AbortSignal;
  /** Called after each write with the bytes it put on disk, header included. */
  onBytes?: (bytesJustWritten: number) => void;
  /** Where batch buffers come from; writeShardedSafetensors shares one pool across its files. */
  buffers?: SharedBufferPool;
}

/**
 * Reusable buffers backed by SharedArrayBuffers. Freed ones are reclaimed
 * only when every thread's GC gets round to them, so allocating afresh for
 * each file or task let hundreds of MB pile up.
 */
export class SharedBufferPool {
  private readonly free: Uint8Array[] = [];

  /** A buffer of at least `size` bytes. */
  take(size: number): Uint8Array {
    const at = this.free.findIndex((buffer) => buffer.length >= size);
    return at >= 0 ? this.free.splice(at, 1)[0]! : new Uint8Array(new SharedArrayBuffer(size));
  }

  give(buffer: Uint8Array): void {
    this.free.push(buffer);
  }
}

export interface ShardPlan {
  file: string;
  tensors: string[];
  bytes: number;
}

const SINGLE_FILE = "model.safetensors";
const INDEX_FILE = "model.safetensors.index.json";
/**
 * Bytes per write; a multiple of every element size. Small enough that what
 * a copy reads is still in the CPU cache when it is written: 16 MiB batches
 * made `bam upcycle` twice as slow.
 */
export const WRITE_BATCH_BYTES = 1024 * 1024;
/** Batches being produced or waiting to be written, in file order (4 and 16 were slower). */
export const BATCHES_IN_FLIGHT = 8;
/** Batches of compute-bound tensors started ahead of file order. */
export const EARLY_BATCHES_IN_FLIGHT = 4;
const HEADER_PADDING = 0x20;

export function safetensorsHeader(
  tensors: TensorLayout[],
  metadata?: Record<string, string>,
): { header: Uint8Array; dataBytes: number } {
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
  if (!Number.isSafeInteger(offset))
    throw new BamError("TENSOR_INVALID", `tensors total ${offset} bytes, too many to address`);
  return { header: frameHeader(`{${entries.join(",")}}`), dataBytes: offset, sizes };
}

/** 8-byte little-endian length, then the JSON padded with spaces so that data starts 8-byte aligned. */
function frameHeader(json: string): Uint8Array {
  const text = new TextEncoder().encode(json);
  const padded = Math.ceil(text.length / 8) * 8;
  if (padded > MAX_HEADER_BYTES) {
    throw new BamError(
      "HEADER_TOO_LARGE",
      `header of ${padded} bytes is over the ${MAX_HEADER_BYTES}-byte limit readers accept`,
    );
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
    if (!isDType(dtype))
      throw new BamError("DTYPE_UNSUPPORTED", `tensor "${name}": dtype ${String(dtype)} is not supported`);
    if (!isShape(shape)) throw invalid("shape is not an array of non-negative integers");
    const bytes = tensorByteLength(dtype, shape);
    if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`${bytes} bytes is too large to address`);
    return Number(bytes);
  });
}

function checkMetadata(metadata: Record<string, string>): Record<string, string> {
  const nonString = Object.keys(metadata).find((key) => typeof metadata[key] !== "string");
  if (nonString !== undefined) {
    throw new BamError(
      "METADATA_INVALID",
      `metadata "${nonString}" is not a string; safetensors metadata maps strings to strings`,
    );
  }
  return metadata;
}

export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  options: WriteOptions = {},
): Promise<{ bytes: number }> {
  const { header, dataBytes, sizes } = layout(tensors, options.metadata);
  throwIfAborted(options.signal, path);
  const handle = await open(path, "w").catch((error: unknown) => {
    throw ioError(path, error);
  });
  try {
    const batches = planBatches(header, tensors, sizes);
    await writeBatches(
      new PositionalWriter(handle, path, options.onBytes),
      batches,
      options.buffers ?? new SharedBufferPool(),
      path,
      options.signal,
    );
  } catch (error) {
    await handle.close().catch(() => undefined); // the first error is the one to report
    throw error;
  }
  await handle.close().catch((error: unknown) => {
    throw ioError(path, error);
  });
  return { bytes: header.length + dataBytes };
}

function throwIfAborted(signal: AbortSignal | undefined, path: string): void {
  if (signal?.aborted) throw new BamError("ABORTED", `${path}: writing interrupted`, { cause: signal.reason });
}

/** `length` bytes of the file from one source: the header, a whole tensor's `data`, or a range of a tensor's `fill`. */
interface Piece {
  tensor: TensorToWrite | null;
  offset: number;
  length: number;
}

/** Consecutive pieces written with one call at `position`; `length` over WRITE_BATCH_BYTES only for one whole `data` tensor. */
interface Batch {
  position: number;
  length: number;
  pieces: Piece[];
}

function planBatches(
  header: Uint8Array,
  tensors: TensorToWrite[],
  sizes: number[],
): { header: Uint8Array; batches: Batch[] } {
  const pieces: Piece[] = [{ tensor: null, offset: 0, length: header.length }];
  tensors.forEach((tensor, i) => {
    const size = sizes[i]!;
    if ("data" in tensor) pieces.push({ tensor, offset: 0, length: size });
    else
      for (let offset = 0; offset < size; offset += WRITE_BATCH_BYTES)
        pieces.push({ tensor, offset, length: Math.min(WRITE_BATCH_BYTES, size - offset) });
  });
  const batches: Batch[] = [];
  let position = 0;
  for (const piece of pieces) {
    const last = batches.at(-1);
    if (last !== undefined && last.length + piece.length <= WRITE_BATCH_BYTES) {
      last.pieces.push(piece);
      last.length += piece.length;
    } else {
      batches.push({ position, length: piece.length, pieces: [piece] });
    }
    position += piece.length;
  }
  return { header, batches };
}

/**
 * Produces and writes the batches: up to BATCHES_IN_FLIGHT started in file
 * order (so `data` is called in order), plus up to EARLY_BATCHES_IN_FLIGHT
 * of compute-bound tensors started ahead of their turn, so that their
 * arithmetic overlaps the I/O of the batches before them. On an error
 * nothing new starts; what is in flight settles before the first error is thrown.
 */
async function writeBatches(
  out: PositionalWriter,
  { header, batches }: ReturnType<typeof planBatches>,
  buffers: SharedBufferPool,
  path: string,
  signal: AbortSignal | undefined,
): Promise<void> {
  const capacity = Math.min(WRITE_BATCH_BYTES, Math.max(0, ...batches.map((b) => b.length)));
  const early = batches.map((batch) =>
    batch.pieces.every(({ tensor }) => tensor !== null && "fill" in tensor && tensor.computeBound === true),
  );
  const started = batches.map(() => false);
  const running = new Set<Promise<void>>();
  const lanes = { inOrder: 0, early: 0 };
  let next = 0;
  let nextEarly = 0;
  let failure: { error: unknown } | undefined;
  const start = (index: number, lane: keyof typeof lanes) => {
    const batch = batches[index]!;
    started[index] = true;
    lanes[lane]++;
    const buffer = batch.length > capacity ? undefined : buffers.take(capacity);
    const task = writeBatch(out, batch, header, buffer, path)
      .catch((error: unknown) => {
        failure ??= { error };
      })
      .finally(() => {
        running.delete(task);
        lanes[lane]--;
        if (buffer !== undefined) buffers.give(buffer);
      });
    running.add(task);
  };
  while (failure === undefined && !signal?.aborted) {
    while (next < batches.length && started[next]) next++;
    while (nextEarly < batches.length && (started[nextEarly] || !early[nextEarly])) nextEarly++;
    if (next === batches.length) break;
    if (nextEarly < batches.length && lanes.early < EARLY_BATCHES_IN_FLIGHT) start(nextEarly, "early");
    else if (lanes.inOrder < BATCHES_IN_FLIGHT) start(next, "inOrder");
    else await Promise.race(running);
  }
  await Promise.all(running);
  if (failure !== undefined) throw failure.error;
  throwIfAborted(signal, path); // aborted while the last batches were produced
}

/** Fills `buffer` from the batch's pieces and writes it; a batch of one oversized `data` tensor is written as produced. */
async function writeBatch(
  out: PositionalWriter,
  batch: Batch,
  header: Uint8Array,
  buffer: Uint8Array | undefined,
  path: string,
): Promise<void> {
  if (buffer === undefined) {
    const { tensor, length } = batch.pieces[0]!;
    await out.write(await wholeData(tensor as DataTensor, length, path), batch.position);
    return;
  }
  const target = buffer.subarray(0, batch.length);
  let at = 0;
  // Every producer is started before the first await, so `data` calls keep file order across batches.
  const produced = batch.pieces.map(async (piece) => {
    const into = target.subarray(at, (at += piece.length));
    if (piece.tensor === null) into.set(header);
    else if ("fill" in piece.tensor) await piece.tensor.fill(piece.offset, into);
    else into.set(await wholeData(piece.tensor, piece.length, path));
  });
  await Promise.all(produced);
  await out.write(target, batch.position);
}

type DataTensor = Extract<TensorToWrite, { data: unknown }>;

async function wholeData(tensor: DataTensor, size: number, path: string): Promise<Uint8Array> {
  const data = await tensor.data();
  if (!(data instanceof Uint8Array) || data.length !== size) {
    const got = data instanceof Uint8Array ? `${data.length} bytes` : "no Uint8Array";
    throw new BamError(
      "TENSOR_INVALID",
      `${path}: tensor "${tensor.name}": expected ${size} bytes of data, got ${got}`,
    );
  }
  return data;
}

/** Writes at given positions of one handle, one at a time, in the order asked. */
class PositionalWriter {
  private last: Promise<void> = Promise.resolve();

  constructor(
    private readonly handle: FileHandle,
    private readonly path: string,
    private readonly onBytes?: (bytes: number) => void,
  ) {}

  write(bytes: Uint8Array, position: number): Promise<void> {
    const write = this.last.then(() => this.writeNow(bytes, position));
    this.last = write.catch(() => undefined); // the error goes to this write's caller
    return write;
  }

  private async writeNow(bytes: Uint8Array, position: number): Promise<void> {
    for (let done = 0; done < bytes.length; ) {
      const { bytesWritten } = await this.handle
        .write(bytes, done, Math.min(bytes.length - done, MAX_IO_BYTES), position + done)
        .catch((error: unknown) => {
          throw ioError(this.path, error);
        });
      done += bytesWritten;
      this.onBytes?.(bytesWritten);
    }
  }
}

/** Greedy split in the given order; a tensor larger than the limit gets a shard of its own. */
export function planShards(tensors: TensorLayout[], maxShardBytes: number): ShardPlan[] {
  if (!(Number.isSafeInteger(maxShardBytes) && maxShardBytes > 0)) {
    throw new BamError(
      "OPTIONS_INVALID",
      `maximum shard size ${maxShardBytes} is not a positive whole number of bytes`,
    );
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
  return [
    { file: SINGLE_FILE, tensors: tensors.map(({ name }) => name), bytes: sizes.reduce((sum, size) => sum + size, 0) },
  ];
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
  const shared = { ...options, buffers: options.buffers ?? new SharedBufferPool() };
  let next = 0;
  for (const shard of plan) {
    const file = resolve(dir, shard.file);
    await writeSafetensors(file, tensors.slice(next, next + shard.tensors.length), shared);
    next += shard.tensors.length;
    files.push(file);
  }
  const totalSize = plan.reduce((sum, shard) => sum + shard.bytes, 0);
  if (plan.length > 1) await writeIndex(resolve(dir, INDEX_FILE), plan, totalSize);
  return { files, totalSize };
}

/** Bytes writeShardedSafetensors will put in its shard files, headers included (for progress). */
export function shardedFileBytes(
  tensors: TensorLayout[],
  maxShardBytes: number,
  metadata?: Record<string, string>,
): number {
  const byName = new Map(tensors.map((t) => [t.name, t]));
  return planShards(tensors, maxShardBytes).reduce((sum, shard) => {
    const { header, dataBytes } = layout(
      shard.tensors.map((name) => byName.get(name)!),
      metadata,
    );
    return sum + header.length + dataBytes;
  }, 0);
}

/** Index laid out like transformers' save_pretrained: indent 2, keys sorted. */
async function writeIndex(path: string, plan: ShardPlan[], totalSize: number): Promise<void> {
  const weightMap = plan
    .flatMap((shard) => shard.tensors.map((name) => [name, shard.file] as const))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([name, file]) => `    ${JSON.stringify(name)}: ${JSON.stringify(file)}`);
  const text = `{\n  "metadata": {\n    "total_size": ${totalSize}\n  },\n  "weight_map": {\n${weightMap.join(",\n")}\n  }\n}\n`;
  await writeFile(path, text).catch((error: unknown) => {
    throw ioError(path, error);
  });
}

const SIZE_UNITS: ReadonlyMap<string, number> = new Map([
  ["", 1],
  ["b", 1],
  ["kb", 1e3],
  ["mb", 1e6],
  ["gb", 1e9],
  ["tb", 1e12],
  ["kib", 2 ** 10],
  ["mib", 2 ** 20],
  ["gib", 2 ** 30],
  ["tib", 2 ** 40],
]);

/** "5GB" (5e9, as Hugging Face counts), "500MB", "2GiB", "1024"; case-insensitive, rounded to whole bytes. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const unit = match ? SIZE_UNITS.get(match[2]!.toLowerCase()) : undefined;
  const bytes = unit === undefined ? NaN : Math.round(Number(match![1]) * unit);
  if (!Number.isSafeInteger(bytes)) {
    throw new BamError(
      "OPTIONS_INVALID",
      `"${text}" is not a size; write bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB`,
    );
  }
  return bytes;
}
