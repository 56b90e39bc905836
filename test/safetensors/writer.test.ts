import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type ErrorCode, isBamError } from "../../src/errors.js";
import { type DType, DTYPE_SIZE } from "../../src/safetensors/dtype.js";
import { SafetensorsReader } from "../../src/safetensors/reader.js";
import {
  parseSize,
  planShards,
  safetensorsHeader,
  type TensorToWrite,
  WRITE_BATCH_BYTES,
  writeSafetensors,
} from "../../src/safetensors/writer.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "bam-st-writer-"));
});
after(() => rm(dir, { recursive: true, force: true }));

/** A tensor whose bytes are a deterministic function of its name. */
function tensor(name: string, dtype: DType, shape: number[]): TensorToWrite & { bytes: Uint8Array } {
  const length = shape.reduce((n, dim) => n * dim, DTYPE_SIZE[dtype]);
  const seed = [...name].reduce((sum, char) => sum + char.charCodeAt(0), 0);
  const bytes = Uint8Array.from({ length }, (_, i) => (seed + i * 31) & 0xff);
  return { name, dtype, shape, bytes, data: () => bytes };
}

const rejectsWith =
  (code: ErrorCode, ...mentions: string[]) =>
  (error: unknown) =>
    isBamError(error, code) && mentions.every((text) => error.message.includes(text));

const ALL_DTYPES = Object.keys(DTYPE_SIZE) as DType[];

test("round trip: every dtype, scalars, zero-size tensors, metadata", async () => {
  const tensors = [
    ...ALL_DTYPES.map((dtype, i) => tensor(`t.${dtype}`, dtype, [i + 1, 3])),
    tensor("scalar", "F32", []),
    tensor("empty", "BF16", [0]),
    tensor("empty2", "I64", [3, 0, 2]),
  ];
  const path = join(dir, "all.safetensors");
  const metadata = { format: "pt", note: 'é "quoted"' };
  const { bytes } = await writeSafetensors(path, tensors, { metadata });
  assert.equal(bytes, (await readFile(path)).length);
  const reader = await SafetensorsReader.open(path);
  try {
    assert.deepEqual(reader.metadata, metadata);
    assert.deepEqual(
      [...reader.tensors.keys()],
      tensors.map((t) => t.name),
    );
    for (const t of tensors) {
      const info = reader.tensors.get(t.name)!;
      assert.equal(info.dtype, t.dtype);
      assert.deepEqual(info.shape, t.shape);
      assert.deepEqual(await reader.read(t.name), t.bytes, t.name);
    }
  } finally {
    await reader.close();
  }
});

test("output is byte-for-byte deterministic and the header keeps the given order", async () => {
  const make = () => [
    tensor("b", "F16", [4]),
    tensor("10", "U8", [3]),
    tensor("a", "F32", [2, 2]),
    tensor("2", "I8", [1]),
  ];
  const [first, second] = [join(dir, "det1.safetensors"), join(dir, "det2.safetensors")];
  await writeSafetensors(first, make(), { metadata: { z: "1", a: "2" } });
  await writeSafetensors(second, make(), { metadata: { z: "1", a: "2" } });
  const bytes = await readFile(first);
  assert.deepEqual(bytes, await readFile(second));
  const { header } = safetensorsHeader(make(), { z: "1", a: "2" });
  assert.deepEqual(bytes.subarray(0, header.length), Buffer.from(header));
  const text = new TextDecoder().decode(header.subarray(8)).trimEnd();
  assert.equal(
    text,
    '{"__metadata__":{"z":"1","a":"2"},' +
      '"b":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"10":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},' +
      '"a":{"dtype":"F32","shape":[2,2],"data_offsets":[11,27]},"2":{"dtype":"I8","shape":[1],"data_offsets":[27,28]}}',
  );
});

test("header is padded with spaces to a multiple of 8 bytes", () => {
  for (let length = 0; length < 16; length++) {
    const { header, dataBytes } = safetensorsHeader([{ name: "x".repeat(length), dtype: "U8", shape: [5] }]);
    const jsonLength = Number(new DataView(header.buffer).getBigUint64(0, true));
    assert.equal(jsonLength % 8, 0);
    assert.equal(header.length, 8 + jsonLength);
    const json = new TextDecoder().decode(header.subarray(8));
    assert.match(json, /^\{.*\} {0,7}$/);
    assert.equal(dataBytes, 5);
  }
  assert.equal(safetensorsHeader([]).header.length, 16, '"{}" padded to 8');
});

