/**
 * Benchmark of the CPU engine (issue 5): tokens/s of `bam eval` on a
 * synthetic llama-like seed of about 0.5B parameters (bf16, random weights)
 * and on its 4-expert BAM model (`bam upcycle s s s s`: soft attention
 * experts, parallel block, top-1), set against the FLOP ratio of the plan.
 * Not a test: run `npm run build && node dist/bench/onnx/bench.js`.
 *
 *   --work DIR     where models, exports and the text go (default /tmp/bam-bench-onnx)
 *   --tokens N     tokens evaluated per model (default 1024, in windows of --context)
 *   --context N    eval window (default 512)
 *   --small        a 4-layer shape, to try the script quickly
 *
 * Writes bench/results/onnx-eval.json with the commit measured.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg, totalmem } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { planUpcycle } from "../../src/upcycle/index.js";
import { writeLlamaSeed, type LlamaShape } from "../upcycle/synthetic.js";
import { argOption, measuredTree, mixtureFacts } from "../provenance.js";

const args = process.argv.slice(2);
const work = resolve(argOption("--work", "/tmp/bam-bench-onnx"));
const tokens = Number(argOption("--tokens", "1024"));
const context = Number(argOption("--context", "512"));
/** About 0.48B parameters: 32 layers, hidden 1024, FFN 2816, vocab 32000 (untied). */
const HALF_BILLION: LlamaShape = { layers: 32, hidden: 1024, intermediate: 2816, heads: 16, kvHeads: 16, vocab: 32000 };
const shape: LlamaShape = args.includes("--small") ? { ...HALF_BILLION, layers: 4 } : HALF_BILLION;
const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const EXPERTS = 4;

function bam(cliArgs: string[]): { seconds: number; stdout: string } {
  const start = performance.now();
  const run = spawnSync(process.execPath, [CLI, ...cliArgs], {
    encoding: "utf8",
    maxBuffer: 64 << 20,
    env: { ...process.env, BAM_CACHE_DIR: join(work, "cache") },
  });
  if (run.status !== 0) throw new Error(`bam ${cliArgs.join(" ")} failed: ${run.stderr}`);
  return { seconds: (performance.now() - start) / 1000, stdout: run.stdout };
}

/** Plain English-like text of about `count` tokens for the fixtures' small byte-level BPE (about 1.6 characters a token). */
function text(count: number): string {
  const words = [
    "the",
    "model",
    "experts",
    "learned",
    "to",
    "write",
    "code",
    "and",
    "solve",
    "math",
    "problems",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "river",
    "bank",
    "near",
    "old",
    "town",
  ];
  const out: string[] = [];
  for (let i = 0; out.join(" ").length < count * 1.6; i++) out.push(words[(i * 7 + (i >> 3)) % words.length]!);
  return `${out.join(" ")}.\n`;
}

const seed = join(work, "seed");
const mixture = join(work, `bam${EXPERTS}`);
if (!existsSync(join(seed, "config.json"))) {
  process.stderr.write(`writing synthetic seed ${seed}\n`);
  await writeLlamaSeed(seed, shape);
}
const seeds = new Array<string>(EXPERTS).fill(seed);
if (!existsSync(join(mixture, "config.json"))) {
  process.stderr.write(`upcycling ${mixture}\n`);
  bam(["upcycle", ...seeds, "-o", mixture, "--force"]);
}
const plan = await planUpcycle({ seeds, output: mixture });
const textFile = join(work, "text.txt");
await writeFile(textFile, text(tokens));

const measure = (dir: string) => {
  const exported = bam(["export-onnx", dir, "--force", "--json"]);
  const evaluated = bam(["eval", dir, "--text", textFile, "--context", String(context), "--json"]);
  const report = JSON.parse(evaluated.stdout);
  return {
    exportSeconds: exported.seconds,
    evalCommandSeconds: evaluated.seconds,
    tokens: report.overall.tokens,
    modelSeconds: report.seconds,
    tokensPerSecond: report.tokensPerSecond,
  };
};
const tree = measuredTree();
const loadBefore = loadavg();
process.stderr.write("measuring the seed\n");
const seedResult = measure(seed);
process.stderr.write(`measuring the ${EXPERTS}-expert model\n`);
const bamResult = measure(mixture);

const result = {
  benchmark: "bam eval tokens/s: seed vs 4-expert BAM (onnxruntime-node, CPU)",
  ...tree,
  date: new Date().toISOString(),
  machine: {
    cpus: cpus().length,
    availableParallelism: availableParallelism(),
    cpuModel: cpus()[0]?.model ?? "?",
    memoryBytes: totalmem(),
    node: process.version,
    loadAverageBefore: loadBefore,
    loadAverageAfter: loadavg(),
  },
  shape,
  context,
  ...mixtureFacts(plan),
  seed: seedResult,
  bam: bamResult,
  /** Seed tokens/s over BAM tokens/s: how many times slower the mixture runs. */
  measuredSlowdown: seedResult.tokensPerSecond / bamResult.tokensPerSecond,
  /** planUpcycle's forward FLOPs per token, BAM over seed (quoted at a context of 2048). */
  flopsPerTokenRatio: plan.summary.flopsPerTokenRatio,
};
const out = resolve("bench/results/onnx-eval.json");
await writeFile(out, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
