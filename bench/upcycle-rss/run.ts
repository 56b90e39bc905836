/**
 * Peak RSS of `bam upcycle` at two model sizes (issue 9): three synthetic
 * llama seeds of about 200 MB and three of about 1 GB (bf16), upcycled into
 * a 3-expert BAM model, each size repeated. The executor streams in chunks,
 * so the peak must not grow with the model. Peak RSS is getrusage's maxrss
 * of the CLI process (worker threads included), written at exit by
 * test/reliability/rss-probe.js. Writes bench/results/upcycle-rss.json.
 *
 *   npm run build && node dist/bench/upcycle-rss/run.js [--work /tmp/bam-rss] [--repeats 3]
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { BATCHES_IN_FLIGHT, EARLY_BATCHES_IN_FLIGHT, WRITE_BATCH_BYTES } from "../../src/safetensors/index.js";
import { CLI, folderBytes, type LlamaSeed, RSS_PROBE, writeSeed } from "../../test/reliability/synth.js";
import { measuredTree, machineInfo } from "../provenance.js";
import { median } from "../stats.js";

const { values } = parseArgs({
  options: { work: { type: "string", default: "/tmp/bam-rss" }, repeats: { type: "string", default: "3" } },
});
const work = resolve(values.work!);
const repeats = Number(values.repeats);

const SIZES: Record<string, LlamaSeed> = {
  // 104M parameters: embeddings 32000 x 1024, 3 layers.
  "200MB": { vocab: 32000, hidden: 1024, intermediate: 2816, layers: 3, heads: 16, kvHeads: 16, maxShardBytes: 1e9 },
  // 491M parameters: embeddings 32000 x 2048, 7 layers.
  "1GB": { vocab: 32000, hidden: 2048, intermediate: 5632, layers: 7, heads: 16, kvHeads: 16, maxShardBytes: 1e9 },
};

interface SizeResult {
  shape: LlamaSeed;
  seeds: number;
  /** Bytes of one seed folder. */
  seedBytes: number;
  outputBytes: number;
  parameters: number;
  peakRssBytes: number[];
  medianPeakRssBytes: number;
  /** The plan's own estimate (`bam upcycle --dry-run`). */
  plannedPeakMemoryBytes: number;
  seconds: number[];
}

const tree = measuredTree();
const loadBefore = loadavg();

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(0);
const results: Record<string, SizeResult> = {};
for (const [name, shape] of Object.entries(SIZES)) {
  const dir = join(work, name);
  const seeds = ["a", "b", "c"].map((s) => join(dir, s));
  for (const [i, seed] of seeds.entries()) {
    if (!existsSync(join(seed, "config.json"))) {
      process.stderr.write(`writing ${seed}\n`);
      await writeSeed(seed, { ...shape, valueSeed: i + 1 });
    }
  }
  const seedBytes = (await Promise.all(seeds.map(folderBytes))).reduce((a, b) => a + b, 0) / seeds.length;
  const output = join(dir, "out");
  const plan = JSON.parse(
    execFileSync(process.execPath, [CLI, "upcycle", ...seeds, "-o", output, "--dry-run", "--json"], {
      encoding: "utf8",
      maxBuffer: 256 << 20,
    }),
  ) as {
    summary: { peakMemoryBytes: number; totalParameters: number };
  };
  const peaks: number[] = [];
  const seconds: number[] = [];
  let outputBytes = 0;
  for (let r = 0; r < repeats; r++) {
    await rm(output, { recursive: true, force: true });
    const rssFile = join(dir, "rss.json");
    const started = performance.now();
    const run = spawnSync(process.execPath, ["--import", RSS_PROBE, CLI, "upcycle", ...seeds, "-o", output], {
      encoding: "utf8",
      env: { ...process.env, BAM_TEST_RSS_FILE: rssFile },
    });
    if (run.status !== 0) throw new Error(`upcycle failed: ${run.stderr}`);
    seconds.push((performance.now() - started) / 1000);
    peaks.push((JSON.parse(await readFile(rssFile, "utf8")) as { maxRssBytes: number }).maxRssBytes);
    outputBytes = await folderBytes(output);
    process.stderr.write(`${name} run ${r + 1}: ${mib(peaks.at(-1)!)} MiB peak, ${seconds.at(-1)!.toFixed(1)} s\n`);
  }
  await rm(output, { recursive: true, force: true });
  results[name] = {
    shape,
    seeds: seeds.length,
    seedBytes,
    outputBytes,
    parameters: plan.summary.totalParameters,
    peakRssBytes: peaks,
    medianPeakRssBytes: median(peaks),
    plannedPeakMemoryBytes: plan.summary.peakMemoryBytes,
    seconds,
  };
}

const small = results["200MB"]!;
const large = results["1GB"]!;
const result = {
  benchmark: "peak RSS of bam upcycle at two model sizes (3 seeds, BAM moa, bf16)",
  ...tree,
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadAverage: { before: loadBefore, after: loadavg() } },
  writeBatchBytes: WRITE_BATCH_BYTES,
  batchesInFlight: BATCHES_IN_FLIGHT,
  earlyBatchesInFlight: EARLY_BATCHES_IN_FLIGHT,
  repeats,
  sizes: results,
  /** Seeds grew this much; the median peak RSS grew by `rssGrowthBytes`. */
  seedGrowth: large.seedBytes / small.seedBytes,
  rssGrowthBytes: large.medianPeakRssBytes - small.medianPeakRssBytes,
  target: { peakRssBytes: 2 ** 30 },
};
const file = resolve("bench/results/upcycle-rss.json");
await mkdir(resolve("bench/results"), { recursive: true });
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(
  `200MB seeds: median peak ${mib(small.medianPeakRssBytes)} MiB\n` +
    `1GB seeds:   median peak ${mib(large.medianPeakRssBytes)} MiB (seeds x${result.seedGrowth.toFixed(1)})\n` +
    `wrote ${file}\n`,
);
