/**
 * A long-lived process (issue 18): RSS after each of 5 back-to-back upcycles
 * through the API in one process, of three synthetic llama seeds (bf16,
 * about 210 MB each) into a 3-expert BAM model of about 430 MB. No manual
 * gc(): what a server or notebook sees. RSS is read 2 s after each run
 * returns (the workers and the pools of that run are gone by then), and
 * once more with --expose-gc after a forced gc() to tell garbage from what
 * is held. Writes bench/results/upcycle-rss-repeat.json.
 *
 *   npm run build && node --expose-gc dist/bench/upcycle-rss/repeat.js [--work /tmp/bam-rss-repeat] [--runs 5]
 */
import { existsSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import { upcycle } from "../../src/index.js";
import { folderBytes, type LlamaSeed, writeSeed } from "../../test/reliability/synth.js";
import { measuredTree, machineInfo } from "../provenance.js";

const { values } = parseArgs({
  options: { work: { type: "string", default: "/tmp/bam-rss-repeat" }, runs: { type: "string", default: "5" } },
});
const work = resolve(values.work!);
const runs = Number(values.runs);
// 105M parameters per seed; the 3-expert BAM model has 217M.
const SHAPE: LlamaSeed = {
  vocab: 32000,
  hidden: 768,
  intermediate: 2048,
  layers: 8,
  heads: 12,
  kvHeads: 12,
  dtype: "BF16",
  maxShardBytes: 1e9,
};

const tree = measuredTree();
const loadBefore = loadavg();
const mib = (bytes: number) => Math.round(bytes / 2 ** 20);
const seeds = ["a", "b", "c"].map((s) => join(work, s));
for (const [i, seed] of seeds.entries()) {
  if (!existsSync(join(seed, "config.json"))) {
    process.stderr.write(`writing ${seed}\n`);
    await writeSeed(seed, { ...SHAPE, valueSeed: i + 1 });
  }
}
const output = join(work, "out");
const memory = () => {
  const m = process.memoryUsage();
  return {
    rssMiB: mib(m.rss),
    heapUsedMiB: mib(m.heapUsed),
    externalMiB: mib(m.external),
    arrayBuffersMiB: mib(m.arrayBuffers),
  };
};
const startMemory = memory();
const after: Array<ReturnType<typeof memory> & { seconds: number }> = [];
let outputBytes = 0;
for (let r = 0; r < runs; r++) {
  await rm(output, { recursive: true, force: true });
  const result = await upcycle({ seeds, output });
  outputBytes = await folderBytes(output);
  await sleep(2000);
  after.push({ ...memory(), seconds: Number(result.seconds.toFixed(1)) });
  process.stderr.write(`run ${r + 1}: ${JSON.stringify(after.at(-1))}\n`);
}
await rm(output, { recursive: true, force: true });
const gc = (globalThis as { gc?: () => void }).gc;
gc?.();
await sleep(1000);
const afterGc = gc ? memory() : null;
const result = {
  benchmark: "RSS of one process after back-to-back API upcycles (3 seeds, BAM moa, bf16), no manual gc",
  ...tree,
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadAverage: { before: loadBefore, after: loadavg() } },
  shape: SHAPE,
  seedBytes: await folderBytes(seeds[0]!),
  outputBytes,
  before: startMemory,
  afterEachRun: after,
  /** After the last run, a forced gc(): what is really held. */
  afterForcedGc: afterGc,
};
await mkdir("bench/results", { recursive: true });
await writeFile("bench/results/upcycle-rss-repeat.json", `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
