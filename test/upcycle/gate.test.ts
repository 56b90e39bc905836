/**
 * The FFN gate option (norm_topk_prob, docs/method.md "FFN gating"): every
 * output's config.json says which gate it computes, the recipe and the CLI
 * carry it, a format that cannot compute the asked gate refuses, and a model
 * whose FFN router cannot learn from the LM loss (top-1, renormalised) is
 * built with a warning.
 */
import assert from "node:assert/strict";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import { isBamError } from "../../src/errors.js";
import { DEFAULT_NORM_TOPK_PROB } from "../../src/upcycle/options.js";
import { planUpcycle, readRecipe, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";
import { runCli } from "../reliability/synth.js";

const llama = () => fixture("llama", "base");
const config = async (dir: string) =>
  JSON.parse(await readFile(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
/** Two seeds in the layout the native formats hold. */
const native = (family: "mistral" | "qwen3", format: UpcycleOptions["format"]): UpcycleOptions => ({
  seeds: [fixture(family, "base"), fixture(family, "code")],
  output: "unused",
  attention: "merged",
  block: "sequential",
  format,
});

test("every output's config.json says which gate it computes, the default when none is asked", () =>
  withTempDir(async (dir) => {
    const cases: Array<[string, UpcycleOptions, boolean]> = [
      ["default", { seeds: [llama(), llama()], output: join(dir, "default") }, DEFAULT_NORM_TOPK_PROB],
      ["renormalised", { seeds: [llama(), llama()], output: join(dir, "renormalised"), normTopkProb: true }, true],
      ["paper", { seeds: [llama(), llama()], output: join(dir, "paper"), normTopkProb: false }, false],
      ["sparse", { seeds: [llama()], output: join(dir, "sparse"), experts: 4, normTopkProb: true }, true],
      ["dense (no router)", { seeds: [llama()], output: join(dir, "dense"), experts: 1 }, DEFAULT_NORM_TOPK_PROB],
      [
        "qwen3-moe, paper",
        { ...native("qwen3", "qwen3-moe"), output: join(dir, "qwen3-paper"), normTopkProb: false },
        false,
      ],
      [
        "qwen3-moe, renormalised",
        { ...native("qwen3", "qwen3-moe"), output: join(dir, "qwen3-renormalised"), normTopkProb: true },
        true,
      ],
      ["mixtral", { ...native("mistral", "mixtral"), output: join(dir, "mixtral"), normTopkProb: true }, true],
    ];
    for (const [label, options, gate] of cases) {
      const { output } = await upcycle(options);
      assert.equal((await config(output)).norm_topk_prob, gate, label);
      assert.match(
        await readFile(join(output, "recipe.yaml"), "utf8"),
        new RegExp(`^norm-topk-prob: ${gate}$`, "m"),
        label,
      );
      if (options.format === undefined) {
        const model = await openModel(output);
        assert.equal(model.moe.normTopkProb, gate, `${label}: read back`);
        await model.close();
      }
    }
  }));

test("the recipe carries the gate, and a recipe's value must be a boolean", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "first");
    await upcycle({ seeds: [llama(), llama()], output: out, normTopkProb: true, expertsPerToken: 2 });
    const recipe = await readRecipe(join(out, "recipe.yaml"));
    assert.equal(recipe.normTopkProb, true);
    const text = join(dir, "text.yaml");
    await writeFile(text, `seeds: [${llama()}, ${llama()}]\nnorm-topk-prob: "no"\n`);
    await assert.rejects(
      planUpcycle({ ...(await readRecipe(text)), output: join(dir, "x") } as UpcycleOptions),
      (error: unknown) =>
        isBamError(error, "OPTIONS_INVALID") &&
        /normTopkProb must be true or false, not the string "no"/.test((error as Error).message),
    );
  }));

