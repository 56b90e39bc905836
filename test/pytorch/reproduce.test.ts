/**
 * scripts/reproduce.sh end to end at its tiny scale on CPU (one mixing seed), so the reproduction pipeline
 * cannot rot: seed, branches, `bam upcycle` with both gates, data- and compute-matched mixes, BTX's token
 * multiples, routing and the routers' LM gradients, the step timings, and both engines' held-out perplexity,
 * which must agree. Random tokens stand in for the corpus (docs/data.md builds the real one).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { withTempDir } from "../helpers.js";
import { NO_TORCH, PYTHON } from "./python.js";

const DOMAINS = ["general", "code", "math", "lexicon"];

test("scripts/reproduce.sh --scale tiny runs every stage and the engines agree", { skip: NO_TORCH }, () =>
  withTempDir(async (dir) => {
    const tokens = join(dir, "tokens");
    await mkdir(tokens);
    let state = 12345;
    const random = (n: number) =>
      Uint16Array.from({ length: n }, () => (state = (state * 1103515245 + 12345) % 2 ** 31) % 8192);
    for (const domain of DOMAINS) {
      await writeFile(join(tokens, `${domain}.train.bin`), random(8192));
      await writeFile(join(tokens, `${domain}.heldout.bin`), random(1024));
    }
    await copyFile("data/corpus/tokenizer.json", join(dir, "tokenizer.json"));
    const out = join(dir, "out");
    const run = spawnSync(
      "scripts/reproduce.sh",
      ["--scale", "tiny", "--data", tokens, "--out", out, "--jobs", "2", "--device", "cpu", "--seeds", "1"],
      { encoding: "utf8", env: { ...process.env, PYTHON: PYTHON!, BAM_CACHE_DIR: join(dir, "bam-cache") } },
    ); // bam eval's builds, removed with the run
    assert.equal(run.status, 0, run.stdout.slice(-3000) + run.stderr.slice(-3000));
    const results = JSON.parse(await readFile(join(out, "reproduction.json"), "utf8"));
    const mixed = [
      ...["dense", "sparse", "btx", "bam-shared-kv", "bam-kv", "bam-kv-renorm", "btx-renorm"].map((m) => `${m}-dm-s0`),
      ...["dense", "sparse", "btx", "bam-shared-kv"].map((m) => `${m}-cm-s0`),
      "btx-x0.5-s0",
      "btx-x2-s0",
    ];
    const runs = ["seed", "code", "math", "lexicon", ...mixed];
    assert.deepEqual(Object.keys(results.runs).sort(), runs.sort());
    for (const name of runs) assert.ok(results.runs[name].log.length > 0 && results.runs[name].evals.length > 0, name);
    assert.equal(results.runs.code.lr, results.runs.seed.lr / 2, "branches at half the seed's peak");
    assert.equal(results.runs["bam-kv-dm-s0"].lr, results.runs.seed.lr, "mixtures at the seed's peak");
    const plan = results.mix_plan.models;
    assert.ok(plan["bam-kv"].flops_per_token > plan.btx.flops_per_token, "soft attention experts cost more per token");
    assert.ok(plan.btx.compute_matched_tokens > plan.btx.data_matched_tokens, "compute-matched BTX sees more tokens");
    assert.ok(
      plan.dense.branch_flops_credited > 0 && plan.btx.branch_flops_credited === 0,
      "dense is credited with the branches",
    );
    // the gates as upcycled: the paper's lets the LM loss reach the top-1 FFN router, the renormalised one does not
    const ffnGrad = (name: string) => results.runs[name].evals.at(-1).router_lm_grad_norm.ffn as number;
    assert.ok(
      ffnGrad("bam-kv-dm-s0") > 0 && ffnGrad("bam-kv-renorm-dm-s0") < 1e-4 * ffnGrad("bam-kv-dm-s0"),
      `FFN router LM gradient: paper ${ffnGrad("bam-kv-dm-s0")}, renormalised ${ffnGrad("bam-kv-renorm-dm-s0")}`,
    );
    const routing = results.heldout["bam-kv-dm-s0"].routing;
    assert.deepEqual(Object.keys(routing).sort(), [...DOMAINS].sort());
    for (const key of ["ffn_share", "attn_weight"]) {
      for (const layer of routing.code[key] as number[][]) {
        assert.ok(Math.abs(layer.reduce((a, b) => a + b, 0) - 1) < 1e-5, `${key} of a layer sums to 1: ${layer}`);
      }
    }
    assert.equal(
      results.heldout["btx-dm-s0"].routing.code.attn_weight,
      undefined,
      "BTX merges attention: no attention router",
    );
    assert.deepEqual(Object.keys(results.timing).sort(), ["bam-kv", "bam-shared-kv", "btx", "dense", "sparse"]);
    const evaluated = Object.entries(results.heldout as Record<string, { agreement?: Record<string, number> }>);
    assert.equal(
      evaluated.filter(([, e]) => e.agreement !== undefined).length,
      runs.length + 6,
      "every model, the 6 upcycled ones too",
    );
    assert.ok(results.max_relative_ppl_difference < 1e-4, `torch vs bam eval: ${results.max_relative_ppl_difference}`);
  }),
);
