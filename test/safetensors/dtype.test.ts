import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { BamError } from "../../src/errors.js";
import {
  concat,
  convertFloats,
  DTYPE_SIZE,
  type FloatDType,
  fromFloat32,
  isDType,
  isFloatDType,
  toFloat32,
} from "../../src/safetensors/dtype.js";
import { SafetensorsReader } from "../../src/safetensors/reader.js";

type HalfDType = "F16" | "BF16";

const FIXTURE = "fixtures/dtype/conversions.safetensors";

const allHalfPatterns = () => new Uint16Array(0x10000).map((_, i) => i);
const halvesToBytes = (halves: Uint16Array) => new Uint8Array(halves.buffer, halves.byteOffset, halves.byteLength);
const bytesToHalves = (bytes: Uint8Array) => new Uint16Array(bytes.slice().buffer);
const f32Bits = (value: number) => new Uint32Array(Float32Array.of(value).buffer)[0]!;

/** Rounds one F32 (given as bits) to a 16-bit pattern. */
function encode(bits: number, to: HalfDType): number {
  return bytesToHalves(fromFloat32(new Float32Array(Uint32Array.of(bits).buffer), to))[0]!;
}

function isNaNPattern(bits: number, dtype: FloatDType): boolean {
  if (dtype === "F32") return (bits & 0x7fffffff) > 0x7f800000;
  return dtype === "F16" ? (bits & 0x7fff) > 0x7c00 : (bits & 0x7fff) > 0x7f80;
}

