/**
 * Weighted averages of seed tensors, the executor's only arithmetic on
 * large tensors (embeddings, LM head, norms, merged attention). It runs on
 * worker threads when the buffers are shared, so the main thread keeps the
 * reads and writes of plain copies going meanwhile.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import {
  decodeFloatsInto,
  DTYPE_SIZE,
  encodeFloatsInto,
  SharedBufferPool,
  type FloatDType,
} from "../safetensors/index.js";
import { AVERAGE_KERNEL_BASE64 } from "./average-kernel.js";

export interface AverageTask {
  /** Each source's values, all of one length in elements. */
  sources: { bytes: Uint8Array; dtype: FloatDType }[];
  weights: number[];
  /** Receives the average in `dtype`. */
  out: Uint8Array;
  dtype: FloatDType;
}

interface Kernel {
  memory: WebAssembly.Memory;
  decode_bf16(src: number, values: number, n: number): void;
  accumulate(sum: number, values: number, n: number, weight: number): void;
  round_f32(sum: number, values: number, n: number): void;
  encode_bf16(values: number, out: number, n: number): void;
}

/** This thread's instance of average.wat, compiled on first use. */
let kernel: Kernel | undefined;

/** Scratch in the kernel's memory for `count` elements: the f64 sums, f32 values, and 16-bit bytes in or out. */
function kernelFor(count: number): { kernel: Kernel; sum: number; values: number; halves: number } {
  kernel ??= new WebAssembly.Instance(new WebAssembly.Module(Buffer.from(AVERAGE_KERNEL_BASE64, "base64")))
    .exports as unknown as Kernel;
  const sum = 0;
  const values = sum + count * 8;
  const halves = values + count * 4;
  const needed = halves + count * 2;
  const pages = Math.ceil((needed - kernel.memory.buffer.byteLength) / 65536);
  if (pages > 0) kernel.memory.grow(pages);
  return { kernel, sum, values, halves };
}

/**
 * out = sum of weights[i] * sources[i], accumulated in doubles in source
 * order and rounded once to float32, then to the output dtype: averaging
 * identical seeds gives the seed back exactly. The arithmetic is average.wat's;
 * F16 is decoded and encoded by dtype.ts (no hot path needs it fast).
 */
export function averageInto({ sources, weights, out, dtype }: AverageTask): void {
  const count = out.length / DTYPE_SIZE[dtype];
  const padded = Math.ceil(count / 8) * 8; // the kernel works 8 elements at a time
  const { kernel, sum, values, halves } = kernelFor(padded);
  const memory = kernel.memory.buffer;
  new Float64Array(memory, sum, padded).fill(0);
  const valuesView = new Float32Array(memory, values, count);
  sources.forEach((source, i) => {
    if (source.dtype === "BF16") {
      new Uint8Array(memory, halves, source.bytes.length).set(source.bytes);
      kernel.decode_bf16(halves, values, padded);
    } else {
      decodeFloatsInto(source.bytes, source.dtype, valuesView);
    }
    kernel.accumulate(sum, values, padded, weights[i]!);
  });
  kernel.round_f32(sum, values, padded);
  if (dtype === "BF16") {
    kernel.encode_bf16(values, halves, padded);
    out.set(new Uint8Array(memory, halves, out.length));
  } else {
    encodeFloatsInto(valuesView, dtype, out);
  }
}

const isShared = (bytes: Uint8Array) => bytes.buffer instanceof SharedArrayBuffer;

/**
 * Worker threads for averageInto, started on first use: one per core but
 * one, at most 4 (the main thread and the kernel's copies need the rest).
 * Tasks whose buffers are not all shared run inline.
 */
/**
 * One buffer pool for every run in the process. A SharedArrayBuffer is freed
 * only when the garbage collector gets round to it, which an idle process
 * may never do: 5 back-to-back upcycles of a 430 MB model, each with its own
 * pools, left 241 MiB of dead buffers (bench/upcycle-rss/repeat.ts). Shared,
 * the next run takes back what the last one gave.
 */
const PROCESS_BUFFERS = new SharedBufferPool();

export class AveragePool {
  /** Shared buffers for the sources' slices and the writer's batches, reused across tasks and runs. */
  readonly buffers = PROCESS_BUFFERS;
  private workers: Worker[] = [];
  private readonly idle: Worker[] = [];
  private readonly busy = new Map<Worker, (error?: Error) => void>();
  private readonly queue: { task: AverageTask; done: (error?: Error) => void }[] = [];
  private failure: Error | undefined;

  run(task: AverageTask): Promise<void> {
    if (!(isShared(task.out) && task.sources.every((s) => isShared(s.bytes)))) {
      averageInto(task);
      return Promise.resolve();
    }
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.workers.length === 0) this.start();
    return new Promise((resolve, reject) => {
      this.queue.push({ task, done: (error) => (error === undefined ? resolve() : reject(error)) });
      this.dispatch();
    });
  }

  /** Stops the workers; call when the last task is done (or abandoned). */
  async close(): Promise<void> {
    const workers = this.workers;
    this.workers = [];
    this.idle.length = 0;
    await Promise.all(workers.map((worker) => worker.terminate()));
  }

  private start(): void {
    const count = Math.max(1, Math.min(4, availableParallelism() - 1));
    for (let i = 0; i < count; i++) {
      const worker = new Worker(new URL("./average-worker.js", import.meta.url));
      worker.on("message", (reply: { error?: string }) => {
        const done = this.busy.get(worker)!;
        this.busy.delete(worker);
        this.idle.push(worker);
        done(reply.error === undefined ? undefined : new Error(`averaging: ${reply.error}`));
        this.dispatch();
      });
      worker.on("error", (error) => this.fail(new Error(`averaging worker failed: ${error.message}`)));
      this.workers.push(worker);
      this.idle.push(worker);
    }
  }

  private dispatch(): void {
    while (this.idle.length > 0 && this.queue.length > 0) {
      const worker = this.idle.pop()!;
      const { task, done } = this.queue.shift()!;
      this.busy.set(worker, done);
      worker.postMessage(task);
    }
  }

  private fail(error: Error): void {
    this.failure ??= error;
    for (const done of this.busy.values()) done(error);
    this.busy.clear();
    for (const { done } of this.queue.splice(0)) done(error);
  }
}
