/**
 * mergekit-moe configs as recipes: the example configs of mergekit's
 * docs/moe.md, rewritten to the fixtures, give byte for byte the model the
 * same merge given as API options and as CLI flags gives; base_model's
 * tensors are copied, also when it is none of the experts; prompts follow
 * their source_model whatever the order; the recipe written into the output
 * reproduces the model; unsupported keys are refused, all named in one line;
 * the cheap-embed and uniform-random routers match a computation here.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, test } from "node:test";
import type { BamError } from "../../src/errors.js";
import { loadTokenizer } from "../../src/onnx/transformers.js";
import { readRecipe, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { bytesEqual, fixture, withTempDir } from "../helpers.js";
import { readTensors } from "../onnx/engine.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

/** Writes `config` (JSON is YAML) as dir/name and returns its path. */
async function configFile(dir: string, config: unknown, name = "moe.yml"): Promise<string> {
  const file = join(dir, name);
  await writeFile(file, JSON.stringify(config));
  return file;
}

/** The model a recipe file makes, as `bam upcycle --recipe FILE -o OUT` makes it. */
async function fromRecipe(file: string, output: string): Promise<void> {
  await upcycle({ ...(await readRecipe(file)), output } as UpcycleOptions);
}

async function weights(dir: string): Promise<Buffer> {
  return readFile(join(dir, "model.safetensors"));
}

async function assertSameWeights(a: string, b: string): Promise<void> {
  assert.ok(bytesEqual(await weights(a), await weights(b)), `${a} and ${b} differ`);
}

const llama = (variant: "base" | "code" | "math") => fixture("llama", variant);
const qwen3 = (variant: "base" | "code" | "math") => fixture("qwen3", variant);

// docs/moe.md, "Shove some Mistral models in a clown car", with the fixtures for the models.
const CLOWN_CAR_PROMPTS = [
  { positive_prompts: ["<|im_start|>user\nHello, who are you?<|im_end|>", "<|im_start|>user\nI need help with"] },
  { positive_prompts: ["As a doctor of medicine,"] },
  {
    positive_prompts: [
      "[Genres: Science Fiction]\n[Tags: humor, old school, sci fi]",
      "> get ye flask",
      "[Mode: Interactive Storyteller]",
    ],
    negative_prompts: ["Das ist ein Satz auf Deutsch."],
  },
];

