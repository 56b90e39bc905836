/**
 * Benchmark of generation's pace and of the CPU engine against PyTorch on
 * CPU (issue 19), on a synthetic llama-like seed of about 25M parameters
 * (bf16 random weights, the fixtures' 320-token tokenizer) and its upcycle
 * `bam upcycle s s` (soft attention experts, parallel block, top-1):
 *   - generation: the time of one new token at about 50 and at about 2000
 *     tokens of context (a prompt of 40 or 1990 tokens, then 21 greedy tokens;
 *     the median gap between steps), ours (decoder.ts on generate.onnx, as
 *     `bam generate`) and transformers' `generate` with its cache;
 *   - scoring: `bam eval --tokens` over windows of 512 tokens, and the same
 *     windows through transformers (forward + NLL);
 *   - where our decode step's time goes, at both contexts: onnxruntime's
 *     profile by operator type, and the bytes a step reads (cache, weights);
 *     and where a scoring window's time goes (evalProfile).
 * PyTorch runs the same folder (trust_remote_code for the BAM folder, the
 * stock class for the seed) in float32, as ours, with torch.set_num_threads
 * equal to onnxruntime's intra-op threads. Engines and models alternate within
 * each round; the figures are medians over rounds, the ratios ours over
 * PyTorch's in the same run. Not a test: run
 * `npm run build && node dist/bench/onnx/generate.js`.
 *
 *   --work DIR     models, exports and token files (default /tmp/bam-bench-generate)
 *   --rounds N     interleaved repeats (default 3)
 *   --python PATH  the interpreter with torch and transformers (default $BAM_PYTHON, else .venv/bin/python)
 *   --out FILE     the result (default bench/results/onnx-generate.json)
 *   --commit SHA   the commit measured, for a copy with no .git (default: git's HEAD)
 *
 * Writes the result JSON with the commit measured.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, loadavg } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { argmax, Decoder } from "../../src/onnx/decoder.js";
import { prepareOnnx } from "../../src/onnx/export.js";
import { OnnxSession } from "../../src/onnx/session.js";
import { GENERATE_FILE, SCORE_FILE } from "../../src/onnx/write.js";
import { planUpcycle } from "../../src/upcycle/index.js";
import { writeLlamaSeed, type LlamaShape } from "../upcycle/synthetic.js";
import { argOption, machineInfo, measuredTree, mixtureFacts } from "../provenance.js";

const work = resolve(argOption("--work", "/tmp/bam-bench-generate"));
const rounds = Number(argOption("--rounds", "3"));
const python = argOption("--python", process.env.BAM_PYTHON ?? resolve(".venv/bin/python"));
/** About 25.7M parameters: 8 layers, hidden 512, FFN 1408, the fixtures' tokenizer's 320 tokens. */
const SHAPE: LlamaShape = { layers: 8, hidden: 512, intermediate: 1408, heads: 8, kvHeads: 8, vocab: 320 };
const CONTEXT = 512;
const EVAL_TOKENS = 4096;
const PROMPTS = [40, 1990];
const NEW_TOKENS = 21;
/** onnxruntime's intra-op threads (its default is one per physical core) and PyTorch's. */
const THREADS = availableParallelism();
const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const TORCH = resolve("bench/onnx/torch_cpu.py");

function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, {
    encoding: "utf8",
    maxBuffer: 64 << 20,
    env: { ...process.env, BAM_CACHE_DIR: join(work, "cache") },
  });
  if (result.status !== 0) throw new Error(`${command} ${args.join(" ")} failed: ${result.stderr}`);
  return result.stdout;
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};

// deterministic token ids below the vocabulary: the eval windows, and the prompts (their first tokens)
const ids = new Uint16Array(EVAL_TOKENS);
for (let i = 0, x = 12345; i < ids.length; i++) {
  x = (x * 1103515245 + 12345) >>> 0;
  ids[i] = 1 + ((x >>> 16) % (SHAPE.vocab - 1));
}
const seed = join(work, "seed");
const mixture = join(work, "bam2");
if (!existsSync(join(seed, "config.json"))) await writeLlamaSeed(seed, SHAPE);
if (!existsSync(join(mixture, "config.json")))
  run(process.execPath, [CLI, "upcycle", seed, seed, "-o", mixture, "--force"]);
const tokensFile = join(work, "tokens.bin");
await writeFile(tokensFile, new Uint8Array(ids.buffer));
const promptsFile = join(work, "prompts.json");
const prompts = PROMPTS.map((n) => Array.from(ids.subarray(0, n)));
await writeFile(promptsFile, JSON.stringify(prompts));
const models = { seed: { dir: seed, remote: false }, bam: { dir: mixture, remote: true } };
const exports = {
  seed: await prepareOnnx(seed, { cacheDir: join(work, "cache") }),
  bam: await prepareOnnx(mixture, { cacheDir: join(work, "cache") }),
};

