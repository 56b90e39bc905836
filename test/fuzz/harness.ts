/**
 * Runs fuzz cases through the real entry points and judges each outcome.
 *
 * A case passes when it ends within the time bound in success or in a
 * BamError whose message is one line, and when nothing changed in its folder
 * except the output it asked for. Everything else is a violation: another
 * exception type, a BamError that wraps a programming error (a TypeError
 * reported as IO_ERROR), a hang, an allocation larger than the guard allows,
 * an unhandled rejection, a file written or left beside the output, a seed
 * changed, or an output that appears but does not load.
 */
import { lstat, mkdir, open, readdir, readlink, rm, writeFile } from "node:fs/promises";
import { constants } from "node:fs";
import { join } from "node:path";
import { openModel } from "../../src/arch/model.js";
import { BamError } from "../../src/errors.js";
import { planUpcycle, upcycle, type UpcycleOptions, type UpcyclePlan } from "../../src/upcycle/index.js";
import { Rng } from "./rng.js";

export const FORMATS = ["safetensors", "index", "config", "tokenizer", "recipe"] as const;
export type Format = (typeof FORMATS)[number];

export interface CaseContext {
  rng: Rng;
  /** The case's own folder, empty. */
  dir: string;
  /** A folder beyond the seeds, with files a link may point at: secret.txt, secret.safetensors. */
  outside: string;
  /** Where an upcycle step must write. */
  output: string;
  /** FIFOs the case made: opened for writing afterwards, so that a blocked reader wakes up. */
  fifos: string[];
  /** What the generator did, for the report. */
  notes: string[];
  /** Probability that a case whose inputs were accepted goes on to a full upcycle. */
  upcycleRate: number;
}

export type Step =
  | { name: string; run: () => Promise<unknown> }
  | { name: string; upcycle: () => UpcycleOptions; dryRun?: boolean };

export type Generator = (ctx: CaseContext) => Promise<Step[]>;

export interface CaseResult {
  format: Format;
  index: number;
  /** "ok", a BamError code, or "VIOLATION". */
  outcome: string;
  /** The last step run. */
  step: string;
  ms: number;
  notes: string[];
  message?: string;
  violations: string[];
  /** Set when the run must stop (a hang may still be running in the background). */
  fatal?: boolean;
}

/** One line, printable: no control characters, no line or paragraph separators. */
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is what this pattern is for
export const NOT_ONE_LINE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/;

let current: string[] | undefined;

/** Violations raised outside a step's promise chain (allocation guard, unhandled rejections) go to the running case. */
export function reportViolation(text: string): void {
  if (current) current.push(text);
  else process.stderr.write(`fuzz: violation outside any case: ${text}\n`);
}

/**
 * Makes any single ArrayBuffer or typed array larger than `limitBytes` a
 * violation. Fuzz inputs are a few MB at most, so a larger allocation means a
 * size was taken from a header or config without checking it against the file.
 */
export function installAllocationGuard(limitBytes: number): void {
  const names = [
    "ArrayBuffer",
    "SharedArrayBuffer",
    "Uint8Array",
    "Int8Array",
    "Uint8ClampedArray",
    "Uint16Array",
    "Int16Array",
    "Uint32Array",
    "Int32Array",
    "Float32Array",
    "Float64Array",
    "BigInt64Array",
    "BigUint64Array",
  ] as const;
  const g = globalThis as unknown as Record<string, unknown>;
  for (const name of names) {
    const target = g[name] as (new (...args: unknown[]) => object) & { BYTES_PER_ELEMENT?: number };
    if (typeof target !== "function") continue;
    g[name] = new Proxy(target, {
      construct(t, args, newTarget) {
        const [first] = args;
        const bytes = typeof first === "number" ? first * (t.BYTES_PER_ELEMENT ?? 1) : 0;
        if (bytes > limitBytes) {
          reportViolation(`allocation of ${bytes} bytes (new ${name}(${first})) over the ${limitBytes}-byte guard`);
          throw new RangeError(`fuzz allocation guard: ${bytes} bytes`);
        }
        return Reflect.construct(t, args, newTarget) as object;
      },
    });
  }
}

