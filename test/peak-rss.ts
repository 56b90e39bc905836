/**
 * Peak resident memory of this process, worker threads included, since it
 * started: /proc's VmHWM on Linux. getrusage's maxrss is not that there: it
 * keeps the parent's RSS at fork across exec, so a child of a large process
 * (a benchmark that has just written its seeds) reports the parent's size.
 */
import { readFileSync } from "node:fs";

export function peakRssBytes(): number {
  try {
    const kib = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync("/proc/self/status", "utf8"))?.[1];
    if (kib !== undefined) return Number(kib) * 1024;
  } catch {
    // No /proc: not Linux, where maxrss has no such inheritance to undo.
  }
  return process.resourceUsage().maxRSS * 1024;
}
