/** Test helpers of the CPU engine: logits of a model folder through its ONNX graph, and references. */
import { join } from "node:path";
import { openModel } from "../../src/arch/model.js";
import { writeOnnx } from "../../src/onnx/export.js";
import { OnnxSession } from "../../src/onnx/session.js";
import { MODEL_FILE } from "../../src/onnx/write.js";
import { SafetensorsReader, toFloat32 } from "../../src/safetensors/index.js";
import { withTempDir } from "../helpers.js";

/** The graphs of `modelDir` written into a temp folder; `body` gets the file of one (default model.onnx); the folder goes when `body` ends. */
export async function withGraph<T>(
  modelDir: string,
  body: (modelFile: string) => Promise<T>,
  file: string = MODEL_FILE,
): Promise<T> {
  return withTempDir(async (dir) => {
    const model = await openModel(modelDir);
    try {
      await writeOnnx(model, dir);
    } finally {
      await model.close();
    }
    return body(join(dir, file));
  });
}

/** A session of one of `modelDir`'s graphs (default model.onnx), closed when `body` ends. */
export async function withSession<T>(
  modelDir: string,
  body: (session: OnnxSession) => Promise<T>,
  file: string = MODEL_FILE,
): Promise<T> {
  return withGraph(
    modelDir,
    async (path) => {
      const session = await OnnxSession.open(path);
      try {
        return await body(session);
      } finally {
        await session.close();
      }
    },
    file,
  );
}

export interface Ids {
  ids: BigInt64Array;
  batch: number;
  seq: number;
}

export async function logitsOf(modelDir: string, { ids, batch, seq }: Ids): Promise<Float32Array> {
  return withSession(modelDir, async (session) => (await session.forward(ids, batch, seq, ["logits"]))[0]!);
}

/** Every tensor of a safetensors file (I64 as BigInt64Array, floats as Float32Array) and its metadata. */
export async function readTensors(file: string): Promise<{
  tensors: Map<string, { shape: number[]; data: Float32Array | BigInt64Array }>;
  metadata: Record<string, string>;
}> {
  const reader = await SafetensorsReader.open(file);
  try {
    const tensors = new Map<string, { shape: number[]; data: Float32Array | BigInt64Array }>();
    for (const info of reader.tensors.values()) {
      const bytes = await reader.read(info.name);
      const data =
        info.dtype === "I64" ? new BigInt64Array(bytes.slice().buffer) : toFloat32(bytes, info.dtype as "F32");
      tensors.set(info.name, { shape: info.shape, data });
    }
    return { tensors, metadata: (reader.metadata ?? {}) as Record<string, string> };
  } finally {
    await reader.close();
  }
}

/** input_ids of a reference file. */
export function idsOf(tensors: Map<string, { shape: number[]; data: Float32Array | BigInt64Array }>): Ids {
  const t = tensors.get("input_ids")!;
  return { ids: t.data as BigInt64Array, batch: t.shape[0]!, seq: t.shape[1]! };
}
