import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type ErrorCode, isBamError } from "../../src/errors.js";
import { SafetensorsReader } from "../../src/safetensors/reader.js";

let dir: string;
let fileCount = 0;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "bam-st-reader-"));
});
after(() => rm(dir, { recursive: true, force: true }));

/** A safetensors file from raw parts: the length prefix is the header's own unless `claimedLength` lies. */
function fileBytes(header: string | Uint8Array, data: Uint8Array | number = 0, claimedLength?: bigint): Uint8Array {
  const json = typeof header === "string" ? new TextEncoder().encode(header) : header;
  const body = typeof data === "number" ? new Uint8Array(data) : data;
  const bytes = new Uint8Array(8 + json.length + body.length);
  new DataView(bytes.buffer).setBigUint64(0, claimedLength ?? BigInt(json.length), true);
  bytes.set(json, 8);
  bytes.set(body, 8 + json.length);
  return bytes;
}

async function writeTemp(bytes: Uint8Array): Promise<string> {
  const path = join(dir, `case-${++fileCount}.safetensors`);
  await writeFile(path, bytes);
  return path;
}

/** Opening must fail with `code`, naming the file and, when given, the tensor. */
async function assertOpenFails(bytes: Uint8Array, code: ErrorCode, tensor?: string): Promise<void> {
  const path = await writeTemp(bytes);
  await assert.rejects(SafetensorsReader.open(path), (error: unknown) => {
    assert.ok(isBamError(error), String(error));
    assert.equal(error.code, code, error.message);
    assert.ok(error.message.includes(path), `message names the file: ${error.message}`);
    if (tensor !== undefined)
      assert.ok(error.message.includes(`"${tensor}"`), `message names the tensor: ${error.message}`);
    assert.ok(!error.message.includes("\n"), "one line");
    return true;
  });
}

const entry = (dtype: unknown, shape: unknown, offsets: unknown) => ({ dtype, shape, data_offsets: offsets });
const json = (header: object) => JSON.stringify(header);
/** Two tensors, 11 data bytes. */
const VALID = json({ a: entry("F32", [2], [0, 8]), b: entry("I8", [3], [8, 11]) });

const openFds = () => readdirSync("/proc/self/fd").length;

test("reads tensors, metadata and offsets of a valid file", async () => {
  const data = Uint8Array.from({ length: 14 }, (_, i) => i);
  const header = json({
    z: entry("U8", [2], [12, 14]),
    __metadata__: { format: "pt" },
    "0": entry("BF16", [2, 3], [0, 12]),
    empty: entry("F64", [0, 5], [12, 12]),
  });
  const path = await writeTemp(fileBytes(header, data));
  const reader = await SafetensorsReader.open(path);
  try {
    assert.equal(reader.path, path);
    assert.equal(reader.headerLength, new TextEncoder().encode(header).length);
    assert.deepEqual(reader.metadata, { format: "pt" });
    assert.deepEqual([...reader.tensors.keys()], ["0", "empty", "z"], "data-offset order");
    const z = reader.tensors.get("z")!;
    assert.deepEqual(z, {
      name: "z",
      dtype: "U8",
      shape: [2],
      byteOffset: 8 + reader.headerLength + 12,
      byteLength: 2,
      file: path,
    });
    assert.ok(Object.isFrozen(z) && Object.isFrozen(z.shape));
    const whole = await reader.read("0");
    assert.deepEqual(whole, data.subarray(0, 12));
    assert.equal(whole.byteOffset, 0);
    assert.equal(whole.buffer.byteLength, 12, "a fresh buffer of its own");
    assert.deepEqual(await reader.read("empty"), new Uint8Array(0));
    assert.deepEqual(await reader.readBytes("0", 4, 6), data.subarray(4, 10));
    assert.deepEqual(await reader.readBytes("0", 12, 0), new Uint8Array(0));
  } finally {
    await reader.close();
  }
});

test("accepts scalars, zero-size tensors anywhere, an empty header and metadata alone", async () => {
  const cases: [string, number, string[]][] = [
    [
      json({ s: entry("F32", [], [0, 4]), e1: entry("I8", [0], [0, 0]), e2: entry("I8", [3, 0], [4, 4]) }),
      4,
      ["e1", "s", "e2"],
    ],
    ["{}", 0, []],
    ["{}        ", 0, []],
    [json({ __metadata__: {} }), 0, []],
  ];
  for (const [header, dataLength, names] of cases) {
    const reader = await SafetensorsReader.open(await writeTemp(fileBytes(header, dataLength)));
    assert.deepEqual([...reader.tensors.keys()], names, header);
    await reader.close();
  }
});

