/**
 * Safetensors files: a valid file (a fixture's weights, or a small synthetic
 * file of random dtypes and shapes) edited at the structure level (dtypes,
 * shapes, offsets overlapping, out of range, with gaps, huge; names;
 * metadata; duplicated keys) and at the byte level (header length, JSON
 * syntax, truncation at every region, trailing bytes, non-UTF-8).
 *
 * Entry points: SafetensorsReader.open, read and readBytes; for files made
 * from a fixture, openSeed on the fixture folder holding the file, then an
 * upcycle of it.
 */
import { cp, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { openSeed } from "../../../src/arch/index.js";
import { DTYPE_SIZE, type DType, SafetensorsReader, tensorByteLength } from "../../../src/safetensors/index.js";
import { FAMILIES } from "../../../src/arch/types.js";
import { fixture } from "../../helpers.js";
import { type CaseContext, judgeError, maybeUpcycle, reportViolation, type Step } from "../harness.js";
import { deepJsonText, encoder, invalidUtf8, mutateBytes, mutateText, oddJsonValue, splice } from "../mutate.js";
import type { Rng } from "../rng.js";

const DTYPES = Object.keys(DTYPE_SIZE) as DType[];
const METADATA = "__metadata__";

/** A safetensors file as its header entries (in order) and its data section. */
export interface StModel {
  entries: Array<[string, unknown]>;
  data: Uint8Array;
}

interface TensorEntry {
  dtype: unknown;
  shape: unknown;
  data_offsets: unknown;
}

interface Serialize {
  /** Replaces the JSON built from the entries. */
  headerText?: string;
  /** Entry index to write twice (a repeated key). */
  duplicate?: number;
  pad: string;
  textEdits: number;
}

const cache = new Map<string, Uint8Array>();

async function cachedFile(path: string): Promise<Uint8Array> {
  let bytes = cache.get(path);
  if (bytes === undefined) {
    bytes = new Uint8Array(await readFile(path));
    cache.set(path, bytes);
  }
  return bytes;
}

export function parseSafetensors(bytes: Uint8Array): StModel {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as Record<string, unknown>;
  return { entries: Object.entries(header), data: bytes.slice(8 + n) };
}

function tensorEntries(model: StModel): Array<[string, TensorEntry]> {
  return model.entries.filter(
    ([name, value]) => name !== METADATA && typeof value === "object" && value !== null && !Array.isArray(value),
  ) as Array<[string, TensorEntry]>;
}

/** A small valid file with random dtypes, shapes (zero-sized included) and metadata. */
export function syntheticSafetensors(rng: Rng): StModel {
  const entries: Array<[string, unknown]> = [];
  if (rng.chance(0.5)) entries.push([METADATA, { format: "pt", note: rng.pick(["", "x", "\u00e9\u4e2d", "a b"]) }]);
  let offset = 0;
  const count = rng.int(0, 8);
  for (let i = 0; i < count; i++) {
    const dtype = rng.pick(DTYPES);
    const shape = Array.from({ length: rng.int(0, 4) }, () => rng.int(0, 5));
    const bytes = Number(tensorByteLength(dtype, shape));
    entries.push([
      rng.pick([`t${i}`, `model.layers.${i}.w`, `${i}`, `\u00e9${i}`]),
      { dtype, shape, data_offsets: [offset, offset + bytes] },
    ]);
    offset += bytes;
  }
  rng.shuffle(entries);
  return { entries, data: rng.bytes(offset) };
}

function buildHeader(model: StModel, options: Serialize): string {
  if (options.headerText !== undefined) return options.headerText;
  const parts = model.entries.map(([name, value]) => `${JSON.stringify(name)}:${JSON.stringify(value)}`);
  if (options.duplicate !== undefined && parts[options.duplicate] !== undefined) parts.push(parts[options.duplicate]!);
  return `{${parts.join(",")}}`;
}

export function serialize(model: StModel, options: Serialize): { bytes: Uint8Array; headerLength: number } {
  let text = buildHeader(model, options);
  let header = encoder.encode(text);
  if (options.pad !== "") {
    while (header.length % 8 !== 0) {
      text += options.pad[0];
      header = encoder.encode(text);
    }
  }
  const bytes = new Uint8Array(8 + header.length + model.data.length);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(header.length), true);
  bytes.set(header, 8);
  bytes.set(model.data, 8 + header.length);
  return { bytes, headerLength: header.length };
}