/** Judges a thrown value: its outcome label and any violations. */
export function judgeError(error: unknown): { outcome: string; message: string; violations: string[] } {
  if (!(error instanceof BamError)) {
    const name = error instanceof Error ? error.constructor.name : typeof error;
    const message = error instanceof Error ? error.message : String(error);
    return { outcome: "VIOLATION", message, violations: [`threw ${name}, not BamError: ${firstLine(message)}`] };
  }
  const violations: string[] = [];
  if (typeof error.message !== "string" || error.message.length === 0) violations.push(`${error.code}: empty message`);
  else if (NOT_ONE_LINE.test(error.message))
    violations.push(`${error.code}: message is not one printable line: ${JSON.stringify(error.message.slice(0, 300))}`);
  const masked = maskedCause(error);
  if (masked !== undefined) violations.push(`${error.code} wraps a programming error: ${masked}`);
  return { outcome: error.code, message: error.message, violations };
}

/** A cause that is not a system error (no errno code such as ENOENT): a bug reported as if it were an input problem. */
function maskedCause(error: BamError): string | undefined {
  const seen = new Set<unknown>();
  let cause: unknown = error.cause;
  while (cause instanceof Error && !seen.has(cause)) {
    seen.add(cause);
    if (cause instanceof BamError) {
      cause = cause.cause;
      continue;
    }
    const code = (cause as NodeJS.ErrnoException).code;
    // Input errors that the parsers and the OS report: a system errno, a JSON or YAML syntax error, bytes that are not UTF-8.
    const expected =
      (typeof code === "string" && /^E[A-Z]+$/.test(code)) ||
      code === "ERR_ENCODING_INVALID_ENCODED_DATA" ||
      cause.name === "SyntaxError" ||
      cause.name.startsWith("YAML") ||
      cause.name === "AbortError";
    return expected ? undefined : `${cause.constructor.name}${code ? ` ${code}` : ""}: ${firstLine(cause.message)}`;
  }
  return undefined;
}

function firstLine(text: string): string {
  const line = text.split("\n")[0] ?? "";
  return line.length > 200 ? `${line.slice(0, 200)}...` : line;
}

type Snapshot = Map<string, string>;

/** Every entry under `dir` (links not followed): type, size, mtime, link target. */
async function snapshot(dir: string, prefix = "", into: Snapshot = new Map()): Promise<Snapshot> {
  let names: string[];
  try {
    names = await readdir(join(dir, prefix));
  } catch {
    return into;
  }
  for (const name of names.sort()) {
    const rel = prefix === "" ? name : `${prefix}/${name}`;
    const path = join(dir, rel);
    const info = await lstat(path).catch(() => undefined);
    if (info === undefined) continue;
    if (info.isSymbolicLink()) into.set(rel, `link -> ${await readlink(path)}`);
    else if (info.isDirectory()) {
      into.set(rel, "dir");
      await snapshot(dir, rel, into);
    } else if (info.isFile()) into.set(rel, `file ${info.size} ${info.mtimeMs}`);
    else into.set(rel, "special");
  }
  return into;
}

function compareSnapshots(before: Snapshot, after: Snapshot): string[] {
  const problems: string[] = [];
  for (const [path, what] of after) {
    const was = before.get(path);
    if (was === undefined) problems.push(`left ${path} (${what})`);
    else if (was !== what) problems.push(`changed ${path} (${was} -> ${what})`);
  }
  for (const path of before.keys()) if (!after.has(path)) problems.push(`removed ${path}`);
  return problems.slice(0, 5);
}

const sleep = (ms: number) => new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), ms).unref());

