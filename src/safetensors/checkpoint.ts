/**
 * A model folder's weights: one safetensors file, or shards listed by a
 * `*.safetensors.index.json`. Shard paths come from the index, which is
 * untrusted input, so each must resolve inside the folder.
 */
import { readdir, realpath } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from "node:path";
import { BamError, ioError } from "../errors.js";
import { readTextFile } from "./input-file.js";
import { findDuplicateKey, isPlainObject, SafetensorsReader, type TensorInfo } from "./reader.js";

const SINGLE_FILE = "model.safetensors";
const INDEX_FILE = "model.safetensors.index.json";
const PICKLE_PATTERN = /\.(bin|pt|pth|ckpt)$/;
/** Most tensors a sharded checkpoint may hold: DeepSeek-V3 with its fp8 scales has about 92k. */
export const MAX_CHECKPOINT_TENSORS = 200_000;
/** Far above any real index (tens of thousands of tensors take a few MB). */
const MAX_INDEX_BYTES = 100_000_000;

type Weights = { single: string } | { index: string };

interface Index {
  weightMap: Map<string, string>;
  metadata: Readonly<Record<string, unknown>> | null;
}

export class CheckpointFiles {
  private constructor(
    readonly dir: string,
    readonly files: readonly string[],
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly indexMetadata: Readonly<Record<string, unknown>> | null,
    /** Keyed by absolute shard path, as TensorInfo.file. */
    private readonly readers: ReadonlyMap<string, SafetensorsReader>,
  ) {}

  static async open(dir: string): Promise<CheckpointFiles> {
    const root = resolve(dir);
    const weights = await locateWeights(root);
    if ("single" in weights) {
      const reader = await SafetensorsReader.open(weights.single);
      return new CheckpointFiles(root, [reader.path], reader.tensors, null, new Map([[reader.path, reader]]));
    }
    const index = await readIndex(weights.index);
    const shardFiles = await resolveShards(root, new Set(index.weightMap.values()), weights.index);
    const files = [...new Set(shardFiles.values())].sort();
    const readers = await openAll(files, weights.index);
    try {
      const weightMap = new Map([...index.weightMap].map(([name, shard]) => [name, shardFiles.get(shard)!]));
      const tensors = collectTensors(weightMap, readers, weights.index);
      return new CheckpointFiles(root, files, tensors, index.metadata, readers);
    } catch (error) {
      await closeAll(readers.values());
      throw error;
    }
  }

  async read(name: string): Promise<Uint8Array> {
    return this.readerOf(name).read(name);
  }

  async readBytes(name: string, start: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    return this.readerOf(name).readBytes(name, start, length, into);
  }

  /** Refuses weight files that changed since they were opened (see SafetensorsReader.checkUnchanged). */
  async checkUnchanged(): Promise<void> {
    for (const reader of this.readers.values()) await reader.checkUnchanged();
  }

  async close(): Promise<void> {
    await closeAll(this.readers.values());
  }

  private readerOf(name: string): SafetensorsReader {
    const info = this.tensors.get(name);
    if (info === undefined) throw new BamError("TENSOR_NOT_FOUND", `${this.dir}: no tensor named "${name}"`);
    return this.readers.get(info.file)!;
  }
}

/**
 * Which file describes the weights, in transformers' order of preference,
 * then any single index or single safetensors file.
 */