/** Our seconds per new token after each prompt: prefill, then the median gap between decode steps. */
async function oursGeneration(folder: string): Promise<number[]> {
  const perToken: number[] = [];
  for (const prompt of prompts) {
    const decoder = await Decoder.open(join(folder, "onnx", GENERATE_FILE), { threads: THREADS });
    try {
      let next = argmax(await decoder.step(prompt));
      const times = [performance.now()];
      for (let i = 1; i < NEW_TOKENS; i++) {
        next = argmax(await decoder.step([next]));
        times.push(performance.now());
      }
      perToken.push(median(times.slice(1).map((t, i) => t - times[i]!)) / 1000);
    } finally {
      await decoder.close();
    }
  }
  return perToken;
}

/**
 * Where a decode step's time goes (onnxruntime's profile of one generation per prompt, after the
 * timed rounds): kernel milliseconds per step by operator type, over the steps after the prompt, and
 * the bytes a step reads: the cache's buffers and the float32 weights of the parameters a token uses.
 * Profiling slows every node, so only the shares and the growth from one context to the other count.
 */
async function profileGeneration(folder: string, name: string, activeParameters: number) {
  const rows = [];
  for (const prompt of prompts) {
    const prefix = await profilePrefix(`${name}-${prompt.length}`);
    const decoder = await Decoder.open(join(folder, "onnx", GENERATE_FILE), { threads: THREADS, profile: prefix });
    let cacheBytes = 0;
    try {
      let next = argmax(await decoder.step(prompt));
      for (let i = 1; i < NEW_TOKENS; i++) next = argmax(await decoder.step([next]));
      cacheBytes = decoder.cacheBytes;
    } finally {
      await decoder.close();
    }
    const { msPerRun, byOp, otherMs } = await profiledRuns(prefix, 1, 8); // the prompt's run first
    rows.push({
      context: prompt.length + NEW_TOKENS / 2,
      profiledMsPerStep: msPerRun,
      kernelMsPerStep: byOp,
      otherKernelsMs: otherMs,
      cacheBytes,
      weightBytesPerToken: activeParameters * Float32Array.BYTES_PER_ELEMENT,
    });
  }
  return rows;
}

/** `<work>/profile/<name>`, onnxruntime's profile prefix, with that prefix's earlier profiles removed. */
async function profilePrefix(name: string): Promise<string> {
  const dir = join(work, "profile");
  await mkdir(dir, { recursive: true });
  const prefix = join(dir, name);
  for (const old of await readdir(dir)) if (join(dir, old).startsWith(`${prefix}_`)) await rm(join(dir, old));
  return prefix;
}

/**
 * onnxruntime's profile `<prefix>_<date>.json`, over the runs after the first `skip`: the milliseconds
 * of a run, and the kernel milliseconds per run of the `top` operator types (the rest summed).
 */
async function profiledRuns(prefix: string, skip: number, top: number) {
  const dir = dirname(prefix);
  const file = (await readdir(dir)).map((f) => join(dir, f)).find((f) => f.startsWith(`${prefix}_`));
  if (file === undefined) throw new Error(`${prefix}: onnxruntime wrote no profile`);
  type Event = { name: string; cat?: string; ts: number; dur: number; args?: { op_name?: string } };
  const events: Event[] = JSON.parse(await readFile(file, "utf8"));
  const runs = events.filter((e) => e.name === "model_run").slice(skip);
  const byOp: Record<string, number> = {};
  for (const e of events)
    if (e.cat === "Node" && e.name.endsWith("_kernel_time") && e.ts >= runs[0]!.ts && e.args?.op_name)
      byOp[e.args.op_name] = (byOp[e.args.op_name] ?? 0) + e.dur / 1000 / runs.length;
  const sorted = Object.entries(byOp).sort((a, b) => b[1] - a[1]);
  return {
    msPerRun: runs.reduce((sum, e) => sum + e.dur, 0) / 1000 / runs.length,
    byOp: Object.fromEntries(sorted.slice(0, top)),
    otherMs: sorted.slice(top).reduce((sum, [, ms]) => sum + ms, 0),
  };
}

/**
 * Where a scoring window's time goes (onnxruntime's profile of `bam eval`'s graph, score.onnx, the threads it
 * uses): kernel milliseconds per window of CONTEXT tokens by operator type, after one untimed window.
 */
async function profileEval(folder: string, name: string) {
  const prefix = await profilePrefix(`${name}-eval`);
  const session = await OnnxSession.open(join(folder, "onnx", SCORE_FILE), { profile: prefix });
  const windows = 4;
  try {
    for (let w = 0; w < windows; w++) await session.score(Array.from(ids.subarray(w * CONTEXT, (w + 1) * CONTEXT)));
  } finally {
    await session.close();
  }
  const { msPerRun, byOp, otherMs } = await profiledRuns(prefix, 1, 10);
  return { windowTokens: CONTEXT, profiledMsPerWindow: msPerRun, kernelMsPerWindow: byOp, otherKernelsMs: otherMs };
}

