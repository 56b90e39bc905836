/**
 * Seeds that cannot be mixed are refused before anything is written, with
 * one line naming both seeds and what differs: families, hidden sizes, layer
 * counts, vocabularies, tokenizers, head counts, rotary settings, tied and
 * untied embeddings, and the rest of the architecture. Variants are synthetic
 * llama seeds and copies of fixture folders with config.json edited.
 */
import assert from "node:assert/strict";
import { cp, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BamError } from "../../src/errors.js";
import { planUpcycle, upcycle } from "../../src/upcycle/index.js";
import { fixture } from "../helpers.js";
import { type LlamaSeed, runCli, TINY, writeSeed } from "./synth.js";

let root: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-mismatch-"));
});
after(() => rm(root, { recursive: true, force: true }));

let counter = 0;
async function synthetic(name: string, change: Partial<LlamaSeed> = {}): Promise<string> {
  return writeSeed(join(root, `${counter++}`, name), { ...TINY, valueSeed: counter, ...change });
}

/** A copy of a fixture seed with config.json edited. */
async function edited(
  family: "phi" | "mistral" | "llama" | "qwen2",
  name: string,
  edit: (config: Record<string, unknown>) => void,
): Promise<string> {
  const dir = join(root, `${counter++}`, name);
  await mkdir(join(dir, ".."), { recursive: true });
  await cp(fixture(family, "base"), dir, { recursive: true });
  const config = JSON.parse(await readFile(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
  edit(config);
  await writeFile(join(dir, "config.json"), JSON.stringify(config, null, 2));
  return dir;
}

/** Both orders are refused, before any write, naming both seeds and `difference`. */
async function expectMismatch(a: string, b: string, difference: RegExp): Promise<void> {
  for (const seeds of [
    [a, b],
    [b, a],
  ]) {
    const parent = join(root, `out-${counter++}`);
    await mkdir(parent);
    for (const run of [
      () => planUpcycle({ seeds, output: join(parent, "out") }),
      () => upcycle({ seeds, output: join(parent, "out") }),
    ]) {
      await assert.rejects(run(), (error: unknown) => {
        assert.ok(error instanceof BamError, String(error));
        assert.equal(error.code, "SEED_MISMATCH", error.message);
        assert.doesNotMatch(error.message, /\n/);
        for (const seed of seeds) assert.ok(error.message.includes(seed), `names ${seed}: ${error.message}`);
        assert.match(error.message, difference);
        return true;
      });
    }
    assert.deepEqual(await readdir(parent), [], "nothing written, no temporary folder");
  }
}

test("different families", async () => {
  await expectMismatch(
    fixture("llama", "base"),
    fixture("mistral", "base"),
    /seed_model_type: "(llama|mistral)" vs "(mistral|llama)"/,
  );
  await expectMismatch(fixture("qwen2", "base"), fixture("qwen3", "base"), /seed_model_type/);
});

test("different sizes: hidden, intermediate, layers, vocabulary", async () => {
  const base = await synthetic("base");
  await expectMismatch(base, await synthetic("hidden", { hidden: 64 }), /hidden_size: (64 vs 32|32 vs 64)/);
  await expectMismatch(base, await synthetic("ffn", { intermediate: 96 }), /intermediate_size: (96 vs 48|48 vs 96)/);
  await expectMismatch(base, await synthetic("layers", { layers: 3 }), /num_hidden_layers: (3 vs 2|2 vs 3)/);
  await expectMismatch(base, await synthetic("vocab", { vocab: 80 }), /vocab_size: (80 vs 64|64 vs 80)/);
});

test("different head counts, including the same projection shapes", async () => {
  const base = await synthetic("base");
  // 8 heads of 4 against 4 heads of 8: q_proj has the same shape, the attention does not.
  await expectMismatch(
    base,
    await synthetic("heads", { heads: 8, kvHeads: 2, headDim: 4 }),
    /num_attention_heads: (8 vs 4|4 vs 8)/,
  );
  await expectMismatch(base, await synthetic("kv", { kvHeads: 4 }), /num_key_value_heads: (4 vs 2|2 vs 4)/);
});

test("different rotary settings", async () => {
  const base = await synthetic("base");
  await expectMismatch(
    base,
    await synthetic("theta", { ropeTheta: 500000 }),
    /rope_theta: (500000 vs 10000|10000 vs 500000)/,
  );
  await expectMismatch(
    base,
    await synthetic("scaled", { ropeScaling: { rope_type: "linear", factor: 2 } }),
    /rope_scaling/,
  );
  const phi = fixture("phi", "base");
  await expectMismatch(
    phi,
    await edited("phi", "partial", (c) => {
      const rope = c.rope_parameters as Record<string, unknown> | undefined;
      if (rope && "partial_rotary_factor" in rope) rope.partial_rotary_factor = 1;
      else c.partial_rotary_factor = 1;
    }),
    /rotary_dim/,
  );
});

test("tied against untied embeddings", async () => {
  await expectMismatch(
    await synthetic("untied"),
    await synthetic("tied", { tied: true }),
    /tie_word_embeddings: (true vs false|false vs true)/,
  );
});

test("other architecture settings: norm epsilon, activation, sliding window", async () => {
  await expectMismatch(await synthetic("base"), await synthetic("eps", { rmsNormEps: 1e-6 }), /norm_eps/);
  await expectMismatch(
    fixture("llama", "base"),
    await edited("llama", "gelu", (c) => {
      c.hidden_act = "gelu";
    }),
    /hidden_act: "(gelu|silu)" vs "(silu|gelu)"/,
  );
  await expectMismatch(
    fixture("mistral", "base"),
    await edited("mistral", "window", (c) => {
      c.sliding_window = 7;
    }),
    /sliding_window/,
  );
});

test("a different tokenizer, or one seed without any", async () => {
  const base = await synthetic("base");
  const tokenizer = JSON.parse(await readFile("fixtures/tokenizer/tokenizer.json", "utf8")) as Record<string, unknown>;
  tokenizer.added_tokens = [{ id: 63, content: "<extra>", special: true }];
  await expectMismatch(
    base,
    await synthetic("tokenizer", { tokenizer: JSON.stringify(tokenizer) }),
    /different tokenizer\.json/,
  );
  const none = await synthetic("none");
  await rm(join(none, "tokenizer.json"));
  await expectMismatch(base, none, /different tokenizer\.json.*\bnone\b|\bnone\b.*different tokenizer\.json/);
});

test("seeds that differ only in their values, or in their dtypes, are accepted", async () => {
  const parent = join(root, "accepted");
  await mkdir(parent);
  const a = await synthetic("a");
  const b = await synthetic("b");
  const c = await synthetic("c", { dtype: "F32" });
  const result = await upcycle({ seeds: [a, b, c], output: join(parent, "out") });
  assert.equal(result.plan.moe.numExperts, 3);
});

test("the CLI says it in one line and exits 1", async () => {
  const parent = join(root, "cli");
  await mkdir(parent);
  const run = await runCli([
    "upcycle",
    fixture("llama", "base"),
    fixture("mistral", "base"),
    "-o",
    join(parent, "out"),
  ]);
  assert.equal(run.code, 1);
  const lines = run.stderr.trim().split("\n");
  assert.equal(lines.length, 1, run.stderr);
  assert.match(lines[0]!, /^bam: seed .*mistral.* differs from seed .*llama.* in seed_model_type/);
  assert.deepEqual(await readdir(parent), []);
});
