/**
 * The API refuses what the CLI refuses: upcycle() and planUpcycle() check
 * what a JavaScript caller (or a recipe) passed at run time, before any seed
 * is opened, and always throw BamError OPTIONS_INVALID / RECIPE_INVALID with
 * the option named as the caller wrote it.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cp, lstat, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join, relative } from "node:path";
import { after, before, test } from "node:test";
import { evaluatePerplexity, evaluateTokenFiles, generateText, saveLogits, type BinDType } from "../../src/index.js";
import { planUpcycle, readRecipe, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, refused } from "../helpers.js";
import { runCli } from "./synth.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-api-"));
});
after(() => rm(root, { recursive: true, force: true }));

const seeds = [fixture("llama", "base"), fixture("llama", "code"), fixture("llama", "math")];

/** Every file and folder under `dir` with its content's hash: what a refusal must leave as it was. */
async function snapshot(dir: string): Promise<Record<string, string>> {
  const entries: Record<string, string> = {};
  for (const name of await readdir(dir, { recursive: true })) {
    const path = join(dir, name);
    const info = await lstat(path);
    entries[relative(dir, path)] = info.isDirectory()
      ? "dir"
      : createHash("sha256")
          .update(await readFile(path))
          .digest("hex");
  }
  return entries;
}

test("unknown, mistyped and missing options are refused by name, with a suggestion where one is close", async () => {
  const output = join(root, "out");
  const cases: Array<[unknown, RegExp]> = [
    [{ seeds, output, expertPerToken: 2 }, /unknown option "expertPerToken"; did you mean "expertsPerToken"\?/],
    [{ seeds, output, colour: "red" }, /unknown option "colour"; known options: seeds, output/],
    [{ seeds, output, weights: "0.4,0.3,0.3" }, /^weights must be a list of numbers, not the string "0\.4,0\.3,0\.3"$/],
    [{ seeds, output, expertsPerToken: "2" }, /^expertsPerToken must be a number, not the string "2"$/],
    [{ seeds, output, force: "yes" }, /^force must be true or false, not the string "yes"$/],
    [{ seeds: "base", output }, /^seeds must be a list of folder paths/],
    [{ seeds, output: 7 }, /^output must be a path, not number 7$/],
    [null, /upcycle options must be an object/],
    [undefined, /upcycle options must be an object/],
    [[seeds], /upcycle options must be an object/],
    [{ seeds, output, expertsPerToken: 0 }, /^expertsPerToken must be an integer from 1 to 3, not 0$/],
  ];
  for (const [options, message] of cases) {
    await refused(upcycle(options as UpcycleOptions), "OPTIONS_INVALID", message);
    await refused(planUpcycle(options as UpcycleOptions), "OPTIONS_INVALID", message);
  }
  assert.deepEqual(await readdir(root), [], "nothing written");
});

test("a plan needs no output folder (null in the plan, and in --dry-run --json); a run that writes does", async () => {
  const plan = await planUpcycle({ seeds: seeds.slice(0, 2) });
  assert.equal(plan.options.output, null);
  assert.equal(plan.summary.experts, 2);
  await refused(upcycle({ seeds: seeds.slice(0, 2) }), "OPTIONS_INVALID", /^output: name the output folder$/);
  const dryRun = await runCli(["upcycle", ...seeds.slice(0, 2), "--dry-run", "--json"]);
  assert.equal(dryRun.code, 0, dryRun.stderr);
  assert.deepEqual(JSON.parse(dryRun.stdout).options, { ...plan.options, seeds: seeds.slice(0, 2) });
  const text = await runCli(["upcycle", ...seeds.slice(0, 2), "--dry-run"]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /^output {6}\d+(\.\d+)? KB in bam format, \d+ tensors$/m);
  assert.deepEqual(await readdir(root), [], "nothing written");
});

/**
 * Each case: what `bam` refuses, the API call it makes refusing the same, with the code the exit
 * status stands for (OPTIONS_INVALID is 2, the rest 1) and one message: the library names options as
 * the API spells them (maxTokens), the command line as flags (--max-tokens).
 */
