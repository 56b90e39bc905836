/** Shared test helpers: fixture paths, temp folders, float comparison. */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { openSeed, type Seed } from "../src/arch/load.js";
import { FAMILIES, type Family } from "../src/arch/types.js";
import { isBamError } from "../src/errors.js";

export const FIXTURES = resolve("fixtures");

export function fixture(family: Family, variant: "base" | "code" | "math" | "sharded" | "bf16"): string {
  return join(FIXTURES, family, variant);
}

/** Every family; throws when one's fixtures are missing, so coverage never shrinks silently. */
export function fixtureFamilies(): Family[] {
  const missing = FAMILIES.filter((family) => !existsSync(join(fixture(family, "base"), "config.json")));
  if (missing.length > 0)
    throw new Error(
      `fixtures missing for ${missing.join(", ")}: run scripts/make_fixtures.py (GPU machine) and commit them`,
    );
  return [...FAMILIES];
}

export async function withTempDir<T>(body: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), "bam-test-"));
  try {
    return await body(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Largest |logits - reference| any logits comparison allows (the CPU engine or modeling_bam.py against
 * transformers, or against each other): the 1e-5 README.md promises ("Checking a merge on CPU"). The worst
 * the tests measure is 9.4e-6 (the engine on qwen3's [s, s, s] in moa, logits up to 11 in magnitude).
 */
export const TOLERANCE = 1e-5;

/** Largest |a - b| over two equally long arrays. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return (
    a.length === b.length &&
    Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.length), Buffer.from(b.buffer, b.byteOffset, b.length)) === 0
  );
}

/** Opens a seed, runs `body`, and closes it whatever happens. */
export async function withSeed<T>(dir: string, body: (seed: Seed) => Promise<T>): Promise<T> {
  const seed = await openSeed(dir);
  try {
    return await body(seed);
  } finally {
    await seed.close();
  }
}

/** Asserts that `call` rejects with a BamError of `code` whose message matches. */
export async function refused(call: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(call, (error: unknown) => {
    assert.ok(isBamError(error), `a BamError, not ${String(error)}`);
    assert.equal(error.code, code, error.message);
    assert.match(error.message, message);
    return true;
  });
}

/** A pid that no process has now. */
export function deadPid(): number {
  for (let pid = 4_000_000; pid > 1000; pid -= 7919) {
    try {
      process.kill(pid, 0);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ESRCH") return pid;
    }
  }
  throw new Error("no free pid");
}
