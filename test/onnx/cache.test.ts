/**
 * The KV cache and the mask: a prefix then one token at a time, feeding
 * present.* back as past_key_values.*, gives the logits of one full forward;
 * left-padded batches give each row's own logits; and greedy generation
 * through transformers.js (its own cache handling) picks, at every step, the
 * argmax of a full forward. Covers every attention mode (the cache of moa
 * holds E x kv heads), interleaved rotary, learned positions and a sliding
 * window shorter than the sequence. Our own generation loop (decoder.ts, on
 * generate.onnx's cache slots) gives transformers.js's greedy tokens on
 * model.onnx past the cache's first growth, and seeded sampling repeats.
 */
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import * as ort from "onnxruntime-node";
import { prepareOnnx } from "../../src/onnx/export.js";
import { sample, uniformRandom } from "../../src/onnx/decoder.js";
import { generateFromExport } from "../../src/onnx/transformers.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, maxAbsDiff, refused, TOLERANCE, withTempDir } from "../helpers.js";
import { withGraph, withSession } from "./engine.js";

const IDS = [
  [279, 274, 88, 80, 261, 84, 83, 313, 280, 78, 288, 291],
  [55, 258, 78, 260, 221, 82, 295, 315, 79, 80, 80, 288],
];

interface Case {
  label: string;
  /** Builds the model folder under `dir`; returns its path. */
  make: (dir: string) => Promise<string>;
}

const merged =
  (family: "llama" | "qwen3" | "cohere" | "gpt2" | "mistral", options: Partial<UpcycleOptions>) =>
  async (dir: string) => {
    const out = join(dir, "model");
    const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
    await upcycle({ seeds, output: out, expertsPerToken: 2, ...options } as UpcycleOptions);
    return out;
  };

const CASES: Case[] = [
  { label: "dense llama", make: async () => fixture("llama", "base") },
  { label: "llama moa", make: merged("llama", { attention: "moa" }) },
  { label: "qwen3 shared-kv (qk-norm)", make: merged("qwen3", { attention: "shared-kv", block: "sequential" }) },
  { label: "cohere moa (interleaved rotary)", make: merged("cohere", { attention: "moa" }) },
  { label: "gpt2 merged (learned positions)", make: merged("gpt2", { attention: "merged" }) },
  {
    label: "mistral moa, sliding window 5",
    make: async (dir) => {
      const out = await merged("mistral", { attention: "moa" })(dir);
      const config = JSON.parse(await readFile(join(out, "config.json"), "utf8"));
      await writeFile(join(out, "config.json"), JSON.stringify({ ...config, sliding_window: 5 }));
      return out;
    },
  },
];

type Feeds = Record<string, ort.Tensor>;

function int64(rows: number[][]): ort.Tensor {
  return new ort.Tensor("int64", BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0]!.length]);
}

async function emptyPast(session: ort.InferenceSession, batch: number): Promise<Feeds> {
  const feeds: Feeds = {};
  for (const meta of session.inputMetadata) {
    if (!meta.name.startsWith("past_key_values.") || !meta.isTensor) continue;
    const [, heads, , dim] = meta.shape as number[];
    feeds[meta.name] = new ort.Tensor("float32", new Float32Array(0), [batch, heads!, 0, dim!]);
  }
  return feeds;
}

/** Logits [batch, seq, vocab] of one step, and the cache it returns as the next step's past. */
async function step(
  session: ort.InferenceSession,
  past: Feeds,
  ids: number[][],
  mask: number[][],
  positions: number[][],
): Promise<{ logits: Float32Array; past: Feeds }> {
  const out = await session.run({
    ...past,
    input_ids: int64(ids),
    attention_mask: int64(mask),
    position_ids: int64(positions),
  });
  const next: Feeds = {};
  for (const name of Object.keys(out))
    if (name.startsWith("present.")) next[name.replace("present.", "past_key_values.")] = out[name]!;
  return { logits: out.logits!.data as Float32Array, past: next };
}

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);
const ones = (rows: number, cols: number) => Array.from({ length: rows }, () => new Array<number>(cols).fill(1));

