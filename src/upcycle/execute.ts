/**
 * Executes a plan tensor by tensor: each planned tensor becomes a producer of
 * byte ranges that the safetensors writer asks for batch by batch, so memory
 * holds a few batches (and, for Drop-Upcycling, one FFN matrix), whatever
 * the model's size. Plain copies read straight into the writer's buffers.
 */
import type { Seed } from "../arch/index.js";
import {
  convertFloats,
  DTYPE_SIZE,
  elementsOf,
  firstNonFinite,
  fromFloat32,
  isFloatDType,
  toFloat32,
  type FloatDType,
  type TensorToWrite,
} from "../safetensors/index.js";
import { BamError } from "../errors.js";
import type { PlannedTensor, SourceRef, UpcyclePlan } from "./plan.js";
import type { AveragePool } from "./average.js";
import { RandomStream } from "../random.js";

/** Fills a byte range of one output tensor; see TensorToWrite. */
type RangeFiller = (offset: number, into: Uint8Array) => Promise<void>;

/**
 * The plan's tensors as writer input, renamed by `rename` (native formats);
 * `routerRows` holds the rows of routers initialised from prompts. Averages
 * run on `pool`, which the caller closes.
 */
export function tensorsToWrite(
  plan: UpcyclePlan,
  seeds: Seed[],
  pool: AveragePool,
  rename: (name: string) => string = (n) => n,
  routerRows: ReadonlyMap<string, Float32Array> = new Map(),
): TensorToWrite[] {
  // biome-ignore lint/suspicious/useIterableCallbackReturn: the switch returns for every Operation kind (tsc checks it is exhaustive)
  return plan.tensors.map((tensor): TensorToWrite => {
    const layout = { name: rename(tensor.name), dtype: tensor.dtype, shape: tensor.shape };
    const op = tensor.operation;
    switch (op.kind) {
      case "copy":
        return { ...layout, fill: copyRange(seeds, op.from, tensor) };
      case "average":
        return { ...layout, fill: averageRange(seeds, op.from, op.weights, tensor, pool), computeBound: true };
      case "router":
        return {
          ...layout,
          data: () => (op.fromPrompts ? promptRouter(tensor, routerRows) : randomRouter(tensor, op, plan.options.seed)),
        };
      case "drop":
        return {
          ...layout,
          fill: wholeTensorRanges(tensor, () =>
            dropUpcycle(seeds, op.from, tensor, op.ratio, op.axis, plan.options.seed, op.key),
          ),
        };
    }
  });
}

function sourceDType(seeds: Seed[], ref: SourceRef): FloatDType {
  const dtype = seeds[ref.seed]!.tensors.get(ref.tensor)!.dtype;
  if (!isFloatDType(dtype)) {
    throw new BamError(
      "DTYPE_UNSUPPORTED",
      `${seeds[ref.seed]!.dir}: tensor ${ref.tensor} is ${dtype}; only F32, F16 and BF16 weights can be upcycled`,
    );
  }
  return dtype;
}

/**
 * Refuses a seed's values that are NaN or Inf, checked on the bytes as they
 * pass (they are read anyway): an average would spread them through every
 * expert, and the output would load and run as NaN. Named as in the seed's
 * weights file, which `bam inspect --scan` lists in full.
 */
function checkFinite(seeds: Seed[], ref: SourceRef, bytes: Uint8Array, dtype: FloatDType): void {
  if (firstNonFinite(bytes, dtype) < 0) return;
  const seed = seeds[ref.seed]!;
  const stored = seed.tensors.get(ref.tensor)!.source.sourceName;
  throw new BamError(
    "TENSOR_INVALID",
    `${seed.dir}: tensor "${stored}" holds NaN or Inf; repair or replace this seed (bam inspect ${seed.dir} --scan lists every such tensor)`,
  );
}

/** Element range [start, start + count) of the output tensor that a byte range covers. */
function elementRange(tensor: PlannedTensor, offset: number, into: Uint8Array): [number, number] {
  const size = DTYPE_SIZE[tensor.dtype];
  return [offset / size, into.length / size];
}

function copyRange(seeds: Seed[], ref: SourceRef, tensor: PlannedTensor): RangeFiller {
  const seed = seeds[ref.seed]!;
  return async (offset, into) => {
    const from = sourceDType(seeds, ref);
    const [start, count] = elementRange(tensor, offset, into);
    // The common case touches no values: the seed's bytes land in the writer's buffer.
    if (from === tensor.dtype) {
      checkFinite(seeds, ref, await seed.readElements(ref.tensor, start, count, into), from);
    } else {
      const bytes = await seed.readElements(ref.tensor, start, count);
      checkFinite(seeds, ref, bytes, from);
      into.set(convertFloats(bytes, from, tensor.dtype));
    }
  };
}

