/**
 * Benchmark of `bam upcycle` (issue 4): three synthetic llama seeds of about
 * 1B parameters each (bf16), upcycled into a 3-expert BAM model, timed
 * against `cp` of the same seed bytes in the same run, with the upcycle's
 * peak RSS. Not a test: run `npm run build && node dist/bench/upcycle/bench.js`.
 *
 * Each repeat runs, in turn: `cp`; `bam upcycle` with an empty hash cache
 * (every seed file hashed, as on a first run); `bam upcycle` with the seeds'
 * hashes cached by an earlier run; and two baselines for the first run:
 * sha256 of the seed files alone, and `cp` while the same hashing runs
 * beside it (both with bam's hashing code and threads, hash-files.ts): a
 * first run's two jobs, done side by side by separate programs.
 * Dirty pages are synced before each, so no contender pays for the previous
 * one's writeback. This VM's memory makes any one timing swing by 2x (pages
 * freed to the host fault back in slowly), so medians and minimums are both
 * reported.
 *
 *   --work DIR     where seeds and outputs go (default /tmp/bam-bench)
 *   --repeats N    timed repetitions of each (default 5)
 *   --small        a ~100M-parameter shape, to try the script quickly
 *   --result FILE  where the JSON goes (default bench/results/upcycle.json)
 *   --commit SHA   the commit measured, where the tree is no git checkout
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { CLI, folderBytes, RSS_PROBE } from "../../test/reliability/synth.js";
import { measuredTree, machineInfo, argOption } from "../provenance.js";
import { median } from "../stats.js";
import { HASH_THREADS } from "../../src/upcycle/hash-seeds.js";
import { ONE_BILLION, writeLlamaSeed, type LlamaShape } from "./synthetic.js";

const args = process.argv.slice(2);
const work = resolve(argOption("--work", "/tmp/bam-bench"));
const repeats = Number(argOption("--repeats", "5"));
const shape: LlamaShape = args.includes("--small")
  ? { layers: 4, hidden: 1024, intermediate: 2816, heads: 16, kvHeads: 16, vocab: 32000 }
  : ONE_BILLION;

const min = (values: number[]) => Math.min(...values);
const ratioOf = (values: number[], baseline: number[]) => ({
  median: median(values) / median(baseline),
  min: min(values) / min(baseline),
});

function timed(
  command: string,
  commandArgs: string[],
  env: NodeJS.ProcessEnv = process.env,
): { seconds: number; stdout: string } {
  execFileSync("sync");
  const start = performance.now();
  const run = spawnSync(command, commandArgs, { encoding: "utf8", maxBuffer: 64 << 20, env });
  if (run.status !== 0) throw new Error(`${command} ${commandArgs.join(" ")} failed: ${run.stderr}`);
  return { seconds: (performance.now() - start) / 1000, stdout: run.stdout };
}

const tree = measuredTree(args.includes("--commit") ? argOption("--commit", "") : undefined);

const seeds = ["seed-a", "seed-b", "seed-c"].map((name) => join(work, name));
for (const seed of seeds) {
  if (!existsSync(join(seed, "config.json"))) {
    process.stderr.write(`writing synthetic seed ${seed}\n`);
    await writeLlamaSeed(seed, shape, seeds.indexOf(seed) + 1);
  }
}
const weightFiles = (
  await Promise.all(
    seeds.map(async (s) => (await readdir(s)).filter((f) => f.endsWith(".safetensors")).map((f) => join(s, f))),
  )
).flat();
const seedBytes = (await Promise.all(weightFiles.map(async (f) => (await stat(f)).size))).reduce((a, b) => a + b, 0);
execFileSync("cat", weightFiles, { stdio: ["ignore", "ignore", "inherit"], maxBuffer: 1 }); // warm the page cache for both contenders

const copyDir = join(work, "copy");
const outDir = join(work, "bam");
const cacheDir = join(work, "hash-cache");
const copySeconds: number[] = [];
const hashSeconds: number[] = [];
const copyWhileHashingSeconds: number[] = [];
const upcycleSeconds = { coldHashes: [] as number[], cachedHashes: [] as number[] };
const HASH_FILES = resolve(import.meta.dirname, "hash-files.js");
const quoted = (paths: string[]) => paths.map((p) => `'${p}'`).join(" ");
const copyCommand = seeds
  .map((s, n) => `mkdir -p ${copyDir}/${n} && cp --reflink=never ${s}/*.safetensors ${copyDir}/${n}/`)
  .join(" && ");
const hashCommand = `'${process.execPath}' '${HASH_FILES}' ${quoted(weightFiles)}`;
const peakRss: number[] = [];
let outputBytes = 0;

/** One upcycle with the hash cache in `cache`; its time, and its peak RSS recorded. */
async function upcycleOnce(cache: string): Promise<number> {
  await rm(outDir, { recursive: true, force: true });
  const rssFile = join(work, "rss.json");
  const run = timed(process.execPath, ["--import", RSS_PROBE, CLI, "upcycle", ...seeds, "-o", outDir, "--json"], {
    ...process.env,
    BAM_CACHE_DIR: cache,
    BAM_TEST_RSS_FILE: rssFile,
  });
  peakRss.push((JSON.parse(await readFile(rssFile, "utf8")) as { maxRssBytes: number }).maxRssBytes);
  outputBytes = await folderBytes(outDir);
  await rm(rssFile, { force: true });
  await rm(outDir, { recursive: true, force: true });
  return run.seconds;
}

