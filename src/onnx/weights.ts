/**
 * Weights as the graph wants them, from the model's BAM-view tensors: float32
 * (f16 and bf16 widened exactly, as the CPU runs f32), rows gathered and
 * concatenated so that one matmul serves every expert's projections.
 */
import type { OpenedModel } from "../arch/model.js";
import { BamError } from "../errors.js";
import { isFloatDType, toFloat32 } from "../safetensors/index.js";

export class WeightSource {
  constructor(private readonly model: OpenedModel) {}

  has(name: string): boolean {
    return this.model.tensors.has(name);
  }

  shape(name: string): number[] {
    return this.info(name).shape;
  }

  async f32(name: string): Promise<Float32Array> {
    const { dtype } = this.info(name);
    if (!isFloatDType(dtype))
      throw new BamError(
        "DTYPE_UNSUPPORTED",
        `${this.model.dir}: tensor ${name} is ${dtype}; only F32, F16 and BF16 weights can run`,
      );
    return toFloat32(await this.model.read(name), dtype);
  }

  private info(name: string) {
    const tensor = this.model.tensors.get(name);
    if (tensor === undefined) throw new BamError("TENSOR_MISSING", `${this.model.dir}: tensor ${name} is missing`);
    return tensor;
  }
}

/**
 * A matrix [rows.length, width] whose row i is row `rows[i].row` of
 * `rows[i].from` (a matrix of the same width): fused and reordered projections.
 */
export function gatherRows(rows: Array<{ from: Float32Array; row: number }>, width: number): Float32Array {
  const out = new Float32Array(rows.length * width);
  for (const [i, { from, row }] of rows.entries()) out.set(from.subarray(row * width, (row + 1) * width), i * width);
  return out;
}

/**
 * A matrix [rows, sum of counts] made of column blocks side by side: block i
 * is columns start..start+count of `from`, a matrix [rows, width].
 */
export function gatherColumns(
  blocks: Array<{ from: Float32Array; width: number; start: number; count: number }>,
  rows: number,
): Float32Array {
  const total = blocks.reduce((sum, b) => sum + b.count, 0);
  const out = new Float32Array(rows * total);
  for (let r = 0; r < rows; r++) {
    let offset = r * total;
    for (const { from, width, start, count } of blocks) {
      out.set(from.subarray(r * width + start, r * width + start + count), offset);
      offset += count;
    }
  }
  return out;
}
