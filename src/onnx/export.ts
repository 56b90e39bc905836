/**
 * The exported folder: what transformers.js loads as a causal LM from local
 * files (config.json, generation_config.json, the tokenizer files and
 * onnx/model.onnx with its external weights), plus `bam-onnx.json`, the key
 * of the weights it was built from.
 *
 * `prepareOnnx` is both `bam export-onnx` and the on-demand cache of
 * `bam eval` and `bam generate`. Unless told where (`output`), the folder is
 * in the user's cache (`cacheDir`, else BAM_CACHE_DIR, XDG_CACHE_HOME or
 * ~/.cache: src/cache-dir.ts), `onnx/<model folder name>-<key>`: never in the
 * model folder, which may be read-only, under version control or a Hugging
 * Face cache snapshot. A folder whose key matches is reused; a model whose
 * key changed gets a new folder, and the folders of its earlier keys (their
 * stamps name the same model folder) are removed once the new one is complete,
 * as are the exports of model folders that no longer exist.
 *
 * The key hashes this engine's version, config.json, each weight file's
 * name, size, modification time and safetensors header (as the validating
 * reader parses it), and the side files' names, sizes and times (tokenizer,
 * generation_config.json: src/arch/folder.ts). Rewriting weights
 * (save_pretrained, an upcycle, fine-tuning) changes times and usually
 * headers, so the key catches it without reading gigabytes of data on
 * every run; hashing the data itself would cost seconds to minutes per call
 * on real models. (The device and inode add nothing here: a copied folder
 * has new times anyway, and the same weights at another path may share an
 * export.)
 *
 * Weights are stored as float32 whatever their dtype: onnxruntime's CPU
 * provider has no bf16 kernels for MatMul or Gemm, so bf16 initializers
 * would each need a Cast, which onnxruntime folds back into float32 copies
 * at load: half the disk, the same memory, and a second graph to keep exact.
 */
import { createHash } from "node:crypto";
import { mkdir, readdir, readFile, realpath, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve, sep } from "node:path";
import { sideFiles, tokenIdsOrNull, writeInto, writeSideFiles } from "../arch/folder.js";
import { openModel, type OpenedModel } from "../arch/model.js";
import { userCacheDir } from "../cache-dir.js";
import { BamError, ioError } from "../errors.js";
import { openAtomicFolder } from "../export/atomic.js";
import { SafetensorsReader } from "../safetensors/index.js";
import { buildGraph, cacheLayout, OPSET, type BuildOptions } from "./build.js";
import { GENERATE_FILE, MODEL_FILE, SCORE_FILE, writeModel } from "./write.js";

/** Bump when the graph a model produces changes: every cached export is rebuilt. */
export const ENGINE_VERSION = 5;
export const STAMP_FILE = "bam-onnx.json";
const ONNX_SUBFOLDER = "onnx";
/** The exports' folder inside the user cache. */
const EXPORTS_SUBFOLDER = "onnx";
const PRODUCER_VERSION = "0.1.0";

export interface PrepareOptions {
  /** Export folder; default: a folder in the cache (see the file comment). */
  output?: string;
  /** The cache folder that holds exports by default; default: userCacheDir() (BAM_CACHE_DIR, XDG_CACHE_HOME or ~/.cache). */
  cacheDir?: string;
  /** Rebuild even when the folder is up to date; replace a folder that is not an export. */
  force?: boolean;
  /** Stops the export (ABORTED); nothing is left behind. */
  signal?: AbortSignal;
  /** Bytes of weights written, while building. */
  onProgress?: (written: number, total: number) => void;
}

export interface PreparedOnnx {
  /** The transformers.js folder. */
  folder: string;
  /** Its onnx/model.onnx. */
  modelFile: string;
  /** Its onnx/score.onnx: the scoring graph (BuildOptions.cache "none"). */
  scoreFile: string;
  /** false when an up-to-date export was reused. */
  built: boolean;
  /** Hash of what the export was built from (engine version, config, weight files); see the file comment. */
  key: string;
}