for (const { label, make } of CASES) {
  describe(`cache and mask: ${label}`, () => {
    test("prefix + one token at a time equals one full forward", () =>
      withTempDir(async (dir) => {
        await withGraph(await make(dir), async (file) => {
          const session = await ort.InferenceSession.create(file);
          const T = IDS[0]!.length;
          const full = await step(session, await emptyPast(session, 2), IDS, ones(2, T), [range(0, T), range(0, T)]);
          const vocab = full.logits.length / (2 * T);
          let { past } = await step(
            session,
            await emptyPast(session, 2),
            IDS.map((r) => r.slice(0, 5)),
            ones(2, 5),
            [range(0, 5), range(0, 5)],
          );
          for (let t = 5; t < T; t++) {
            const out = await step(
              session,
              past,
              IDS.map((r) => [r[t]!]),
              ones(2, t + 1),
              [[t], [t]],
            );
            past = out.past;
            for (let b = 0; b < 2; b++) {
              const want = full.logits.subarray((b * T + t) * vocab, (b * T + t + 1) * vocab);
              const error = maxAbsDiff(out.logits.subarray(b * vocab, (b + 1) * vocab), want);
              assert.ok(error <= TOLERANCE, `row ${b}, token ${t}: max |cached - full| = ${error}`);
            }
          }
          await session.release();
        });
      }));

    test("a left-padded batch gives each row's own logits", () =>
      withTempDir(async (dir) => {
        await withGraph(await make(dir), async (file) => {
          const session = await ort.InferenceSession.create(file);
          const short = IDS[1]!.slice(0, 7);
          const pad = IDS[0]!.length - short.length;
          const batch = [IDS[0]!, [...new Array<number>(pad).fill(0), ...short]];
          const mask = [ones(1, 12)[0]!, [...new Array<number>(pad).fill(0), ...ones(1, 7)[0]!]];
          const positions = [range(0, 12), [...new Array<number>(pad).fill(0), ...range(0, 7)]]; // as transformers.js: cumsum - 1, padding at 0
          const padded = await step(session, await emptyPast(session, 2), batch, mask, positions);
          const alone = await step(session, await emptyPast(session, 1), [short], ones(1, 7), [range(0, 7)]);
          const vocab = alone.logits.length / 7;
          const error = maxAbsDiff(padded.logits.subarray((12 + pad) * vocab, 24 * vocab), alone.logits);
          assert.ok(error <= TOLERANCE, `max |padded - alone| = ${error}`);
          await session.release();
        });
      }));
  });
}

/** The new tokens of transformers.js's own greedy `generate` on an export (its generation_config.json applied). */
async function transformersJsGreedy(folder: string, prompt: string, maxNewTokens: number): Promise<number[]> {
  const { AutoModelForCausalLM, AutoTokenizer, env } = await import("@huggingface/transformers");
  env.allowRemoteModels = false;
  const tokenizer = await AutoTokenizer.from_pretrained(folder, { local_files_only: true });
  const model = await AutoModelForCausalLM.from_pretrained(folder, { local_files_only: true, dtype: "fp32" });
  const inputs = tokenizer(prompt);
  const output = (await model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false })) as {
    data: BigInt64Array;
  };
  await model.dispose();
  return Array.from(output.data, Number).slice(inputs.input_ids.dims.at(-1));
}