test("read errors: unknown tensor, range outside the tensor, file truncated after open, closed reader", async () => {
  const path = await writeTemp(fileBytes(VALID, 11));
  const reader = await SafetensorsReader.open(path);
  const fails = (code: ErrorCode, tensor: string) => (error: unknown) =>
    isBamError(error, code) && error.message.includes(path) && error.message.includes(`"${tensor}"`);
  await assert.rejects(reader.read("nope"), fails("TENSOR_NOT_FOUND", "nope"));
  for (const [start, length] of [
    [0, 9],
    [8, 1],
    [-1, 2],
    [0.5, 1],
    [0, -1],
  ] as const) {
    await assert.rejects(reader.readBytes("a", start, length), fails("INVALID_OFFSET", "a"), `${start}+${length}`);
  }
  await truncate(path, 8 + VALID.length + 9);
  assert.equal((await reader.read("a")).length, 8);
  await assert.rejects(reader.read("b"), fails("DATA_INCOMPLETE", "b"));
  await reader.close();
  await reader.close();
  await assert.rejects(reader.read("a"), (error: unknown) => isBamError(error, "IO_ERROR"));
});

test("header length prefix: too short, too large, past the end", async () => {
  await assertOpenFails(new Uint8Array(7), "HEADER_INVALID");
  await assertOpenFails(fileBytes("{}", 0, 2n ** 63n), "HEADER_TOO_LARGE");
  await assertOpenFails(fileBytes("{}", 0, 100_000_001n), "HEADER_TOO_LARGE");
  await assertOpenFails(fileBytes("{}", 0, 3n), "HEADER_INVALID");
});

test("header JSON: not JSON, not an object, not UTF-8, duplicate keys", async () => {
  const tensorA = json(entry("F32", [2], [0, 8]));
  const cases = [
    "{",
    "[]",
    '"x"',
    "null",
    "",
    "{} x",
    `{"a":${tensorA},"a":${tensorA}}`,
    `{"a":${tensorA},"\\u0061":${tensorA}}`,
    '{"a":{"dtype":"F32","dtype":"I8","shape":[2],"data_offsets":[0,8]}}',
  ];
  for (const header of cases) await assertOpenFails(fileBytes(header, 8), "HEADER_INVALID");
  await assertOpenFails(fileBytes(Uint8Array.of(0x7b, 0x22, 0xff, 0x22, 0x3a, 0x31, 0x7d)), "HEADER_INVALID");
  await assertOpenFails(fileBytes(Uint8Array.of(0xef, 0xbb, 0xbf, 0x7b, 0x7d)), "HEADER_INVALID"); // a BOM is not JSON
});

test("__metadata__ must map strings to strings", async () => {
  for (const metadata of ["x", ["a"], null, { a: 1 }, { a: { b: "c" } }]) {
    await assertOpenFails(fileBytes(json({ __metadata__: metadata })), "METADATA_INVALID");
  }
});

test("tensor entries: structure, dtype, shape, data_offsets, size", async () => {
  const cases: [unknown, ErrorCode][] = [
    [[1], "TENSOR_INVALID"],
    ["F32", "TENSOR_INVALID"],
    [{ shape: [2], data_offsets: [0, 8] }, "TENSOR_INVALID"],
    [entry(4, [2], [0, 8]), "TENSOR_INVALID"],
    [entry("F4", [2], [0, 8]), "DTYPE_UNSUPPORTED"],
    [entry("f32", [2], [0, 8]), "DTYPE_UNSUPPORTED"],
    [entry("F32", [-2], [0, 8]), "TENSOR_INVALID"],
    [entry("F32", [1.5], [0, 8]), "TENSOR_INVALID"],
    [entry("F32", "2", [0, 8]), "TENSOR_INVALID"],
    [entry("F32", [2 ** 60], [0, 8]), "TENSOR_INVALID"],
    [entry("F32", [2], undefined), "TENSOR_INVALID"],
    [entry("F32", [2], [0]), "TENSOR_INVALID"],
    [entry("F32", [2], [0, 8, 8]), "TENSOR_INVALID"],
    [entry("F32", [2], [8, 0]), "TENSOR_INVALID"],
    [entry("F32", [2], [0, "8"]), "TENSOR_INVALID"],
    [entry("F32", [2], [0, 7.5]), "TENSOR_INVALID"],
    [entry("F32", [2], [-8, 0]), "TENSOR_INVALID"],
    [entry("F32", [2], [0, 4]), "TENSOR_INVALID"],
    [entry("F32", [3], [0, 8]), "TENSOR_INVALID"],
  ];
  for (const [value, code] of cases) {
    await assertOpenFails(fileBytes(json({ tensor_x: value }), 8), code, "tensor_x");
  }
});