await rm(cacheDir, { recursive: true, force: true });
await upcycleOnce(cacheDir); // fills the hash cache for the "cached" runs
for (let i = 0; i < repeats; i++) {
  // The same seed bytes, each seed into its own folder (their shard names collide).
  copySeconds.push(timed("bash", ["-c", copyCommand]).seconds);
  await rm(copyDir, { recursive: true, force: true });
  hashSeconds.push(timed("bash", ["-c", hashCommand]).seconds);
  copyWhileHashingSeconds.push(
    timed("bash", ["-c", `set -e; ${hashCommand} & hashing=$!; ${copyCommand}; wait $hashing`]).seconds,
  );
  await rm(copyDir, { recursive: true, force: true });
  const empty = join(work, `empty-cache-${i}`);
  upcycleSeconds.coldHashes.push(await upcycleOnce(empty));
  await rm(empty, { recursive: true, force: true });
  upcycleSeconds.cachedHashes.push(await upcycleOnce(cacheDir));
}
await rm(cacheDir, { recursive: true, force: true });

const result = {
  benchmark: "bam upcycle vs cp",
  ...tree,
  date: new Date().toISOString(),
  // Other work on the machine skews both timings: the load average says how quiet it was.
  machine: { ...machineInfo(), loadAverage: loadavg() },
  shape,
  seeds: seeds.length,
  seedBytes,
  outputBytes,
  repeats,
  cpSeconds: copySeconds,
  /** sha256 of the seed files alone, and cp while it runs, as bam hashes them (threads). */
  hashThreads: HASH_THREADS,
  hashSeconds,
  cpWhileHashingSeconds: copyWhileHashingSeconds,
  upcycleSeconds,
  peakRssBytes: peakRss,
  /**
   * upcycle / cp, of the medians and of the minimums, with every file hashed
   * and with hashes cached; the hashing alone / cp and cp while hashing / cp
   * (a first run's two jobs by separate programs); and a first run / cp while hashing.
   */
  ratios: {
    coldHashes: ratioOf(upcycleSeconds.coldHashes, copySeconds),
    cachedHashes: ratioOf(upcycleSeconds.cachedHashes, copySeconds),
    hashOnly: ratioOf(hashSeconds, copySeconds),
    cpWhileHashing: ratioOf(copyWhileHashingSeconds, copySeconds),
    coldHashesVsCpWhileHashing: ratioOf(upcycleSeconds.coldHashes, copyWhileHashingSeconds),
  },
  targets: { ratio: 1.3, peakRssBytes: 2 ** 30 },
};
const file = resolve(argOption("--result", "bench/results/upcycle.json"));
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
const seconds = (values: number[]) =>
  `median ${median(values).toFixed(2)} s, min ${min(values).toFixed(2)} s  (${values.map((v) => v.toFixed(2)).join(", ")})`;
const ratio = (r: { median: number; min: number }) => `${r.median.toFixed(2)}x cp (median), ${r.min.toFixed(2)}x (min)`;
process.stdout.write(
  `seeds ${(seedBytes / 1e9).toFixed(2)} GB -> output ${(outputBytes / 1e9).toFixed(2)} GB\n` +
    `cp                      ${seconds(copySeconds)}\n` +
    `sha256 of the seeds     ${seconds(hashSeconds)} (${HASH_THREADS} thread(s))\n` +
    `cp while hashing        ${seconds(copyWhileHashingSeconds)}\n` +
    `upcycle, hashing seeds  ${seconds(upcycleSeconds.coldHashes)}\n` +
    `upcycle, hashes cached  ${seconds(upcycleSeconds.cachedHashes)}\n` +
    `ratio, hashing seeds    ${ratio(result.ratios.coldHashes)}; cp while hashing ${ratio(result.ratios.cpWhileHashing)}\n` +
    `ratio, hashes cached    ${ratio(result.ratios.cachedHashes)} (target <= 1.3)\n` +
    `peak RSS ${(Math.max(...peakRss) / 2 ** 20).toFixed(0)} MiB (target <= 1024)\n` +
    `wrote ${file}\n`,
);
