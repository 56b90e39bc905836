/**
 * Averages (average.wat's SIMD kernel, inline or on worker threads) give
 * exactly the bytes of the plain JavaScript computation: float64 sums in
 * seed order, one rounding to float32, then the output dtype. NaN payloads
 * included: where two sources hold different NaNs, the kernel adds in the
 * order V8 does on x64, so the same one survives. The averaged model that
 * router init runs through computes with the same code.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { openSeed } from "../../src/arch/load.js";
import { DTYPE_SIZE, fromFloat32, SafetensorsReader, toFloat32, type FloatDType } from "../../src/safetensors/index.js";
import { assembleKernel, kernelSource } from "../../scripts/build-kernel.js";
import { AveragePool } from "../../src/upcycle/average.js";
import { AVERAGE_KERNEL_BASE64 } from "../../src/upcycle/average-kernel.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { resolveOptions } from "../../src/upcycle/options.js";
import { buildPlan, seedFiles } from "../../src/upcycle/plan.js";
import { averagedModel } from "../../src/upcycle/router-init.js";
import { bytesEqual, fixture, withTempDir } from "../helpers.js";

/** Random values with varied exponents, NaN and infinities included, in `dtype`. */
function randomValues(count: number, dtype: FloatDType, seed: number): Uint8Array {
  let x = seed;
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    values[i] = (x / 2 ** 32 - 0.5) * 2 ** ((x % 40) - 20);
  }
  values[0] = NaN;
  values[1] = Infinity;
  values[2] = -0;
  const bytes = fromFloat32(values, dtype);
  // NaNs of both signs, quiet and signalling, with payloads, differing between sources.
  const nans = {
    BF16: [0xffc1, 0x7f81, 0x7fc0 + (seed % 8)],
    F16: [0xfe01, 0x7c01, 0x7e00 + (seed % 8)],
    F32: [0xffc00001, 0x7f800001, 0x7fc00000 + seed],
  }[dtype];
  const view = new DataView(bytes.buffer);
  nans.forEach((bits, k) => {
    const at = (3 + k + (seed % 2)) * DTYPE_SIZE[dtype];
    if (dtype === "F32") view.setUint32(at, bits, true);
    else view.setUint16(at, bits, true);
  });
  return bytes;
}

function reference(
  sources: { bytes: Uint8Array; dtype: FloatDType }[],
  weights: number[],
  dtype: FloatDType,
): Uint8Array {
  const decoded = sources.map((s) => toFloat32(s.bytes, s.dtype));
  const out = new Float32Array(decoded[0]!.length);
  for (let j = 0; j < out.length; j++) {
    let sum = 0;
    for (let i = 0; i < decoded.length; i++) sum += weights[i]! * decoded[i]![j]!;
    out[j] = sum;
  }
  return fromFloat32(out, dtype);
}

const shared = (bytes: Uint8Array) => {
  const copy = new Uint8Array(new SharedArrayBuffer(bytes.length));
  copy.set(bytes);
  return copy;
};

test("averages from a worker and inline equal the plain computation, for every dtype mix", async () => {
  const pool = new AveragePool();
  try {
    const count = 5003; // not a multiple of the kernel's 8 lanes
    const dtypes: FloatDType[] = ["BF16", "F16", "F32"];
    for (const out of dtypes) {
      const sources = dtypes.map((dtype, i) => ({ bytes: randomValues(count, dtype, 17 + i), dtype }));
      const weights = [0.2, 0.3, 0.5];
      const expected = reference(sources, weights, out);
      const inline = new Uint8Array(count * DTYPE_SIZE[out]);
      await pool.run({ sources, weights, out: inline, dtype: out });
      assert.deepEqual(inline, expected, `inline -> ${out}`);
      const target = shared(new Uint8Array(count * DTYPE_SIZE[out]));
      const runs = [1, 2, 3].map(() =>
        pool.run({ sources: sources.map((s) => ({ ...s, bytes: shared(s.bytes) })), weights, out: target, dtype: out }),
      );
      await Promise.all(runs);
      assert.deepEqual(new Uint8Array(target), expected, `worker -> ${out}`);
    }
  } finally {
    await pool.close();
  }
});

test("averaging identical seeds gives the seed's values back", async () => {
  const pool = new AveragePool();
  try {
    const seed = shared(randomValues(4096, "BF16", 3));
    const out = shared(new Uint8Array(seed.length));
    await pool.run({
      sources: [seed, seed, seed].map((bytes) => ({ bytes, dtype: "BF16" as const })),
      weights: [1 / 3, 1 / 3, 1 / 3],
      out,
      dtype: "BF16",
    });
    // The same values (NaN stays NaN; -0 becomes +0, as the sum starts from 0).
    const want = toFloat32(seed, "BF16");
    const got = toFloat32(new Uint8Array(out), "BF16");
    const differ = want.findIndex((v, j) => !(v === got[j] || (Number.isNaN(v) && Number.isNaN(got[j]!))));
    assert.equal(differ, -1, `element ${differ}: ${want[differ]} became ${got[differ]}`);
  } finally {
    await pool.close();
  }
});

test("average-kernel.ts holds average.wat as assembled now (npm run build:kernel)", async () => {
  const assembled = await assembleKernel();
  assert.equal(kernelSource(assembled), kernelSource(Buffer.from(AVERAGE_KERNEL_BASE64, "base64")));
});

test("the averaged model that router init runs is the executor's average, byte for byte, in any chunking", () =>
  withTempDir(async (dir) => {
    const paths = (["base", "code", "math"] as const).map((v) => fixture("llama", v));
    const options: UpcycleOptions = {
      seeds: paths,
      output: join(dir, "out"),
      attention: "merged",
      dtype: "f32",
      weights: [0.5, 0.3, 0.2],
    };
    await upcycle(options);
    const seeds = await Promise.all(paths.map((path) => openSeed(path)));
    const output = await SafetensorsReader.open(join(dir, "out", "model.safetensors"));
    try {
      const plan = buildPlan(seeds, resolveOptions(options, "sequential"), await Promise.all(seeds.map(seedFiles)));
      const averaged = plan.tensors.filter((t) => t.operation.kind === "average");
      assert.ok(
        averaged.some((t) => t.name === "model.embed_tokens.weight") && averaged.some((t) => t.name.includes(".attn.")),
        averaged.map((t) => t.name).join(", "),
      );
      const [whole, chunked] = [averagedModel(plan, seeds), averagedModel(plan, seeds, 999)];
      for (const { name } of averaged) {
        const expected = await output.read(name);
        assert.ok(bytesEqual(await whole.read(name), expected), name);
        assert.ok(bytesEqual(await chunked.read(name), expected), `${name}, in chunks of 999 elements`);
      }
    } finally {
      await output.close();
      await Promise.all(seeds.map((seed) => seed.close()));
    }
  }));
