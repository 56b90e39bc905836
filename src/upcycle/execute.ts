/**
 * Executes a plan tensor by tensor: each planned tensor becomes a lazy
 * stream of byte chunks that the safetensors writer pulls in order, so at
 * most one chunk per seed (and, for Drop-Upcycling, one FFN matrix) is in
 * memory at a time, whatever the model's size.
 */
import type { Seed } from "../arch/index.js";
import { convertFloats, fromFloat32, isFloatDType, toFloat32, type FloatDType, type TensorToWrite } from "../safetensors/index.js";
import { BamError } from "../errors.js";
import { CHUNK_ELEMENTS, COPY_CHUNK_ELEMENTS, type PlannedTensor, type SourceRef, type UpcyclePlan } from "./plan.js";
import { RandomStream } from "./random.js";

const elementsOf = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

/**
 * The plan's tensors as writer input, renamed by `rename` (native formats);
 * `routerRows` holds the rows of routers initialised from prompts.
 */
export function tensorsToWrite(
  plan: UpcyclePlan, seeds: Seed[], rename: (name: string) => string = (n) => n, routerRows: ReadonlyMap<string, Float32Array> = new Map(),
): TensorToWrite[] {
  return plan.tensors.map((tensor) => ({
    name: rename(tensor.name),
    dtype: tensor.dtype,
    shape: tensor.shape,
    data: () => produce(tensor, plan, seeds, routerRows),
  }));
}

function produce(tensor: PlannedTensor, plan: UpcyclePlan, seeds: Seed[], routerRows: ReadonlyMap<string, Float32Array>): AsyncIterable<Uint8Array> {
  const op = tensor.operation;
  switch (op.kind) {
    case "copy":
      return copyChunks(seeds, op.from, tensor);
    case "average":
      return averageChunks(seeds, op.from, op.weights, tensor);
    case "router":
      if (op.fromPrompts) return promptRouterChunks(tensor, routerRows);
      return routerChunks(tensor, op.std, plan.options.seed, op.key);
    case "drop":
      return dropUpcycle(seeds, op.from, tensor, op.ratio, op.axis, plan.options.seed, op.key);
  }
}

function sourceDType(seeds: Seed[], ref: SourceRef): FloatDType {
  const dtype = seeds[ref.seed]!.tensors.get(ref.tensor)!.dtype;
  if (!isFloatDType(dtype)) {
    throw new BamError("DTYPE_UNSUPPORTED", `${seeds[ref.seed]!.dir}: tensor ${ref.tensor} is ${dtype}; only F32, F16 and BF16 weights can be upcycled`);
  }
  return dtype;
}

/** Element ranges of `size` covering a tensor. */
function* chunkRanges(total: number, size = CHUNK_ELEMENTS): Generator<[number, number]> {
  for (let start = 0; start < total; start += size) yield [start, Math.min(size, total - start)];
}

async function* copyChunks(seeds: Seed[], ref: SourceRef, tensor: PlannedTensor): AsyncGenerator<Uint8Array> {
  const seed = seeds[ref.seed]!;
  const from = sourceDType(seeds, ref);
  // Plain copies touch no values: large chunks mean fewer, larger reads and writes.
  for (const [start, count] of chunkRanges(elementsOf(tensor.shape), COPY_CHUNK_ELEMENTS)) {
    yield convertFloats(await seed.readElements(ref.tensor, start, count), from, tensor.dtype);
  }
}

async function* averageChunks(seeds: Seed[], refs: SourceRef[], weights: number[], tensor: PlannedTensor): AsyncGenerator<Uint8Array> {
  for (const [start, count] of chunkRanges(elementsOf(tensor.shape))) {
    const values = await Promise.all(refs.map(async (ref) => toFloat32(await seeds[ref.seed]!.readElements(ref.tensor, start, count), sourceDType(seeds, ref))));
    yield fromFloat32(weightedSum(values, weights), tensor.dtype);
  }
}

/**
 * Sum of weights[i] * values[i], element by element, accumulated in a double
 * (a JS number) and rounded once to float32: averaging identical seeds gives
 * the seed back exactly.
 */
function weightedSum(values: Float32Array[], weights: number[]): Float32Array {
  const out = new Float32Array(values[0]!.length);
  for (let j = 0; j < out.length; j++) {
    let sum = 0;
    for (let i = 0; i < values.length; i++) sum += weights[i]! * values[i]![j]!;
    out[j] = sum;
  }
  return out;
}

async function* routerChunks(tensor: PlannedTensor, std: number, seed: number, key: string): AsyncGenerator<Uint8Array> {
  const values = new Float32Array(elementsOf(tensor.shape));
  if (std > 0) {
    const random = new RandomStream(seed, key);
    for (let i = 0; i < values.length; i++) values[i] = std * random.nextTruncatedNormal();
  }
  yield fromFloat32(values, tensor.dtype);
}

async function* promptRouterChunks(tensor: PlannedTensor, routerRows: ReadonlyMap<string, Float32Array>): AsyncGenerator<Uint8Array> {
  const rows = routerRows.get(tensor.name);
  if (rows === undefined) throw new BamError("OPTIONS_INVALID", `${tensor.name}: no rows from prompts were computed`);
  yield fromFloat32(rows, tensor.dtype);
}

/**
 * Drop-Upcycling (arXiv 2502.19261): re-draw a fraction `ratio` of the
 * intermediate dimensions from N(mean, std) of the original matrix. The
 * dimensions depend only on (seed, layer, expert), so an expert's gate, up
 * and down projections drop the same ones.
 */
async function* dropUpcycle(
  seeds: Seed[], ref: SourceRef, tensor: PlannedTensor, ratio: number, axis: 0 | 1, seed: number, key: string,
): AsyncGenerator<Uint8Array> {
  const [rows, cols] = tensor.shape as [number, number];
  const values = toFloat32(await seeds[ref.seed]!.readElements(ref.tensor, 0, rows * cols), sourceDType(seeds, ref));
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
  yield fromFloat32(values, tensor.dtype);
}
