/**
 * Starts the fuzz worker as a child process (small heap, time limit) and adds
 * up its per-case results; a crash or a hang of the process becomes a
 * violation of the case that was running.
 */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { CaseResult, Format } from "./harness.js";
import type { WorkerEnd } from "./worker.js";

export const WORKER = fileURLToPath(new URL("./worker.js", import.meta.url));

export interface Example {
  index: number;
  step: string;
  notes: string[];
  violations: string[];
  message?: string;
}

export interface FormatSummary {
  cases: number;
  /** "ok", a BamError code, or "VIOLATION" -> cases. */
  outcomes: Record<string, number>;
  violations: number;
  /** The first violating cases, with what they did. */
  examples: Example[];
  slowest: { index: number; ms: number; outcome: string; step: string; notes: string[] } | null;
  /** Time spent in the cases themselves (not in making them). */
  caseMs: number;
}

export interface FuzzSummary {
  formats: Partial<Record<Format, FormatSummary>>;
  maxRssMB: number;
  fds: { start: number; end: number } | null;
  /** Why the run ended early: a hang, a crash (then `crashed` names the case), a harness failure. */
  stopped: string | null;
  crashed: { format: Format; index: number } | null;
  seconds: number;
}

export function emptyFormat(): FormatSummary {
  return { cases: 0, outcomes: {}, violations: 0, examples: [], slowest: null, caseMs: 0 };
}

export function addResult(
  entry: FormatSummary,
  result: Pick<CaseResult, "index" | "outcome" | "ms" | "step" | "notes" | "violations" | "message">,
): void {
  entry.cases += 1;
  entry.caseMs += result.ms;
  entry.outcomes[result.outcome] = (entry.outcomes[result.outcome] ?? 0) + 1;
  if (result.violations.length > 0) {
    entry.violations += 1;
    if (entry.examples.length < 20) {
      entry.examples.push({
        index: result.index,
        step: result.step,
        notes: result.notes,
        violations: result.violations,
        message: result.message?.slice(0, 500),
      });
    }
  }
  if (entry.slowest === null || result.ms > entry.slowest.ms) {
    entry.slowest = {
      index: result.index,
      ms: Math.round(result.ms * 10) / 10,
      outcome: result.outcome,
      step: result.step,
      notes: result.notes,
    };
  }
}

export function runWorker(
  counts: Partial<Record<Format, number>>,
  options: {
    seed: string;
    upcycleRate: number;
    timeoutSeconds: number;
    heapMB?: number;
    first?: number;
    keepGoing?: boolean;
  },
): Promise<FuzzSummary> {
  const started = performance.now();
  const args = [
    `--max-old-space-size=${options.heapMB ?? 256}`,
    WORKER,
    "--seed",
    options.seed,
    "--counts",
    JSON.stringify(counts),
    "--upcycle-rate",
    String(options.upcycleRate),
    "--first",
    String(options.first ?? 0),
    ...(options.keepGoing ? ["--keep-going"] : []),
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  const summary: FuzzSummary = { formats: {}, maxRssMB: 0, fds: null, stopped: null, crashed: null, seconds: 0 };
  let end: WorkerEnd | undefined;
  let pending = "";
  let stderrTail = "";
  let running: { format: Format; index: number } | null = null;
  child.stdout.setEncoding("utf8").on("data", (text: string) => {
    pending += text;
    const lines = pending.split("\n");
    pending = lines.pop()!;
    for (const line of lines) {
      if (line.trim() === "") continue;
      const record = JSON.parse(line) as CaseResult | WorkerEnd;
      if ("end" in record) end = record;
      else addResult((summary.formats[record.format] ??= emptyFormat()), record);
    }
  });
  child.stderr.setEncoding("utf8").on("data", (text: string) => {
    for (const line of text.split("\n")) {
      const match = /^case (\S+) (\d+)/.exec(line);
      if (match) running = { format: match[1] as Format, index: Number(match[2]) };
    }
    stderrTail = (stderrTail + text.replace(/^case .*\n/gm, "")).slice(-2000);
  });
  const timer = setTimeout(() => child.kill("SIGKILL"), options.timeoutSeconds * 1000);
  return new Promise((resolve) => {
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      summary.seconds = (performance.now() - started) / 1000;
      if (end !== undefined && code === 0) {
        Object.assign(summary, { maxRssMB: end.maxRssMB, fds: end.fds, stopped: end.stopped });
      } else {
        const why =
          signal === "SIGKILL" && summary.seconds >= options.timeoutSeconds
            ? `gave no result within ${options.timeoutSeconds} s`
            : `exited with ${code ?? signal}`;
        const crashed = running as { format: Format; index: number } | null;
        summary.crashed = crashed;
        summary.stopped = `fuzz process ${why} during ${crashed ? `${crashed.format} case ${crashed.index}` : "start-up"}: ${stderrTail.trim().slice(-600)}`;
        if (crashed !== null) {
          addResult((summary.formats[crashed.format] ??= emptyFormat()), {
            index: crashed.index,
            outcome: "VIOLATION",
            ms: 0,
            step: "(process)",
            notes: [],
            violations: [summary.stopped],
          });
        }
      }
      for (const entry of Object.values(summary.formats)) entry.caseMs = Math.round(entry.caseMs);
      resolve(summary);
    });
  });
}
