/**
 * `bam generate` and generateFromExport: an empty prompt, a prompt past the
 * model's positions and a maxNewTokens past them are refused in one line
 * before the model is loaded (the prompt's tokens are counted); generation
 * stops between tokens on an abort signal, and SIGINT exits 130.
 */
import assert from "node:assert/strict";
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { generateFromExport, prepareOnnx, type GenerationSettings } from "../../src/onnx/index.js";
import { OnnxSession } from "../../src/onnx/session.js";
import { fixture, refused } from "../helpers.js";
import { runCli } from "./synth.js";

let root: string;
let folder: string;
let modelFile: string;
const model = fixture("llama", "base"); // 128 positions
const greedy: GenerationSettings = { maxNewTokens: 4, temperature: 0, topK: 50, topP: 1, seed: null };

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-generate-"));
  ({ folder, modelFile } = await prepareOnnx(model, { output: join(root, "onnx") }));
});
after(() => rm(root, { recursive: true, force: true }));

test("generateFromExport refuses what the CLI refuses, before loading the model", async () => {
  await refused(generateFromExport(folder, "", greedy), "OPTIONS_INVALID", /^prompt must be a non-empty string/);
  await refused(
    generateFromExport(folder, "hello", { ...greedy, maxNewTokens: 1e12 }),
    "OPTIONS_INVALID",
    /exceed the 128 positions of the model; ask for at most \d+ new tokens/,
  );
  await refused(
    generateFromExport(folder, "hello", { ...greedy, maxNewTokens: "2" as unknown as number }),
    "OPTIONS_INVALID",
    /^maxNewTokens must be a positive integer/,
  );
  await refused(generateFromExport(folder, "hello", { ...greedy, topP: 0 }), "OPTIONS_INVALID", /^topP must be in/);
  const started = performance.now();
  await refused(
    generateFromExport(folder, "word ".repeat(20_000), greedy),
    "OPTIONS_INVALID",
    /^prompt is \d+ tokens, past the 128 positions of the model/,
  );
  assert.ok(performance.now() - started < 10_000, `took ${performance.now() - started} ms`);
});

test("an abort signal stops generation between tokens", async () => {
  const controller = new AbortController();
  let pieces = 0;
  await refused(
    generateFromExport(folder, "The experts", {
      ...greedy,
      maxNewTokens: 100,
      signal: controller.signal,
      onText: () => {
        if (++pieces === 1) controller.abort();
      },
    }),
    "ABORTED",
    /generation interrupted/,
  );
  assert.equal(pieces, 1, "no text after the abort");
  // Without the abort the same call runs to the end.
  const whole = await generateFromExport(folder, "The experts", { ...greedy, maxNewTokens: 100 });
  assert.equal(whole.newIds.length > 1, true);
});

test("bam generate: one line for refusals, no onnxruntime output; SIGINT exits 130", async () => {
  const env = { BAM_CACHE_DIR: join(root, "cache") };
  for (const [args, message] of [
    [["--prompt", ""], /^bam: --prompt must be a non-empty string/],
    [["--prompt", "word ".repeat(20_000)], /^bam: --prompt is \d+ tokens, past the 128 positions/],
    [
      ["--prompt", "hello", "--max-new-tokens", "1e12"],
      /^bam: --prompt \(\d+ tokens\) and --max-new-tokens \(1000000000000\) exceed the 128 positions/,
    ],
  ] as const) {
    const run = await runCli(["generate", model, ...args], { env });
    assert.equal(run.code, 2, run.stderr); // OPTIONS_INVALID: bad usage
    const lines = run.stderr.split("\n").filter((line) => line !== "" && !line.startsWith("exporting"));
    assert.equal(lines.length, 1, run.stderr);
    assert.match(lines[0]!, message);
    // biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is what this pattern is for
    assert.doesNotMatch(run.stderr, /\u001b\[|onnxruntime/i);
  }
  let sent = false;
  const run = await runCli(["generate", model, "--prompt", "The", "--max-new-tokens", "120"], {
    env,
    during: (child) =>
      child.stdout!.on("data", () => {
        if (!sent) sent = child.kill("SIGINT");
      }),
  });
  assert.ok(sent, "some text came out before SIGINT");
  assert.equal(run.code, 130, run.stderr);
  assert.match(run.stderr, /interrupted/);
});

test("bam generate follows the model's generation_config.json unless a flag says otherwise, and says so", async () => {
  const env = { BAM_CACHE_DIR: join(root, "cache") };
  const sampling = join(root, "sampling");
  await cp(model, sampling, { recursive: true });
  const configFile = join(sampling, "generation_config.json");
  const config = JSON.parse(await readFile(configFile, "utf8")) as Record<string, unknown>;
  await writeFile(configFile, JSON.stringify({ ...config, do_sample: true, temperature: 1.5, top_k: 0, top_p: 0.99 }));
  const args = ["generate", sampling, "--prompt", "The experts", "--max-new-tokens", "6", "--seed", "4"];
  const json = await runCli([...args, "--json"], { env });
  assert.equal(json.code, 0, json.stderr);
  const result = JSON.parse(json.stdout) as { settings: unknown; modelSettings: unknown };
  assert.deepEqual(result.settings, { maxNewTokens: 6, temperature: 1.5, topK: 0, topP: 0.99, seed: 4 });
  assert.deepEqual(result.modelSettings, ["temperature", "topK", "topP"]);
  const streamed = await runCli(args, { env });
  assert.equal(streamed.code, 0, streamed.stderr);
  assert.match(
    streamed.stderr,
    /^bam: \d+ tokens, sampled at temperature 1\.5, top-k 0, top-p 0\.99 \(as the model's generation_config\.json says\), in /m,
  );
  const greedy = await runCli([...args, "--temperature", "0"], { env });
  assert.equal(greedy.code, 0, greedy.stderr);
  assert.match(greedy.stderr, /^bam: \d+ tokens, greedy, in /m);
  await writeFile(configFile, JSON.stringify({ ...config, max_new_tokens: 1000 }));
  const long = await runCli(["generate", sampling, "--prompt", "The experts"], { env });
  assert.equal(long.code, 2, long.stderr);
  assert.match(
    long.stderr,
    /^bam: --prompt \(\d+ tokens\) and the max_new_tokens of the model's generation_config\.json \(1000\) exceed the 128 positions of the model; ask for at most \d+ new tokens with --max-new-tokens$/m,
  );
});

test("an onnxruntime failure is one worded line, a BamError", async () => {
  const session = await OnnxSession.open(modelFile);
  try {
    await refused(
      session.forward(BigInt64Array.from([1n, 1_000_000_000n]), 1, 2, ["logits"]),
      "IO_ERROR",
      /^onnxruntime failed on 1 x 2 tokens \([^\n]*\)$/,
    );
  } finally {
    await session.close();
  }
});
