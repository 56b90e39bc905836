/**
 * Writes a graph as `model.onnx` plus its weights in `model.onnx_data`
 * (ONNX external data, the layout onnx.save writes and transformers.js
 * loads as `use_external_data_format`). Weights are produced and written one
 * at a time, so memory holds one weight at most; the graph file stays small,
 * under protobuf's 2 GB limit whatever the model's size.
 */
import { type FileHandle, open, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { BamError, ioError } from "../errors.js";
import { elementsOf } from "../safetensors/index.js";
import { valueInfo, type Graph } from "./graph.js";
import { DataType, encodeModel, IR_VERSION, type TensorMessage } from "./proto.js";

export const MODEL_FILE = "model.onnx";
/** The generation graph (BuildOptions.cache "slots") beside model.onnx, over the same weights file. */
export const GENERATE_FILE = "generate.onnx";
/** The scoring graph (BuildOptions.cache "none": bam eval's perplexity) beside model.onnx, over the same weights file. */
export const SCORE_FILE = "score.onnx";
export const DATA_FILE = "model.onnx_data";
/** Large weights start on 64 KiB boundaries so the runtime can map them (onnx.save's align_offset). */
const ALIGN_LARGE = 65536;
const LARGE_BYTES = 1 << 20;
const ALIGN_SMALL = 64;

export interface WriteModelOptions {
  opset: number;
  producerVersion: string;
  /** Stored in the model's metadata_props. */
  metadata?: Record<string, string>;
  signal?: AbortSignal;
  /** After each weight: bytes of weights written so far and in all. */
  onProgress?: (written: number, total: number) => void;
  /** More graphs over the same weights, each written as its own file beside model.onnx, reading model.onnx_data. */
  siblings?: Array<{ file: string; graph: Graph }>;
}

/** Writes `model.onnx` and `model.onnx_data` into `dir`; returns the bytes of weights. */
export async function writeModel(graph: Graph, dir: string, options: WriteModelOptions): Promise<number> {
  const total = graph.weights.reduce((sum, w) => sum + 4 * elementsOf(w.dims), 0);
  const initializers: TensorMessage[] = [];
  const dataPath = join(dir, DATA_FILE);
  let offset = 0;
  let file: FileHandle;
  try {
    file = await open(dataPath, "w");
  } catch (error) {
    throw ioError(dataPath, error);
  }
  try {
    for (const weight of graph.weights) {
      if (options.signal?.aborted) throw new BamError("ABORTED", `${dir}: interrupted`);
      const values = await weight.produce();
      if (values.length !== elementsOf(weight.dims)) {
        throw new BamError("TENSOR_SHAPE", `${weight.name}: ${values.length} values for shape [${weight.dims}]`);
      }
      const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
      const align = bytes.length >= LARGE_BYTES ? ALIGN_LARGE : ALIGN_SMALL;
      offset = Math.ceil(offset / align) * align;
      await file.write(bytes, 0, bytes.length, offset);
      initializers.push({
        name: weight.name,
        dims: weight.dims,
        dataType: DataType.FLOAT,
        dataLocation: 1,
        externalData: [
          { key: "location", value: DATA_FILE },
          { key: "offset", value: String(offset) },
          { key: "length", value: String(bytes.length) },
        ],
      });
      offset += bytes.length;
      options.onProgress?.(offset, total);
    }
  } catch (error) {
    throw ioError(dataPath, error);
  } finally {
    await file.close();
  }
  const stored = new Map(initializers.map((tensor) => [tensor.name, tensor]));
  for (const { file, graph: written } of [{ file: MODEL_FILE, graph }, ...(options.siblings ?? [])]) {
    const weights = written.weights.map((weight) => {
      const tensor = stored.get(weight.name);
      if (tensor === undefined) throw new Error(`${file}: weight ${weight.name} is not among ${MODEL_FILE}'s`);
      return tensor;
    });
    const model = encodeModel({
      irVersion: IR_VERSION,
      opsetImport: [
        { domain: "", version: options.opset },
        ...written.contribDomains.map((domain) => ({ domain, version: 1 })),
      ],
      producerName: "bam-upcycle",
      producerVersion: options.producerVersion,
      graph: {
        name: "bam",
        node: written.nodes,
        initializer: [...written.constants, ...weights],
        input: written.inputs.map(valueInfo),
        output: written.outputs.map(valueInfo),
      },
      metadataProps: Object.entries(options.metadata ?? {}).map(([key, value]) => ({ key, value })),
    });
    try {
      await writeFile(join(dir, file), model);
    } catch (error) {
      throw ioError(join(dir, file), error);
    }
  }
  return total;
}
