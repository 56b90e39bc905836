/**
 * Inputs that used to be accepted and should not be: NaN/Inf in a seed
 * (refused as the bytes stream past, naming the tensor as the file names
 * it), tensors the config gives no part, eval of nothing, and a BAM folder
 * whose weights file holds only logits. Fixture seeds copied into temp
 * folders and edited there.
 */
import assert from "node:assert/strict";
import { closeSync, copyFileSync, openSync, readSync, renameSync, statSync, writeSync } from "node:fs";
import { cp, mkdtemp, open, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { scanModel } from "../../src/arch/describe.js";
import { openModel } from "../../src/arch/model.js";
import { openSeed } from "../../src/arch/load.js";
import { evaluatePerplexity, evaluateTokenFiles } from "../../src/onnx/index.js";
import {
  firstNonFinite,
  fromFloat32,
  SafetensorsReader,
  toFloat32,
  writeSafetensors,
} from "../../src/safetensors/index.js";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, refused } from "../helpers.js";
import { runCli } from "./synth.js";

let root: string;
let counter = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-accepted-"));
});
after(() => rm(root, { recursive: true, force: true }));

async function copyOf(family: "llama" | "phi" | "gpt2", variant: "base" | "code" | "math" = "base"): Promise<string> {
  const dir = join(root, `${counter++}`, variant);
  await cp(fixture(family, variant), dir, { recursive: true });
  return dir;
}

/** Overwrites element `index` of a stored F32 tensor with `value`, in place. */
async function plant(dir: string, tensor: string, index: number, value: number): Promise<void> {
  const file = join(dir, "model.safetensors");
  const reader = await SafetensorsReader.open(file);
  const info = reader.tensors.get(tensor)!;
  await reader.close();
  assert.equal(info.dtype, "F32");
  const handle = await open(file, "r+");
  const bytes = Buffer.alloc(4);
  bytes.writeFloatLE(value);
  await handle.write(bytes, 0, 4, info.byteOffset + 4 * index);
  await handle.close();
}

test("a seed holding NaN or Inf is refused by the executor, naming the file's tensor; inspect --scan names the same", async () => {
  for (const [tensor, value, others] of [
    ["model.layers.1.mlp.up_proj.weight", NaN, []], // copied into one expert
    ["model.layers.0.self_attn.q_proj.weight", Infinity, ["code", "math"]], // averaged (merged attention)
    ["model.embed_tokens.weight", -Infinity, ["code"]], // averaged embeddings
  ] as const) {
    const seed = await copyOf("llama");
    await plant(seed, tensor, 7, value);
    const seeds = [seed, ...others.map((v) => fixture("llama", v))];
    const output = join(root, `out-${counter++}`);
    await refused(
      upcycle({ seeds, output, attention: "merged", ...(seeds.length === 1 ? { experts: 2 } : {}) }),
      "TENSOR_INVALID",
      new RegExp(`^${seed.replaceAll("/", "\\/")}: tensor "${tensor.replaceAll(".", "\\.")}" holds NaN or Inf`),
    );
    assert.deepEqual(
      (await readdir(join(output, ".."))).filter((e) => e.startsWith("out-")),
      [],
      "no output",
    );
    const model = await openModel(seed);
    try {
      assert.deepEqual(await scanModel(model), [
        { tensor, nan: Number.isNaN(value) ? 1 : 0, inf: Number.isNaN(value) ? 0 : 1 },
      ]);
      assert.ok(
        await SafetensorsReader.open(join(seed, "model.safetensors")).then(async (r) => {
          const has = r.tensors.has(tensor);
          await r.close();
          return has;
        }),
      );
    } finally {
      await model.close();
    }
  }
  // Drop-Upcycling reads the FFN whole: the same check.
  const seed = await copyOf("llama");
  await plant(seed, "model.layers.0.mlp.gate_proj.weight", 3, NaN);
  await refused(
    upcycle({ seeds: [seed], output: join(root, "drop"), experts: 2, dropRatio: 0.5 }),
    "TENSOR_INVALID",
    /tensor "model\.layers\.0\.mlp\.gate_proj\.weight" holds NaN or Inf/,
  );
});

