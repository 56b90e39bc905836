/**
 * openSeed: a dense Hugging Face folder as the canonical DenseModel, with a
 * reader that returns each canonical tensor in [out, in] layout.
 */
import { basename, isAbsolute, join, resolve } from "node:path";
import { BamError, ioError } from "../errors.js";
import {
  CheckpointFiles,
  concat,
  DTYPE_SIZE,
  elementsOf,
  isFloatDType,
  readTextFile,
  TENSOR_ENTRY_BYTES,
  toFloat32,
} from "../safetensors/index.js";
import { featuresFromHfConfig, familyOf, readConfigFile, show, type HfConfig } from "./config.js";
import type { FamilySpec } from "./families.js";
import { SINGLE_EXPERT_BAM_TENSORS } from "./names.js";
import { featuresFromConfig } from "./features.js";
import { tokenizerHash as tokenizerContentHash } from "./hash.js";
import { mapCheckpoint } from "./layout.js";
import type { ArchFeatures, CanonicalTensor, DenseModel, TensorSource } from "./types.js";

export interface Seed extends DenseModel {
  /** Absolute paths of the safetensors files holding the weights. */
  files: readonly string[];
  /** Checkpoint tensors nothing reads (not known-harmless buffers either); `bam inspect` warns about them. */
  unusedTensors: string[];
  /** How the seed ends and frames text: eos_token, bos_token, chat_template (JSON text, "absent" when not set). */
  chatSettings: Record<ChatSetting, string>;
  /** Resident bytes the open checkpoint's tensor entries take (every stored tensor, used or not), for memory estimates. */
  entryBytes: number;
  /** Bytes of a canonical tensor in its stored dtype, little-endian, [out, in] layout. */
  read(name: string): Promise<Uint8Array>;
  /**
   * Bytes of elements [start, start + count) of a canonical tensor, flattened
   * row-major; into `into` (exactly that many bytes) when given.
   */
  readElements(name: string, start: number, count: number, into?: Uint8Array): Promise<Uint8Array>;
  /** Refuses a seed whose weight files changed since it was opened: call once everything is read. */
  checkUnchanged(): Promise<void>;
  close(): Promise<void>;
}

/** A dense folder of a supported family, or a single-expert BAM folder (see seedLayout); `name` names it in messages and upcycled_from. */
export async function openSeed(dir: string, name = basename(resolve(dir))): Promise<Seed> {
  const config = await readConfigFile(dir);
  // The whole config is checked before any weights file is opened.
  const { spec, features } = seedLayout(config);
  const checkpoint = await CheckpointFiles.open(dir);
  try {
    const { tensors, unused } = mapCheckpoint(spec, features, checkpoint.tensors, checkpointLabel(checkpoint));
    await refuseIgnoredParameters(checkpoint, tensors, unused);
    const tokenizerHash = await tokenizerContentHash(join(dir, "tokenizer.json"));
    const chatSettings = await readChatSettings(dir);
    const reader = new CanonicalReader(checkpoint);
    const tensor = (name: string): CanonicalTensor => {
      const found = tensors.get(name);
      if (found === undefined)
        throw new BamError("TENSOR_NOT_FOUND", `${dir}: no canonical tensor "${name}" in this ${features.family} seed`);
      return found;
    };
    return {
      dir,
      name,
      features,
      tensors,
      rawConfig: config.raw,
      tokenizerHash,
      files: checkpoint.files,
      unusedTensors: unused,
      chatSettings,
      entryBytes: checkpoint.tensors.size * TENSOR_ENTRY_BYTES,
      read: async (name) => {
        const t = tensor(name);
        return reader.read(t, 0, elementsOf(t.shape));
      },
      readElements: async (name, start, count, into) => {
        const t = tensor(name);
        const total = elementsOf(t.shape);
        if (
          !Number.isSafeInteger(start) ||
          !Number.isSafeInteger(count) ||
          start < 0 ||
          count < 0 ||
          start + count > total
        ) {
          throw new BamError(
            "INVALID_OFFSET",
            `${dir}: elements ${start}..${start + count} are outside "${name}" (${total} elements)`,
          );
        }
        return reader.read(t, start, count, into);
      },
      checkUnchanged: () => checkpoint.checkUnchanged(),
      close: () => checkpoint.close(),
    };
  } catch (error) {
    await checkpoint.close();
    throw error;
  }
}

export type ChatSetting = "eos_token" | "bos_token" | "chat_template";
const CHAT_SETTINGS: readonly ChatSetting[] = ["eos_token", "bos_token", "chat_template"];
/** tokenizer_config.json with a long chat template is tens of KB; this is far beyond. */
const MAX_TOKENIZER_CONFIG_BYTES = 16_000_000;

/**
 * The settings of tokenizer_config.json (and a chat_template.jinja beside
 * it, as transformers v5 saves it) that decide where generation stops and
 * how a chat is framed, as comparable text. A file that is absent or not
 * JSON gives "absent": the copy of it is the first seed's either way.
 */