async function locateWeights(root: string): Promise<Weights> {
  const names = await readdir(root).catch((error: unknown) => {
    throw ioError(root, error);
  });
  if (names.includes(SINGLE_FILE)) return { single: join(root, SINGLE_FILE) };
  if (names.includes(INDEX_FILE)) return { index: join(root, INDEX_FILE) };
  const indexes = names.filter((name) => name.endsWith(".safetensors.index.json"));
  const files = names.filter((name) => name.endsWith(".safetensors"));
  const ambiguous = (candidates: string[]) =>
    new BamError(
      "NOT_A_CHECKPOINT",
      `${root}: cannot tell which weights to use among ${candidates.join(", ")}; keep one, or add ${INDEX_FILE}`,
    );
  if (indexes.length > 1) throw ambiguous(indexes);
  if (indexes[0] !== undefined) return { index: join(root, indexes[0]) };
  if (files.length > 1) throw ambiguous(files);
  if (files[0] !== undefined) return { single: join(root, files[0]) };
  const pickles = names.filter((name) => PICKLE_PATTERN.test(name));
  if (pickles.length > 0) {
    throw new BamError(
      "PICKLE_REFUSED",
      `${root}: has only pickle weights (${pickles.join(", ")}), which can execute code when loaded, so they are not read; ` +
        "convert them in a trusted environment: load the model with torch/transformers and call model.save_pretrained(dir, safe_serialization=True)",
    );
  }
  throw new BamError("NOT_A_CHECKPOINT", `${root}: no model weights found (expected ${SINGLE_FILE} or ${INDEX_FILE})`);
}

async function readIndex(file: string): Promise<Index> {
  const invalid = (reason: string) => new BamError("INDEX_INVALID", `${file}: ${reason}`);
  const text = await readTextFile(file, MAX_INDEX_BYTES, "INDEX_INVALID").catch((error: unknown) => {
    throw ioError(file, error);
  });
  let index: unknown;
  try {
    index = JSON.parse(text);
  } catch (error) {
    throw new BamError("INDEX_INVALID", `${file}: not valid JSON (${(error as Error).message})`, { cause: error });
  }
  const duplicate = findDuplicateKey(text);
  if (duplicate !== undefined) throw invalid(`repeats the key "${duplicate}"`);
  if (!isPlainObject(index) || !isPlainObject(index.weight_map))
    throw invalid("expected an object with a weight_map object");
  const { weight_map: weightMap, metadata = null } = index;
  const listed = Object.keys(weightMap).length;
  if (listed === 0) throw invalid("weight_map lists no tensors");
  if (listed > MAX_CHECKPOINT_TENSORS)
    throw invalid(`weight_map lists ${listed} tensors, over the ${MAX_CHECKPOINT_TENSORS} any real checkpoint needs`);
  const nonString = Object.keys(weightMap).find(
    (name) =>
      typeof weightMap[name] !== "string" || weightMap[name] === "" || (weightMap[name] as string).includes("\0"),
  );
  if (nonString !== undefined) throw invalid(`weight_map entry "${nonString}" is not a file name`);
  if (metadata !== null && !isPlainObject(metadata)) throw invalid("metadata is not an object");
  return {
    weightMap: new Map(Object.entries(weightMap as Record<string, string>)),
    metadata: metadata as Index["metadata"],
  };
}

/** Absolute path of each shard the index names, after checking it stays inside the folder. */
async function resolveShards(root: string, shards: Set<string>, indexFile: string): Promise<Map<string, string>> {
  const realRoot = await realpath(root).catch((error: unknown) => {
    throw ioError(root, error);
  });
  const files = new Map<string, string>();
  for (const shard of shards) files.set(shard, await resolveShard(root, realRoot, shard, indexFile));
  return files;
}

async function resolveShard(root: string, realRoot: string, shard: string, indexFile: string): Promise<string> {
  const escapes = (reason: string) =>
    new BamError("PATH_ESCAPE", `${indexFile}: shard "${shard}" ${reason}; shards must lie inside ${root}`);
  if (isAbsolute(shard)) throw escapes("is an absolute path");
  if (shard.split(/[\\/]/).includes("..")) throw escapes("climbs out with ..");
  const file = join(root, shard);
  const outside = await outsideFolder(realRoot, file);
  if (outside !== undefined) throw escapes(`links to ${outside}`);
  return file;
}