describe("mergekit-moe configs", () => {
  test("docs example 1 (sparse upcycling, gate_mode random, bfloat16): the same bytes as the merge given as options", () =>
    withTempDir(async (dir) => {
      // paths relative to the config file, as mergekit's users write them
      const config = await configFile(dir, {
        base_model: relative(dir, llama("base")),
        gate_mode: "random",
        dtype: "bfloat16",
        experts: Array.from({ length: 8 }, () => ({ source_model: relative(dir, llama("base")) })),
      });
      await fromRecipe(config, join(dir, "recipe"));
      const seeds = new Array<string>(8).fill(llama("base"));
      await upcycle({
        seeds,
        output: join(dir, "options"),
        sharedFrom: llama("base"),
        attention: "merged",
        block: "sequential",
        expertsPerToken: 2,
        routerInit: "random",
        dtype: "bf16",
      });
      await assertSameWeights(join(dir, "recipe"), join(dir, "options"));
    }));

  test("docs example 2 (clown car, gate_mode hidden): the same bytes as CLI flags with the prompts in a prompts file", () =>
    withTempDir(async (dir) => {
      const experts = [llama("base"), llama("code"), llama("math")];
      const config = await configFile(dir, {
        base_model: llama("base"),
        gate_mode: "hidden",
        dtype: "bfloat16",
        experts: experts.map((source_model, e) => ({ source_model, ...CLOWN_CAR_PROMPTS[e] })),
      });
      const prompts = await configFile(dir, { experts: CLOWN_CAR_PROMPTS }, "prompts.yaml");
      const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, "upcycle", ...args], { encoding: "utf8" });
      const byRecipe = cli("--recipe", config, "-o", join(dir, "recipe"));
      assert.equal(byRecipe.status, 0, byRecipe.stderr);
      const byFlags = cli(
        ...experts,
        "-o",
        join(dir, "flags"),
        "--shared-from",
        llama("base"),
        "--attention",
        "merged",
        "--block",
        "sequential",
        "-k",
        "2",
        "--router-init",
        "hidden",
        "--prompts",
        prompts,
        "--dtype",
        "bf16",
      );
      assert.equal(byFlags.status, 0, byFlags.stderr);
      await assertSameWeights(join(dir, "recipe"), join(dir, "flags"));
    }));

  test("qwen3_moe with a base model that is no expert: its tensors copied, the same bytes as the options, and recipe.yaml reproduces it", () =>
    withTempDir(async (dir) => {
      const config = await configFile(dir, {
        base_model: qwen3("base"),
        architecture: "qwen3_moe",
        gate_mode: "cheap_embed",
        experts_per_token: 1,
        experts: [
          { source_model: qwen3("code"), positive_prompts: ["def add(a, b): return a + b"] },
          {
            source_model: qwen3("math"),
            positive_prompts: ["The integral of x squared"],
            negative_prompts: ["def f(x):"],
          },
        ],
      });
      await fromRecipe(config, join(dir, "recipe"));
      await upcycle({
        seeds: [qwen3("code"), qwen3("math")],
        output: join(dir, "options"),
        sharedFrom: qwen3("base"),
        attention: "merged",
        block: "sequential",
        expertsPerToken: 1,
        routerInit: "cheap-embed",
        prompts: config,
        format: "qwen3-moe",
      });
      await assertSameWeights(join(dir, "recipe"), join(dir, "options"));
      const out = JSON.parse(await readFile(join(dir, "recipe", "config.json"), "utf8"));
      assert.equal(out.model_type, "qwen3_moe");
      assert.equal(out.num_experts_per_tok, 1);

      const { tensors: moe } = await readTensors(join(dir, "recipe", "model.safetensors"));
      const { tensors: base } = await readTensors(join(qwen3("base"), "model.safetensors"));
      const { tensors: code } = await readTensors(join(qwen3("code"), "model.safetensors"));
      let shared = 0;
      for (const [name, tensor] of base) {
        if (name.includes(".mlp.")) continue;
        assert.deepEqual(moe.get(name)?.data, tensor.data, `${name} is the base model's`);
        assert.notDeepEqual(
          code.get(name)!.data,
          tensor.data,
          `${name}: the seeds differ here, so the copy is the base's`,
        );
        shared++;
      }
      assert.ok(shared > 5);

      await fromRecipe(join(dir, "recipe", "recipe.yaml"), join(dir, "again"));
      await assertSameWeights(join(dir, "recipe"), join(dir, "again"));
    }));

  test("cheap_embed rows are the prompts' summed embedding rows; prompts are matched to the experts by source_model in any order", () =>
    withTempDir(async (dir) => {
      const prompts: Record<string, { positive_prompts: string[]; negative_prompts?: string[] }> = {
        [llama("code")]: { positive_prompts: ["def quicksort(xs):", "import numpy as np"] },
        [llama("math")]: {
          positive_prompts: ["Let x be a real number such that"],
          negative_prompts: ["Once upon a time", "She said"],
        },
        [llama("base")]: { positive_prompts: ["The weather today is"] },
      };
      const entries = (order: string[]) => order.map((source_model) => ({ source_model, ...prompts[source_model] }));
      const seeds = [llama("code"), llama("math"), llama("base")];
      // the config lists the experts in another order than the seeds
      const config = await configFile(dir, {
        base_model: llama("base"),
        gate_mode: "cheap_embed",
        experts: entries([llama("base"), llama("math"), llama("code")]),
      });
      await upcycle({
        seeds,
        output: join(dir, "out"),
        sharedFrom: llama("base"),
        routerInit: "cheap-embed",
        prompts: config,
      });

      const tokenizer = await loadTokenizer(llama("base"));
      const { tensors: base } = await readTensors(join(llama("base"), "model.safetensors"));
      const embedding = base.get("model.embed_tokens.weight")!;
      const H = embedding.shape[1]!;
      const normalised = (v: number[]) => {
        const norm = Math.hypot(...v);
        return v.map((x) => x / norm);
      };
      const sumOfRows = (texts: string[]) => {
        const sum = new Array<number>(H).fill(0);
        for (const id of texts.flatMap((t) => tokenizer.encode(t)))
          for (let h = 0; h < H; h++) sum[h]! += (embedding.data as Float32Array)[id * H + h]!;
        return normalised(sum);
      };
      const expected = seeds.map((seed) => {
        const { positive_prompts, negative_prompts } = prompts[seed]!;
        const positive = sumOfRows(positive_prompts);
        const negative = negative_prompts ? sumOfRows(negative_prompts) : positive.map(() => 0);
        return normalised(positive.map((x, h) => x - negative[h]!));
      });
      const { tensors: moe } = await readTensors(join(dir, "out", "model.safetensors"));
      const routers = [...moe.keys()].filter((name) => name.endsWith(".router.weight"));
      assert.equal(routers.length, 4); // attention and FFN routers of both layers, all the same rows
      for (const name of routers) {
        const rows = moe.get(name)!.data as Float32Array;
        for (const [e, row] of expected.entries()) {
          for (const [h, x] of row.entries())
            assert.ok(
              Math.abs(rows[e * H + h]! - x) < 1e-6,
              `${name} expert ${e} dim ${h}: ${rows[e * H + h]} vs ${x}`,
            );
        }
      }

      // the same experts and prompts in the seeds' order give the same model
      const inOrder = await configFile(
        dir,
        { base_model: llama("base"), gate_mode: "cheap_embed", experts: entries(seeds) },
        "ordered.yml",
      );
      await upcycle({
        seeds,
        output: join(dir, "ordered"),
        sharedFrom: llama("base"),
        routerInit: "cheap-embed",
        prompts: inOrder,
      });
      await assertSameWeights(join(dir, "out"), join(dir, "ordered"));
      // and so does hidden, which reads the prompts the same way
      for (const [name, prompts] of [
        ["hidden-out", config],
        ["hidden-ordered", inOrder],
      ] as const) {
        await upcycle({ seeds, output: join(dir, name), sharedFrom: llama("base"), routerInit: "hidden", prompts });
      }
      await assertSameWeights(join(dir, "hidden-out"), join(dir, "hidden-ordered"));
    }));

  test("uniform_random routers are U(-1/sqrt(hidden), 1/sqrt(hidden)), deterministic, and differ from random", () =>
    withTempDir(async (dir) => {
      const experts = [llama("code"), llama("math")].map((source_model) => ({ source_model }));
      const config = await configFile(dir, { base_model: llama("base"), gate_mode: "uniform_random", experts });
      for (const name of ["a", "b"]) await fromRecipe(config, join(dir, name));
      await assertSameWeights(join(dir, "a"), join(dir, "b"));
      const { tensors } = await readTensors(join(dir, "a", "model.safetensors"));
      const H = tensors.get("model.embed_tokens.weight")!.shape[1]!;
      const bound = 1 / Math.sqrt(H);
      const values = [...tensors]
        .filter(([name]) => name.endsWith(".router.weight"))
        .flatMap(([, t]) => [...(t.data as Float32Array)]);
      assert.equal(values.length, 2 * 2 * H); // two layers' FFN routers of two experts
      assert.ok(
        values.every((x) => x >= -bound && x < bound),
        "every value within the bound",
      );
      // 128 draws of U(-b, b): the extremes lie beyond +-0.8 b with probability 1 - 2 * 0.9^128 > 0.99999
      assert.ok(Math.min(...values) < -0.8 * bound && Math.max(...values) > 0.8 * bound, "spread over the whole range");
      const mean = values.reduce((a, b) => a + b, 0) / values.length;
      const variance = values.reduce((a, x) => a + (x - mean) ** 2, 0) / values.length;
      assert.ok(
        Math.abs(variance / ((bound * bound) / 3) - 1) < 0.35,
        `variance ${variance} vs ${(bound * bound) / 3}`,
      );

      await writeFile(config, JSON.stringify({ base_model: llama("base"), gate_mode: "random", experts }));
      await fromRecipe(config, join(dir, "random"));
      assert.ok(!bytesEqual(await weights(join(dir, "a")), await weights(join(dir, "random"))));
    }));

  test("unsupported keys are refused in one line naming each of them; bad values name the key", () =>
    withTempDir(async (dir) => {
      const refused = async (config: unknown, pattern: RegExp) => {
        const file = await configFile(dir, config);
        await assert.rejects(
          readRecipe(file),
          (e: BamError) =>
            e.code === "RECIPE_INVALID" &&
            !e.message.includes("\n") &&
            pattern.test(e.message) &&
            e.message.startsWith(file),
        );
      };
      const experts = [
        { source_model: llama("code"), positive_prompts: ["a"] },
        { source_model: llama("math"), positive_prompts: ["b"] },
      ];
      await refused(
        {
          base_model: llama("base"),
          experts: [
            { ...experts[0], residual_scale: 0.1 },
            { ...experts[1], noise_scale: 0.01 },
          ],
          shared_experts: [{ source_model: llama("base") }],
          tokenizer_source: "base",
        },
        /not supported: shared_experts \(.*\), experts\[0\]\.residual_scale \(.*\), experts\[1\]\.noise_scale \(.*\); unknown: tokenizer_source; remove them/,
      );
      await refused(
        { base_model: llama("base"), experts, gate_mode: "hidden_avg" },
        /gate_mode must be one of hidden, cheap_embed, random, uniform_random, not "hidden_avg"/,
      );
      await refused(
        { base_model: llama("base"), experts, dtype: "int64" },
        /dtype must be one of bfloat16, float16, float32/,
      );
      await refused(
        { base_model: llama("base"), experts, architecture: "deepseek" },
        /architecture "deepseek" is not written here/,
      );
      await refused(
        { base_model: llama("base"), experts: [{ source_model: llama("code") }, ...experts.slice(1)] },
        /gate_mode hidden needs positive_prompts for every expert; experts\[0\] have none/,
      );
      await refused({ base_model: llama("base"), experts: [] }, /"experts" is empty/);
      await refused({ experts: [{ model: llama("code") }] }, /unknown: experts\[0\]\.model/);

      // the CLI: exit 1, one line on stderr
      const file = await configFile(dir, { base_model: llama("base"), experts, shared_experts: [] });
      const run = spawnSync(process.execPath, [CLI, "upcycle", "--recipe", file, "-o", join(dir, "out")], {
        encoding: "utf8",
      });
      assert.equal(run.status, 1);
      assert.match(
        run.stderr,
        /^bam: .*moe\.yml: mergekit-moe config: not supported: shared_experts \(a shared expert\); remove them .*\n$/,
      );
      assert.equal(run.stderr.split("\n").length, 2);
    }));

  test("--dry-run shows the base model as the source of every shared tensor", () =>
    withTempDir(async (dir) => {
      const experts = [qwen3("code"), qwen3("math")].map((source_model) => ({ source_model }));
      const file = await configFile(dir, { base_model: qwen3("base"), gate_mode: "random", experts });
      const run = spawnSync(process.execPath, [CLI, "upcycle", "--recipe", file, "--dry-run"], { encoding: "utf8" });
      assert.equal(run.status, 0, run.stderr);
      assert.match(run.stdout, new RegExp(`shared +copied from ${qwen3("base")}\n`));
      assert.match(run.stdout, /model\.embed_tokens\.weight .* <- copy base:model\.embed_tokens\.weight\n/);
      assert.match(
        run.stdout,
        /model\.layers\.0\.attn\.q_proj\.weight .* <- copy base:model\.layers\.0\.attn\.q_proj\.weight\n/,
      );
      assert.match(
        run.stdout,
        /model\.layers\.0\.mlp\.experts\.1\.up_proj\.weight .* <- copy math:model\.layers\.0\.mlp\.up_proj\.weight\n/,
      );
    }));

  test("keys map to options: dtype, experts_per_token, architecture (mergekit's prefix rule), gate_mode, base_model", () =>
    withTempDir(async (dir) => {
      const experts = [
        { source_model: "org/code", positive_prompts: ["a"] },
        { source_model: relative(dir, llama("math")), positive_prompts: ["b"] },
      ];
      const read = async (extra: Record<string, unknown>) =>
        readRecipe(await configFile(dir, { base_model: "../no-such-folder", experts, ...extra }));
      const options = await read({ dtype: "torch.float16", architecture: "Mixtral", experts_per_token: 1 });
      assert.deepEqual(options.seeds, ["org/code", llama("math")]); // a Hugging Face id as given, a folder relative to the config
      assert.equal(options.sharedFrom, "../no-such-folder");
      assert.equal(options.dtype, "f16");
      assert.equal(options.format, "mixtral");
      assert.equal(options.expertsPerToken, 1);
      assert.equal(options.routerInit, "hidden"); // mergekit's default gate mode
      assert.equal(options.prompts, join(dir, "moe.yml"));
      assert.equal((await read({})).expertsPerToken, 2); // mergekit's default
      assert.equal((await read({})).format, undefined);
      assert.equal((await read({ architecture: "qwen3" })).format, "qwen3-moe");
      assert.equal((await read({ gate_mode: "random" })).prompts, undefined);
    }));
});