/** Value of an F16 pattern by the IEEE formula, independent of the code under test. */
function f16Value(half: number): number {
  const sign = half & 0x8000 ? -1 : 1;
  const exponent = (half >>> 10) & 0x1f;
  const mantissa = half & 0x3ff;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

test("dtype table and guards", () => {
  assert.equal(DTYPE_SIZE.F64, 8);
  assert.equal(DTYPE_SIZE.BF16, 2);
  assert.equal(DTYPE_SIZE.F8_E4M3, 1);
  assert.equal(DTYPE_SIZE.BOOL, 1);
  for (const dtype of Object.keys(DTYPE_SIZE)) assert.ok(isDType(dtype));
  for (const other of ["F31", "f32", "toString", "__proto__", 4, null]) assert.equal(isDType(other), false);
  assert.deepEqual((["F32", "F16", "BF16", "F64", "I8"] as const).map(isFloatDType), [true, true, true, false, false]);
});

test("F16 decodes every pattern to its IEEE value", () => {
  const values = toFloat32(halvesToBytes(allHalfPatterns()), "F16");
  values.forEach((value, half) => {
    const expected = f16Value(half);
    if (Number.isNaN(expected)) assert.ok(Number.isNaN(value), `pattern ${half}`);
    else assert.ok(Object.is(value, expected), `pattern ${half}: ${value} != ${expected}`);
  });
});

test("BF16 decodes every pattern to the upper half of an F32", () => {
  const bits = new Uint32Array(toFloat32(halvesToBytes(allHalfPatterns()), "BF16").buffer);
  for (const [half, word] of bits.entries()) assert.equal(word, half * 0x10000);
});

for (const dtype of ["F16", "BF16"] as const) {
  test(`${dtype}: all 65536 patterns round-trip through F32 bit-exactly, NaN as NaN`, () => {
    const back = bytesToHalves(fromFloat32(toFloat32(halvesToBytes(allHalfPatterns()), dtype), dtype));
    back.forEach((half, original) => {
      if (isNaNPattern(original, dtype)) assert.ok(isNaNPattern(half, dtype), `NaN ${original} became ${half}`);
      else assert.equal(half, original);
    });
  });

  test(`${dtype}: between every two neighbours, ties go to even and the rest to the nearest`, () => {
    const maxFinite = dtype === "F16" ? 0x7bff : 0x7f7f;
    const values = toFloat32(halvesToBytes(allHalfPatterns()), dtype);
    const probes: number[] = [];
    const expected: number[] = [];
    for (const sign of [0, 0x8000]) {
      for (let half = 0; half <= maxFinite; half++) {
        const low = values[half]!;
        // Past the largest finite value, the next step is where Inf would sit with an unbounded exponent.
        const high = half === maxFinite ? 2 * low - values[half - 1]! : values[half + 1]!;
        const tie = f32Bits((low + high) / 2) | (sign << 16);
        probes.push(tie, tie - 1, tie + 1);
        expected.push((half % 2 === 0 ? half : half + 1) | sign, half | sign, (half + 1) | sign);
      }
    }
    const actual = bytesToHalves(fromFloat32(new Float32Array(Uint32Array.from(probes).buffer), dtype));
    const wrong = expected.findIndex((bits, i) => actual[i] !== bits);
    assert.equal(
      wrong,
      -1,
      `F32 ${probes[wrong]?.toString(16)} gave ${actual[wrong]?.toString(16)}, expected ${expected[wrong]?.toString(16)}`,
    );
  });
}

test("rounding examples: ties, overflow, subnormals, signed zero", () => {
  const cases: [number, HalfDType, number][] = [
    [1 + 2 ** -11, "F16", 0x3c00],
    [1 + 3 * 2 ** -11, "F16", 0x3c02],
    [1 + 2 ** -8, "BF16", 0x3f80],
    [1 + 3 * 2 ** -8, "BF16", 0x3f82],
    [65504, "F16", 0x7bff],
    [65519.99, "F16", 0x7bff],
    [65520, "F16", 0x7c00],
    [1e6, "F16", 0x7c00],
    [-1e6, "F16", 0xfc00],
    [3.4028234663852886e38, "BF16", 0x7f80],
    [-Infinity, "BF16", 0xff80],
    [Infinity, "F16", 0x7c00],
    [2 ** -24, "F16", 0x0001],
    [2 ** -25, "F16", 0x0000],
    [3 * 2 ** -25, "F16", 0x0002],
    [1023.5 * 2 ** -24, "F16", 0x0400],
    [2 ** -133, "BF16", 0x0001],
    [-0, "F16", 0x8000],
    [-0, "BF16", 0x8000],
  ];
  for (const [value, dtype, expected] of cases)
    assert.equal(encode(f32Bits(value), dtype), expected, `${value} -> ${dtype}`);
});

test("NaNs stay NaN and become quiet; a signalling NaN never turns into Inf", () => {
  for (const nanBits of [0x7f800001, 0xff800001, 0x7fc00000, 0x7fffffff]) {
    for (const dtype of ["F16", "BF16"] as const) {
      const half = encode(nanBits, dtype);
      assert.ok(isNaNPattern(half, dtype), `${nanBits.toString(16)} -> ${dtype} ${half.toString(16)}`);
      assert.ok(half & (dtype === "F16" ? 0x200 : 0x40), "quiet bit set");
      assert.equal(half & 0x8000, (nanBits >>> 16) & 0x8000, "sign kept");
    }
  }
});

test("convertFloats: same dtype is a no-op, others go through F32", () => {
  const bytes = halvesToBytes(Uint16Array.of(0x3c00, 0x7e01));
  assert.equal(convertFloats(bytes, "F16", "F16"), bytes);
  // BF16 70000 overflows F16; BF16 2^-30 underflows to zero; F16 subnormal is exact in BF16.
  assert.deepEqual(
    [...bytesToHalves(convertFloats(halvesToBytes(Uint16Array.of(0x4789, 0x3080)), "BF16", "F16"))],
    [0x7c00, 0x0000],
  );
  assert.deepEqual(
    toFloat32(convertFloats(halvesToBytes(Uint16Array.of(0x0200)), "F16", "BF16"), "BF16"),
    Float32Array.of(2 ** -15),
  );
  assert.deepEqual(
    convertFloats(fromFloat32(Float32Array.of(1.5, -2), "F32"), "F32", "BF16"),
    halvesToBytes(Uint16Array.of(0x3fc0, 0xc000)),
  );
});

test("unaligned input is read correctly; a partial element is TENSOR_INVALID", () => {
  const padded = new Uint8Array([0xff, 0x00, 0x3c, 0x00, 0xc0]);
  assert.deepEqual([...toFloat32(padded.subarray(1), "F16")], [1, -2]);
  assert.deepEqual([...toFloat32(new Uint8Array([0, 0, 0, 0, 0x80, 0x3f]).subarray(2), "F32")], [1]);
  assert.throws(
    () => toFloat32(new Uint8Array(3), "BF16"),
    (error) => error instanceof BamError && error.code === "TENSOR_INVALID",
  );
});

test("F32 bits survive toFloat32 and fromFloat32 untouched, NaN payloads included", () => {
  const bits = Uint32Array.of(0x7f800001, 0xffc01234, 0x00000001, 0x80000000, f32Bits(Math.PI));
  const bytes = new Uint8Array(bits.buffer);
  assert.deepEqual(fromFloat32(toFloat32(bytes, "F32"), "F32"), bytes);
});

test("conversions match torch bit for bit", async (t) => {
  if (!existsSync(FIXTURE)) {
    t.skip("fixture not made yet");
    return;
  }
  const reader = await SafetensorsReader.open(FIXTURE);
  try {
    const pairs: [string, FloatDType, string, FloatDType][] = [
      ["f32", "F32", "f32_to_bf16", "BF16"],
      ["f32", "F32", "f32_to_f16", "F16"],
      ["bf16", "BF16", "bf16_to_f16", "F16"],
      ["f16", "F16", "f16_to_bf16", "BF16"],
      ["bf16", "BF16", "bf16_to_f32", "F32"],
      ["f16", "F16", "f16_to_f32", "F32"],
    ];
    for (const [source, from, target, to] of pairs) {
      const actual = patterns(convertFloats(await reader.read(source), from, to), to);
      const expected = patterns(await reader.read(target), to);
      assert.equal(actual.length, expected.length, target);
      actual.forEach((bits, i) => {
        if (bits !== expected[i])
          assert.ok(
            isNaNPattern(bits, to) && isNaNPattern(expected[i]!, to),
            `${target}[${i}]: ${bits} != ${expected[i]}`,
          );
      });
    }
  } finally {
    await reader.close();
  }
});

function patterns(bytes: Uint8Array, dtype: FloatDType): Uint16Array | Uint32Array {
  const copy = bytes.slice().buffer;
  return dtype === "F32" ? new Uint32Array(copy) : new Uint16Array(copy);
}

test("concat: parts in order, as floats or as plain bytes (Buffers too)", () => {
  const floats = [Float32Array.of(1.5, -0), Float32Array.of(NaN, 3e38)];
  const joined = concat(floats);
  assert.ok(joined instanceof Float32Array);
  assert.deepEqual([...joined], [...floats[0]!, ...floats[1]!]);
  const parts = [Buffer.from([1, 2]), new Uint8Array([3]), Buffer.from([4, 5]).subarray(1)];
  const bytes = concat(parts);
  assert.equal(Object.getPrototypeOf(bytes), Uint8Array.prototype);
  assert.deepEqual(
    [...bytes],
    parts.flatMap((part) => [...part]),
  );
});