async function readChatSettings(dir: string): Promise<Record<ChatSetting, string>> {
  const read = (name: string) =>
    readTextFile(join(dir, name), MAX_TOKENIZER_CONFIG_BYTES, "CONFIG_INVALID").catch((error: unknown) => {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw ioError(join(dir, name), error);
    });
  let config: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse((await read("tokenizer_config.json")) ?? "{}");
    if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed))
      config = parsed as Record<string, unknown>;
  } catch {
    // not JSON: nothing to compare
  }
  const template = await read("chat_template.jinja");
  if (template !== null) config = { ...config, chat_template: template };
  const settings = {} as Record<ChatSetting, string>;
  for (const key of CHAT_SETTINGS)
    settings[key] = config[key] === undefined || config[key] === null ? "absent" : JSON.stringify(config[key]);
  return settings;
}

/**
 * Seeds that stop or frame chats differently: the output keeps the first
 * seed's tokenizer files, so its settings win; each difference is a warning
 * that says so.
 */
export function chatSettingWarnings(seeds: readonly Pick<Seed, "name" | "chatSettings">[]): string[] {
  const [first, ...rest] = seeds;
  if (first === undefined) return [];
  const warnings: string[] = [];
  for (const key of CHAT_SETTINGS) {
    const differing = rest
      .filter((seed) => seed.chatSettings[key] !== first.chatSettings[key])
      .map((seed) => seed.name);
    if (differing.length > 0) {
      const value = first.chatSettings[key];
      warnings.push(
        `${key} differs between seeds (${[...new Set(differing)].join(", ")} vs ${first.name}); the output keeps the first seed's (${first.name}: ${value.length > 60 ? `${value.slice(0, 60)}...` : value})`,
      );
    }
  }
  return warnings;
}

/**
 * Where the seed's tensors live and what it computes. A BAM folder with one
 * FFN expert and merged attention is a dense model under docs/format.md's names: the
 * seed stage of scripts/reproduce.sh trains one with scripts/finetune.py and
 * branches it, so the trained copies are seeds as they are.
 */
function seedLayout(config: HfConfig): { spec: Pick<FamilySpec, "family" | "tensors">; features: ArchFeatures } {
  if (config.raw.model_type !== "bam") return { spec: familyOf(config), features: featuresFromHfConfig(config) };
  const { num_experts: experts, attention_experts: attention, block } = config.raw;
  if (experts !== 1 || attention !== "merged") {
    throw new BamError(
      "FEATURE_UNSUPPORTED",
      `${config.file}: a BAM model with num_experts ${show(experts)} and ${show(attention)} attention is not a dense seed; only a single-expert BAM folder with merged attention (bam upcycle SEED --experts 1) can be upcycled again`,
    );
  }
  if (block !== "parallel" && block !== "sequential") {
    throw new BamError(
      "CONFIG_INVALID",
      `${config.file}: "block" must be parallel or sequential, found ${show(block)}`,
    );
  }
  const features = { ...featuresFromConfig(config.raw, config.file), parallelBlock: block === "parallel" };
  return { spec: { family: features.family, tensors: SINGLE_EXPERT_BAM_TENSORS }, features };
}

/**
 * A tensor beside one the model reads, in the same module, that config.json
 * gives no part (a non-zero mlp.down_proj.bias with mlp_bias false): the
 * checkpoint computes something the config does not describe, and dropping
 * it would change the model silently. Zeros change nothing and pass; other
 * leftovers (a vision tower, buffers) stay in `unusedTensors`.
 */
async function refuseIgnoredParameters(
  checkpoint: CheckpointFiles,
  tensors: ReadonlyMap<string, CanonicalTensor>,
  unused: readonly string[],
): Promise<void> {
  const moduleOf = (name: string) => name.slice(0, name.lastIndexOf("."));
  const readModules = new Set([...tensors.values()].map((t) => moduleOf(t.source.sourceName)));
  for (const name of unused) {
    if (!readModules.has(moduleOf(name))) continue;
    const info = checkpoint.tensors.get(name)!;
    const bytes = await checkpoint.read(name);
    const nonZero = isFloatDType(info.dtype)
      ? toFloat32(bytes, info.dtype).some((v) => v !== 0)
      : bytes.some((b) => b !== 0);
    if (nonZero) {
      throw new BamError(
        "CONFIG_INVALID",
        `${info.file}: tensor "${name}" holds non-zero values that config.json gives no part in the model (e.g. a bias with mlp_bias or attention_bias false); fix config.json to match the weights, or remove the tensor`,
      );
    }
  }
}

/** The file that names the checkpoint's tensors: its only weights file, or the shard index. */
function checkpointLabel(checkpoint: CheckpointFiles): string {
  const only = checkpoint.files.length === 1 ? checkpoint.files[0] : undefined;
  if (only === undefined) return join(checkpoint.dir, "model.safetensors.index.json");
  return isAbsolute(only) ? only : join(checkpoint.dir, only);
}

type ByteReader = Pick<CheckpointFiles, "read" | "readBytes">;

