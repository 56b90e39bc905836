/** Finds a python3 with torch (the repository's .venv from requirements.txt, as CI builds it) and runs our Python scripts with it. */
import { execFileSync, spawnSync } from "node:child_process";

const CANDIDATES = [process.env.BAM_PYTHON, ".venv/bin/python", "python3"].filter((p): p is string => Boolean(p));

function hasTorch(python: string): boolean {
  const probe = spawnSync(python, ["-c", "import torch"], { stdio: "ignore" });
  return probe.status === 0;
}

/** The interpreter to use, or null (tests then skip, saying why). */
export const PYTHON: string | null = CANDIDATES.find(hasTorch) ?? null;
const MISSING =
  "no python3 with torch: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt (or set BAM_PYTHON)";
if (PYTHON === null && process.env.BAM_REQUIRE_PYTHON)
  throw new Error(`BAM_REQUIRE_PYTHON is set but there is ${MISSING}`);
/** A skip reason where no interpreter has torch (never in CI, which sets BAM_REQUIRE_PYTHON). */
export const NO_TORCH = PYTHON === null ? MISSING : false;

export function runPython(args: string[]): string {
  return execFileSync(PYTHON!, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], maxBuffer: 64 << 20 });
}
