/**
 * The merge API: `planUpcycle(options)` reads the seeds' configs and headers
 * (no tensor data, no writes) and returns the plan, frozen plain data;
 * `executePlan(plan)` checks the plan against the seeds as they are now and
 * runs it into an atomic output folder; `upcycle(options)` is the two.
 */
import { copyFile, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { openSeed, type Seed } from "../arch/index.js";
import { sideFiles, writeInto, writeSideFiles } from "../arch/folder.js";
import { BamError, isBamError } from "../errors.js";
import { openAtomicFolder } from "../export/atomic.js";
import { modelCard, type CardModel } from "../export/card.js";
import { configJson, formatDefaults, formatTensorName } from "../export/formats.js";
import { resolveSeed, type DownloadProgress } from "../hub/index.js";
import { shardedFileBytes, writeShardedSafetensors, type TensorToWrite } from "../safetensors/index.js";
import { tensorsToWrite } from "./execute.js";
import { AveragePool } from "./average.js";
import { filesToHash, hashSeeds, type HashedSeed } from "./hash-seeds.js";
import {
  checkOptions,
  checkWriteOptions,
  recipeYaml,
  resolveOptions,
  type ResolvedOptions,
  type UpcycleOptions,
} from "./options.js";
import { buildPlan, checkSeeds, inputModels, seedFiles, type UpcyclePlan } from "./plan.js";
import { promptRouterRows, promptsLabel, readPlanPrompts } from "./router-init.js";

export type { UpcycleOptions, ResolvedOptions } from "./options.js";
export type { UpcyclePlan, PlannedTensor, Operation, SourceRef, SeedInfo, SeedFile, PlanSummary } from "./plan.js";
export type { FormatPlan, FormatMoe } from "../export/formats.js";
export type { DownloadProgress } from "../hub/index.js";
export { readRecipe, recipeYaml } from "./options.js";

/**
 * The long stages of an upcycle, in this order: "router-init" (with
 * routerInit "hidden" or "cheap-embed": prompts run through the averaged
 * model), "writing" (the output's bytes) and "hashing" (seed files whose
 * sha256 for upcycled_from is still unknown when the writing ends; at least
 * one event, done = total = 0 when every hash was known or done).
 */
export type UpcycleStage = "router-init" | "writing" | "hashing";

export interface UpcycleProgress {
  /** The stage this event reports. */
  stage: UpcycleStage;
  /** Progress of this stage: prompts for "router-init", bytes otherwise. */
  done: number;
  /** The stage's total, in the unit of done. */
  total: number;
  /** Output bytes written so far (0 before "writing"). */
  bytesWritten: number;
  /** Bytes of the output in all. */
  totalBytes: number;
  /** Output tensor being written ("writing" only). */
  tensor: string;
}

/** Seeds given by Hugging Face id and missing from the cache are downloaded first. */
export interface SeedHooks {
  /** Progress of each Hub seed being downloaded. */
  onDownload?: (progress: DownloadProgress) => void;
  /** Stops the run (ABORTED); a partial output is removed. */
  signal?: AbortSignal;
}

export interface UpcycleHooks extends SeedHooks {
  /** Called as the output is made, stage by stage. */
  onProgress?: (progress: UpcycleProgress) => void;
}

export interface UpcycleResult {
  /** The output folder. */
  output: string;
  /** The plan that was run. */
  plan: UpcyclePlan;
  /** The weight files written, at their final paths. */
  files: string[];
  /** Bytes written into the weight files. */
  bytesWritten: number;
  /** Wall time of the run. */
  seconds: number;
  /** Each seed's record with the sha256 of each of its files: config.json's upcycled_from (BAM format). */
  seeds: HashedSeed[];
}

/** Marks the shards as PyTorch weights, as transformers writes them. */
const SHARD_METADATA = { format: "pt" };
const PYTHON_DIR = fileURLToPath(new URL("../../../python/", import.meta.url));

/** Seeds are folders or Hugging Face ids (src/hub: found in the cache or downloaded into it), named by repo id where they have one. */
async function withSeeds<T>(refs: string[], hooks: SeedHooks, body: (seeds: Seed[]) => Promise<T>): Promise<T> {
  const seeds: Seed[] = [];
  try {
    for (const ref of refs) {
      if (hooks.signal?.aborted) throw new BamError("ABORTED", `${ref}: interrupted before the seed was read`);
      const source = await resolveSeed(ref, { onDownload: hooks.onDownload, signal: hooks.signal });
      seeds.push(await openSeed(source.dir, source.name));
    }
    return await body(seeds);
  } finally {
    await Promise.all(seeds.map((s) => s.close()));
  }
}

/** The options, resolved for these seeds with the defaults the output format implies. */
function resolveFor(options: UpcycleOptions, seeds: Seed[]): ResolvedOptions {
  checkSeeds(seeds);
  const implied = formatDefaults(options.format); // what the format needs, where the user chose nothing
  const withFormat: UpcycleOptions = {
    ...options,
    attention: options.attention ?? implied.attention,
    block: options.block ?? implied.block,
    normTopkProb: options.normTopkProb ?? implied.normTopkProb,
  };
  return resolveOptions(withFormat, seeds[0]!.features.parallelBlock ? "parallel" : "sequential");
}

/** The plan of open seeds: their configs, headers and file records. */
async function planFor(options: UpcycleOptions, seeds: Seed[]): Promise<UpcyclePlan> {
  return buildPlan(seeds, resolveFor(options, seeds), await Promise.all(seeds.map(seedFiles)));
}

/** The plan of an upcycle: pure apart from reading the seeds' configs and headers (and downloading Hub ids the cache lacks). */
export async function planUpcycle(options: UpcycleOptions, hooks: SeedHooks = {}): Promise<UpcyclePlan> {
  checkOptions(options); // before any file is opened: the API refuses what the CLI refuses
  return withSeeds(inputModels(options), hooks, async (seeds) => {
    const plan = await planFor(options, seeds);
    await sideFiles(seeds[0]!.dir);
    return plan;
  });
}

/**
 * Runs a plan (planUpcycle's, or its JSON parsed back); the output folder
 * appears complete or not at all. The plan is checked first, against the
 * seeds it names as they are now: PLAN_STALE when a seed's files changed
 * since planning, PLAN_INVALID when the plan is not what its options give
 * for these seeds (edited, or made by another version or elsewhere).
 */
export async function executePlan(plan: UpcyclePlan, hooks: UpcycleHooks = {}): Promise<UpcycleResult> {
  const started = performance.now();
  const options = optionsOfPlan(plan);
  return withSeeds(inputModels(options), hooks, async (seeds) => {
    const checked = await replan(plan, options, seeds);
    return execute(checked, options.output, seeds, hooks, started);
  });
}

/**
 * Plans and runs the upcycle, as planUpcycle then executePlan would, with the
 * seeds opened and planned once; the output folder appears complete or not at all.
 */
export async function upcycle(options: UpcycleOptions, hooks: UpcycleHooks = {}): Promise<UpcycleResult> {
  checkWriteOptions(options); // before any file is opened: the API refuses what the CLI refuses
  const started = performance.now();
  return withSeeds(inputModels(options), hooks, async (seeds) =>
    execute(await planFor(options, seeds), options.output, seeds, hooks, started),
  );
}

const notAPlan = (why: string) =>
  new BamError("PLAN_INVALID", `plan: ${why}; pass what planUpcycle returned (or its JSON parsed back), unedited`);

/** The options a plan was made from, as UpcycleOptions: planning them again must give the same plan; a plan to run names its output. */
function optionsOfPlan(plan: unknown): UpcycleOptions & { output: string } {
  const o = (plan as { options?: unknown } | null)?.options;
  if (o === null || typeof o !== "object" || Array.isArray(o))
    throw notAPlan(plan === null || typeof plan !== "object" ? "not an object" : "has no options");
  const r = o as ResolvedOptions;
  const options: UpcycleOptions = readable(() => ({
    seeds: r.seeds,
    output: r.output ?? undefined,
    attention: r.attention,
    block: r.block,
    experts: Array.isArray(r.seeds) && r.seeds.length === 1 ? r.experts : undefined,
    dropRatio: r.dropRatio,
    expertsPerToken: r.expertsPerToken,
    normTopkProb: r.normTopkProb,
    weights: r.sharedFrom === null ? r.weights : undefined, // implied (uniform) with sharedFrom
    sharedFrom: r.sharedFrom ?? undefined,
    routerInit: r.routerInit,
    prompts: r.prompts ?? undefined,
    routerScale: r.routerScale,
    seed: r.seed,
    dtype: r.dtype,
    maxShardSize: r.maxShardBytes,
    format: r.format,
    force: r.force,
    routerAuxLossCoef: r.routerAuxLossCoef,
    routerZLossCoef: r.routerZLossCoef,
    name: r.name ?? undefined,
  }));
  return inPlanWords(() => {
    checkWriteOptions(options);
    return options;
  });
}

/** Runs `body`, its OPTIONS_INVALID reworded as the plan's. */
function inPlanWords<T>(body: () => T): T {
  try {
    return body();
  } catch (error) {
    if (isBamError(error, "OPTIONS_INVALID")) throw notAPlan(`options: ${error.message}`);
    throw error;
  }
}

/**
 * The plan again, from `plan`'s options and the seeds now: refused unless
 * it is `plan` itself, fact for fact (PLAN_STALE where a seed changed,
 * PLAN_INVALID for anything else). The run then works from this copy, never
 * from the object it was handed.
 */
async function replan(plan: UpcyclePlan, options: UpcycleOptions, seeds: Seed[]): Promise<UpcyclePlan> {
  const resolved = inPlanWords(() => resolveFor(options, seeds));
  // Normalising weights that already sum to 1 can move them by an ulp: the plan's own stand when they are that close.
  const given = options.weights;
  const weights =
    Array.isArray(given) &&
    given.length === resolved.weights.length &&
    given.every((w, i) => Math.abs(w - resolved.weights[i]!) <= 1e-12)
      ? given
      : resolved.weights;
  const files = await Promise.all(seeds.map(seedFiles));
  const checked = inPlanWords(() => buildPlan(seeds, { ...resolved, weights }, files));
  readable(() => checkFresh(plan, checked));
  const found = readable(() => difference(plan, checked, "plan"));
  if (found !== undefined) {
    throw new BamError(
      "PLAN_INVALID",
      `${found.path} is ${shown(found.given)} in the plan, but ${shown(found.expected)} from its options and seeds (it was edited, or made by another version of bam-upcycle or on another machine); make the plan again with planUpcycle`,
    );
  }
  return checked;
}

/** Reads a handed plan: what is not plain data (a getter that throws, a revoked proxy) is PLAN_INVALID, not a stack trace. */
function readable<T>(read: () => T): T {
  try {
    return read();
  } catch (error) {
    if (error instanceof BamError) throw error;
    throw notAPlan(`cannot be read (${(error as Error | undefined)?.message ?? String(error)})`);
  }
}

/** Refuses a plan made before one of its seeds changed: another folder, other files, or files of another size or time. */
function checkFresh(plan: UpcyclePlan, checked: UpcyclePlan): void {
  const stale = (where: string, what: string) =>
    new BamError("PLAN_STALE", `${where}: ${what} since the plan was made; make the plan again with planUpcycle`);
  for (const [i, seed] of checked.seeds.entries()) {
    const was: unknown = Array.isArray(plan.seeds) ? plan.seeds[i] : undefined;
    if (was === null || typeof was !== "object") continue; // no seed record at all: the comparison calls the plan invalid
    const { dir, files } = was as { dir?: unknown; files?: unknown };
    if (dir !== seed.dir)
      throw stale(`seed ${plan.options.seeds[i] ?? plan.options.sharedFrom}`, `is now ${seed.dir}, not ${shown(dir)},`);
    const changed = () =>
      stale(seed.dir, `its files are now ${seed.files.map((f) => basename(f.path)).join(", ")}: they changed`);
    if (!Array.isArray(files) || files.length !== seed.files.length) throw changed();
    for (const [j, file] of seed.files.entries()) {
      const before = files[j] as Partial<typeof file> | undefined;
      if (before?.path !== file.path) throw changed();
      if (before.bytes !== file.bytes)
        throw stale(file.path, `is now ${file.bytes} bytes, not ${shown(before.bytes)}: it changed`);
      if (before.modifiedMs !== file.modifiedMs) throw stale(file.path, "was modified");
    }
  }
}

/** The first place where `given` is not `expected` (plain data: undefined and absent are alike), with both values there. */
function difference(
  given: unknown,
  expected: unknown,
  path: string,
): { path: string; given: unknown; expected: unknown } | undefined {
  if (expected === null || typeof expected !== "object")
    return given === expected ? undefined : { path, given, expected };
  if (given === null || typeof given !== "object" || Array.isArray(given) !== Array.isArray(expected))
    return { path, given, expected };
  if (Array.isArray(expected)) {
    const list = given as unknown[];
    if (list.length !== expected.length)
      return { path: `${path}.length`, given: list.length, expected: expected.length };
    for (const [i, item] of expected.entries()) {
      const found = difference(list[i], item, `${path}[${i}]`);
      if (found !== undefined) return found;
    }
    return undefined;
  }
  const a = given as Record<string, unknown>;
  const b = expected as Record<string, unknown>;
  for (const key of new Set([...Object.keys(b), ...Object.keys(a)])) {
    const found = difference(
      Object.hasOwn(a, key) ? a[key] : undefined,
      Object.hasOwn(b, key) ? b[key] : undefined,
      `${path}.${key}`,
    );
    if (found !== undefined) return found;
  }
  return undefined;
}

/** A value in a message: short JSON, or its kind. */
function shown(value: unknown): string {
  if (value === undefined) return "absent";
  if (value !== null && typeof value === "object")
    return Array.isArray(value) ? `a list of ${value.length}` : "an object";
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 80)}...` : text;
}

/** What the model card says of a plan. */
function cardModel(plan: UpcyclePlan, output: string): CardModel {
  return {
    output,
    title: plan.options.name,
    family: plan.features.family,
    seedNames: plan.seeds.map((seed) => seed.name),
    dropRatio: plan.options.dropRatio,
    moe: plan.moe,
    totalParameters: plan.summary.totalParameters,
    activeParameters: plan.summary.activeParameters,
    flopsPerTokenRatio: plan.summary.flopsPerTokenRatio,
    warnings: plan.warnings,
  };
}

/** Writes a checked plan from the open seeds into its atomic output folder. */
async function execute(
  plan: UpcyclePlan,
  output: string,
  seeds: Seed[],
  hooks: UpcycleHooks,
  started: number,
): Promise<UpcycleResult> {
  const copied = await sideFiles(seeds[0]!.dir);
  const inputs = [
    ...seeds.flatMap((seed) => [seed.dir, ...filesToHash(seed).files]),
    ...(typeof plan.options.prompts === "string" ? [plan.options.prompts] : []),
  ];
  const folder = await openAtomicFolder(output, { force: plan.options.force, inputs });
  let bytesWritten = 0;
  let totalBytes = 0;
  let hashed: [number, number] | undefined; // bytes hashed and to hash, once the hashing threads know
  let writing = true; // hashing runs behind the copy; its progress is shown once the copy is done
  const report = (stage: UpcycleStage, done: number, total: number, tensor = "") =>
    hooks.onProgress?.({ stage, done, total, bytesWritten, totalBytes, tensor });
  const hashing = hashSeeds(seeds.map(filesToHash), (done, total) => {
    hashed = [done, total];
    if (!writing) report("hashing", done, total);
  });
  const averages = new AveragePool();
  try {
    const source = plan.options.prompts;
    const prompts = source === null ? undefined : await readPlanPrompts(plan, source);
    const routerRows =
      prompts === undefined
        ? undefined
        : await promptRouterRows(plan, seeds, prompts, promptsLabel(source!), hooks.signal, (done, total) =>
            report("router-init", done, total),
          );
    let current = "";
    // With several batches in flight, "current" is the tensor whose production started last.
    const tensors = tensorsToWrite(
      plan,
      seeds,
      averages,
      (name) => formatTensorName(plan.format, name),
      routerRows,
    ).map(
      (t): TensorToWrite =>
        "fill" in t
          ? {
              ...t,
              fill: (offset, into) => {
                current = t.name;
                return t.fill(offset, into);
              },
            }
          : {
              ...t,
              data: () => {
                current = t.name;
                return t.data();
              },
            },
    );
    totalBytes = shardedFileBytes(tensors, plan.options.maxShardBytes, SHARD_METADATA);
    const written = await writeShardedSafetensors(folder.path, tensors, {
      maxShardBytes: plan.options.maxShardBytes,
      metadata: SHARD_METADATA,
      buffers: averages.buffers,
      signal: hooks.signal,
      onBytes: (n) => {
        bytesWritten += n;
        report("writing", bytesWritten, totalBytes, current);
      },
    });
    await averages.close();
    writing = false;
    report("hashing", ...(hashed ?? [0, 0]));
    const seedHashes = await hashing.result;
    for (const seed of seeds) await seed.checkUnchanged(); // what was read and hashed is one version of each seed
    const recipe = recipeYaml(plan.options, prompts);
    await writeOutputFiles(
      folder.path,
      seeds[0]!,
      copied,
      {
        "config.json": configJson(plan.format, seedHashes),
        "recipe.yaml": recipe,
        "README.md": modelCard(cardModel(plan, output), recipe, plan.format.remoteCode, seeds),
      },
      plan.format.remoteCode,
    );
    if (hooks.signal?.aborted) throw new BamError("ABORTED", `${output}: interrupted; nothing was written`);
    await folder.commit();
    return {
      output,
      plan,
      files: written.files.map((file) => join(output, basename(file))), // where they are now, not the temp folder
      bytesWritten,
      seconds: (performance.now() - started) / 1000,
      seeds: seedHashes,
    };
  } catch (error) {
    hashing.cancel();
    await averages.close();
    await folder.discard();
    if (hooks.signal?.aborted && !(error instanceof BamError && error.code === "ABORTED")) {
      throw new BamError("ABORTED", `${output}: interrupted; nothing was written`, { cause: error });
    }
    throw folder.explain(error);
  }
}

/** The output's side files: the first seed's (checked by sideFiles), the model code for trust_remote_code, and the generated files. */
async function writeOutputFiles(
  dir: string,
  firstSeed: Seed,
  copied: readonly string[],
  generated: Record<string, string>,
  remoteCode: boolean,
): Promise<void> {
  await writeSideFiles(firstSeed.dir, copied, dir, firstSeed.rawConfig);
  if (remoteCode) {
    for (const file of ["configuration_bam.py", "modeling_bam.py"])
      await writeInto(dir, file, (path) => copyFile(join(PYTHON_DIR, file), path));
  }
  for (const [file, text] of Object.entries(generated)) await writeInto(dir, file, (path) => writeFile(path, text));
}
