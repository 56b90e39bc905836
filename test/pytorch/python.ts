/** Finds a python3 with torch (Debian's python3-torch in CI) and runs our Python scripts with it. */
import { execFileSync, spawnSync } from "node:child_process";

const CANDIDATES = [process.env.BAM_PYTHON, "/usr/bin/python3", "python3"].filter((p): p is string => Boolean(p));

function hasTorch(python: string): boolean {
  const probe = spawnSync(python, ["-c", "import torch"], { stdio: "ignore" });
  return probe.status === 0;
}

/** The interpreter to use, or null (tests then skip, saying why). */
export const PYTHON: string | null = CANDIDATES.find(hasTorch) ?? null;
export const NO_TORCH = PYTHON === null ? "no python3 with torch (apt-get install python3-torch, or set BAM_PYTHON)" : false;

export function runPython(args: string[]): string {
  return execFileSync(PYTHON!, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], maxBuffer: 64 << 20 });
}