test("invalid tensor lists are refused before anything is written", () => {
  const cases: [TensorToWrite[], ErrorCode, string][] = [
    [[tensor("a", "F32", [1]), tensor("a", "F32", [1])], "TENSOR_INVALID", '"a"'],
    [[tensor("__metadata__", "F32", [1])], "TENSOR_INVALID", "__metadata__"],
    [[{ ...tensor("s", "F32", [1]), shape: [-1] }], "TENSOR_INVALID", '"s"'],
    [[{ ...tensor("s", "F32", [1]), shape: [2 ** 30, 2 ** 30] }], "TENSOR_INVALID", '"s"'],
    [[{ ...tensor("d", "F32", [1]), dtype: "F4" as DType }], "DTYPE_UNSUPPORTED", '"d"'],
  ];
  for (const [tensors, code, mention] of cases)
    assert.throws(() => safetensorsHeader(tensors), rejectsWith(code, mention));
  assert.throws(() => safetensorsHeader([], { n: 1 as unknown as string }), rejectsWith("METADATA_INVALID", '"n"'));
});

test("data is produced lazily, once, in order, and its length is checked", async () => {
  const calls: string[] = [];
  const lazy = (t: TensorToWrite & { bytes: Uint8Array }) => ({
    ...t,
    data: () => {
      calls.push(t.name);
      return t.bytes;
    },
  });
  await writeSafetensors(join(dir, "lazy.safetensors"), [tensor("x", "F32", [2]), tensor("y", "I8", [2])].map(lazy));
  assert.deepEqual(calls, ["x", "y"]);
  const path = join(dir, "short.safetensors");
  const short = { ...tensor("short", "F32", [2]), data: () => new Uint8Array(7) };
  await assert.rejects(writeSafetensors(path, [short]), rejectsWith("TENSOR_INVALID", path, '"short"'));
  const asyncTensor = { ...tensor("async", "U8", [3]), data: async () => Uint8Array.of(1, 2, 3) };
  await writeSafetensors(path, [asyncTensor]);
  const reader = await SafetensorsReader.open(path);
  assert.deepEqual(await reader.read("async"), Uint8Array.of(1, 2, 3));
  await reader.close();
});

test("abort between batches stops the write with ABORTED", async () => {
  const controller = new AbortController();
  const calls: string[] = [];
  // Each tensor fills most of a batch, so each is a batch of its own.
  const bytes = WRITE_BATCH_BYTES / 2 + 8;
  const tensors = ["p", "q", "r"].map((name) => ({
    ...tensor(name, "U8", [bytes]),
    data: () => {
      calls.push(name);
      controller.abort();
      return new Uint8Array(bytes);
    },
  }));
  const path = join(dir, "aborted.safetensors");
  await assert.rejects(writeSafetensors(path, tensors, { signal: controller.signal }), rejectsWith("ABORTED", path));
  assert.deepEqual(calls, ["p"]);
  await assert.rejects(
    writeSafetensors(join(dir, "never.safetensors"), tensors, { signal: controller.signal }),
    rejectsWith("ABORTED"),
  );
  assert.equal(existsSync(join(dir, "never.safetensors")), false, "an aborted signal creates no file");
  // Aborted while the only batch was produced: still ABORTED, not a finished file.
  const late = new AbortController();
  const one = [
    {
      ...tensor("s", "U8", [4]),
      data: () => {
        late.abort();
        return new Uint8Array(4);
      },
    },
  ];
  await assert.rejects(writeSafetensors(path, one, { signal: late.signal }), rejectsWith("ABORTED", path));
});

test("fill tensors are asked for batch-sized ranges and written where they belong", async () => {
  const big = tensor("big", "BF16", [(WRITE_BATCH_BYTES * 2.5 + 6) / 2]);
  const ranges: [number, number][] = [];
  const filled: TensorToWrite = {
    name: big.name,
    dtype: big.dtype,
    shape: big.shape,
    fill: async (offset, into) => {
      ranges.push([offset, into.length]);
      into.set(big.bytes.subarray(offset, offset + into.length));
    },
  };
  const small = [tensor("a", "F32", [3]), tensor("z", "I8", [5])];
  const path = join(dir, "filled.safetensors");
  await writeSafetensors(path, [small[0]!, filled, small[1]!]);
  assert.deepEqual(ranges, [
    [0, WRITE_BATCH_BYTES],
    [WRITE_BATCH_BYTES, WRITE_BATCH_BYTES],
    [2 * WRITE_BATCH_BYTES, big.bytes.length - 2 * WRITE_BATCH_BYTES],
  ]);
  const reader = await SafetensorsReader.open(path);
  for (const t of [small[0]!, big, small[1]!])
    assert.ok(Buffer.from(await reader.read(t.name)).equals(t.bytes), t.name);
  await reader.close();
  const failing: TensorToWrite = {
    ...filled,
    fill: async (offset) => {
      if (offset > 0) throw new Error("seed read failed");
    },
  };
  await assert.rejects(writeSafetensors(path, [failing]), /seed read failed/);
});