interface Sample {
  evalTokensPerSecond: number;
  stepSeconds: number[];
}
const samples: Record<"seed" | "bam", { ours: Sample[]; torch: Sample[] }> = {
  seed: { ours: [], torch: [] },
  bam: { ours: [], torch: [] },
};
const tree = measuredTree(argOption("--commit", "") || undefined);
const loadBefore = loadavg();
let torchVersion = "";
for (let round = 0; round < rounds; round++) {
  for (const name of ["seed", "bam"] as const) {
    const engines = round % 2 === 0 ? (["ours", "torch"] as const) : (["torch", "ours"] as const);
    for (const engine of engines) {
      process.stderr.write(`round ${round + 1}/${rounds}: ${name}, ${engine}\n`);
      if (engine === "ours") {
        const report = JSON.parse(
          run(process.execPath, [
            CLI,
            "eval",
            models[name].dir,
            "--tokens",
            tokensFile,
            "--context",
            String(CONTEXT),
            "--json",
          ]),
        );
        samples[name].ours.push({
          evalTokensPerSecond: report.tokensPerSecond,
          stepSeconds: await oursGeneration(exports[name].folder),
        });
      } else {
        const out = JSON.parse(
          run(python, [
            TORCH,
            "--model",
            models[name].dir,
            ...(models[name].remote ? ["--remote"] : []),
            "--tokens",
            tokensFile,
            "--context",
            String(CONTEXT),
            "--threads",
            String(THREADS),
            "--prompts",
            promptsFile,
            "--new-tokens",
            String(NEW_TOKENS),
          ]),
        );
        torchVersion = out.torch;
        samples[name].torch.push({
          evalTokensPerSecond: out.eval.tokensPerSecond,
          stepSeconds: out.generation.map((g: { stepSeconds: number }) => g.stepSeconds),
        });
      }
    }
  }
}

const summary = (runs: Sample[]) => ({
  evalTokensPerSecond: median(runs.map((r) => r.evalTokensPerSecond)),
  generation: PROMPTS.map((promptTokens, i) => {
    const seconds = median(runs.map((r) => r.stepSeconds[i]!));
    return {
      context: promptTokens + NEW_TOKENS / 2,
      promptTokens,
      secondsPerToken: seconds,
      tokensPerSecond: 1 / seconds,
    };
  }),
  runs,
});
const rows = Object.fromEntries(
  (["seed", "bam"] as const).map((name) => {
    const ours = summary(samples[name].ours);
    const torch = summary(samples[name].torch);
    const pace = (s: typeof ours) => s.generation[1]!.secondsPerToken / s.generation[0]!.secondsPerToken;
    return [
      name,
      {
        ours,
        pytorch: torch,
        /** Ours over PyTorch's: scoring tokens/s, and generation tokens/s at each context. */
        oursOverPytorch: {
          eval: ours.evalTokensPerSecond / torch.evalTokensPerSecond,
          generation: ours.generation.map((g, i) => ({
            context: g.context,
            ratio: g.tokensPerSecond / torch.generation[i]!.tokensPerSecond,
          })),
        },
        /** Seconds per token at about 2000 tokens of context over at about 50 (goal: at most 2). */
        pace: { ours: pace(ours), pytorch: pace(torch) },
      },
    ];
  }),
);
const plan = await planUpcycle({ seeds: [seed, seed], output: mixture });
process.stderr.write("profiling a generation of each model\n");
const profile = {
  seed: await profileGeneration(exports.seed.folder, "seed", plan.summary.seedParameters),
  bam: await profileGeneration(exports.bam.folder, "bam", plan.summary.activeParameters),
};
process.stderr.write("profiling scoring windows of each model\n");
const evalProfile = {
  seed: await profileEval(exports.seed.folder, "seed"),
  bam: await profileEval(exports.bam.folder, "bam"),
};
const result = {
  benchmark:
    "generation pace (per-token time at 50 and 2000 tokens of context) and bam eval, ours (onnxruntime-node) vs PyTorch on CPU, same folder",
  ...tree,
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadAverageBefore: loadBefore, loadAverageAfter: loadavg() },
  threads: THREADS,
  pytorch: { torch: torchVersion, dtype: "float32" },
  rounds,
  shape: SHAPE,
  ...mixtureFacts(plan),
  eval: { context: CONTEXT, tokens: EVAL_TOKENS },
  generation: { promptTokens: PROMPTS, newTokens: NEW_TOKENS, decoding: "greedy" },
  seed: rows.seed,
  bam: rows.bam,
  profile,
  evalProfile,
};
const out = resolve(argOption("--out", "bench/results/onnx-generate.json"));
await writeFile(out, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(
  `${JSON.stringify({ seed: { oursOverPytorch: rows.seed!.oursOverPytorch, pace: rows.seed!.pace }, bam: { oursOverPytorch: rows.bam!.oursOverPytorch, pace: rows.bam!.pace } }, null, 2)}\n`,
);
