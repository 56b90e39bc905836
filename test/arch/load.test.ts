import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { countParameters } from "../../src/arch/describe.js";
import { CanonicalReader, sourceSegments, transpose2d } from "../../src/arch/load.js";
import { featuresFromConfig, featuresToConfig } from "../../src/arch/features.js";
import { FAMILIES, type CanonicalTensor, type Family } from "../../src/arch/types.js";
import { fromFloat32 } from "../../src/safetensors/index.js";
import { bytesEqual, withSeed } from "../helpers.js";
import {
  D,
  f32,
  H,
  HEADS,
  I,
  KV,
  L,
  randomTensors,
  randomValues,
  synthetic,
  toV5,
  V,
  WIDE_D,
  writeCheckpoint,
  writeSynthetic,
} from "./synthetic.js";

let root: string;
let count = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-arch-load-"));
});
after(() => rm(root, { recursive: true, force: true }));
const newDir = () => join(root, `seed-${++count}`);

/** Canonical shapes every family must produce, from the synthetic sizes. */
function expectedShapes(family: Family): Record<string, number[]> {
  const d = family === "gemma" || family === "qwen3" ? WIDE_D : D;
  const kv = family === "gpt_neox" || family === "gpt2" ? HEADS : KV;
  const inner = family === "gpt2" ? 4 * H : I;
  return {
    "model.embed_tokens.weight": [V, H],
    "model.layers.1.attn.q_proj.weight": [HEADS * d, H],
    "model.layers.1.attn.k_proj.weight": [kv * d, H],
    "model.layers.1.attn.v_proj.weight": [kv * d, H],
    "model.layers.1.attn.o_proj.weight": [H, HEADS * d],
    "model.layers.1.mlp.up_proj.weight": [inner, H],
    "model.layers.1.mlp.down_proj.weight": [H, inner],
    "model.norm.weight": [H],
  };
}

describe("every family, v4 and v5 configs", () => {
  for (const family of FAMILIES) {
    test(family, async () => {
      const s = synthetic(family);
      const features = [];
      for (const style of ["v4", "v5"] as const) {
        const dir = newDir();
        await writeSynthetic(dir, family, style);
        features.push(
          await withSeed(dir, async (seed) => {
            assert.equal(seed.name, `seed-${count}`);
            assert.equal(seed.features.family, family);
            assert.deepEqual(seed.unusedTensors, [], "no unused tensors");
            for (const [key, value] of Object.entries(s.expect)) {
              assert.deepEqual(seed.features[key as keyof typeof seed.features], value, `${family} ${style}: ${key}`);
            }
            assert.equal(seed.features.numLayers, L);
            assert.equal(seed.features.vocabSize, V);
            for (const [name, shape] of Object.entries(expectedShapes(family))) {
              assert.deepEqual(seed.tensors.get(name)?.shape, shape, `${family} ${style}: ${name}`);
            }
            assert.equal(seed.tensors.has("lm_head.weight"), !seed.features.tiedEmbeddings);
            assert.equal(seed.tensors.has("model.layers.0.post_attention_layernorm.weight"), seed.features.secondNorm);
            assert.equal(seed.tokenizerHash, null);
            for (const tensor of seed.tensors.values()) {
              const bytes = await seed.read(tensor.name);
              assert.equal(
                bytes.length,
                tensor.shape.reduce((a, b) => a * b, 4),
                tensor.name,
              );
            }
            return seed.features;
          }),
        );
      }
      assert.deepEqual(features[0], features[1], "v4 and v5 configs give the same features");
      // The BAM config.json round trip keeps every feature.
      assert.deepEqual(
        featuresFromConfig(featuresToConfig(features[0]!) as unknown as Record<string, unknown>, "config.json"),
        features[0],
      );
    });
  }
});

test("canonical order: embeddings, layers in order, final norm, head", async () => {
  const dir = newDir();
  await writeSynthetic(dir, "gpt2");
  await withSeed(dir, async (seed) => {
    const names = [...seed.tensors.keys()];
    assert.deepEqual(names.slice(0, 2), ["model.embed_tokens.weight", "model.embed_positions.weight"]);
    assert.deepEqual(names.slice(-2), ["model.norm.weight", "model.norm.bias"]);
    const layerOf = names.map((n) => Number(/layers\.(\d+)\./.exec(n)?.[1] ?? -1)).filter((l) => l >= 0);
    assert.deepEqual(
      layerOf,
      [...layerOf].sort((a, b) => a - b),
    );
    assert.deepEqual(
      names.filter((n) => n.startsWith("model.layers.0.")),
      [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.input_layernorm.bias",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.post_attention_layernorm.bias",
        "model.layers.0.attn.q_proj.weight",
        "model.layers.0.attn.q_proj.bias",
        "model.layers.0.attn.k_proj.weight",
        "model.layers.0.attn.k_proj.bias",
        "model.layers.0.attn.v_proj.weight",
        "model.layers.0.attn.v_proj.bias",
        "model.layers.0.attn.o_proj.weight",
        "model.layers.0.attn.o_proj.bias",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.bias",
      ],
    );
  });
});

