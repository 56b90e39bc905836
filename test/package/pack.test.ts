/**
 * The npm package as published: `npm pack`, installed into an empty folder
 * without the optional ONNX engine (`--omit=optional`, the way an offline or
 * minimal install ends up), then `npx bam --help`, an upcycle of the llama
 * fixtures and `bam inspect` from there; the engine's commands say in one line
 * what to install; and a consumer's TypeScript compiles against the packed
 * types with skipLibCheck off (the root .d.ts reaches no optional package).
 */
import assert from "node:assert/strict";
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fixture } from "../helpers.js";

const REPO = resolve(".");
const ENGINE_INSTALL = "npm install onnxruntime-node @huggingface/transformers";
let root: string;
let app: string;

function run(command: string, args: string[], cwd: string): SpawnSyncReturns<string> {
  // npm_config_* of the npm running the tests (npm test) would leak into the consumer's npm
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !/^npm_/i.test(key)));
  return spawnSync(command, args, { cwd, env: { ...env, NO_COLOR: "1" }, encoding: "utf8", timeout: 120_000 });
}

function ok(result: SpawnSyncReturns<string>, what: string): string {
  assert.equal(result.status, 0, `${what} failed (${String(result.error ?? "")}):\n${result.stderr}`);
  return result.stdout;
}

const bam = (...args: string[]) => run("npx", ["--no", "--", "bam", ...args], app);

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-package-"));
  // dist/ is built by npm test's pretest; publishing builds it by prepack
  const packed = JSON.parse(
    ok(run("npm", ["pack", "--json", "--ignore-scripts", "--pack-destination", root], REPO), "npm pack"),
  ) as Array<{ filename: string }>;
  app = join(root, "app");
  await mkdir(app);
  await writeFile(join(app, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
  ok(
    run(
      "npm",
      ["install", "--no-audit", "--no-fund", "--prefer-offline", "--omit=optional", join(root, packed[0]!.filename)],
      app,
    ),
    "npm install of the tarball",
  );
});
after(() => rm(root, { recursive: true, force: true }));

test("the package installs without the ONNX engine and ships what its docs name", () => {
  const installed = join(app, "node_modules", "bam-upcycle");
  for (const path of [
    "dist/src/cli/main.js",
    "dist/src/index.d.ts",
    "python/modeling_bam.py",
    "scripts/finetune.py",
    "docs/format.md",
    "examples/merge.mjs",
    "requirements.txt",
    "README.md",
  ]) {
    assert.ok(existsSync(join(installed, path)), path);
  }
  for (const name of ["onnxruntime-node", "@huggingface/transformers"])
    assert.ok(!existsSync(join(app, "node_modules", name)), `${name} is not installed`);
});

test("npx bam --help, upcycle and inspect run from the installed package", async () => {
  assert.match(ok(bam("--help"), "bam --help"), /bam upcycle \[seeds\.\.\]/);
  const seeds = (["base", "code", "math"] as const).map((variant) => fixture("llama", variant));
  ok(bam("upcycle", ...seeds, "-o", "bam3"), "bam upcycle");
  const summary = JSON.parse(ok(bam("inspect", "bam3", "--json"), "bam inspect")) as {
    kind: string;
    experts: number;
    upcycledFrom: unknown[];
  };
  assert.equal(summary.kind, "bam");
  assert.equal(summary.experts, 3);
  assert.equal(summary.upcycledFrom.length, 3);
  // the API from the package: inspectModel is what `inspect --json` printed
  await writeFile(
    join(app, "inspect.mjs"),
    'import { inspectModel } from "bam-upcycle";\nprocess.stdout.write(JSON.stringify(await inspectModel("bam3")));\n',
  );
  assert.deepEqual(JSON.parse(ok(run(process.execPath, ["inspect.mjs"], app), "inspectModel")), {
    ...summary,
    scan: null,
  });
});

test("without the engine, eval, generate, export-onnx and --router-init hidden say what to install (exit 1)", async () => {
  await writeFile(join(app, "text.txt"), "The experts learned to route.");
  await writeFile(
    join(app, "prompts.yaml"),
    JSON.stringify({
      experts: [{ positive_prompts: ["a"] }, { positive_prompts: ["b"] }, { positive_prompts: ["c"] }],
    }),
  );
  const seeds = (["base", "code", "math"] as const).map((variant) => fixture("llama", variant));
  for (const args of [
    ["eval", "bam3", "--text", "text.txt"],
    ["generate", "bam3", "--prompt", "The experts"],
    ["export-onnx", "bam3", "-o", "onnx"],
    ["upcycle", ...seeds, "-o", "routed", "--router-init", "hidden", "--prompts", "prompts.yaml"],
  ]) {
    const result = bam(...args);
    assert.equal(result.status, 1, `${args[0]}: ${result.stderr}`);
    const lines = result.stderr.trim().split("\n");
    assert.equal(lines.length, 1, result.stderr);
    assert.ok(lines[0]!.includes(ENGINE_INSTALL), lines[0]);
  }
  assert.ok(!existsSync(join(app, "routed")) && !existsSync(join(app, "onnx")), "nothing written");
});

test("a consumer's TypeScript compiles against the packed types with skipLibCheck off", async () => {
  const consumer = join(app, "consumer.ts");
  await writeFile(
    consumer,
    `
import { upcycle, planUpcycle, inspectModel, generateText, evaluatePerplexity, isBamError, OUTPUT_FORMATS, ROUTER_INITS, ATTENTION_EXPERTS, DEFAULT_GENERATION,
  type UpcycleOptions, type UpcycleResult, type Inspection, type EvalOptions, type PerplexityReport, type GenerationSettings, type Generation, type OutputFormat } from "bam-upcycle";
const format: OutputFormat = OUTPUT_FORMATS[0]!;
const options: UpcycleOptions = { seeds: ["a", "b"], output: "out", format, routerInit: ROUTER_INITS[0], attention: ATTENTION_EXPERTS[0] };
const settings: GenerationSettings = { ...DEFAULT_GENERATION, maxNewTokens: 8 };
const evalOptions: EvalOptions = { context: 128 };
export async function main(): Promise<[UpcycleResult, Inspection, PerplexityReport, Generation, number]> {
  const plan = await planUpcycle(options, { signal: AbortSignal.timeout(1000) });
  try {
    return [await upcycle(options), await inspectModel("out"), await evaluatePerplexity("out", ["t.txt"], evalOptions), await generateText("out", "hi", settings), plan.summary.experts];
  } catch (error) {
    if (isBamError(error)) throw new Error(error.code);
    throw error;
  }
}
`,
  );
  await writeFile(
    join(app, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        strict: true,
        noEmit: true,
        skipLibCheck: false,
        module: "NodeNext",
        moduleResolution: "NodeNext",
        target: "ES2022",
        types: ["node"],
        typeRoots: [join(REPO, "node_modules", "@types")],
      },
      files: ["consumer.ts"],
    }),
  );
  const result = run(
    process.execPath,
    [join(REPO, "node_modules", "typescript", "bin", "tsc"), "-p", app, "--listFilesOnly"],
    app,
  );
  const files = ok(result, "tsc --listFilesOnly");
  assert.ok(!/onnxruntime|@huggingface[\\/]transformers|onnx[\\/]transformers\.d\.ts/.test(files), files);
  ok(
    run(process.execPath, [join(REPO, "node_modules", "typescript", "bin", "tsc"), "-p", app], app),
    "tsc on the consumer",
  );
  assert.ok((await readFile(consumer, "utf8")).length > 0);
});
