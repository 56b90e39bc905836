/**
 * Benchmark of `bam upcycle` (issue 4): three synthetic llama seeds of about
 * 1B parameters each (bf16), upcycled into a 3-expert BAM model, timed
 * against `cp` of the same seed bytes in the same run, with the upcycle's
 * peak RSS. Not a test: run `npm run build && node dist/bench/upcycle/bench.js`.
 *
 *   --work DIR     where seeds and outputs go (default /tmp/bam-bench)
 *   --repeats N    timed repetitions of each (default 3; medians reported)
 *   --small        a ~100M-parameter shape, to try the script quickly
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { cpus, loadavg, totalmem } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ONE_BILLION, writeLlamaSeed, type LlamaShape } from "./synthetic.js";

const args = process.argv.slice(2);
const option = (name: string, fallback: string) => {
  const at = args.indexOf(name);
  return at >= 0 && args[at + 1] ? args[at + 1]! : fallback;
};
const work = resolve(option("--work", "/tmp/bam-bench"));
const repeats = Number(option("--repeats", "3"));
const shape: LlamaShape = args.includes("--small") ? { layers: 4, hidden: 1024, intermediate: 2816, heads: 16, kvHeads: 16, vocab: 32000 } : ONE_BILLION;
const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const RSS_WRAPPER = fileURLToPath(new URL("./peak-rss.js", import.meta.url));

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

async function folderBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir)) total += (await stat(join(dir, entry))).size;
  return total;
}

function timed(command: string, commandArgs: string[]): { seconds: number; stdout: string } {
  const start = performance.now();
  const run = spawnSync(command, commandArgs, { encoding: "utf8", maxBuffer: 64 << 20 });
  if (run.status !== 0) throw new Error(`${command} ${commandArgs.join(" ")} failed: ${run.stderr}`);
  return { seconds: (performance.now() - start) / 1000, stdout: run.stdout };
}

const seeds = ["seed-a", "seed-b", "seed-c"].map((name) => join(work, name));
for (const seed of seeds) {
  if (!existsSync(join(seed, "config.json"))) {
    process.stderr.write(`writing synthetic seed ${seed}\n`);
    await writeLlamaSeed(seed, shape, seeds.indexOf(seed) + 1);
  }
}
const weightFiles = (await Promise.all(seeds.map(async (s) => (await readdir(s)).filter((f) => f.endsWith(".safetensors")).map((f) => join(s, f))))).flat();
const seedBytes = (await Promise.all(weightFiles.map(async (f) => (await stat(f)).size))).reduce((a, b) => a + b, 0);
execFileSync("cat", weightFiles, { stdio: ["ignore", "ignore", "inherit"], maxBuffer: 1 }); // warm the page cache for both contenders

const copyDir = join(work, "copy");
const outDir = join(work, "bam");
const copySeconds: number[] = [];
const upcycleSeconds: number[] = [];
const peakRss: number[] = [];
let outputBytes = 0;
for (let i = 0; i < repeats; i++) {
  await rm(copyDir, { recursive: true, force: true });
  await rm(outDir, { recursive: true, force: true });
  // The same seed bytes, each seed into its own folder (their shard names collide).
  copySeconds.push(timed("bash", ["-c", seeds.map((s, n) => `mkdir -p ${copyDir}/${n} && cp --reflink=never ${s}/*.safetensors ${copyDir}/${n}/`).join(" && ")]).seconds);
  await rm(copyDir, { recursive: true, force: true });
  const run = timed(process.execPath, [RSS_WRAPPER, CLI, "upcycle", ...seeds, "-o", outDir, "--json"]);
  upcycleSeconds.push(run.seconds);
  peakRss.push(Number(JSON.parse(await readFile(`${outDir}.rss`, "utf8")).maxRssBytes));
  outputBytes = await folderBytes(outDir);
  await rm(`${outDir}.rss`, { force: true });
}
await rm(outDir, { recursive: true, force: true });

const commit = execFileSync("git", ["rev-parse", "HEAD"], { encoding: "utf8" }).trim();
const result = {
  benchmark: "bam upcycle vs cp",
  commit,
  date: new Date().toISOString(),
  // Other work on the machine skews both timings: the load average says how quiet it was.
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryBytes: totalmem(), node: process.version, loadAverage: loadavg() },
  shape,
  seeds: seeds.length,
  seedBytes,
  outputBytes,
  repeats,
  cpSeconds: copySeconds,
  upcycleSeconds,
  peakRssBytes: peakRss,
  medianRatio: median(upcycleSeconds) / median(copySeconds),
  targets: { ratio: 1.3, peakRssBytes: 2 ** 30 },
};
const file = resolve("bench/results/upcycle.json");
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(
  `seeds ${(seedBytes / 1e9).toFixed(2)} GB -> output ${(outputBytes / 1e9).toFixed(2)} GB\n` +
  `cp      median ${median(copySeconds).toFixed(2)} s  (${copySeconds.map((s) => s.toFixed(2)).join(", ")})\n` +
  `upcycle median ${median(upcycleSeconds).toFixed(2)} s  (${upcycleSeconds.map((s) => s.toFixed(2)).join(", ")})\n` +
  `ratio   ${result.medianRatio.toFixed(2)}x cp (target <= 1.3)\n` +
  `peak RSS ${(Math.max(...peakRss) / 2 ** 20).toFixed(0)} MiB (target <= 1024)\n` +
  `wrote ${file}\n`,
);