test("plain families: canonical bytes are the stored bytes", async () => {
  const dir = newDir();
  const stored = await writeSynthetic(dir, "llama");
  await withSeed(dir, async (seed) => {
    const pairs: Array<[string, string]> = [
      ["model.embed_tokens.weight", "model.embed_tokens.weight"],
      ["model.layers.1.attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
      ["model.layers.0.attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"],
      ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight"],
      ["model.layers.0.post_attention_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"],
      ["lm_head.weight", "lm_head.weight"],
    ];
    for (const [canonical, hf] of pairs) {
      assert.ok(bytesEqual(await seed.read(canonical), stored.get(hf)!.bytes), canonical);
      assert.equal(seed.tensors.get(canonical)!.source.sourceName, hf);
    }
  });
});

/** Row-major float matrix [rows, cols] from known values, as bytes. */
const matrix = (rows: number, cols: number, seed: number) => randomValues(rows * cols, seed);
const rowsOf = (m: Float32Array, cols: number, start: number, count: number) =>
  m.subarray(start * cols, (start + count) * cols);
const bytesOf = (values: Float32Array) => fromFloat32(values, "F32");

test("gpt_neox: query_key_value is split per head ([heads, 3, D] rows)", async () => {
  const dir = newDir();
  const s = synthetic("gpt_neox");
  const tensors = randomTensors(s.tensors);
  const [q, k, v] = [matrix(H, H, 101), matrix(H, H, 102), matrix(H, H, 103)];
  const [qb, kb, vb] = [matrix(H, 1, 104), matrix(H, 1, 105), matrix(H, 1, 106)];
  // Fuse as GPT-NeoX does: for each head h, its q rows, then its k rows, then its v rows.
  const fused = new Float32Array(3 * H * H);
  const fusedBias = new Float32Array(3 * H);
  for (let h = 0; h < HEADS; h++) {
    for (const [part, m] of [q, k, v].entries()) fused.set(rowsOf(m, H, h * D, D), (h * 3 * D + part * D) * H);
    for (const [part, b] of [qb, kb, vb].entries()) fusedBias.set(b.subarray(h * D, (h + 1) * D), h * 3 * D + part * D);
  }
  tensors.set("gpt_neox.layers.1.attention.query_key_value.weight", { shape: [3 * H, H], bytes: bytesOf(fused) });
  tensors.set("gpt_neox.layers.1.attention.query_key_value.bias", { shape: [3 * H], bytes: bytesOf(fusedBias) });
  await writeCheckpoint(dir, s.v4, tensors);
  await withSeed(dir, async (seed) => {
    for (const [name, want] of [
      ["q_proj", q],
      ["k_proj", k],
      ["v_proj", v],
    ] as const) {
      assert.deepEqual(f32(await seed.read(`model.layers.1.attn.${name}.weight`)), want, name);
    }
    for (const [name, want] of [
      ["q_proj", qb],
      ["k_proj", kb],
      ["v_proj", vb],
    ] as const) {
      assert.deepEqual(f32(await seed.read(`model.layers.1.attn.${name}.bias`)), want, `${name} bias`);
    }
    assert.equal(seed.tensors.get("model.layers.1.attn.k_proj.weight")!.source.rows!.length, HEADS);
  });
});

test("gpt2: Conv1D weights are transposed, c_attn split into q, k, v", async () => {
  const dir = newDir();
  const s = synthetic("gpt2");
  const tensors = randomTensors(s.tensors);
  // Canonical [out, in] q, k, v; GPT-2 stores c_attn as [in, 3 * out] = transpose of the stacked rows.
  const [q, k, v] = [matrix(H, H, 201), matrix(H, H, 202), matrix(H, H, 203)];
  const stacked = new Float32Array(3 * H * H);
  for (const [part, m] of [q, k, v].entries()) stacked.set(m, part * H * H);
  const cAttn = new Float32Array(3 * H * H);
  for (let r = 0; r < 3 * H; r++) for (let c = 0; c < H; c++) cAttn[c * 3 * H + r] = stacked[r * H + c]!;
  const bias = matrix(3 * H, 1, 204);
  tensors.set("transformer.h.0.attn.c_attn.weight", { shape: [H, 3 * H], bytes: bytesOf(cAttn) });
  tensors.set("transformer.h.0.attn.c_attn.bias", { shape: [3 * H], bytes: bytesOf(bias) });
  await writeCheckpoint(dir, s.v4, tensors);
  await withSeed(dir, async (seed) => {
    assert.deepEqual(f32(await seed.read("model.layers.0.attn.q_proj.weight")), q);
    assert.deepEqual(f32(await seed.read("model.layers.0.attn.k_proj.weight")), k);
    assert.deepEqual(f32(await seed.read("model.layers.0.attn.v_proj.weight")), v);
    assert.deepEqual(f32(await seed.read("model.layers.0.attn.v_proj.bias")), bias.subarray(2 * H));
    // c_fc is [in H, out 4H]; up_proj is [4H, H] with up[o][i] = c_fc[i][o].
    const cFc = f32(tensors.get("transformer.h.0.mlp.c_fc.weight")!.bytes);
    const up = f32(await seed.read("model.layers.0.mlp.up_proj.weight"));
    assert.deepEqual(seed.tensors.get("model.layers.0.mlp.up_proj.weight")!.shape, [4 * H, H]);
    for (const [o, i] of [
      [0, 0],
      [5, 3],
      [4 * H - 1, H - 1],
      [100, 17],
    ] as const) {
      assert.equal(up[o * H + i], cFc[i * 4 * H + o]);
    }
    // Biases are not transposed.
    assert.ok(
      bytesEqual(
        await seed.read("model.layers.0.mlp.down_proj.bias"),
        tensors.get("transformer.h.0.mlp.c_proj.bias")!.bytes,
      ),
    );
    assert.ok(
      bytesEqual(await seed.read("model.embed_positions.weight"), tensors.get("transformer.wpe.weight")!.bytes),
    );
  });
});

test("phi3: qkv_proj is [q | k | v] rows, gate_up_proj is [gate | up]", async () => {
  const dir = newDir();
  const s = synthetic("phi3");
  const tensors = randomTensors(s.tensors);
  const qkv = f32(tensors.get("model.layers.1.self_attn.qkv_proj.weight")!.bytes);
  const gateUp = f32(tensors.get("model.layers.1.mlp.gate_up_proj.weight")!.bytes);
  await writeCheckpoint(dir, s.v4, tensors);
  await withSeed(dir, async (seed) => {
    assert.deepEqual(f32(await seed.read("model.layers.1.attn.q_proj.weight")), rowsOf(qkv, H, 0, HEADS * D));
    assert.deepEqual(f32(await seed.read("model.layers.1.attn.k_proj.weight")), rowsOf(qkv, H, HEADS * D, KV * D));
    assert.deepEqual(
      f32(await seed.read("model.layers.1.attn.v_proj.weight")),
      rowsOf(qkv, H, (HEADS + KV) * D, KV * D),
    );
    assert.deepEqual(f32(await seed.read("model.layers.1.mlp.gate_proj.weight")), rowsOf(gateUp, H, 0, I));
    assert.deepEqual(f32(await seed.read("model.layers.1.mlp.up_proj.weight")), rowsOf(gateUp, H, I, I));
  });
});

test("a row split without transpose reads only the bytes it needs", async () => {
  const calls: string[] = [];
  const files = {
    read: async (name: string) => {
      calls.push(`read ${name}`);
      return new Uint8Array(0);
    },
    readBytes: async (_name: string, start: number, length: number) => {
      calls.push(`${start}+${length}`);
      return new Uint8Array(length);
    },
  };
  const tensor: CanonicalTensor = {
    name: "model.layers.0.attn.k_proj.weight",
    shape: [8, 4],
    dtype: "BF16",
    source: {
      file: "x",
      sourceName: "qkv",
      dtype: "BF16",
      sourceShape: [24, 4],
      transpose: false,
      rows: [
        [2, 2],
        [4, 2],
        [8, 2],
        [20, 2],
      ],
    },
  };
  const reader = new CanonicalReader(files);
  assert.equal((await reader.read(tensor, 0, 32)).length, 8 * 4 * 2);
  // Adjacent ranges are merged; a BF16 row of 4 is 8 bytes.
  assert.deepEqual(calls, ["16+32", "64+16", "160+16"]);
  calls.length = 0;
  // Elements 10..21 are rows 2.5..5.25 of the canonical tensor: source rows 4.5..9.25.
  await reader.read(tensor, 10, 11);
  assert.deepEqual(calls, ["36+12", "64+10"]);
  assert.deepEqual(sourceSegments({ ...tensor.source, rows: null }, 5, 3), [[10, 6]]);
});

test("readElements gives the same bytes as slicing a whole read", async () => {
  for (const family of ["gpt_neox", "gpt2", "phi3"] as const) {
    const dir = newDir();
    await writeSynthetic(dir, family, "v4", "BF16");
    await withSeed(dir, async (seed) => {
      assert.deepEqual(seed.files, [join(dir, "model.safetensors")]);
      for (const name of [
        "model.layers.1.attn.k_proj.weight",
        "model.layers.1.attn.v_proj.bias",
        "model.layers.0.mlp.up_proj.weight",
      ]) {
        if (!seed.tensors.has(name)) continue;
        const whole = await seed.read(name);
        const total = whole.length / 2;
        for (const [start, count] of [
          [0, total],
          [3, 17],
          [total - 5, 5],
          [7, 0],
        ] as const) {
          assert.ok(
            bytesEqual(await seed.readElements(name, start, count), whole.subarray(start * 2, (start + count) * 2)),
            `${family} ${name} ${start}+${count}`,
          );
        }
      }
      await assert.rejects(
        seed.readElements("model.norm.weight", H - 1, 2),
        (e: Error & { code?: string }) => e.code === "INVALID_OFFSET",
      );
    });
  }
});

test("transpose2d moves whole elements for 1, 2, 4 and 8-byte types", () => {
  for (const size of [1, 2, 4, 8]) {
    const rows = 3,
      cols = 5;
    const input = new Uint8Array(rows * cols * size).map((_, i) => i);
    const out = transpose2d(input.subarray(0), rows, cols, size);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const from = (r * cols + c) * size;
        const to = (c * rows + r) * size;
        assert.deepEqual(out.subarray(to, to + size), input.subarray(from, from + size));
      }
    }
  }
  // Unaligned input (odd byte offset) works too.
  const backing = new Uint8Array(1 + 2 * 3 * 2).map((_, i) => i);
  const unaligned = backing.subarray(1);
  assert.deepEqual([...transpose2d(unaligned, 2, 3, 2)], [1, 2, 7, 8, 3, 4, 9, 10, 5, 6, 11, 12]);
});