/** The real path of `file`, links followed, when it lies outside the folder whose real path is `realRoot` (and outside the Hugging Face cache's blobs/). */
async function outsideFolder(realRoot: string, file: string): Promise<string | undefined> {
  const real = await realpath(file).catch((error: unknown) => {
    throw ioError(file, error);
  });
  return isInside(realRoot, real) || isHubCacheBlob(realRoot, real) ? undefined : real;
}

/**
 * PATH_ESCAPE unless `file`, links followed, lies inside `root` (or in the
 * Hugging Face cache's blobs/): for files copied out of a downloaded folder,
 * which a link could otherwise point at any file of the user's.
 */
export async function checkInsideFolder(root: string, file: string): Promise<void> {
  const realRoot = await realpath(root).catch((error: unknown) => {
    throw ioError(root, error);
  });
  const outside = await outsideFolder(realRoot, file);
  if (outside !== undefined)
    throw new BamError(
      "PATH_ESCAPE",
      `${file}: links to ${outside}, outside ${root}; files of a model folder must lie inside it`,
    );
}

function isInside(folder: string, path: string): boolean {
  const rel = relative(folder, path);
  return rel !== "" && !isAbsolute(rel) && rel.split(sep)[0] !== "..";
}

/** The Hugging Face cache keeps files in `<repo>/blobs` and links them from `<repo>/snapshots/<revision>`. */
function isHubCacheBlob(realRoot: string, real: string): boolean {
  const snapshots = dirname(realRoot);
  return basename(snapshots) === "snapshots" && isInside(join(dirname(snapshots), "blobs"), real);
}

/** Opens every file; if any fails, closes the others before throwing. */
/**
 * Opens the shards one after another, so that the tensors they hold together
 * stay within MAX_CHECKPOINT_TENSORS whatever their number (each is bounded
 * on its own by the reader); a header is read in milliseconds.
 */
async function openAll(files: readonly string[], index: string): Promise<Map<string, SafetensorsReader>> {
  const readers = new Map<string, SafetensorsReader>();
  let entries = 0;
  try {
    for (const file of files) {
      const reader = await SafetensorsReader.open(file);
      readers.set(reader.path, reader);
      entries += reader.tensors.size;
      if (entries > MAX_CHECKPOINT_TENSORS) {
        throw new BamError(
          "INDEX_INVALID",
          `${index}: its shards hold more than ${MAX_CHECKPOINT_TENSORS} tensors; no real checkpoint has so many`,
        );
      }
    }
    return readers;
  } catch (error) {
    await closeAll(readers.values());
    throw error;
  }
}

async function closeAll(readers: Iterable<SafetensorsReader>): Promise<void> {
  await Promise.all([...readers].map((reader) => reader.close()));
}

/** All shards' tensors, each stored once and exactly where the index says. */
function collectTensors(
  weightMap: ReadonlyMap<string, string>,
  readers: ReadonlyMap<string, SafetensorsReader>,
  indexFile: string,
): Map<string, TensorInfo> {
  const invalid = (reason: string) => new BamError("INDEX_INVALID", `${indexFile}: ${reason}`);
  const tensors = new Map<string, TensorInfo>();
  for (const reader of readers.values()) {
    for (const [name, info] of reader.tensors) {
      const other = tensors.get(name);
      if (other !== undefined) throw invalid(`tensor "${name}" is stored in both ${other.file} and ${info.file}`);
      tensors.set(name, info);
    }
  }
  for (const { name, file } of tensors.values()) {
    const listed = weightMap.get(name);
    if (listed === undefined) throw invalid(`tensor "${name}" in ${file} is missing from weight_map`);
    if (listed !== file) throw invalid(`weight_map puts tensor "${name}" in ${listed} but it is in ${file}`);
  }
  for (const [name, file] of weightMap) {
    if (!tensors.has(name)) throw invalid(`tensor "${name}" is listed in weight_map but missing from ${file}`);
  }
  return tensors;
}
