/**
 * Weighted averages of seed tensors, the executor's only arithmetic on
 * large tensors (embeddings, LM head, norms, merged attention). It runs on
 * worker threads when the buffers are shared, so the main thread keeps the
 * reads and writes of plain copies going meanwhile.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import { decodeFloatsInto, DTYPE_SIZE, encodeFloatsInto, SharedBufferPool, type FloatDType } from "../safetensors/index.js";

export interface AverageTask {
  /** Each source's values, all of one length in elements. */
  sources: { bytes: Uint8Array; dtype: FloatDType }[];
  weights: number[];
  /** Receives the average in `dtype`. */
  out: Uint8Array;
  dtype: FloatDType;
}

/** Scratch reused across tasks on one thread. */
let scratch = { sum: new Float64Array(0), values: new Float32Array(0) };

/**
 * out = sum of weights[i] * sources[i], accumulated in doubles in source
 * order and rounded once to float32, then to the output dtype: averaging
 * identical seeds gives the seed back exactly.
 */
export function averageInto({ sources, weights, out, dtype }: AverageTask): void {
  const count = out.length / DTYPE_SIZE[dtype];
  if (scratch.sum.length < count) scratch = { sum: new Float64Array(count), values: new Float32Array(count) };
  const sum = scratch.sum.subarray(0, count).fill(0);
  const values = scratch.values.subarray(0, count);
  sources.forEach((source, i) => accumulate(sum, decodeFloatsInto(source.bytes, source.dtype, values), weights[i]!));
  encodeFloatsInto(roundToFloat32(sum, values), dtype, out);
}

function accumulate(sum: Float64Array, values: Float32Array, weight: number): void {
  for (let j = 0; j < sum.length; j++) sum[j] = sum[j]! + weight * values[j]!;
}

/** (A loop of its own: inline in a larger function, V8 ran it 10x slower.) */
function roundToFloat32(sum: Float64Array, out: Float32Array): Float32Array {
  for (let j = 0; j < sum.length; j++) out[j] = sum[j]!;
  return out;
}

const isShared = (bytes: Uint8Array) => bytes.buffer instanceof SharedArrayBuffer;

/**
 * Worker threads for averageInto, started on first use: one per core but
 * one, at most 4 (the main thread and the kernel's copies need the rest).
 * Tasks whose buffers are not all shared run inline.
 */
export class AveragePool {
  /** Shared buffers for the sources' slices, reused across tasks. */
  readonly buffers = new SharedBufferPool();
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