/**
 * Reads element ranges of canonical tensors. Without a transpose only the
 * needed bytes are read, row splits included. A Conv1D weight (gpt2, at most
 * tens of MB) is read whole and transposed once, then served from a
 * one-tensor cache while it is read chunk by chunk.
 */
export class CanonicalReader {
  private transposed: { tensor: CanonicalTensor; bytes: Promise<Uint8Array> } | undefined;

  constructor(private readonly files: ByteReader) {}

  /** Into `into` (exactly count elements' bytes) when given, else a fresh buffer. */
  async read(tensor: CanonicalTensor, start: number, count: number, into?: Uint8Array): Promise<Uint8Array> {
    const { sourceName, dtype, transpose } = tensor.source;
    const size = DTYPE_SIZE[dtype];
    if (into !== undefined && into.length !== count * size) {
      throw new BamError(
        "INVALID_OFFSET",
        `${sourceName}: a ${into.length}-byte buffer cannot take ${count} ${dtype} elements`,
      );
    }
    const out = into ?? new Uint8Array(count * size);
    if (transpose) {
      if (this.transposed?.tensor !== tensor) this.transposed = { tensor, bytes: readTransposed(this.files, tensor) };
      // A copy: callers may keep or change what they get.
      out.set((await this.transposed.bytes).subarray(start * size, (start + count) * size));
      return out;
    }
    // Row splits (fused projections) become one read per segment, each straight into its place.
    let at = 0;
    await Promise.all(
      sourceSegments(tensor.source, start, count).map(([offset, length]) => {
        const part = out.subarray(at, (at += length));
        return this.files.readBytes(sourceName, offset, length, part);
      }),
    );
    return out;
  }
}

/**
 * Byte ranges of the stored tensor that hold canonical elements
 * [start, start + count): the canonical tensor is the listed row ranges of
 * the source, one after another (all rows when there is no split).
 */
export function sourceSegments(source: TensorSource, start: number, count: number): Array<[number, number]> {
  const size = DTYPE_SIZE[source.dtype];
  const rowLength = elementsOf(source.sourceShape.slice(1));
  const rows = source.rows ?? [[0, source.sourceShape[0] ?? 1]];
  const end = start + count;
  const segments: Array<[number, number]> = [];
  let first = 0; // canonical index of the range's first element
  for (const [row, rowCount] of rows) {
    const last = first + rowCount * rowLength;
    const from = Math.max(start, first);
    const to = Math.min(end, last);
    if (from < to) {
      const offset = (row * rowLength + (from - first)) * size;
      const previous = segments[segments.length - 1];
      // Adjacent ranges become one read.
      if (previous !== undefined && previous[0] + previous[1] === offset) previous[1] += (to - from) * size;
      else segments.push([offset, (to - from) * size]);
    }
    first = last;
  }
  return segments;
}

async function readTransposed(files: ByteReader, tensor: CanonicalTensor): Promise<Uint8Array> {
  const { sourceName, sourceShape, dtype, rows } = tensor.source;
  const size = DTYPE_SIZE[dtype];
  const [inner, outer] = sourceShape as [number, number];
  const transposed = transpose2d(await files.read(sourceName), inner, outer, size);
  if (rows === null) return transposed;
  const rowBytes = inner * size;
  const parts = rows.map(([row, count]) => transposed.subarray(row * rowBytes, (row + count) * rowBytes));
  return parts.length === 1 ? parts[0]! : concat(parts);
}

/** [rows, cols] -> [cols, rows], moving whole elements (bit patterns untouched). */
export function transpose2d(bytes: Uint8Array, rows: number, cols: number, elementSize: number): Uint8Array {
  if (bytes.length !== rows * cols * elementSize) {
    throw new BamError(
      "DATA_INCOMPLETE",
      `transpose: expected ${rows * cols * elementSize} bytes, got ${bytes.length}`,
    );
  }
  const out = new Uint8Array(bytes.length);
  const View = ELEMENT_VIEWS[elementSize];
  if (View !== undefined) {
    // Typed views need aligned offsets; copy once if the input is not aligned.
    const aligned = bytes.byteOffset % elementSize === 0 ? bytes : bytes.slice();
    const src = new View(aligned.buffer as ArrayBuffer, aligned.byteOffset, rows * cols);
    const dst = new View(out.buffer, 0, rows * cols);
    for (let r = 0; r < rows; r++) {
      const base = r * cols;
      for (let c = 0; c < cols; c++) dst[c * rows + r] = src[base + c]!;
    }
    return out;
  }
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const from = (r * cols + c) * elementSize;
      out.set(bytes.subarray(from, from + elementSize), (c * rows + r) * elementSize);
    }
  }
  return out;
}

type ElementView = Uint8ArrayConstructor | Uint16ArrayConstructor | Uint32ArrayConstructor;
const ELEMENT_VIEWS: Readonly<Record<number, ElementView>> = { 1: Uint8Array, 2: Uint16Array, 4: Uint32Array };
