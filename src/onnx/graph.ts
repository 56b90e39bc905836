/**
 * A small ONNX graph builder: nodes by op type with readable unique value
 * names, small constants stored inline, and weights as lazy producers that
 * the writer pulls one at a time into the external data file (so memory
 * stays bounded by the largest weight, whatever the model's size).
 */
import {
  AttributeType,
  DataType,
  type AttributeMessage,
  type Dimension,
  type NodeMessage,
  type TensorMessage,
  type ValueInfoMessage,
} from "./proto.js";

/** A dimension: a size, or a symbolic name ("batch_size"). */
export type Dim = number | string;

/** Node attributes: integers, integer lists, strings, or floats wrapped by `float()`. */
export type Attribute = number | number[] | string | { float: number };

export function float(value: number): { float: number } {
  return { float: value };
}

/** A weight: f32 values [dims] produced on demand, once, when the model is written. */
export interface Weight {
  name: string;
  dims: number[];
  produce: () => Promise<Float32Array>;
}

export interface GraphIO {
  name: string;
  type: DataType;
  shape: Dim[];
}

/** onnxruntime's own operators (GroupQueryAttention, FusedMatMul, RotaryEmbedding); version 1 is the only one. */
export const CONTRIB_DOMAIN = "com.microsoft";

export class Graph {
  readonly nodes: NodeMessage[] = [];
  readonly constants: TensorMessage[] = [];
  readonly weights: Weight[] = [];
  readonly inputs: GraphIO[] = [];
  readonly outputs: GraphIO[] = [];
  private readonly used = new Set<string>();
  private readonly constantCache = new Map<string, string>();
  private scopeName = "";

  /** Runs `body` with node names prefixed by `name/` (layer and block names in the graph). */
  scope<T>(name: string, body: () => T): T {
    const outer = this.scopeName;
    this.scopeName = `${outer}${name}/`;
    try {
      return body();
    } finally {
      this.scopeName = outer;
    }
  }

  input(name: string, type: DataType, shape: Dim[]): string {
    this.inputs.push({ name, type, shape });
    this.used.add(name);
    return name;
  }

  /** Names `value` as a graph output (an Identity node when the value already has another name). */
  output(value: string, name: string, type: DataType, shape: Dim[]): void {
    if (value !== name)
      this.nodes.push({ name: `${name}/identity`, opType: "Identity", input: [value], output: [name], attribute: [] });
    this.used.add(name);
    this.outputs.push({ name, type, shape });
  }

  /** One node with one output; "" in `inputs` skips an optional input. */
  op(opType: string, inputs: string[], attributes: Record<string, Attribute> = {}): string {
    return this.opN(opType, inputs, 1, attributes)[0]!;
  }

  /** One node with `count` outputs. */
  opN(opType: string, inputs: string[], count: number, attributes: Record<string, Attribute> = {}): string[] {
    return this.node("", opType, inputs, count, attributes);
  }

  /** One node of onnxruntime's contrib operators (domain com.microsoft, version 1). */
  contribOpN(opType: string, inputs: string[], count: number, attributes: Record<string, Attribute> = {}): string[] {
    return this.node(CONTRIB_DOMAIN, opType, inputs, count, attributes);
  }

  /** The operator sets the nodes use, as ModelProto's opset_import lists them beside ONNX's own. */
  get contribDomains(): string[] {
    return this.nodes.some((node) => node.domain === CONTRIB_DOMAIN) ? [CONTRIB_DOMAIN] : [];
  }

  private node(
    domain: string,
    opType: string,
    inputs: string[],
    count: number,
    attributes: Record<string, Attribute>,
  ): string[] {
    const base = this.unique(`${this.scopeName}${opType}`);
    const output = Array.from({ length: count }, (_, i) => (count === 1 ? base : `${base}:${i}`));
    this.used.add(base);
    for (const name of output) this.used.add(name);
    this.nodes.push({
      name: base,
      opType,
      input: inputs,
      output,
      attribute: Object.entries(attributes).map(([name, value]) => attributeMessage(name, value)),
      ...(domain === "" ? {} : { domain }),
    });
    return output;
  }

  /** An int64 constant (shapes, axes, indices), shared by every user of the same values. */
  int64(values: number[], dims: number[] = [values.length]): string {
    const data = new Uint8Array(new BigInt64Array(values.map(BigInt)).buffer);
    return this.constant(DataType.INT64, dims, data, `i64[${values.join(",")}]/${dims.join("x")}`);
  }

  /** A float32 constant, shared by every user of the same values. */
  float32(values: ArrayLike<number>, dims: number[] = [values.length]): string {
    const data = new Uint8Array(Float32Array.from(values).buffer);
    return this.constant(DataType.FLOAT, dims, data, `f32[${Array.from(values).join(",")}]/${dims.join("x")}`);
  }

  /** A float32 scalar (rank 0). */
  scalar(value: number): string {
    return this.float32([value], []);
  }

  /** Declares a weight; its data comes from `produce` when the model is written. */
  weight(name: string, dims: number[], produce: () => Promise<Float32Array>): string {
    if (this.used.has(name)) throw new Error(`weight ${name} declared twice`);
    this.used.add(name);
    this.weights.push({ name, dims, produce });
    return name;
  }

  private constant(type: DataType, dims: number[], rawData: Uint8Array, key: string): string {
    const cached = this.constantCache.get(key);
    if (cached !== undefined) return cached;
    const name = this.unique(`const/${type === DataType.INT64 ? "i64" : "f32"}`);
    this.used.add(name);
    this.constants.push({ name, dims, dataType: type, rawData });
    this.constantCache.set(key, name);
    return name;
  }

  private unique(base: string): string {
    if (!this.used.has(base)) return base;
    for (let i = 1; ; i++) {
      const name = `${base}_${i}`;
      if (!this.used.has(name)) return name;
    }
  }
}

function attributeMessage(name: string, value: Attribute): AttributeMessage {
  if (typeof value === "number") {
    if (!Number.isInteger(value)) throw new Error(`attribute ${name}: wrap float values in float()`);
    return { name, type: AttributeType.INT, i: value };
  }
  if (typeof value === "string") return { name, type: AttributeType.STRING, s: new TextEncoder().encode(value) };
  if (Array.isArray(value)) return { name, type: AttributeType.INTS, ints: value };
  return { name, type: AttributeType.FLOAT, f: value.float };
}

export function valueInfo({ name, type, shape }: GraphIO): ValueInfoMessage {
  const dim: Dimension[] = shape.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d }));
  return { name, type: { tensorType: { elemType: type, shape: { dim } } } };
}
