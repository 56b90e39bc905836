/**
 * The merge API: `planUpcycle(options)` reads the seeds' configs and headers
 * (no tensor data, no writes) and returns the plan; `upcycle(options)` runs
 * it into an atomic output folder.
 */
import { copyFile, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { openSeed, type Seed } from "../arch/index.js";
import { sideFiles, writeInto, writeSideFiles } from "../arch/folder.js";
import { BamError } from "../errors.js";
import { openAtomicFolder } from "../export/atomic.js";
import { modelCard } from "../export/card.js";
import { formatDefaults, formatWriter } from "../export/formats.js";
import { resolveSeed, type DownloadProgress } from "../hub/index.js";
import { shardedFileBytes, writeShardedSafetensors, type TensorToWrite } from "../safetensors/index.js";
import { tensorsToWrite } from "./execute.js";
import { AveragePool } from "./average.js";
import { filesToHash, hashSeeds, type HashedSeed } from "./hash-seeds.js";
import { checkOptions, recipeYaml, resolveOptions, type UpcycleOptions } from "./options.js";
import { buildPlan, checkSeeds, inputModels, type UpcyclePlan } from "./plan.js";
import { promptRouterRows, promptsLabel, readPlanPrompts } from "./router-init.js";

export type { UpcycleOptions, ResolvedOptions } from "./options.js";
export type { UpcyclePlan, PlannedTensor, Operation, SourceRef, SeedInfo, PlanSummary } from "./plan.js";
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
  /** Each seed's record with the sha256 of each of its files. */
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

function planFor(options: UpcycleOptions, seeds: Seed[]): UpcyclePlan {
  checkSeeds(seeds);
  const first = seeds[0]!;
  const implied = formatDefaults(options.format); // what the format needs, where the user chose nothing
  const withFormat: UpcycleOptions = {
    ...options,
    attention: options.attention ?? implied.attention,
    block: options.block ?? implied.block,
    normTopkProb: options.normTopkProb ?? implied.normTopkProb,
  };
  const resolved = resolveOptions(withFormat, first.features.parallelBlock ? "parallel" : "sequential");
  const plan = buildPlan(seeds, resolved);
  formatWriter(resolved.format, plan.features, plan.moe, plan.tensors[0]!.dtype, first.rawConfig); // refuses a format that cannot hold the model
  return plan;
}

/** The plan of an upcycle: pure apart from reading the seeds' configs and headers (and downloading Hub ids the cache lacks). */
export async function planUpcycle(options: UpcycleOptions, hooks: SeedHooks = {}): Promise<UpcyclePlan> {
  checkOptions(options); // before any file is opened: the API refuses what the CLI refuses
  return withSeeds(inputModels(options), hooks, async (seeds) => {
    const plan = planFor(options, seeds);
    await sideFiles(seeds[0]!.dir);
    return plan;
  });
}

/** Runs the upcycle; the output folder appears complete or not at all. */
export async function upcycle(
  options: UpcycleOptions,
  hooks: SeedHooks & {
    /** Called as the weight files are written. */
    onProgress?: (progress: UpcycleProgress) => void;
  } = {},
): Promise<UpcycleResult> {
  checkOptions(options); // before any file is opened: the API refuses what the CLI refuses
  const started = performance.now();
  return withSeeds(inputModels(options), hooks, async (seeds) => {
    const plan = planFor(options, seeds);
    const copied = await sideFiles(seeds[0]!.dir);
    const inputs = [...seeds.flatMap((seed) => [seed.dir, ...filesToHash(seed).files]), ...(typeof plan.options.prompts === "string" ? [plan.options.prompts] : [])];
    const folder = await openAtomicFolder(plan.options.output, { force: plan.options.force, inputs });
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
      const routerRows = prompts === undefined
        ? undefined
        : await promptRouterRows(plan, seeds, prompts, promptsLabel(source!), hooks.signal, (done, total) => report("router-init", done, total));
      const writer = formatWriter(plan.options.format, plan.features, plan.moe, plan.tensors[0]!.dtype, seeds[0]!.rawConfig);
      let current = "";
      // With several batches in flight, "current" is the tensor whose production started last.
      const tensors = tensorsToWrite(plan, seeds, averages, writer.rename, routerRows).map((t): TensorToWrite => ("fill" in t
        ? { ...t, fill: (offset, into) => ((current = t.name), t.fill(offset, into)) }
        : { ...t, data: () => ((current = t.name), t.data()) }));
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
      plan.moe.upcycledFrom = seedHashes.map(({ name, sha256 }) => ({ name, sha256 }));
      const config = { ...writer.config };
      if (writer.remoteCode) config.upcycled_from = seedHashes;
      const recipe = recipeYaml(plan.options, prompts);
      await writeOutputFiles(folder.path, seeds[0]!, copied, {
        "config.json": `${JSON.stringify(config, null, 2)}\n`,
        "recipe.yaml": recipe,
        "README.md": modelCard(plan, recipe, writer.remoteCode, seeds),
      }, writer.remoteCode);
      if (hooks.signal?.aborted) throw new BamError("ABORTED", `${plan.options.output}: interrupted; nothing was written`);
      await folder.commit();
      return {
        output: plan.options.output,
        plan,
        files: written.files.map((file) => join(plan.options.output, basename(file))), // where they are now, not the temp folder
        bytesWritten,
        seconds: (performance.now() - started) / 1000,
        seeds: seedHashes,
      };
    } catch (error) {
      hashing.cancel();
      await averages.close();
      await folder.discard();
      if (hooks.signal?.aborted && !(error instanceof BamError && error.code === "ABORTED")) {
        throw new BamError("ABORTED", `${plan.options.output}: interrupted; nothing was written`, { cause: error });
      }
      throw folder.explain(error);
    }
  });
}

/** Everything but the weights: the first seed's side files, the remote code (BAM folder) and the generated files. */
async function writeOutputFiles(dir: string, firstSeed: Seed, copied: readonly string[], generated: Record<string, string>, remoteCode: boolean): Promise<void> {
  await writeSideFiles(firstSeed.dir, copied, dir, firstSeed.rawConfig);
  if (remoteCode) {
    for (const file of ["configuration_bam.py", "modeling_bam.py"]) await writeInto(dir, file, (path) => copyFile(join(PYTHON_DIR, file), path));
  }
  for (const [file, text] of Object.entries(generated)) await writeInto(dir, file, (path) => writeFile(path, text));
}