describe("generation", () => {
  for (const { label, make } of [CASES[1]!, CASES[3]!]) {
    test(`${label}: greedy tokens with the KV cache are the full forward's argmax at every step`, () =>
      withTempDir(async (dir) => {
        const model = await make(dir);
        const { folder } = await prepareOnnx(model, { output: join(dir, "onnx") });
        const generated = await generateFromExport(folder, "The experts learned", {
          maxNewTokens: 8,
          temperature: 0,
          topK: 0,
          topP: 1,
          seed: null,
        });
        assert.equal(generated.newIds.length, 8);
        await withSession(model, async (session) => {
          const ids = [...generated.promptIds];
          for (const next of generated.newIds) {
            const [logits] = await session.forward(BigInt64Array.from(ids, BigInt), 1, ids.length, ["logits"]);
            const vocab = logits!.length / ids.length;
            const last = logits!.subarray((ids.length - 1) * vocab);
            assert.equal(next, last.indexOf(Math.max(...last)), `after ${ids.length} tokens`);
            ids.push(next);
          }
        });
      }));
  }

  for (const { label, make } of [CASES[0]!, CASES[2]!, CASES[4]!, CASES[5]!]) {
    test(`${label}: our loop's greedy tokens are transformers.js's, past 64 slots`, () =>
      withTempDir(async (dir) => {
        const { folder } = await prepareOnnx(await make(dir), { output: join(dir, "onnx") });
        const ours = await generateFromExport(folder, "The experts learned", {
          maxNewTokens: 80,
          temperature: 0,
          topK: 0,
          topP: 1,
          seed: null,
        });
        assert.deepEqual(ours.newIds, await transformersJsGreedy(folder, "The experts learned", 80));
        assert.ok(
          ours.promptIds.length + ours.newIds.length > 64,
          `${ours.newIds.length} tokens: the cache never grew`,
        );
      }));
  }

  test("a model's repetition_penalty (generation_config.json) is applied as transformers.js applies it", () =>
    withTempDir(async (dir) => {
      const { folder } = await prepareOnnx(await CASES[0]!.make(dir), { output: join(dir, "onnx") });
      const greedy = { maxNewTokens: 40, temperature: 0, topK: 0, topP: 1, seed: null };
      const plain = await generateFromExport(folder, "The experts learned", greedy);
      const configFile = join(folder, "generation_config.json");
      const config = JSON.parse(await readFile(configFile, "utf8")) as Record<string, unknown>;
      await writeFile(configFile, JSON.stringify({ ...config, repetition_penalty: 1.8 }));
      const ours = await generateFromExport(folder, "The experts learned", greedy);
      assert.notDeepEqual(ours.newIds, plain.newIds, "the penalty changed nothing: the test would prove nothing");
      assert.deepEqual(ours.newIds, await transformersJsGreedy(folder, "The experts learned", 40));
    }));

  test("settings not given come from the model's generation_config.json as transformers takes them", () =>
    withTempDir(async (dir) => {
      const { folder } = await prepareOnnx(await CASES[1]!.make(dir), { output: join(dir, "onnx") });
      const configFile = join(folder, "generation_config.json");
      const original = JSON.parse(await readFile(configFile, "utf8")) as Record<string, unknown>;
      const withConfig = (extra: Record<string, unknown>) =>
        writeFile(configFile, JSON.stringify({ ...original, ...extra }));
      const prompt = "The experts";
      const greedy = await generateFromExport(folder, prompt, { maxNewTokens: 12, temperature: 0 });
      assert.deepEqual(greedy.modelSettings, []);
      // do_sample with its temperature, top_k and top_p: what the same settings given draw, seed for seed
      await withConfig({ do_sample: true, temperature: 1.5, top_k: 0, top_p: 0.99, max_new_tokens: 12 });
      const sampled = await generateFromExport(folder, prompt, { seed: 7 });
      assert.deepEqual(sampled.settings, { maxNewTokens: 12, temperature: 1.5, topK: 0, topP: 0.99, seed: 7 });
      assert.deepEqual(sampled.modelSettings, ["maxNewTokens", "temperature", "topK", "topP"]);
      const given = await generateFromExport(folder, prompt, { ...sampled.settings });
      assert.deepEqual(given.newIds, sampled.newIds);
      assert.deepEqual(given.modelSettings, []);
      assert.notDeepEqual(sampled.newIds, greedy.newIds, "temperature 1.5 drew the greedy tokens");
      // a setting given wins over the model's; undefined is not given
      const overridden = await generateFromExport(folder, prompt, { temperature: 0, topK: undefined });
      assert.deepEqual(overridden.newIds, greedy.newIds);
      assert.deepEqual(overridden.modelSettings, ["maxNewTokens", "topK", "topP"]);
      // do_sample's defaults are transformers': temperature 1, top_k 50, top_p 1; top_k 1 is greedy
      await withConfig({ do_sample: true, top_k: 1 });
      const topOne = await generateFromExport(folder, prompt, { maxNewTokens: 12, seed: 3 });
      assert.deepEqual(topOne.settings, { maxNewTokens: 12, temperature: 1, topK: 1, topP: 1, seed: 3 });
      assert.deepEqual(topOne.newIds, greedy.newIds);
      // null turns a filter off, as transformers reads it
      await withConfig({ do_sample: true, temperature: null, top_k: null, top_p: null });
      const off = await generateFromExport(folder, prompt, { maxNewTokens: 2, seed: 3 });
      assert.deepEqual(off.settings, { maxNewTokens: 2, temperature: 1, topK: 0, topP: 1, seed: 3 });
      // without do_sample, transformers ignores a temperature: greedy
      await withConfig({ temperature: 0.7, top_k: 5 });
      const plain = await generateFromExport(folder, prompt, { maxNewTokens: 12 });
      assert.equal(plain.settings.temperature, 0);
      assert.deepEqual(plain.newIds, greedy.newIds);
      for (const [extra, message] of [
        [{ do_sample: true, temperature: 0 }, /temperature must be a positive number when do_sample is true, not 0$/],
        [{ do_sample: "yes" }, /do_sample must be true or false, not "yes"$/],
        [{ do_sample: true, top_p: 2 }, /top_p must be in \(0, 1\], not 2$/],
      ] as const) {
        await withConfig(extra);
        await refused(generateFromExport(folder, prompt, {}), "CONFIG_INVALID", message);
      }
    }));

  test("sampling: a seed repeats its tokens, a tiny top-p is greedy", () =>
    withTempDir(async (dir) => {
      const { folder } = await prepareOnnx(await CASES[1]!.make(dir), { output: join(dir, "onnx") });
      const settings = { maxNewTokens: 12, temperature: 1.5, topK: 0, topP: 1, seed: 7 };
      const first = await generateFromExport(folder, "The experts", settings);
      assert.deepEqual((await generateFromExport(folder, "The experts", settings)).newIds, first.newIds);
      const greedy = await generateFromExport(folder, "The experts", { ...settings, temperature: 0 });
      assert.notDeepEqual(first.newIds, greedy.newIds, "temperature 1.5 drew the greedy tokens");
      assert.deepEqual(
        (await generateFromExport(folder, "The experts", { ...settings, topP: 1e-6 })).newIds,
        greedy.newIds,
      );
      assert.deepEqual(
        (await generateFromExport(folder, "The experts", { ...settings, topK: 1 })).newIds,
        greedy.newIds,
        "top-k 1 is greedy",
      );
    }));

  test("sampling keeps the top-k tokens, then top-p of their mass, as transformers does", () => {
    const random = uniformRandom(11);
    const logits = Float32Array.from({ length: 40 }, () => random() * 4 - 2);
    const ranked = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!);
    const drawn = (topK: number, topP: number) => {
      const draw = uniformRandom(5);
      return new Set(Array.from({ length: 2000 }, () => sample(logits, 1, topK, topP, draw)));
    };
    assert.deepEqual(
      [...drawn(3, 1)].sort(),
      ranked.slice(0, 3).sort(),
      "top-k 3: the three most probable, each drawn",
    );
    assert.ok(drawn(0, 1).size > 30, "top-k 0 keeps every token");
    // top-p within the top-k: probabilities renormalised over the k kept
    const weights = ranked.slice(0, 5).map((t) => Math.exp(logits[t]! - logits[ranked[0]!]!));
    const total = weights.reduce((a, b) => a + b, 0);
    const topP = (weights[0]! + weights[1]! / 2) / total; // within the 2nd token's mass: the first two are kept
    assert.deepEqual([...drawn(5, topP)].sort(), ranked.slice(0, 2).sort());
  });

  test("pipeline('text-generation', folder) loads the export from local files", () =>
    withTempDir(async (dir) => {
      const model = await merged("llama", { attention: "shared-kv" })(dir);
      const { folder } = await prepareOnnx(model, { output: join(dir, "onnx") });
      const { pipeline, env } = await import("@huggingface/transformers");
      env.allowRemoteModels = false;
      const generator = await pipeline("text-generation", folder, { dtype: "fp32" });
      const [out] = (await generator("The experts learned", { max_new_tokens: 6, do_sample: false })) as Array<{
        generated_text: string;
      }>;
      const ours = await generateFromExport(folder, "The experts learned", {
        maxNewTokens: 6,
        temperature: 0,
        topK: 0,
        topP: 1,
        seed: null,
      });
      assert.equal(out!.generated_text, `The experts learned${ours.text}`);
      await generator.dispose();
    }));
});
