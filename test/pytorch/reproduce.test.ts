/**
 * scripts/reproduce.sh end to end at its tiny scale on CPU, so the reproduction pipeline cannot rot:
 * seed, branches, `bam upcycle` x4, data- and compute-matched mixes, and both engines' held-out
 * perplexity, which must agree. Random tokens stand in for the corpus (docs/data.md builds the real one).
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
    const random = (n: number) => Uint16Array.from({ length: n }, () => (state = (state * 1103515245 + 12345) % 2 ** 31) % 8192);
    for (const domain of DOMAINS) {
      await writeFile(join(tokens, `${domain}.train.bin`), random(8192));
      await writeFile(join(tokens, `${domain}.heldout.bin`), random(1024));
    }
    await copyFile("data/corpus/tokenizer.json", join(dir, "tokenizer.json"));
    const out = join(dir, "out");
    const run = spawnSync("scripts/reproduce.sh", ["--scale", "tiny", "--data", tokens, "--out", out, "--jobs", "2", "--device", "cpu"],
      { encoding: "utf8", env: { ...process.env, PYTHON: PYTHON! } });
    assert.equal(run.status, 0, run.stdout.slice(-3000) + run.stderr.slice(-3000));
    const results = JSON.parse(await readFile(join(out, "reproduction.json"), "utf8"));
    const runs = ["seed", "code", "math", "lexicon", ...["dense", "sparse", "btx", "bam-shared-kv", "bam-kv"].map((m) => `${m}-dm`),
      ...["dense", "sparse", "btx", "bam-shared-kv"].map((m) => `${m}-cm`)];
    assert.deepEqual(Object.keys(results.runs).sort(), runs.sort());
    for (const name of runs) assert.ok(results.runs[name].log.length > 0 && results.runs[name].evals.length > 0, name);
    const plan = results.mix_plan.models;
    assert.ok(plan["bam-kv"].flops_per_token > plan.btx.flops_per_token, "soft attention experts cost more per token");
    assert.ok(plan.btx.compute_matched_tokens > plan.btx.data_matched_tokens, "compute-matched BTX sees more tokens");
    const evaluated = Object.entries(results.heldout as Record<string, { agreement?: Record<string, number> }>);
    assert.equal(evaluated.filter(([, e]) => e.agreement !== undefined).length, runs.length + 4, "every model, the 4 upcycled ones too");
    assert.ok(results.max_relative_ppl_difference < 1e-4, `torch vs bam eval: ${results.max_relative_ppl_difference}`);
  }));
