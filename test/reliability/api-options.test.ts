/**
 * The API refuses what the CLI refuses: upcycle() and planUpcycle() check
 * what a JavaScript caller (or a recipe) passed at run time, before any seed
 * is opened, and always throw BamError OPTIONS_INVALID / RECIPE_INVALID with
 * the option named as the caller wrote it.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { planUpcycle, readRecipe, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, refused } from "../helpers.js";
import { runCli } from "./synth.js";

let root: string;
before(async () => { root = await mkdtemp(join(tmpdir(), "bam-api-")); });
after(() => rm(root, { recursive: true, force: true }));

const seeds = [fixture("llama", "base"), fixture("llama", "code"), fixture("llama", "math")];

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

test("the seed count is capped before any seed is opened", async () => {
  // 100,000 names of folders that do not exist: refused on the count, not on the first missing folder or EMFILE.
  const many = Array.from({ length: 100_000 }, (_, i) => join(root, "missing", String(i)));
  await refused(upcycle({ seeds: many, output: join(root, "out") }), "OPTIONS_INVALID", /at most 256 seed folders, not 100000/);
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
    assert.ok(process.memoryUsage().heapUsed - heapBefore < 200e6, `${name}: the heap grew by ${process.memoryUsage().heapUsed - heapBefore} bytes`);
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
  assert.deepEqual(result.files.map((file) => basename(file)), (await readdir(output)).filter((name) => name.endsWith(".safetensors")).sort());
  const run = await runCli(["upcycle", ...seeds.slice(0, 2), "-o", join(root, "named-cli"), "--json"]);
  assert.equal(run.code, 0, run.stderr);
  for (const file of (JSON.parse(run.stdout) as { files: string[] }).files) assert.equal(dirname(file), join(root, "named-cli"));
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