function averageRange(
  seeds: Seed[],
  refs: SourceRef[],
  weights: number[],
  tensor: PlannedTensor,
  pool: AveragePool,
): RangeFiller {
  return async (offset, into) => {
    const [start, count] = elementRange(tensor, offset, into);
    // Ranges are at most a write batch, so each source's range is read whole, into shared memory a worker can read.
    const sources = refs.map((ref) => {
      const dtype = sourceDType(seeds, ref);
      return { ref, dtype, buffer: pool.buffers.take(count * DTYPE_SIZE[dtype]) };
    });
    try {
      const read = await Promise.all(
        sources.map(({ ref, dtype, buffer }) =>
          seeds[ref.seed]!.readElements(ref.tensor, start, count, buffer.subarray(0, count * DTYPE_SIZE[dtype])),
        ),
      );
      for (const [i, bytes] of read.entries()) checkFinite(seeds, sources[i]!.ref, bytes, sources[i]!.dtype);
      await pool.run({
        sources: read.map((bytes, i) => ({ bytes, dtype: sources[i]!.dtype })),
        weights,
        out: into,
        dtype: tensor.dtype,
      });
    } finally {
      for (const { buffer } of sources) pool.buffers.give(buffer);
    }
  };
}

/** Ranges of a tensor computed whole (a drop needs the matrix's statistics): computed on the first request, dropped after the last. */
function wholeTensorRanges(tensor: PlannedTensor, compute: () => Promise<Uint8Array>): RangeFiller {
  const total = elementsOf(tensor.shape) * DTYPE_SIZE[tensor.dtype];
  let whole: Promise<Uint8Array> | undefined;
  let served = 0;
  return async (offset, into) => {
    whole ??= compute();
    const bytes = await whole;
    into.set(bytes.subarray(offset, offset + into.length));
    served += into.length;
    if (served === total) whole = undefined;
  };
}

function randomRouter(
  tensor: PlannedTensor,
  { std, key, bound }: { std: number; key: string; bound?: number },
  seed: number,
): Uint8Array {
  const values = new Float32Array(elementsOf(tensor.shape));
  const random = new RandomStream(seed, key);
  if (bound !== undefined) {
    for (let i = 0; i < values.length; i++) values[i] = bound * (2 * random.nextUniform() - 1);
  } else if (std > 0) {
    for (let i = 0; i < values.length; i++) values[i] = std * random.nextTruncatedNormal();
  }
  return fromFloat32(values, tensor.dtype);
}

function promptRouter(tensor: PlannedTensor, routerRows: ReadonlyMap<string, Float32Array>): Uint8Array {
  const rows = routerRows.get(tensor.name);
  if (rows === undefined) throw new BamError("OPTIONS_INVALID", `${tensor.name}: no rows from prompts were computed`);
  return fromFloat32(rows, tensor.dtype);
}

/**
 * Drop-Upcycling (arXiv 2502.19261): re-draw a fraction `ratio` of the
 * intermediate dimensions from N(mean, std) of the original matrix. The
 * dimensions depend only on (seed, layer, expert), so an expert's gate, up
 * and down projections drop the same ones.
 */
async function dropUpcycle(
  seeds: Seed[],
  ref: SourceRef,
  tensor: PlannedTensor,
  ratio: number,
  axis: 0 | 1,
  seed: number,
  key: string,
): Promise<Uint8Array> {
  const [rows, cols] = tensor.shape as [number, number];
  const from = sourceDType(seeds, ref);
  const bytes = await seeds[ref.seed]!.readElements(ref.tensor, 0, rows * cols);
  checkFinite(seeds, ref, bytes, from);
  const values = toFloat32(bytes, from);
  let mean = 0;
  for (const v of values) mean += v;
  mean /= values.length;
  let variance = 0;
  for (const v of values) variance += (v - mean) ** 2;
  const std = Math.sqrt(variance / values.length);
  const intermediate = axis === 0 ? rows : cols;
  const dropped = new RandomStream(seed, `${key}/dims`).sampleIndices(intermediate, Math.round(ratio * intermediate));
  const noise = new RandomStream(seed, `${key}/${tensor.name}`);
  for (const d of dropped) {
    if (axis === 0) {
      for (let c = 0; c < cols; c++) values[d * cols + c] = mean + std * noise.nextNormal();
    } else {
      for (let r = 0; r < rows; r++) values[r * cols + d] = mean + std * noise.nextNormal();
    }
  }
  return fromFloat32(values, tensor.dtype);
}