const ODD_NAMES = [
  "",
  METADATA,
  "\n",
  "a\u0000b",
  "\u001b[31mred",
  "../../etc/passwd",
  "/abs",
  "\ud800",
  "\u2028",
  "n".repeat(10_000),
  "model.embed_tokens.weight",
  "0",
];

function oddShape(rng: Rng, shape: unknown): unknown {
  const dims = Array.isArray(shape) ? (shape as number[]) : [1];
  return rng.pick<() => unknown>([
    () => [],
    () => [-1],
    () => [1.5],
    () => [2 ** 53],
    () => [2 ** 31, 2 ** 31, 2 ** 31],
    () => [Number.MAX_SAFE_INTEGER, 0],
    () => ["3"],
    () => null,
    () => 3,
    () => [[3]],
    () => [1e20],
    () => [0],
    () => dims.map((d, i) => (i === 0 ? d + 1 : d)),
    () => [...dims].reverse(),
    () => [...dims, 1],
    () => Array.from({ length: 64 }, () => 1),
    () => dims.slice(1),
    () => oddJsonValue(rng),
  ])();
}

function oddOffsets(rng: Rng, offsets: unknown, dataLength: number): unknown {
  const [b, e] = Array.isArray(offsets) && offsets.length === 2 ? (offsets as [number, number]) : [0, 0];
  return rng.pick<() => unknown>([
    () => [e, b],
    () => [0, 0],
    () => [b + 1, e + 1],
    () => [b - 1, e - 1],
    () => [b, e + 1],
    () => [b, e - 1],
    () => [b, dataLength + rng.int(1, 1000)],
    () => [b, 2 ** 53],
    () => [2 ** 53 + 2, 2 ** 53 + 10],
    () => [-1, e],
    () => [b + 0.5, e + 0.5],
    () => [String(b), String(e)],
    () => [b, e, e],
    () => [b],
    () => null,
    () => ({ begin: b, end: e }),
    () => [b, 2 ** 40],
    () => [dataLength, dataLength + (e - b)],
  ])();
}

/** Recomputes offsets in entry order for entries whose dtype and shape are valid, resizing the data to match. */
function relayout(rng: Rng, model: StModel): void {
  let offset = 0;
  for (const [, entry] of tensorEntries(model)) {
    const { dtype, shape } = entry;
    if (
      typeof dtype !== "string" ||
      !Object.hasOwn(DTYPE_SIZE, dtype) ||
      !Array.isArray(shape) ||
      !shape.every((d) => Number.isSafeInteger(d) && d >= 0)
    )
      continue;
    const bytes = tensorByteLength(dtype as DType, shape as number[]);
    if (bytes > 4_000_000n) continue;
    entry.data_offsets = [offset, offset + Number(bytes)];
    offset += Number(bytes);
  }
  const data = new Uint8Array(offset);
  data.set(model.data.subarray(0, offset));
  if (offset > model.data.length) data.set(rng.bytes(offset - model.data.length), model.data.length);
  model.data = data;
}

type StructureOp = (rng: Rng, model: StModel, options: Serialize) => string;