/** Wakes up anything blocked opening one of the case's FIFOs for reading. */
async function unblockFifos(fifos: string[]): Promise<void> {
  for (const fifo of fifos) {
    for (let i = 0; i < 4; i++) {
      try {
        const handle = await open(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
        await handle.close();
      } catch {
        break; // ENXIO: no reader is waiting
      }
    }
  }
}

export async function checkUpcycleSuccess(
  options: UpcycleOptions,
  plan: UpcyclePlan,
  dryRun: boolean,
  violations: string[],
): Promise<void> {
  const weights = plan.options.weights;
  const sum = weights.reduce((a, b) => a + b, 0);
  if (!weights.every(Number.isFinite) || Math.abs(sum - 1) > 1e-9)
    violations.push(`plan weights ${JSON.stringify(weights)} do not sum to 1`);
  if (dryRun) return;
  const out = options.output;
  if (out === undefined) {
    violations.push("upcycle succeeded without an output folder");
    return;
  }
  const entries = await readdir(out).catch(() => undefined);
  if (entries === undefined) {
    violations.push("upcycle succeeded but the output folder is missing");
    return;
  }
  for (const entry of entries) {
    const info = await lstat(join(out, entry));
    if (!info.isFile()) violations.push(`output holds ${entry}, which is not a plain file`);
  }
  try {
    const model = await openModel(out);
    try {
      if (model.moe.numExperts !== plan.moe.numExperts)
        violations.push(`output has ${model.moe.numExperts} experts, planned ${plan.moe.numExperts}`);
      const names = [...model.tensors.keys()];
      for (const name of [names[0], names[names.length - 1]]) if (name !== undefined) await model.read(name);
    } finally {
      await model.close();
    }
  } catch (error) {
    violations.push(`output does not load: ${error instanceof Error ? error.message : String(error)}`);
  }
  await rm(out, { recursive: true, force: true });
}

async function runSteps(
  steps: Step[],
  record: { step: string },
  violations: string[],
): Promise<{ outcome: string; message?: string }> {
  for (const step of steps) {
    record.step = step.name;
    try {
      if ("run" in step) {
        await step.run();
      } else {
        const options = step.upcycle();
        const plan = step.dryRun ? await planUpcycle(options) : (await upcycle(options)).plan;
        await checkUpcycleSuccess(options, plan, step.dryRun ?? false, violations);
      }
    } catch (error) {
      const judged = judgeError(error);
      violations.push(...judged.violations);
      return { outcome: judged.outcome, message: judged.message };
    }
  }
  return { outcome: "ok" };
}

export interface RunOptions {
  root: string;
  seed: string;
  timeoutMs: number;
  upcycleRate: number;
  /** Build the case and report what it did, without running it (to see what a crashing case was). */
  generateOnly?: boolean;
}

export async function runCase(
  format: Format,
  index: number,
  generate: Generator,
  options: RunOptions,
): Promise<CaseResult> {
  const dir = join(options.root, `${format}-${index}`);
  const outside = join(dir, "outside");
  await mkdir(outside, { recursive: true });
  await writeFile(join(outside, "secret.txt"), "not for the model folder\n");
  const ctx: CaseContext = {
    rng: new Rng(`${options.seed}/${format}/${index}`),
    dir,
    outside,
    output: join(dir, "out"),
    fifos: [],
    notes: [],
    upcycleRate: options.upcycleRate,
  };
  const steps = await Promise.race([generate(ctx), sleep(options.timeoutMs)]);
  if (steps === "timeout")
    throw new Error(
      `fuzz harness: generating ${format} case ${index} took over ${options.timeoutMs} ms (${ctx.notes.join(", ")})`,
    );
  if (options.generateOnly) {
    await unblockFifos(ctx.fifos);
    await rm(dir, { recursive: true, force: true });
    return {
      format,
      index,
      outcome: "(not run)",
      step: steps.map((s) => s.name).join(", "),
      ms: 0,
      notes: ctx.notes,
      violations: [],
    };
  }
  const before = await snapshot(dir);
  const violations: string[] = [];
  current = violations;
  const record = { step: "(none)" };
  const started = performance.now();
  const result = await Promise.race([runSteps(steps, record, violations), sleep(options.timeoutMs)]);
  const ms = performance.now() - started;
  current = undefined;
  await unblockFifos(ctx.fifos);
  let fatal = false;
  let outcome: string;
  let message: string | undefined;
  if (result === "timeout") {
    violations.push(`no result within ${options.timeoutMs} ms (step ${record.step})`);
    outcome = "VIOLATION";
    fatal = true;
  } else {
    ({ outcome, message } = result);
    const changes = compareSnapshots(before, await snapshot(dir));
    violations.push(...changes.map((change) => `files outside the output: ${change}`));
  }
  if (!fatal) await rm(dir, { recursive: true, force: true });
  const strays = fatal ? [] : await readdir(options.root);
  if (strays.length > 0) {
    violations.push(`files beside the case folder: ${strays.slice(0, 3).join(", ")}`);
    for (const stray of strays) await rm(join(options.root, stray), { recursive: true, force: true });
  }
  if (violations.length > 0) outcome = "VIOLATION";
  return { format, index, outcome, step: record.step, ms, notes: ctx.notes, message, violations, fatal };
}

/** Adds an upcycle step with the case's sampling rate; `always` forces it. */
export function maybeUpcycle(ctx: CaseContext, options: () => UpcycleOptions, always = false): Step[] {
  if (!always && !ctx.rng.chance(ctx.upcycleRate)) return [];
  const dryRun = ctx.rng.chance(0.2);
  return [{ name: dryRun ? "planUpcycle" : "upcycle", upcycle: options, dryRun }];
}