test("checkpoints saved from the bare model (no base prefix) load", async () => {
  const dir = newDir();
  const s = synthetic("gpt2");
  const stored = randomTensors(s.tensors);
  const bare = new Map([...stored].map(([name, t]) => [name.replace(/^transformer\./, ""), t]));
  await writeCheckpoint(dir, s.v4, bare);
  await withSeed(dir, async (seed) => {
    assert.deepEqual(seed.unusedTensors, []);
    assert.equal(seed.tensors.get("model.embed_tokens.weight")!.source.sourceName, "wte.weight");
    assert.ok(bytesEqual(await seed.read("model.norm.bias"), stored.get("transformer.ln_f.bias")!.bytes));
  });
});

test("tied: a stored lm_head.weight is ignored; other leftovers are reported", async () => {
  const dir = newDir();
  const s = synthetic("gemma");
  const tensors = randomTensors({
    ...s.tensors,
    "lm_head.weight": [V, H],
    "model.layers.0.self_attn.rotary_emb.inv_freq": [WIDE_D / 2],
    "model.layers.0.mlp.extra_proj.weight": [2, 2],
    "vision_tower.weight": [2],
  });
  await writeCheckpoint(dir, s.v4, tensors);
  await withSeed(dir, async (seed) => {
    assert.equal(seed.tensors.has("lm_head.weight"), false);
    assert.deepEqual(seed.unusedTensors, ["model.layers.0.mlp.extra_proj.weight", "vision_tower.weight"]);
  });
});