test("a BAM config without norm_topk_prob renormalises (folders written before the key); a non-boolean is refused", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    await upcycle({ seeds: [llama(), llama()], output: out, normTopkProb: false });
    const raw = await config(out);
    delete raw.norm_topk_prob;
    await writeFile(join(out, "config.json"), JSON.stringify(raw));
    const model = await openModel(out);
    assert.equal(model.moe.normTopkProb, true);
    await model.close();
    await writeFile(join(out, "config.json"), JSON.stringify({ ...raw, norm_topk_prob: "false" }));
    await assert.rejects(
      openModel(out),
      (error: unknown) =>
        isBamError(error, "CONFIG_INVALID") &&
        /"norm_topk_prob" must be true or false, found "false"/.test((error as Error).message),
    );
  }));

test("--format mixtral refuses the paper's gate before writing, saying what to do", () =>
  withTempDir(async (dir) => {
    const output = join(dir, "out");
    await assert.rejects(
      upcycle({ ...native("mistral", "mixtral"), output, normTopkProb: false }),
      (error: unknown) => {
        assert.ok(isBamError(error, "OPTIONS_INVALID"), String(error));
        assert.match(
          (error as Error).message,
          /--format mixtral cannot hold this model: it always renormalises .*pass --norm-topk-prob, or use --format qwen3-moe\); change this, or use --format bam$/,
        );
        return true;
      },
    );
    assert.deepEqual(await readdir(dir), [], "nothing written");
  }));

test("a warning wherever the FFN router gets no LM gradient: top-1 with the renormalised gate, in any format", async () => {
  const noGradient = /top-1 with the renormalised gate .*no gradient from the language-model loss/;
  const warned = async (options: Partial<UpcycleOptions>) =>
    (await planUpcycle({ seeds: [llama(), llama()], output: "unused", ...options } as UpcycleOptions)).warnings.some(
      (w) => noGradient.test(w),
    );
  assert.equal(await warned({ normTopkProb: true }), true, "top-1, renormalised");
  assert.equal(await warned({ normTopkProb: false }), false, "top-1, paper's gate");
  assert.equal(await warned({ normTopkProb: true, expertsPerToken: 2 }), false, "top-2, renormalised");
  assert.equal(await warned({ seeds: [llama()], experts: 1, normTopkProb: true }), false, "one expert: no router");
  const mixtral = await planUpcycle({ ...native("mistral", "mixtral"), normTopkProb: true });
  const warning = mixtral.warnings.find((w) => noGradient.test(w));
  assert.match(warning ?? "", /use -k 2 or more \(Mixtral's gate always renormalises\)/);
  const qwen = await planUpcycle({ ...native("qwen3", "qwen3-moe"), normTopkProb: true });
  assert.ok(
    qwen.warnings.some((w) => noGradient.test(w)),
    "qwen3-moe, top-1 renormalised",
  );
});

test("the CLI flag: --norm-topk-prob and --no-norm-topk-prob override the recipe, the warning goes to stderr beside --json", () =>
  withTempDir(async (dir) => {
    const recipe = join(dir, "recipe.yaml");
    await writeFile(recipe, `seeds: [${llama()}, ${llama()}]\nnorm-topk-prob: true\n`);
    const fromRecipe = await runCli(["upcycle", "--recipe", recipe, "-o", join(dir, "a"), "--json"]);
    assert.equal(fromRecipe.code, 0, fromRecipe.stderr);
    assert.equal(JSON.parse(fromRecipe.stdout).options.normTopkProb, true, "the recipe's value, no flag given");
    assert.match(fromRecipe.stderr, /bam: warning: top-1 with the renormalised gate/);
    assert.equal((await config(join(dir, "a"))).norm_topk_prob, true);
    const flag = await runCli(["upcycle", "--recipe", recipe, "-o", join(dir, "b"), "--no-norm-topk-prob"]);
    assert.equal(flag.code, 0, flag.stderr);
    assert.doesNotMatch(flag.stderr, /renormalised gate/);
    assert.equal((await config(join(dir, "b"))).norm_topk_prob, false);
    const dryRun = await runCli(["upcycle", llama(), llama(), "--norm-topk-prob", "-k", "2", "--dry-run"]);
    assert.match(dryRun.stdout, /top-2, renormalised gate \(--norm-topk-prob\)/);
  }));
