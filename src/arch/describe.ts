/**
 * What `bam inspect` reports about a model folder, as data (the CLI prints
 * it as text or JSON).
 */
import { basename } from "node:path";
import { BamError } from "../errors.js";
import { isFloatDType, toFloat32 } from "../safetensors/index.js";
import {
  openModel,
  type AttentionExperts,
  type BlockKind,
  type ModelKind,
  type ModelTensor,
  type OpenedModel,
  type SeedRecord,
} from "./model.js";
import { parseTensorName, siteOf } from "./names.js";
import type { ArchFeatures } from "./types.js";

export interface ParameterCounts {
  /** Every parameter of the model. */
  total: number;
  /** Parameters one token runs through: all attention experts (soft routing), k of E FFN experts. */
  activePerToken: number;
}

export interface ModelSummary {
  /** The folder, as given. */
  dir: string;
  /** A dense model, a BAM mixture, or a native mixtral / qwen3_moe mixture. */
  kind: ModelKind;
  /** The transformers model_type of the (seed) architecture. */
  family: string;
  /** Parallel or sequential block. */
  block: BlockKind;
  /** Transformer blocks. */
  layers: number;
  /** Width of the residual stream. */
  hiddenSize: number;
  /** Width of one FFN (expert). */
  intermediateSize: number;
  /** Query heads. */
  heads: number;
  /** Key/value heads. */
  kvHeads: number;
  /** Width of one head. */
  headDim: number;
  /** Rows of the embedding. */
  vocabSize: number;
  /** The head shares the embedding's weight. */
  tiedEmbeddings: boolean;
  /** Parameter counts. */
  parameters: ParameterCounts;
  /** Tensors per dtype. */
  dtypes: Record<string, number>;
  /** The weight files. */
  shards: string[];
  /** sha256 of tokenizer.json, or null without one. */
  tokenizerSha256: string | null;
  /** FFN experts per layer (1 for a dense model). */
  experts: number;
  /** Top-k of the FFN router (1 for a dense model). */
  expertsPerToken: number;
  /** Attention experts ("merged" for a dense model). */
  attentionExperts: AttentionExperts;
  /** The seeds of a BAM model, in expert order (empty when dense). */
  upcycledFrom: SeedRecord[];
  /** The architecture. */
  features: ArchFeatures;
}

/** A tensor of one FFN expert: a token runs through k of the E. */
function isFfnExpert(name: string): boolean {
  const t = parseTensorName(name);
  return t !== undefined && t.expert !== null && siteOf(t.slot) === "mlp";
}

export function countParameters(
  tensors: Iterable<Pick<ModelTensor, "name" | "shape">>,
  numExperts: number,
  expertsPerToken: number,
): ParameterCounts {
  let total = 0;
  let ffnExperts = 0;
  for (const tensor of tensors) {
    const size = tensor.shape.reduce((a, b) => a * b, 1);
    total += size;
    if (isFfnExpert(tensor.name)) ffnExperts += size;
  }
  return { total, activePerToken: total - ffnExperts + (ffnExperts * expertsPerToken) / numExperts };
}

export function describeModel(model: OpenedModel): ModelSummary {
  const f = model.features;
  const dtypes: Record<string, number> = {};
  for (const tensor of model.tensors.values()) {
    dtypes[tensor.dtype] = (dtypes[tensor.dtype] ?? 0) + 1;
  }
  return {
    dir: model.dir,
    kind: model.kind,
    family: f.family,
    block: model.moe.block,
    layers: f.numLayers,
    hiddenSize: f.hiddenSize,
    intermediateSize: f.intermediateSize,
    heads: f.numHeads,
    kvHeads: f.numKvHeads,
    headDim: f.headDim,
    vocabSize: f.vocabSize,
    tiedEmbeddings: f.tiedEmbeddings,
    parameters: countParameters(model.tensors.values(), model.moe.numExperts, model.moe.expertsPerToken),
    dtypes,
    shards: model.files.map((file) => basename(file)),
    tokenizerSha256: model.tokenizerHash,
    experts: model.moe.numExperts,
    expertsPerToken: model.moe.expertsPerToken,
    attentionExperts: model.moe.attentionExperts,
    upcycledFrom: model.moe.upcycledFrom,
    features: f,
  };
}

export interface ScanFinding {
  /** As named in the weights file. */
  tensor: string;
  /** NaN values. */
  nan: number;
  /** Infinite values. */
  inf: number;
}

/**
 * Reads every float tensor and counts NaN and Inf values, per tensor of the
 * weights file (the parts of a fused q/k/v add up); reports progress in bytes.
 */
export async function scanModel(
  model: OpenedModel,
  options: { onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
): Promise<ScanFinding[]> {
  const tensors = [...model.tensors.values()].filter((t) => isFloatDType(t.dtype));
  const sizeOf = (t: ModelTensor) => t.shape.reduce((a, b) => a * b, 1) * (t.dtype === "F32" ? 4 : 2);
  const total = tensors.reduce((sum, t) => sum + sizeOf(t), 0);
  const findings = new Map<string, ScanFinding>();
  let done = 0;
  for (const tensor of tensors) {
    if (options.signal?.aborted) throw new BamError("ABORTED", `${model.dir}: scan interrupted`);
    if (!isFloatDType(tensor.dtype)) continue;
    const values = toFloat32(await model.read(tensor.name), tensor.dtype);
    let nan = 0;
    let inf = 0;
    for (const v of values) {
      if (Number.isNaN(v)) nan += 1;
      else if (!Number.isFinite(v)) inf += 1;
    }
    if (nan + inf > 0) {
      const finding = findings.get(tensor.stored) ?? { tensor: tensor.stored, nan: 0, inf: 0 };
      finding.nan += nan;
      finding.inf += inf;
      findings.set(tensor.stored, finding);
    }
    done += sizeOf(tensor);
    options.onProgress?.(done, total);
  }
  return [...findings.values()];
}

export interface InspectOptions {
  /** Also read every float tensor and count NaN and Inf (slow: reads the whole model). */
  scan?: boolean;
  /** Bytes scanned so far, of all. */
  onProgress?: (done: number, total: number) => void;
  /** Stops the scan between tensors (ABORTED). */
  signal?: AbortSignal;
}

/** What `bam inspect --json` prints. */
export interface Inspection extends ModelSummary {
  /** Tensors holding NaN or Inf (empty: all finite); null when not scanned. */
  scan: ScanFinding[] | null;
}

/** Opens the model folder, describes it (and scans it when asked), and closes it. */
export async function inspectModel(dir: string, options: InspectOptions = {}): Promise<Inspection> {
  const model = await openModel(dir);
  try {
    const summary = describeModel(model);
    return { ...summary, scan: options.scan ? await scanModel(model, options) : null };
  } finally {
    await model.close();
  }
}
