/**
 * Prompt-based router init (--router-init hidden): every router row is the
 * normalised mean input of that router over the expert's prompts (minus its
 * negative prompts) in the seeds' averaged model, here checked against
 * python/modeling_bam.py with hooks on the attention and FFN inputs; the
 * rows are deterministic; bad prompt files are refused before anything is
 * written.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { BamError } from "../../src/errors.js";
import { loadTokenizer } from "../../src/onnx/transformers.js";
import { upcycle } from "../../src/upcycle/index.js";
import { bytesEqual, fixture, withTempDir } from "../helpers.js";
import { NO_TORCH, runPython } from "../pytorch/python.js";
import { readTensors } from "./engine.js";

const EXPERTS = [
  {
    positive_prompts: [
      "The quick brown fox jumps over the lazy dog.",
      "She opened the window, and the cold morning air filled the kitchen.",
    ],
  },
  {
    positive_prompts: ["def add(a, b): return a + b", "for (let i = 0; i < n; i++) { total += values[i]; }"],
    negative_prompts: ["Rain fell all night."],
  },
  {
    positive_prompts: ["The integral of x squared from zero to one equals one third."],
    negative_prompts: ["He said that the meeting would start at nine.", "The law requires a written contract."],
    source_model: "math",
  },
];

async function promptsFile(dir: string, experts: unknown[] = EXPERTS): Promise<string> {
  const file = join(dir, "prompts.yaml");
  await writeFile(file, JSON.stringify({ experts })); // JSON is YAML
  return file;
}

describe("router init from prompts against modeling_bam.py", { skip: NO_TORCH }, () => {
  const CASES = [
    ["llama", "sequential"],
    ["gpt_neox", "parallel"],
  ] as const;
  let root = "";
  let means: Array<Record<"attn" | "ffn", number[][][]>> = [];
  before(async () => {
    root = await mkdtemp(join(tmpdir(), "bam-test-"));
    const jobs = [];
    for (const [family, block] of CASES) {
      const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
      await upcycle({
        seeds,
        output: join(root, family),
        block,
        prompts: await promptsFile(root),
        routerInit: "hidden",
      });
      // the reference: each seed in the dense layout, averaged and run by PyTorch (one python run for all)
      const folders = [];
      for (const [i, seed] of seeds.entries()) {
        folders.push(join(root, `${family}-dense-${i}`));
        await upcycle({ seeds: [seed], output: folders[i]! });
      }
      const tokenizer = await loadTokenizer(seeds[0]!);
      const prompts = EXPERTS.flatMap((e) => [e.positive_prompts, e.negative_prompts ?? []]).map((list) =>
        list.map((p) => tokenizer.encode(p)),
      );
      jobs.push({ block, folders, prompts });
    }
    await writeFile(join(root, "jobs.json"), JSON.stringify(jobs));
    means = JSON.parse(runPython(["test/onnx/hidden_means.py", join(root, "jobs.json")]));
  });
  after(() => rm(root, { recursive: true, force: true }));

  CASES.forEach(([family, block], job) => {
    test(`${family}, ${block} block: router rows are the normalised mean router inputs`, async () => {
      const { tensors } = await readTensors(join(root, family, "model.safetensors"));
      for (const [site, router] of [
        ["attn", "attn"],
        ["ffn", "mlp"],
      ] as const) {
        for (let l = 0; l < 2; l++) {
          const rows = tensors.get(`model.layers.${l}.${router}.router.weight`)!.data as Float32Array;
          const H = rows.length / EXPERTS.length;
          EXPERTS.forEach((expert, e) => {
            const positive = means[job]![site][2 * e]![l]!;
            const negative = expert.negative_prompts ? means[job]![site][2 * e + 1]![l]! : null;
            const v = positive.map((x, h) => x - (negative ? negative[h]! : 0));
            const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
            for (let h = 0; h < H; h++) {
              assert.ok(
                Math.abs(rows[e * H + h]! - v[h]! / norm) <= 1e-5,
                `layer ${l} ${router} router, expert ${e}, dim ${h}: ${rows[e * H + h]} vs ${v[h]! / norm}`,
              );
            }
          });
        }
      }
    });
  });
});

describe("router init from prompts", () => {
  test("is deterministic: two upcycles write the same bytes", () =>
    withTempDir(async (dir) => {
      const seeds = ["base", "code", "math"].map((v) => fixture("qwen3", v as "base"));
      const prompts = await promptsFile(dir);
      for (const name of ["a", "b"])
        await upcycle({ seeds, output: join(dir, name), attention: "shared-kv", routerInit: "hidden", prompts });
      const [a, b] = await Promise.all(["a", "b"].map((name) => readFile(join(dir, name, "model.safetensors"))));
      assert.ok(bytesEqual(a!, b!));
    }));

  test("refuses bad prompt files and options before writing", () =>
    withTempDir(async (dir) => {
      const seeds = ["base", "code", "math"].map((v) => fixture("llama", v as "base"));
      const output = join(dir, "out");
      const rejects = (promise: Promise<unknown>, code: string, pattern: RegExp) =>
        assert.rejects(promise, (e: BamError) => e.code === code && pattern.test(e.message));
      await rejects(upcycle({ seeds, output, routerInit: "hidden" }), "OPTIONS_INVALID", /needs prompts/);
      await rejects(
        upcycle({ seeds, output, prompts: await promptsFile(dir) }),
        "OPTIONS_INVALID",
        /prompts goes with routerInit "hidden"/,
      );
      await rejects(
        upcycle({ seeds, output, routerInit: "hidden", prompts: await promptsFile(dir, EXPERTS.slice(0, 2)) }),
        "RECIPE_INVALID",
        /lists 2 experts; the model has 3/,
      );
      await rejects(
        upcycle({
          seeds,
          output,
          routerInit: "hidden",
          prompts: await promptsFile(dir, [...EXPERTS.slice(0, 2), { positive_prompts: [] }]),
        }),
        "RECIPE_INVALID",
        /expert 2: positive_prompts must be a non-empty list/,
      );
      await rejects(
        upcycle({
          seeds,
          output,
          routerInit: "hidden",
          prompts: await promptsFile(dir, [...EXPERTS.slice(0, 2), { positive: ["x"] }]),
        }),
        "RECIPE_INVALID",
        /unknown key "positive"/,
      );
      // Counted in tokens before any model runs: past the 128 positions of the fixtures is refused by name.
      await rejects(
        upcycle({
          seeds,
          output,
          routerInit: "hidden",
          prompts: await promptsFile(dir, [...EXPERTS.slice(0, 2), { positive_prompts: ["word ".repeat(20_000)] }]),
        }),
        "RECIPE_INVALID",
        /expert 2: positive_prompts\[0\] is \d+ tokens; each prompt must be 1 to 128 tokens/,
      );
      await rejects(
        upcycle({ seeds, output, routerInit: "hidden", prompts: join(dir, "none.yaml") }),
        "IO_ERROR",
        /none\.yaml: no such file/,
      );
      const tagged = join(dir, "tagged.yaml");
      await writeFile(tagged, "experts: !!python/object/apply:os.system [echo]\n");
      await rejects(
        upcycle({ seeds, output, routerInit: "hidden", prompts: tagged }),
        "RECIPE_INVALID",
        /tagged\.yaml: not valid YAML \(Unresolved tag/,
      );
    }));
});