const STRUCTURE_OPS: ReadonlyArray<readonly [number, StructureOp]> = [
  [
    3,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "dtype: no tensor";
      t[1].dtype = rng.pick<unknown>([
        ...DTYPES,
        "F4",
        "f32",
        "",
        "FLOAT",
        32,
        null,
        [],
        {},
        "U64",
        "I128",
        "F8_E8M0",
        "C64",
        "__proto__",
      ]);
      const consistent = rng.chance(0.5);
      if (consistent) relayout(rng, model);
      return `dtype of ${short(t[0])} -> ${JSON.stringify(t[1].dtype)}${consistent ? " (relaid out)" : ""}`;
    },
  ],
  [
    3,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "shape: no tensor";
      t[1].shape = oddShape(rng, t[1].shape);
      const consistent = rng.chance(0.5);
      if (consistent) relayout(rng, model);
      return `shape of ${short(t[0])} -> ${short(JSON.stringify(t[1].shape))}${consistent ? " (relaid out)" : ""}`;
    },
  ],
  [
    3,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "offsets: no tensor";
      t[1].data_offsets = oddOffsets(rng, t[1].data_offsets, model.data.length);
      return `data_offsets of ${short(t[0])} -> ${short(JSON.stringify(t[1].data_offsets))}`;
    },
  ],
  [
    2,
    (rng, model) => {
      const tensors = tensorEntries(model);
      if (tensors.length < 2) return "overlap: fewer than 2 tensors";
      const [a, b] = rng.shuffle([...tensors]);
      b![1].dtype = a![1].dtype;
      b![1].shape = a![1].shape;
      b![1].data_offsets = a![1].data_offsets;
      return `${short(b![0])} overlaps ${short(a![0])}`;
    },
  ],
  [
    2,
    (rng, model) => {
      const at = rng.int(0, model.data.length);
      const gap = rng.int(1, 64);
      for (const [, entry] of tensorEntries(model)) {
        const o = entry.data_offsets;
        if (Array.isArray(o) && typeof o[0] === "number" && typeof o[1] === "number" && o[0] >= at)
          entry.data_offsets = [o[0] + gap, o[1] + gap];
      }
      model.data = splice(model.data, at, 0, rng.bytes(gap));
      return `gap of ${gap} bytes at data byte ${at}`;
    },
  ],
  [
    1,
    (rng, model) => {
      if (model.entries.length === 0) return "remove: no entry";
      const [removed] = model.entries.splice(rng.int(0, model.entries.length - 1), 1);
      return `removed entry ${short(removed![0])}`;
    },
  ],
  [
    1,
    (rng, model, options) => {
      if (model.entries.length === 0) return "duplicate: no entry";
      options.duplicate = rng.int(0, model.entries.length - 1);
      return `entry ${short(model.entries[options.duplicate]![0])} written twice`;
    },
  ],
  [
    2,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "rename: no tensor";
      const name = rng.pick(ODD_NAMES);
      const entry = model.entries.find((e) => e[0] === t[0])!;
      entry[0] = name;
      return `renamed ${short(t[0])} -> ${JSON.stringify(short(name))}`;
    },
  ],
  [
    2,
    (rng, model) => {
      const value = rng.pick<() => unknown>([
        () => null,
        () => 1,
        () => "x",
        () => [],
        () => ({ a: 1 }),
        () => ({ a: null }),
        () => ({ a: {} }),
        () => ({ "": "" }),
        () => ({ big: "m".repeat(rng.int(1, 200_000)) }),
        () => oddJsonValue(rng),
      ])();
      const existing = model.entries.find(([name]) => name === METADATA);
      if (existing) existing[1] = value;
      else model.entries.unshift([METADATA, value]);
      return `${METADATA} -> ${short(JSON.stringify(value) ?? "undefined")}`;
    },
  ],
  [
    2,
    (rng, model) => {
      if (model.entries.length === 0) return "entry value: no entry";
      const entry = rng.pick(model.entries);
      entry[1] = rng.chance(0.5)
        ? oddJsonValue(rng)
        : rng.pick<unknown>([
            { dtype: "F32" },
            { shape: [], data_offsets: [0, 0] },
            { dtype: "F32", shape: [0], data_offsets: [0, 0], extra: [1] },
          ]);
      return `value of ${short(entry[0])} -> ${short(JSON.stringify(entry[1]) ?? "")}`;
    },
  ],
  [
    1,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "missing field: no tensor";
      const field = rng.pick(["dtype", "shape", "data_offsets"] as const);
      delete (t[1] as Partial<TensorEntry>)[field];
      return `deleted ${field} of ${short(t[0])}`;
    },
  ],
  [
    1,
    (rng, model) => {
      const count = rng.pick([10, 1000, rng.int(1, 30_000)]);
      for (let i = 0; i < count; i++)
        model.entries.push([`zero.${i}`, { dtype: "F32", shape: [0, rng.int(0, 9)], data_offsets: [0, 0] }]);
      return `${count} zero-sized tensors`;
    },
  ],
  [
    1,
    (rng, model) => {
      rng.shuffle(model.entries);
      return "entries shuffled";
    },
  ],
  [
    1,
    (rng, model) => {
      const t = pickTensor(rng, model);
      if (!t) return "huge claim: no tensor";
      // A consistent lie: shape and offsets agree, but the data is not in the file.
      t[1].dtype = "F32";
      t[1].shape = [2 ** 20, 2 ** 20];
      const begin = model.data.length;
      t[1].data_offsets = [begin, begin + 2 ** 42];
      return `${short(t[0])} claims 4 TiB at the end`;
    },
  ],
  [
    1,
    (rng, model) => {
      const floats = new Float32Array([NaN, Infinity, -Infinity, -0, 3.4e38, 1e-45]);
      const bytes = new Uint8Array(floats.buffer);
      for (let i = 0; i + bytes.length <= model.data.length; i += rng.int(bytes.length, 4096))
        model.data.set(bytes, i - (i % 4));
      return "NaN/Inf values in the data";
    },
  ],
  [
    2,
    (rng, _model, options) => {
      options.headerText = rng.pick<() => string>([
        () => "[]",
        () => "null",
        () => "1",
        () => '"x"',
        () => "{}",
        () => '{"a":1}',
        () => "",
        () => " ".repeat(rng.int(1, 100)),
        () => deepJsonText(rng.int(1000, 200_000)),
        () => deepJsonText(rng.int(1000, 200_000), "object"),
        () => "{".repeat(rng.int(1, 1000)),
        () => `{"t":{"dtype":"F32","shape":[${"1,".repeat(rng.int(1, 50_000))}1],"data_offsets":[0,4]}}`,
      ])();
      return `header replaced by ${short(options.headerText)}`;
    },
  ],
  [
    1,
    (rng, _model, options) => {
      options.pad = rng.pick(["", "\u0000", "\t", "\n", " "]);
      return `header padded with ${JSON.stringify(options.pad)}`;
    },
  ],
  [
    2,
    (rng, _model, options) => {
      options.textEdits += rng.int(1, 3);
      return "JSON text edits";
    },
  ],
];