test("every command's refusals are the library's: the API refuses the same with the same code", {
  timeout: 120_000,
}, async (t) => {
  const dir = await mkdtemp(join(root, "parity-"));
  const model = join(dir, "model");
  await cp(fixture("llama", "base"), model, { recursive: true });
  const ids = join(dir, "ids.safetensors");
  await cp(join(fixture("llama", "base"), "..", "reference.safetensors"), ids); // holds input_ids
  const existing = join(dir, "logits.safetensors");
  await writeFile(existing, "the user's file");
  const text = join(dir, "a.txt");
  await writeFile(text, "Some words to score.");
  const tokens = join(dir, "a.bin");
  await writeFile(tokens, Buffer.of(1, 0, 2, 0, 3, 0));
  const out = join(dir, "out");
  const before = await snapshot(dir);
  const cases: Array<[string[], () => Promise<unknown>, string, RegExp]> = [
    [["upcycle", ...seeds], () => upcycle({ seeds }), "OPTIONS_INVALID", /output: name the output folder/],
    [
      ["upcycle", "-o", out],
      () => upcycle({ seeds: [], output: out }),
      "OPTIONS_INVALID",
      /seeds: name at least one seed folder/,
    ],
    [
      ["upcycle", ...seeds, "-o", out, "-k", "4"],
      () => upcycle({ seeds, output: out, expertsPerToken: 4 }),
      "OPTIONS_INVALID",
      /experts-?per-?token must be an integer from 1 to 3, not 4/i,
    ],
    [
      ["upcycle", model, ...seeds.slice(1), "-o", model, "--force"],
      () => upcycle({ seeds: [model, ...seeds.slice(1)], output: model, force: true }),
      "OUTPUT_UNSAFE",
      /is the input/,
    ],
    [
      ["eval", model, "--ids", ids, "--save-logits", join(model, "model.safetensors"), "--force"],
      () => saveLogits(model, ids, join(model, "model.safetensors"), { force: true }),
      "OUTPUT_UNSAFE",
      /lies inside the input/,
    ],
    [
      ["eval", model, "--ids", ids, "--save-logits", ids, "--force"],
      () => saveLogits(model, ids, ids, { force: true }),
      "OUTPUT_UNSAFE",
      /is the input/,
    ],
    [
      ["eval", model, "--ids", ids, "--save-logits", existing],
      () => saveLogits(model, ids, existing),
      "OUTPUT_EXISTS",
      /exists; choose another file/,
    ],
    [
      ["eval", model, "--text", text, "--context", "1"],
      () => evaluatePerplexity(model, [text], { context: 1 }),
      "OPTIONS_INVALID",
      /(^|--)context must be an integer of at least 2, not 1/,
    ],
    [
      ["eval", model, "--tokens", tokens, "--max-tokens", "1"],
      () => evaluateTokenFiles(model, [tokens], { maxTokens: 1 }),
      "OPTIONS_INVALID",
      /(^|--)max-?tokens must be an integer of at least 2, not 1/i,
    ],
    // yargs refuses a value outside --bin-dtype's choices; a JavaScript caller reaches the library's check
    [
      ["eval", model, "--tokens", tokens, "--bin-dtype", "int8"],
      () => evaluateTokenFiles(model, [tokens], { binDType: "int8" as BinDType }),
      "OPTIONS_INVALID",
      /int8/,
    ],
    [
      ["generate", model, "--prompt", "x", "--max-new-tokens", "0"],
      () => generateText(model, "x", { maxNewTokens: 0 }),
      "OPTIONS_INVALID",
      /max-?new-?tokens/i,
    ],
  ];
  const cache = await mkdtemp(join(root, "cache-"));
  const env = { BAM_CACHE_DIR: cache }; // were a check to come after the export, it would land here, not in the user's cache
  const userCache = process.env.BAM_CACHE_DIR;
  process.env.BAM_CACHE_DIR = cache;
  t.after(() => {
    if (userCache === undefined) delete process.env.BAM_CACHE_DIR;
    else process.env.BAM_CACHE_DIR = userCache;
  });
  for (const [args, call, code, message] of cases) {
    const run = await runCli(args, { env });
    assert.equal(run.code, code === "OPTIONS_INVALID" ? 2 : 1, `bam ${args.join(" ")}: ${run.stderr}`);
    assert.match(run.stderr.split("\n")[0]!, message, `bam ${args.join(" ")}`);
    await refused(call(), code, message);
  }
  assert.deepEqual(await snapshot(dir), before, "nothing written or replaced");
  assert.deepEqual(await readdir(cache), [], "no export built: every check comes before it");
  await rm(dir, { recursive: true });
  await rm(cache, { recursive: true });
});