test("a non-zero tensor the config gives no part is refused by name; zeros pass", async () => {
  const seed = await copyOf("llama"); // stores mlp biases
  const configFile = join(seed, "config.json");
  const config = JSON.parse(await readFile(configFile, "utf8")) as Record<string, unknown>;
  await writeFile(configFile, JSON.stringify({ ...config, mlp_bias: false }));
  await refused(
    openSeed(seed),
    "CONFIG_INVALID",
    /tensor "model\.layers\.0\.mlp\.down_proj\.bias" holds non-zero values that config\.json gives no part/,
  );
  await refused(
    upcycle({ seeds: [seed], output: join(root, "bias"), experts: 2 }),
    "CONFIG_INVALID",
    /mlp\.down_proj\.bias/,
  );
  // The same seed with those biases zeroed computes what the config says: accepted.
  const reader = await SafetensorsReader.open(join(seed, "model.safetensors"));
  const tensors = await Promise.all(
    [...reader.tensors.values()].map(async (info) => {
      const bytes = await reader.read(info.name);
      return {
        name: info.name,
        dtype: info.dtype,
        shape: [...info.shape],
        data: () => (/mlp\..*\.bias$/.test(info.name) ? new Uint8Array(bytes.length) : bytes),
      };
    }),
  );
  await reader.close();
  await writeSafetensors(join(seed, "model.safetensors"), tensors, { metadata: { format: "pt" } });
  const opened = await openSeed(seed);
  assert.ok(opened.unusedTensors.some((name) => name.endsWith("mlp.down_proj.bias")));
  await opened.close();
});

test("eval of an empty text file or an empty token file is refused, not perplexity NaN", async () => {
  const model = await copyOf("llama"); // a regression would export into the model folder: not the fixture's
  const empty = join(root, "empty.txt");
  await writeFile(empty, "");
  const emptyBin = join(root, "empty.bin");
  await writeFile(emptyBin, new Uint8Array(0));
  await refused(
    evaluatePerplexity(model, [empty]),
    "DATA_INCOMPLETE",
    /empty\.txt: 0 token\(s\); perplexity needs at least 2/,
  );
  await refused(evaluateTokenFiles(model, [emptyBin]), "DATA_INCOMPLETE", /empty\.bin: 0 token\(s\)/);
  const run = await runCli(["eval", model, "--tokens", emptyBin], { env: { BAM_CACHE_DIR: join(root, "cache") } });
  assert.equal(run.code, 1, run.stderr);
  assert.doesNotMatch(run.stdout, /NaN/);
});

test("a BAM folder whose weights file holds only logits is refused by inspect", async () => {
  const output = join(root, "bam");
  await upcycle({ seeds: ["base", "code"].map((v) => fixture("llama", v as "base")), output });
  await writeSafetensors(
    join(output, "model.safetensors"),
    [{ name: "logits", dtype: "F32", shape: [1, 2, 3], data: () => new Uint8Array(24) }],
    { metadata: { format: "pt" } },
  );
  await refused(
    openModel(output),
    "TENSOR_MISSING",
    /the weights lack "model\.embed_tokens\.weight" \[\d+, \d+\].*hold 1 tensor\(s\): logits/,
  );
  const run = await runCli(["inspect", output]);
  assert.equal(run.code, 1, run.stderr);
  assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
});

test("firstNonFinite agrees with decoding, for every float dtype and alignment", () => {
  const values = Float32Array.from([1, -2, 65504, 3e38, -0, 1e-40, NaN, 5, Infinity, -Infinity]);
  for (const dtype of ["F32", "F16", "BF16"] as const) {
    const encoded = fromFloat32(values, dtype);
    for (const offset of [0, 1, 2, 3]) {
      const shifted = new Uint8Array(encoded.length + offset).subarray(offset);
      shifted.set(encoded);
      for (let from = 0; from < values.length; from++) {
        const size = encoded.length / values.length;
        const part = shifted.subarray(from * size);
        const expected = Array.from(toFloat32(part.slice(), dtype)).findIndex((v) => !Number.isFinite(v));
        assert.equal(firstNonFinite(part, dtype), expected, `${dtype} offset ${offset} from ${from}`);
      }
    }
  }
});

test("a seed rewritten in place, or replaced, during a run fails the run and writes nothing", async () => {
  for (const how of ["in place", "replaced"] as const) {
    const seed = await copyOf("llama");
    const weights = join(seed, "model.safetensors");
    const output = join(root, `changed-${counter++}`);
    let changed = false;
    const change = () => {
      if (changed) return;
      changed = true;
      if (how === "in place") {
        // The same bytes written again: only the file's times tell (new values could be refused as they are read).
        const fd = openSync(weights, "r+");
        const last = Buffer.alloc(4);
        readSync(fd, last, 0, 4, statSync(weights).size - 4);
        writeSync(fd, last, 0, 4, statSync(weights).size - 4);
        closeSync(fd);
      } else {
        copyFileSync(weights, `${weights}.new`);
        renameSync(`${weights}.new`, weights);
      }
    };
    await refused(
      upcycle({ seeds: [seed, fixture("llama", "code")], output }, { onProgress: change }),
      "IO_ERROR",
      new RegExp(
        `${weights.replaceAll("/", "\\/").replaceAll(".", "\\.")}: changed while it was being read; nothing was written`,
      ),
    );
    assert.ok(changed);
    assert.deepEqual(
      (await readdir(root)).filter((e) => e.startsWith("changed-") || e.startsWith(".bam-tmp-changed")),
      [],
      how,
    );
  }
});