type ByteOp = (rng: Rng, bytes: Uint8Array, headerLength: number, model: StModel) => [Uint8Array, string];

const BYTE_OPS: ReadonlyArray<readonly [number, ByteOp]> = [
  [
    3,
    (rng, bytes, n) => {
      const size = bytes.length;
      const value = rng.pick([
        0n,
        1n,
        7n,
        BigInt(n - 1),
        BigInt(n + 1),
        BigInt(n + 8),
        BigInt(size - 8),
        BigInt(size - 7),
        BigInt(size),
        100_000_000n,
        100_000_001n,
        2n ** 32n,
        2n ** 53n,
        2n ** 63n,
        2n ** 64n - 1n,
      ]);
      const out = bytes.slice();
      if (out.length >= 8) new DataView(out.buffer).setBigUint64(0, BigInt.asUintN(64, value), true);
      return [out, `header length -> ${value}`];
    },
  ],
  [
    4,
    (rng, bytes, n, model) => {
      const boundaries = [0, 1, 4, 7, 8, 9, 8 + rng.int(0, n), 8 + n - 1, 8 + n, 8 + n + 1, bytes.length - 1];
      for (const [, entry] of tensorEntries(model)) {
        const o = entry.data_offsets;
        if (Array.isArray(o) && typeof o[0] === "number" && typeof o[1] === "number") {
          boundaries.push(8 + n + o[0] - 1, 8 + n + o[0], 8 + n + o[0] + 1, 8 + n + o[1] - 1, 8 + n + o[1]);
        }
      }
      const at = Math.max(
        0,
        Math.min(bytes.length - 1, rng.chance(0.7) ? rng.pick(boundaries) : rng.int(0, bytes.length)),
      );
      return [bytes.slice(0, at), `truncated to ${at} of ${bytes.length} bytes`];
    },
  ],
  [
    2,
    (rng, bytes) => {
      const extra = rng.chance(0.5) ? new Uint8Array(rng.int(1, 4096)) : rng.bytes(rng.int(1, 64));
      const out = new Uint8Array(bytes.length + extra.length);
      out.set(bytes);
      out.set(extra, bytes.length);
      return [out, `${extra.length} trailing bytes`];
    },
  ],
  [3, (rng, bytes, n) => mutateBytes(rng, bytes, 8, 8 + n)],
  [1, (rng, bytes) => mutateBytes(rng, bytes)],
  [
    2,
    (rng, bytes, n) => {
      // Non-UTF-8 inside the header, with the length fixed up so that only the encoding is wrong.
      const bad = invalidUtf8(rng);
      const at = 8 + rng.int(1, Math.max(1, n - 1));
      const out = splice(bytes, at, 0, bad);
      new DataView(out.buffer).setBigUint64(0, BigInt(n + bad.length), true);
      return [out, `non-UTF-8 ${[...bad].map((b) => b.toString(16)).join("")} in the header (length fixed)`];
    },
  ],
  [
    1,
    (_rng, bytes, n) => {
      const bom = Uint8Array.from([0xef, 0xbb, 0xbf]);
      const out = splice(bytes, 8, 0, bom);
      new DataView(out.buffer).setBigUint64(0, BigInt(n + 3), true);
      return [out, "UTF-8 byte-order mark before the header"];
    },
  ],
];

