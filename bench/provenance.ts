/**
 * What a benchmark measured: the commit, and the source files that differed
 * from it. Taken when a run starts, since files may change while it goes on.
 */
import { execFileSync } from "node:child_process";
import { cpus, totalmem } from "node:os";
import type { UpcyclePlan } from "../src/upcycle/index.js";

export interface MeasuredTree {
  commit: string;
  /** Files under src/ that differed from the commit (the measured tree is the commit plus these); null where not known. */
  uncommittedSource: string[] | null;
}

/**
 * The git checkout's HEAD and its changes under src/. `commit` is for a copy
 * with no .git (the GPU machine gets one): the caller vouches for the tree,
 * and what differed is not known.
 */
export function measuredTree(commit?: string): MeasuredTree {
  if (commit) return { commit, uncommittedSource: null };
  const git = (...args: string[]) => execFileSync("git", args, { encoding: "utf8" });
  return {
    commit: git("rev-parse", "HEAD").trim(),
    // Lines are "XY path"; not trimmed, since X is a space for a file changed only in the work tree.
    uncommittedSource: git("status", "--porcelain", "--", "src")
      .split("\n")
      .filter(Boolean)
      .map((line) => line.slice(3)),
  };
}

/** The machine a benchmark ran on, as every result JSON records it (callers add their load averages). */
export function machineInfo(): { cpus: number; cpuModel: string | undefined; memoryBytes: number; node: string } {
  return { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryBytes: totalmem(), node: process.version };
}

/** `--name value` from the command line, or `fallback`. */
export function argOption(name: string, fallback: string): string {
  const args = process.argv.slice(2);
  const at = args.indexOf(name);
  return at >= 0 && args[at + 1] ? args[at + 1]! : fallback;
}

/** The mixture a benchmark measured and its parameter counts, from its upcycle plan, as the ONNX benchmarks record them. */
export function mixtureFacts({ summary }: UpcyclePlan) {
  return {
    mixture: {
      experts: summary.experts,
      attention: summary.attention,
      block: summary.block,
      expertsPerToken: summary.expertsPerToken,
    },
    parameters: {
      seed: summary.seedParameters,
      bamTotal: summary.totalParameters,
      bamActivePerToken: summary.activeParameters,
    },
  };
}
