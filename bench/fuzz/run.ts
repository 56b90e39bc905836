/**
 * The long fuzz run (issue 9): at least 10,000 cases per input format, the
 * same generators and judge as the CI test (test/fuzz), in parallel worker
 * processes of 256 MB heap. A process that crashes or hangs is recorded as a
 * violation of the case it was running and the run goes on from the next
 * case. Writes bench/results/fuzz.json: cases, outcomes by error code,
 * violations with examples, the slowest case, the commit measured.
 *
 *   npm run build && node dist/bench/fuzz/run.js [--cases 10000] [--jobs 2] [--seed bench-1]
 *     [--formats safetensors,index,config,tokenizer,recipe] [--upcycle-rate 0.25] [--out bench/results/fuzz.json]
 */
import { mkdir, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { dirname, resolve } from "node:path";
import { parseArgs } from "node:util";
import { FORMATS, type Format } from "../../test/fuzz/harness.js";
import { emptyFormat, type FormatSummary, runWorker } from "../../test/fuzz/run-worker.js";
import { measuredTree, machineInfo } from "../provenance.js";

const { values } = parseArgs({
  options: {
    cases: { type: "string", default: "10000" },
    jobs: { type: "string", default: String(Math.max(1, cpus().length)) },
    seed: { type: "string", default: "bench-1" },
    formats: { type: "string", default: FORMATS.join(",") },
    "upcycle-rate": { type: "string", default: "0.25" },
    chunk: { type: "string", default: "1000" },
    out: { type: "string", default: "bench/results/fuzz.json" },
  },
});
const cases = Number(values.cases);
const chunk = Number(values.chunk);
const upcycleRate = Number(values["upcycle-rate"]);
const formats = values.formats!.split(",") as Format[];

interface Chunk {
  format: Format;
  first: number;
  count: number;
}
const queue: Chunk[] = [];
for (const format of formats)
  for (let first = 0; first < cases; first += chunk)
    queue.push({ format, first, count: Math.min(chunk, cases - first) });

const tree = measuredTree();

const summaries: Partial<Record<Format, FormatSummary>> = {};
const crashes: Array<{ format: Format; index: number; why: string }> = [];
let maxRssMB = 0;
let fdGrowth = 0;
let done = 0;
const started = performance.now();

function merge(format: Format, part: FormatSummary): void {
  const entry = (summaries[format] ??= emptyFormat());
  entry.cases += part.cases;
  entry.caseMs += part.caseMs;
  entry.violations += part.violations;
  for (const [outcome, n] of Object.entries(part.outcomes))
    entry.outcomes[outcome] = (entry.outcomes[outcome] ?? 0) + n;
  for (const example of part.examples) if (entry.examples.length < 20) entry.examples.push(example);
  if (part.slowest && (entry.slowest === null || part.slowest.ms > entry.slowest.ms)) entry.slowest = part.slowest;
}

async function runChunk({ format, first, count }: Chunk): Promise<void> {
  let next = first;
  const end = first + count;
  while (next < end) {
    const summary = await runWorker(
      { [format]: end - next },
      { seed: values.seed!, upcycleRate, timeoutSeconds: 3600, first: next, keepGoing: true },
    );
    maxRssMB = Math.max(maxRssMB, summary.maxRssMB);
    if (summary.fds) fdGrowth = Math.max(fdGrowth, summary.fds.end - summary.fds.start);
    const part = summary.formats[format] ?? emptyFormat();
    merge(format, part);
    if (summary.stopped === null) break;
    // A crash names its case; a harness failure stops the worker at the case after the last result.
    const failed = summary.crashed?.index ?? next + part.cases;
    crashes.push({ format, index: failed, why: summary.stopped });
    next = failed + 1;
  }
  done += 1;
  process.stderr.write(
    `${format} ${first}..${end - 1} done (${done}/${queue.length} chunks, ${((performance.now() - started) / 1000).toFixed(0)} s)\n`,
  );
}

const pending = [...queue];
await Promise.all(
  Array.from({ length: Number(values.jobs) }, async () => {
    for (let job = pending.shift(); job !== undefined; job = pending.shift()) await runChunk(job);
  }),
);

const ordered: Partial<Record<Format, FormatSummary>> = {};
for (const format of formats) {
  const entry = summaries[format]!;
  entry.outcomes = Object.fromEntries(Object.entries(entry.outcomes).sort((a, b) => b[1] - a[1]));
  entry.caseMs = Math.round(entry.caseMs);
  ordered[format] = entry;
}
const result = {
  benchmark: "fuzz (test/fuzz generators, bench/fuzz/run.ts)",
  ...tree,
  date: new Date().toISOString(),
  machine: machineInfo(),
  seed: values.seed,
  casesPerFormat: cases,
  upcycleRate,
  seconds: Math.round((performance.now() - started) / 1000),
  totals: {
    cases: Object.values(ordered).reduce((n, s) => n + s.cases, 0),
    violations: Object.values(ordered).reduce((n, s) => n + s.violations, 0),
    processCrashesOrHangs: crashes.length,
  },
  maxWorkerRssMB: maxRssMB,
  maxOpenFileGrowth: fdGrowth,
  crashes,
  formats: ordered,
};
const file = resolve(values.out!);
await mkdir(dirname(file), { recursive: true });
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
for (const [format, s] of Object.entries(ordered)) {
  process.stdout.write(
    `${format.padEnd(12)} ${String(s.cases).padStart(6)} cases  ${String(s.violations).padStart(4)} violations  slowest ${s.slowest?.ms} ms  ${JSON.stringify(s.outcomes)}\n`,
  );
}
process.stdout.write(
  `${result.totals.cases} cases in ${result.seconds} s, ${result.totals.violations} violations, ${crashes.length} crashes or hangs; wrote ${file}\n`,
);