function pickTensor(rng: Rng, model: StModel): [string, TensorEntry] | undefined {
  const tensors = tensorEntries(model);
  return tensors.length === 0 ? undefined : rng.pick(tensors);
}

function short(text: string): string {
  const t = JSON.stringify(text).slice(1, -1);
  return t.length > 60 ? `${t.slice(0, 57)}...` : t;
}

/** A mutated safetensors file; `base` is the fixture folder it came from, if any. */
export async function mutatedSafetensors(
  rng: Rng,
  notes: string[],
  source?: string,
): Promise<{ bytes: Uint8Array; base?: string }> {
  let model: StModel;
  let base: string | undefined;
  if (source !== undefined) {
    model = parseSafetensors(await cachedFile(source));
  } else if (rng.chance(0.6)) {
    const family = rng.pick(FAMILIES);
    base = fixture(family, rng.pick(["base", "bf16"] as const));
    model = parseSafetensors(await cachedFile(join(base, "model.safetensors")));
    notes.push(`from ${family}/${base.split("/").pop()}`);
  } else {
    model = syntheticSafetensors(rng);
    notes.push(`synthetic, ${tensorEntries(model).length} tensors`);
  }
  model = { entries: structuredClone(model.entries), data: model.data };
  const options: Serialize = { pad: " ", textEdits: 0 };
  const structural = rng.weighted<number>([
    [1, 0],
    [5, 1],
    [3, 2],
    [1, 3],
  ]);
  for (let i = 0; i < structural; i++) notes.push(rng.weighted(STRUCTURE_OPS)(rng, model, options));
  let text = buildHeader(model, options);
  for (let i = 0; i < options.textEdits; i++) {
    const [edited, note] = mutateText(rng, text);
    text = edited;
    notes.push(note);
  }
  options.headerText = text;
  options.duplicate = undefined;
  let { bytes, headerLength } = serialize(model, options);
  const byteOps =
    structural === 0
      ? rng.int(1, 2)
      : rng.weighted<number>([
          [3, 0],
          [2, 1],
          [1, 2],
        ]);
  for (let i = 0; i < byteOps; i++) {
    const [out, note] = rng.weighted(BYTE_OPS)(rng, bytes, headerLength, model);
    bytes = out;
    notes.push(note);
  }
  return { bytes, base };
}

async function readEverything(path: string, rng: Rng): Promise<void> {
  const reader = await SafetensorsReader.open(path);
  try {
    for (const name of reader.tensors.keys()) await reader.read(name);
    const names = [...reader.tensors.keys(), "no such tensor"];
    for (let i = 0; i < 3; i++) {
      const name = rng.pick(names);
      const start = rng.pick([0, 1, -1, 2 ** 53, 0.5, rng.int(0, 100)]);
      const length = rng.pick([0, 1, 4, 2 ** 40, -4, rng.int(0, 100)]);
      try {
        await reader.readBytes(name, start, length);
      } catch (error) {
        // Out-of-range requests must be refused with our error, one line; the case goes on.
        for (const violation of judgeError(error).violations)
          reportViolation(`readBytes(${JSON.stringify(name)}, ${start}, ${length}): ${violation}`);
      }
    }
  } finally {
    await reader.close();
  }
}

export async function safetensorsCase(ctx: CaseContext): Promise<Step[]> {
  const { rng, dir, notes } = ctx;
  const { bytes, base } = await mutatedSafetensors(rng, notes);
  const file = join(dir, "file.safetensors");
  await writeFile(file, bytes);
  // Most cases start at the reader; some go straight to openSeed, to exercise its own error paths.
  const direct = base !== undefined && rng.chance(0.3);
  const steps: Step[] = direct
    ? []
    : [{ name: "SafetensorsReader", run: () => readEverything(file, rng.fork("read")) }];
  if (base !== undefined) {
    const seed = join(dir, "seed");
    await cp(base, seed, { recursive: true });
    await writeFile(join(seed, "model.safetensors"), bytes);
    steps.push({
      name: "openSeed",
      run: async () => {
        const opened = await openSeed(seed);
        await opened.close();
      },
    });
    steps.push(...maybeUpcycle(ctx, () => ({ seeds: [seed], experts: 2, output: ctx.output })));
  }
  return steps;
}
