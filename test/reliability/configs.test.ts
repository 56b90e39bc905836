/**
 * Configs that were accepted silently: a non-positive rope scaling factor,
 * rope_theta stated twice with two values; and tokenizers compared by
 * content, so a tokenizer.json re-saved with other whitespace or key order
 * is the same vocabulary while a changed one is not. Fixture copies edited.
 */
import assert from "node:assert/strict";
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { openSeed } from "../../src/arch/load.js";
import { planUpcycle, upcycle } from "../../src/upcycle/index.js";
import { fixture, refused } from "../helpers.js";
import { runCli } from "./synth.js";

let root: string;
let counter = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-configs-"));
});
after(() => rm(root, { recursive: true, force: true }));

async function edited(variant: "base" | "code", edit: (config: Record<string, unknown>) => void): Promise<string> {
  const dir = join(root, `${counter++}`, variant);
  await cp(fixture("llama", variant), dir, { recursive: true });
  const config = JSON.parse(await readFile(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
  edit(config);
  await writeFile(join(dir, "config.json"), JSON.stringify(config, null, 2));
  return dir;
}

test("rope scaling factors must be positive", async () => {
  for (const factor of [-2, 0]) {
    const dir = await edited("base", (c) => {
      delete c.rope_parameters;
      c.rope_theta = 5000;
      c.rope_scaling = { rope_type: "linear", factor };
    });
    await refused(
      openSeed(dir),
      "CONFIG_INVALID",
      new RegExp(`"rope_scaling\\.factor" must be positive, found ${factor}`),
    );
  }
  const v5 = await edited("base", (c) => {
    delete c.rope_theta;
    c.rope_parameters = { rope_type: "linear", rope_theta: 10000, factor: -1 };
  });
  await refused(openSeed(v5), "CONFIG_INVALID", /"rope_parameters\.factor" must be positive/);
  const fine = await edited("base", (c) => {
    delete c.rope_parameters;
    c.rope_theta = 5000;
    c.rope_scaling = { rope_type: "linear", factor: 2 };
  });
  const seed = await openSeed(fine);
  assert.equal(seed.features.rope?.scaling?.factor, 2);
  await seed.close();
});

test("rope_theta and rope_parameters.rope_theta must agree", async () => {
  const dir = await edited("base", (c) => {
    c.rope_theta = 10000;
    c.rope_parameters = { rope_type: "default", rope_theta: 500000 };
  });
  await refused(openSeed(dir), "CONFIG_INVALID", /"rope_theta" is 10000 but "rope_parameters\.rope_theta" is 500000/);
  const same = await edited("base", (c) => {
    c.rope_theta = 500000;
    c.rope_parameters = { rope_type: "default", rope_theta: 500000 };
  });
  const seed = await openSeed(same);
  assert.equal(seed.features.rope?.theta, 500000);
  await seed.close();
});

test("tokenizer.json is compared by content: whitespace and key order do not matter, a token does", async () => {
  const base = fixture("llama", "base");
  const resaved = join(root, "resaved", "code");
  await cp(fixture("llama", "code"), resaved, { recursive: true });
  const parsed = JSON.parse(await readFile(join(resaved, "tokenizer.json"), "utf8")) as Record<string, unknown>;
  const reordered = Object.fromEntries(Object.entries(parsed).reverse());
  await writeFile(join(resaved, "tokenizer.json"), JSON.stringify(reordered, null, 4));
  const plan = await planUpcycle({ seeds: [base, resaved], output: join(root, "out") });
  assert.equal(plan.seeds.length, 2);
  const changed = join(root, "changed", "code");
  await cp(resaved, changed, { recursive: true });
  (parsed.added_tokens as unknown[]).push({
    id: 999_999,
    content: "<odd>",
    special: true,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
  });
  await writeFile(join(changed, "tokenizer.json"), JSON.stringify(parsed, null, 4));
  await refused(
    planUpcycle({ seeds: [base, changed], output: join(root, "out") }),
    "SEED_MISMATCH",
    /different tokenizer\.json/,
  );
});

test("seeds whose eos_token or chat_template differ are warned about by name, and the first seed's win", async () => {
  const base = fixture("llama", "base");
  const code = join(root, "chat", "code");
  await cp(fixture("llama", "code"), code, { recursive: true });
  const same = await planUpcycle({ seeds: [base, code], output: join(root, "out") });
  assert.deepEqual(
    same.warnings.filter((w) => /eos_token|chat_template/.test(w)),
    [],
  );
  const file = join(code, "tokenizer_config.json");
  const config = JSON.parse(await readFile(file, "utf8")) as Record<string, unknown>;
  await writeFile(file, JSON.stringify({ ...config, eos_token: "<|im_end|>", chat_template: "{{ messages }}" }));
  const plan = await planUpcycle({ seeds: [base, code], output: join(root, "out") });
  const chat = plan.warnings.filter((w) => /eos_token|chat_template/.test(w));
  assert.equal(chat.length, 2, chat.join("\n"));
  assert.match(
    chat[0]!,
    /^eos_token differs between seeds \(code vs base\); the output keeps the first seed's \(base: /,
  );
  assert.match(chat[1]!, /^chat_template differs between seeds \(code vs base\); the output keeps the first seed's/);
  const output = join(root, "chat-out");
  const result = await upcycle({ seeds: [base, code], output });
  assert.deepEqual(result.plan.warnings, plan.warnings);
  assert.equal(
    await readFile(join(output, "tokenizer_config.json"), "utf8"),
    await readFile(join(base, "tokenizer_config.json"), "utf8"),
  );
  const run = await runCli(["upcycle", base, code, "-o", join(root, "chat-cli")]);
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stderr, /bam: warning: eos_token differs between seeds/);
});