test("the seed count is capped before any seed is opened", async () => {
  // 100,000 names of folders that do not exist: refused on the count, not on the first missing folder or EMFILE.
  const many = Array.from({ length: 100_000 }, (_, i) => join(root, "missing", String(i)));
  await refused(
    upcycle({ seeds: many, output: join(root, "out") }),
    "OPTIONS_INVALID",
    /at most 256 seed folders, not 100000/,
  );
});

test("a recipe nested a million levels deep fails fast, small, and as RECIPE_INVALID", async () => {
  for (const [name, body] of [
    ["flow.yaml", `weights: ${"[".repeat(1_000_000)}${"]".repeat(1_000_000)}\n`],
    ["block.yaml", `weights:\n${"- ".repeat(500_000)}1\n`],
  ] as const) {
    const file = join(root, name);
    await writeFile(file, body);
    const started = performance.now();
    const heapBefore = process.memoryUsage().heapUsed;
    await refused(readRecipe(file), "RECIPE_INVALID", /nested more than 64 levels deep/);
    assert.ok(performance.now() - started < 5000, `${name}: took ${performance.now() - started} ms`);
    assert.ok(
      process.memoryUsage().heapUsed - heapBefore < 200e6,
      `${name}: the heap grew by ${process.memoryUsage().heapUsed - heapBefore} bytes`,
    );
    await rm(file);
  }
  // Brackets inside quotes and comments are not nesting.
  const quoted = join(root, "quoted.yaml");
  await writeFile(quoted, `seeds: ["${"[".repeat(100)}"] # ${"{".repeat(100)}\n`);
  assert.deepEqual(await readRecipe(quoted), { seeds: [join(root, "[".repeat(100))] }); // a path, relative to the recipe
  await rm(quoted);
});

test("result.files and --json list the shards where they are, in the output folder the caller named", async () => {
  const output = join(root, "named");
  const result = await upcycle({ seeds: seeds.slice(0, 2), output, maxShardSize: "40KB" });
  assert.ok(result.files.length > 1, "several shards");
  for (const file of result.files) assert.equal(dirname(file), output);
  assert.deepEqual(
    result.files.map((file) => basename(file)),
    (await readdir(output)).filter((name) => name.endsWith(".safetensors")).sort(),
  );
  const run = await runCli(["upcycle", ...seeds.slice(0, 2), "-o", join(root, "named-cli"), "--json"]);
  assert.equal(run.code, 0, run.stderr);
  for (const file of (JSON.parse(run.stdout) as { files: string[] }).files)
    assert.equal(dirname(file), join(root, "named-cli"));
  await rm(output, { recursive: true });
  await rm(join(root, "named-cli"), { recursive: true });
});

test("bam upcycle words the library's option errors as flags", async () => {
  for (const [args, message] of [
    [["--experts-per-token", "3"], /^bam: --experts-per-token must be an integer from 1 to 2, not 3$/],
    [["--seed", "1.5"], /^bam: --seed must be a non-negative integer, not 1\.5$/],
    [["--router-scale", "-1"], /^bam: --router-scale must be a positive number, not -1$/],
  ] as const) {
    const run = await runCli(["upcycle", ...seeds.slice(0, 2), "-o", join(root, "flags"), ...args]);
    assert.equal(run.code, 2, run.stderr); // OPTIONS_INVALID: bad usage
    assert.match(run.stderr.trim(), message);
  }
});