export async function prepareOnnx(modelDir: string, options: PrepareOptions = {}): Promise<PreparedOnnx> {
  const model = await openModel(modelDir);
  try {
    const side = await sideFiles(model.dir);
    const key = await sourceKey(model, side);
    const realDir = await realSource(modelDir); // the stamp's source: exports name the folder, not a link to it
    const folder = resolve(options.output ?? cacheFolder(realDir, key, options.cacheDir));
    const source = resolve(modelDir);
    if (source === folder || source.startsWith(`${folder}${sep}`)) {
      throw new BamError(
        "OPTIONS_INVALID",
        `${folder}: the export would replace the model folder ${modelDir}; choose another output folder`,
      );
    }
    const modelFile = join(folder, ONNX_SUBFOLDER, MODEL_FILE);
    const scoreFile = join(folder, ONNX_SUBFOLDER, SCORE_FILE);
    const stamp = await readStamp(folder);
    if (stamp?.key === key && !options.force) return { folder, modelFile, scoreFile, built: false, key };
    // a stale export of ours is replaced without asking; anything else needs --force
    const target = await openAtomicFolder(folder, {
      force: options.force === true || stamp !== null,
      inputs: [],
      ours: async (dir) => (await readStamp(dir)) !== null,
    });
    try {
      await mkdir(join(target.path, ONNX_SUBFOLDER));
      await writeOnnx(model, join(target.path, ONNX_SUBFOLDER), {
        signal: options.signal,
        onProgress: options.onProgress,
      });
      await writeFolderFiles(model, side, target.path);
      // cached: a build of the cache, which removeStaleExports may remove once its model folder is gone
      const stamp = { key, engine: ENGINE_VERSION, source: realDir, cached: options.output === undefined };
      await writeFile(join(target.path, STAMP_FILE), `${JSON.stringify(stamp, null, 2)}\n`);
      await target.commit();
    } catch (error) {
      await target.discard();
      throw error;
    }
    if (options.output === undefined) await removeStaleExports(folder, realDir, key);
    return { folder, modelFile, scoreFile, built: true, key };
  } finally {
    await model.close();
  }
}

/** Builds `model`'s graphs and writes model.onnx, generate.onnx and score.onnx (generation's and scoring's, see BuildOptions.cache; model.onnx alone with probes) and their model.onnx_data into `dir`. */
export async function writeOnnx(
  model: OpenedModel,
  dir: string,
  options: BuildOptions & { signal?: AbortSignal; onProgress?: (written: number, total: number) => void } = {},
): Promise<void> {
  const graph = buildGraph(model, { probes: options.probes });
  await writeModel(graph, dir, {
    opset: OPSET,
    producerVersion: PRODUCER_VERSION,
    metadata: {
      source: model.name,
      kind: model.kind,
      attention_experts: model.moe.attentionExperts,
      block: model.moe.block,
    },
    signal: options.signal,
    onProgress: options.onProgress,
    // a probing graph (router init's, in a temporary folder) is run alone
    siblings: options.probes
      ? []
      : [
          { file: GENERATE_FILE, graph: buildGraph(model, { cache: "slots" }) },
          { file: SCORE_FILE, graph: buildGraph(model, { cache: "none" }) },
        ],
  });
}

/** config.json for transformers.js: a generic decoder (llama) with the cache dims of our graph. */
function transformersConfig(model: OpenedModel): Record<string, unknown> {
  const f = model.features;
  const cache = cacheLayout(model);
  const raw = model.rawConfig;
  return {
    // transformers.js runs any decoder graph with these inputs and outputs as its llama class;
    // the cache shapes come from the graph's inputs, and agree with these numbers
    model_type: "llama",
    architectures: ["LlamaForCausalLM"],
    vocab_size: f.vocabSize,
    hidden_size: f.hiddenSize,
    num_hidden_layers: cache.layers,
    num_attention_heads: cache.queryHeads,
    num_key_value_heads: cache.heads,
    head_dim: cache.headDim,
    max_position_embeddings: f.maxPositions,
    ...tokenIdsOrNull(raw),
    // no use_external_data_format: in Node, onnxruntime finds onnx/model.onnx_data by itself, while
    // transformers.js 4.3 would also stream the whole data file into memory in the background (its
    // FileResponse reads eagerly); a browser user passes use_external_data_format: true instead
    "transformers.js_config": { dtype: "fp32" },
    bam_onnx: {
      note: "ONNX export by bam-upcycle; the graph, not this config, defines the model",
      source_model_type: raw.model_type ?? null,
      seed_model_type: f.family,
      num_experts: model.moe.numExperts,
      num_experts_per_tok: model.moe.expertsPerToken,
      norm_topk_prob: model.moe.normTopkProb,
      attention_experts: model.moe.attentionExperts,
      block: model.moe.block,
    },
  };
}