test("BF16 checkpoints keep their dtype; tokenizer.json is hashed", async () => {
  const dir = newDir();
  const stored = await writeSynthetic(dir, "phi3", "v5", "BF16");
  const { writeFile } = await import("node:fs/promises");
  await writeFile(join(dir, "tokenizer.json"), "{}");
  await withSeed(dir, async (seed) => {
    assert.ok([...seed.tensors.values()].every((t) => t.dtype === "BF16"));
    const q = await seed.read("model.layers.0.attn.q_proj.weight");
    assert.equal(q.length, HEADS * D * H * 2);
    assert.ok(bytesEqual(q, stored.get("model.layers.0.self_attn.qkv_proj.weight")!.bytes.subarray(0, q.length)));
    // sha256 of "{}".
    assert.equal(seed.tokenizerHash, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
  });
});

test("countParameters counts every canonical tensor of a dense seed once, all of them active", async () => {
  const dir = newDir();
  await writeSynthetic(dir, "qwen2");
  await withSeed(dir, async (seed) => {
    const perLayer = 2 * H + (HEADS * D * H + HEADS * D) + 2 * (KV * D * H + KV * D) + H * HEADS * D + 3 * I * H;
    const total = V * H + L * perLayer + H; // tied: no head
    assert.deepEqual(countParameters(seed.tensors.values(), 1, 1), { total, activePerToken: total });
  });
});

test("v5 helper moves rope keys into rope_parameters", () => {
  assert.deepEqual(toV5({ model_type: "gpt_neox", rotary_pct: 0.25, rotary_emb_base: 10000, x: 1 }), {
    model_type: "gpt_neox",
    x: 1,
    rope_parameters: { rope_type: "default", rope_theta: 10000, partial_rotary_factor: 0.25 },
  });
});