test("small tensors are coalesced into few large writes; onBytes adds up to the file size", async () => {
  const small = Array.from({ length: 2000 }, (_, i) => tensor(`s${i}`, "F32", [16]));
  const largeBytes = 17 * 2 ** 20;
  const large: TensorToWrite = {
    name: "large",
    dtype: "U8",
    shape: [largeBytes],
    data: () => new Uint8Array(largeBytes),
  };
  const writes: number[] = [];
  const path = join(dir, "coalesced.safetensors");
  const { bytes } = await writeSafetensors(
    path,
    [...small, large, ...small.slice(0, 3).map((t) => ({ ...t, name: `${t.name}b` }))],
    {
      onBytes: (n) => writes.push(n),
    },
  );
  assert.equal(
    writes.reduce((a, b) => a + b, 0),
    bytes,
  );
  assert.ok(writes.length <= 4, `${writes.length} writes`);
  assert.equal((await readFile(path)).length, bytes);
});

test("a full disk is DISK_FULL", { skip: !existsSync("/dev/full") && "needs /dev/full" }, async () => {
  await assert.rejects(writeSafetensors("/dev/full", [tensor("x", "F32", [4])]), rejectsWith("DISK_FULL", "/dev/full"));
});

test("planShards: one file when it fits, HF names otherwise, order kept, oversized tensors alone", () => {
  const layout = (name: string, bytes: number) => ({ name, dtype: "U8" as const, shape: [bytes] });
  assert.deepEqual(planShards([layout("a", 40), layout("b", 60)], 100), [
    { file: "model.safetensors", tensors: ["a", "b"], bytes: 100 },
  ]);
  assert.deepEqual(planShards([], 100), [{ file: "model.safetensors", tensors: [], bytes: 0 }]);
  assert.deepEqual(
    planShards(
      [layout("a", 40), layout("b", 61), layout("c", 30), layout("big", 250), layout("d", 1), layout("z", 0)],
      100,
    ),
    [
      { file: "model-00001-of-00004.safetensors", tensors: ["a"], bytes: 40 },
      { file: "model-00002-of-00004.safetensors", tensors: ["b", "c"], bytes: 91 },
      { file: "model-00003-of-00004.safetensors", tensors: ["big"], bytes: 250 },
      { file: "model-00004-of-00004.safetensors", tensors: ["d", "z"], bytes: 1 },
    ],
  );
  assert.equal(
    planShards(
      Array.from({ length: 12 }, (_, i) => layout(`t${i}`, 10)),
      10,
    ).at(-1)!.file,
    "model-00012-of-00012.safetensors",
  );
  for (const bad of [0, -1, 1.5, NaN, Infinity])
    assert.throws(() => planShards([], bad), rejectsWith("OPTIONS_INVALID"));
  assert.throws(() => planShards([layout("a", 1), layout("a", 1)], 10), rejectsWith("TENSOR_INVALID", '"a"'));
});

test("parseSize reads HF-style sizes and refuses garbage", () => {
  const cases: [string, number][] = [
    ["5GB", 5e9],
    ["500MB", 5e8],
    ["2GiB", 2 * 2 ** 30],
    ["1024", 1024],
    ["10KB", 10_000],
    ["3 kib", 3072],
    ["1.5GB", 1.5e9],
    [" 7B ", 7],
    ["1TB", 1e12],
    ["0", 0],
  ];
  for (const [text, bytes] of cases) assert.equal(parseSize(text), bytes, text);
  for (const text of [
    "",
    "GB",
    "5 GBs",
    "-5GB",
    "5XB",
    "1e3",
    "constructor",
    "5constructor",
    "0x10",
    "99999999999999999999",
  ]) {
    assert.throws(() => parseSize(text), rejectsWith("OPTIONS_INVALID", text), text);
  }
});