/** The model's side files (`side`, from sideFiles) and config.json for transformers.js. */
async function writeFolderFiles(model: OpenedModel, side: readonly string[], dir: string): Promise<void> {
  await writeSideFiles(model.dir, side, dir, model.rawConfig);
  // transformers.js's AutoTokenizer needs a tokenizer_config.json, even an empty one
  if (side.includes("tokenizer.json") && !side.includes("tokenizer_config.json"))
    await writeInto(dir, "tokenizer_config.json", (path) => writeFile(path, "{}\n"));
  await writeInto(dir, "config.json", (path) =>
    writeFile(path, `${JSON.stringify(transformersConfig(model), null, 2)}\n`),
  );
}

async function sourceKey(model: OpenedModel, side: readonly string[]): Promise<string> {
  const hash = createHash("sha256").update(`bam-onnx engine ${ENGINE_VERSION}\n`);
  const configPath = join(model.dir, "config.json");
  try {
    hash.update(await readFile(configPath));
    for (const file of [...model.files, ...side.map((name) => join(model.dir, name))]) {
      const info = await stat(file);
      hash.update(`\n${basename(file)} ${info.size} ${info.mtimeMs}\n`);
      if (file.endsWith(".safetensors")) hash.update(await headerKey(file));
    }
  } catch (error) {
    throw ioError(model.dir, error);
  }
  return hash.digest("hex");
}

/** A weights file's header as the validating reader parses it: data offset, metadata, and each tensor's name, dtype, shape and byte range. */
async function headerKey(file: string): Promise<string> {
  const reader = await SafetensorsReader.open(file);
  try {
    const tensors = [...reader.tensors.values()].map(({ name, dtype, shape, byteOffset, byteLength }) => [
      name,
      dtype,
      shape,
      byteOffset,
      byteLength,
    ]);
    return JSON.stringify([reader.headerLength, reader.metadata, tensors]);
  } finally {
    await reader.close();
  }
}

async function readStamp(folder: string): Promise<{ key: string; source?: string; cached: boolean } | null> {
  try {
    const stamp = JSON.parse(await readFile(join(folder, STAMP_FILE), "utf8")) as {
      key?: unknown;
      source?: unknown;
      cached?: unknown;
    };
    return typeof stamp.key === "string"
      ? {
          key: stamp.key,
          ...(typeof stamp.source === "string" ? { source: stamp.source } : {}),
          cached: stamp.cached === true,
        }
      : null;
  } catch {
    return null; // no export there (or a broken one): build
  }
}

async function realSource(modelDir: string): Promise<string> {
  return realpath(modelDir).catch((error: unknown) => {
    throw ioError(modelDir, error);
  });
}

/** `<cache>/onnx/<model folder name>-<key>` (of the folder's real path): the model's content names its export. */
function cacheFolder(realDir: string, key: string, cacheDir: string | undefined): string {
  return join(cacheDir ?? userCacheDir(), EXPORTS_SUBFOLDER, `${basename(realDir)}-${key.slice(0, 16)}`);
}

/**
 * Removes the cache's stale exports: siblings of `folder` named like an
 * export (`<name>-<16 hex digits>`) holding our stamp, that are either this
 * model folder's earlier keys or cache builds (not `bam export-onnx -o`
 * folders, which may be all a user keeps) of a model folder that no longer
 * exists. Nothing without a stamp is touched, nor the export of a folder that
 * exists but cannot be read.
 */
async function removeStaleExports(folder: string, source: string, key: string): Promise<void> {
  const parent = dirname(folder);
  for (const entry of await readdir(parent).catch(() => [] as string[])) {
    const other = join(parent, entry);
    if (other === folder || !/^.+-[0-9a-f]{16}$/.test(entry)) continue;
    const stamp = await readStamp(other);
    if (stamp?.source === undefined) continue;
    const earlierKey = stamp.source === source && stamp.key !== key && entry.startsWith(`${basename(source)}-`);
    if (earlierKey || (stamp.cached && stamp.source !== source && (await isGone(stamp.source))))
      await rm(other, { recursive: true, force: true });
  }
}

/** Whether nothing is at `path` (as opposed to something this process cannot read). */
async function isGone(path: string): Promise<boolean> {
  try {
    await stat(path);
    return false;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code === "ENOENT" || code === "ENOTDIR";
  }
}
