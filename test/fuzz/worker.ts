/**
 * The fuzz run as a process of its own (small heap, allocation guard), so a
 * hang or a crash cannot take the test runner with it. Each case's result is
 * one JSON line on stdout (./run-worker.ts adds them up); each case's id goes
 * to stderr before it runs, so that the parent can name the case that
 * crashed the process.
 *
 *   node --max-old-space-size=256 dist/test/fuzz/worker.js --seed 1 --counts '{"config":100}'
 *   node dist/test/fuzz/worker.js --seed 1 --format config --index 42     # replay one case, verbose
 */
import { readdirSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  FORMATS,
  type CaseResult,
  type Format,
  type Generator,
  installAllocationGuard,
  reportViolation,
  runCase,
} from "./harness.js";
import { safetensorsCase } from "./formats/safetensors.js";
import { indexCase } from "./formats/index.js";
import { configCase } from "./formats/config.js";
import { tokenizerCase } from "./formats/tokenizer.js";
import { recipeCase } from "./formats/recipe.js";
import { peakRssBytes } from "../peak-rss.js";

export const GENERATORS: Readonly<Record<Format, Generator>> = {
  safetensors: safetensorsCase,
  index: indexCase,
  config: configCase,
  tokenizer: tokenizerCase,
  recipe: recipeCase,
};

/** The last line of a run. */
export interface WorkerEnd {
  end: true;
  /** Peak resident memory of the fuzz process. */
  maxRssMB: number;
  /** Open file descriptors before and after: a leak shows as growth. */
  fds: { start: number; end: number } | null;
  /** Why the run stopped early: a hang (work may still be running) or a harness failure. */
  stopped: string | null;
}

function openFds(): number | null {
  try {
    return readdirSync("/proc/self/fd").length;
  } catch {
    return null;
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      seed: { type: "string", default: "1" },
      counts: { type: "string" },
      format: { type: "string" },
      index: { type: "string" },
      first: { type: "string", default: "0" },
      timeout: { type: "string", default: "10000" },
      "upcycle-rate": { type: "string", default: "0.25" },
      "alloc-limit": { type: "string", default: String(64 * 1024 * 1024) },
      "generate-only": { type: "boolean", default: false },
      "keep-going": { type: "boolean", default: false },
    },
  });
  installAllocationGuard(Number(values["alloc-limit"]));
  process.on("unhandledRejection", (reason) =>
    reportViolation(
      `unhandled rejection: ${reason instanceof Error ? `${reason.constructor.name}: ${reason.message}` : String(reason)}`,
    ),
  );
  process.on("uncaughtException", (error) =>
    reportViolation(`uncaught exception: ${error.constructor.name}: ${error.message}`),
  );

  const root = await mkdtemp(join(tmpdir(), "bam-fuzz-"));
  const options = {
    root,
    seed: values.seed!,
    timeoutMs: Number(values.timeout),
    upcycleRate: Number(values["upcycle-rate"]),
    generateOnly: values["generate-only"],
  };

  if (values.index !== undefined) {
    const format = values.format as Format;
    const result = await runCase(format, Number(values.index), GENERATORS[format], options);
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    if (!result.fatal) await rm(root, { recursive: true, force: true });
    process.exit(0);
  }

  const counts = JSON.parse(values.counts ?? "{}") as Partial<Record<Format, number>>;
  const first = Number(values.first);
  const fdStart = openFds();
  let stopped: string | null = null;
  let hung = false;
  run: for (const format of FORMATS) {
    const count = counts[format];
    if (count === undefined) continue;
    for (let index = first; index < first + count; index++) {
      process.stderr.write(`case ${format} ${index} at ${Math.round(performance.now())} ms\n`);
      let result: CaseResult;
      try {
        result = await runCase(format, index, GENERATORS[format], options);
      } catch (error) {
        stopped = `fuzz harness failed on ${format} case ${index}: ${error instanceof Error ? error.stack : String(error)}`;
        break run;
      }
      process.stdout.write(`${JSON.stringify(result)}\n`);
      if (result.fatal) {
        hung = true;
        if (!values["keep-going"]) {
          stopped = `${format} case ${index}: ${result.violations.join("; ")}`;
          break run;
        }
      }
    }
  }
  const fdEnd = openFds();
  const end: WorkerEnd = {
    end: true,
    maxRssMB: Math.round(peakRssBytes() / 2 ** 20),
    fds: fdStart === null || fdEnd === null ? null : { start: fdStart, end: fdEnd },
    stopped,
  };
  if (!hung) await rm(root, { recursive: true, force: true });
  process.stdout.write(`${JSON.stringify(end)}\n`);
  // A hung read may hold the event loop open; the results are out, so leave.
  process.exit(0);
}

await main();