test("layout: gaps, overlaps, a late start and trailing bytes are INVALID_OFFSET", async () => {
  const a = entry("F32", [2], [0, 8]);
  await assertOpenFails(fileBytes(json({ a, b: entry("I8", [3], [9, 12]) }), 12), "INVALID_OFFSET", "b");
  await assertOpenFails(fileBytes(json({ a, b: entry("I8", [3], [4, 7]) }), 8), "INVALID_OFFSET", "b");
  await assertOpenFails(fileBytes(json({ a, b: entry("F32", [2], [0, 8]) }), 8), "INVALID_OFFSET");
  await assertOpenFails(fileBytes(json({ a: entry("F32", [2], [4, 12]) }), 12), "INVALID_OFFSET", "a");
  await assertOpenFails(fileBytes(VALID, 12), "INVALID_OFFSET");
  await assertOpenFails(fileBytes("{}", 1), "INVALID_OFFSET");
});

test("a file truncated at any point fails: in the header as HEADER_INVALID, in the data as DATA_INCOMPLETE", async () => {
  const whole = fileBytes(VALID, 11);
  const dataStart = 8 + VALID.length;
  const cuts: [number, ErrorCode, string?][] = [
    [0, "HEADER_INVALID"],
    [5, "HEADER_INVALID"],
    [8, "HEADER_INVALID"],
    [8 + 10, "HEADER_INVALID"],
    [dataStart - 1, "HEADER_INVALID"],
    [dataStart, "DATA_INCOMPLETE", "a"],
    [dataStart + 5, "DATA_INCOMPLETE", "a"],
    [dataStart + 9, "DATA_INCOMPLETE", "b"],
    [whole.length - 1, "DATA_INCOMPLETE", "b"],
  ];
  for (const [length, code, tensor] of cuts) await assertOpenFails(whole.subarray(0, length), code, tensor);
});

test("lying headers fail fast, allocating nothing like what they claim", async () => {
  const before = process.memoryUsage().arrayBuffers;
  const started = performance.now();
  await assertOpenFails(fileBytes("{}", 0, 99_999_999n), "HEADER_INVALID");
  await assertOpenFails(
    fileBytes(json({ huge: entry("F32", [2 ** 20, 2 ** 20], [0, 2 ** 42]) }), 8),
    "DATA_INCOMPLETE",
    "huge",
  );
  await assertOpenFails(
    fileBytes(json({ huge: entry("F32", [2 ** 40, 2 ** 40, 2 ** 40], [0, 8]) }), 8),
    "TENSOR_INVALID",
    "huge",
  );
  await assertOpenFails(
    fileBytes(json({ huge: entry("F32", [2], [2 ** 52, 2 ** 52 + 8]) }), 8),
    "INVALID_OFFSET",
    "huge",
  );
  await assertOpenFails(fileBytes(json({ huge: entry("F32", [2], [0, 1e300]) }), 8), "TENSOR_INVALID", "huge");
  assert.ok(process.memoryUsage().arrayBuffers - before < 16 * 2 ** 20, "no large buffer allocated");
  assert.ok(performance.now() - started < 1000, "fails fast");
});

test("a failed open leaves no file handle open", { skip: !existsSync("/proc/self/fd") && "needs /proc" }, async () => {
  const fdsBefore = openFds();
  await assertOpenFails(fileBytes(VALID, 12), "INVALID_OFFSET");
  await assertOpenFails(fileBytes("{", 0), "HEADER_INVALID");
  assert.equal(openFds(), fdsBefore);
});
