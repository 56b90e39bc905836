/**
 * The mapping engine: which canonical tensors a model with these features
 * has (and their shapes), and where each one lives in a family's checkpoint,
 * including Conv1D transposes and fused q/k/v or gate/up splits.
 */
import { BamError } from "../errors.js";
import { isFloatDType, type TensorInfo } from "../safetensors/index.js";
import type { FamilySpec, FusedLayout, Slot, SourceSpec } from "./families.js";
import { tensorName, type Part } from "./names.js";
import type { ArchFeatures, CanonicalTensor, TensorSource } from "./types.js";

/** One tensor of the canonical description, before it is matched to a checkpoint. */
export interface LayoutEntry {
  name: string;
  shape: number[];
  slot: Slot;
  /** Layer index, or null for embeddings, final norm and head. */
  layer: number | null;
  suffix: Part;
}

/** Every canonical tensor of a dense model with these features, in canonical order. */
export function canonicalLayout(f: ArchFeatures): LayoutEntry[] {
  const H = f.hiddenSize;
  const qDim = f.numHeads * f.headDim;
  const kvDim = f.numKvHeads * f.headDim;
  const I = f.intermediateSize;
  const entries: LayoutEntry[] = [];
  const push = (slot: Slot, layer: number | null, suffix: Part, shape: number[]) =>
    entries.push({ name: tensorName({ layer, slot, expert: null, part: suffix }), shape, slot, layer, suffix });
  const add = (slot: Slot, layer: number | null, weight: number[], bias: number[] | null) => {
    push(slot, layer, "weight", weight);
    if (bias !== null) push(slot, layer, "bias", bias);
  };
  const normBias = f.normBias ? [H] : null;

  add("embed_tokens", null, [f.vocabSize, H], null);
  if (f.learnedPositions) add("embed_positions", null, [f.maxPositions, H], null);
  for (let l = 0; l < f.numLayers; l++) {
    add("input_layernorm", l, [H], normBias);
    if (f.secondNorm) add("post_attention_layernorm", l, [H], normBias);
    add("attn.q_proj", l, [qDim, H], f.qkvBias ? [qDim] : null);
    add("attn.k_proj", l, [kvDim, H], f.qkvBias ? [kvDim] : null);
    add("attn.v_proj", l, [kvDim, H], f.qkvBias ? [kvDim] : null);
    add("attn.o_proj", l, [H, qDim], f.attnOutBias ? [H] : null);
    if (f.qkNorm === "shared") {
      add("attn.q_norm", l, [f.headDim], null);
      add("attn.k_norm", l, [f.headDim], null);
    } else if (f.qkNorm === "per_head") {
      add("attn.q_norm", l, [f.numHeads, f.headDim], null);
      add("attn.k_norm", l, [f.numKvHeads, f.headDim], null);
    }
    if (f.gatedMlp) add("mlp.gate_proj", l, [I, H], f.mlpBias ? [I] : null);
    add("mlp.up_proj", l, [I, H], f.mlpBias ? [I] : null);
    add("mlp.down_proj", l, [H, I], f.mlpBias ? [H] : null);
  }
  add("norm", null, [H], normBias);
  if (!f.tiedEmbeddings) add("lm_head", null, [f.vocabSize, H], f.lmHeadBias ? [f.vocabSize] : null);
  else if (f.lmHeadBias) push("lm_head", null, "bias", [f.vocabSize]);
  return entries;
}

export interface CheckpointMapping {
  /** Canonical name -> tensor, in canonical order. */
  tensors: Map<string, CanonicalTensor>;
  /** Checkpoint tensors that no canonical tensor reads and that are not known harmless buffers. */
  unused: string[];
}

/**
 * Matches the canonical layout to the checkpoint's tensors. TENSOR_MISSING
 * lists every absent tensor; TENSOR_SHAPE and DTYPE_UNSUPPORTED name the
 * first offending one. `label` names the checkpoint (its weights file or index).
 */
export function mapCheckpoint(
  spec: Pick<FamilySpec, "family" | "tensors">,
  features: ArchFeatures,
  available: ReadonlyMap<string, TensorInfo>,
  label: string,
): CheckpointMapping {
  const { prefix } = spec.tensors;
  // Saved from the bare model (e.g. GPT2Model): names lack the base prefix, as transformers allows.
  const bare = prefix !== "" && ![...available.keys()].some((n) => n.startsWith(prefix));
  const checkpointName = (template: string, layer: number | null): string => {
    const name = layer === null ? template : template.replaceAll("{l}", String(layer));
    return bare && name.startsWith(prefix) ? name.slice(prefix.length) : name;
  };

  const tensors = new Map<string, CanonicalTensor>();
  const used = new Set<string>();
  // Keyed by checkpoint name: the parts of a fused tensor are one missing tensor.
  const missing = new Map<string, string>();
  for (const entry of canonicalLayout(features)) {
    const source = sourceSpec(spec, entry.slot);
    const sourceName = checkpointName(`${source.module}.${entry.suffix}`, entry.layer);
    const { sourceShape, transpose, rows } = transform(source, entry, features);
    const info = available.get(sourceName);
    if (info === undefined) {
      missing.set(sourceName, `"${sourceName}" ${shapeText(sourceShape)}`);
      continue;
    }
    if (!sameShape(info.shape, sourceShape)) {
      throw new BamError(
        "TENSOR_SHAPE",
        `${info.file}: tensor "${sourceName}" has shape ${shapeText(info.shape)}, expected ${shapeText(sourceShape)} from config.json (${features.family})`,
      );
    }
    if (!isFloatDType(info.dtype)) {
      throw new BamError(
        "DTYPE_UNSUPPORTED",
        `${info.file}: tensor "${sourceName}" is ${info.dtype}; only F32, F16 and BF16 weights can be read`,
      );
    }
    used.add(sourceName);
    const tensorSource: TensorSource = {
      file: info.file,
      sourceName,
      dtype: info.dtype,
      sourceShape: info.shape,
      transpose,
      rows,
    };
    tensors.set(entry.name, { name: entry.name, shape: entry.shape, dtype: info.dtype, source: tensorSource });
  }
  if (missing.size > 0) {
    const listed = [...missing.values()];
    const shown = listed.slice(0, 5).join(", ") + (listed.length > 5 ? `, and ${listed.length - 5} more` : "");
    throw new BamError(
      "TENSOR_MISSING",
      `${label}: ${listed.length} tensor(s) that config.json (${features.family}, ${features.numLayers} layers) requires are missing: ${shown}`,
    );
  }

  const ignored = spec.tensors.ignored.map((template) => templatePattern(checkpointName(template, null)));
  if (features.tiedEmbeddings) {
    // Tied: the head is the embedding; a stored copy of it is redundant.
    ignored.push(templatePattern(checkpointName(`${sourceSpec(spec, "lm_head").module}.weight`, null)));
  }
  const unused = [...available.keys()]
    .filter((name) => !used.has(name) && !ignored.some((pattern) => pattern.test(name)))
    .sort();
  return { tensors, unused };
}

function sourceSpec(
  spec: Pick<FamilySpec, "family" | "tensors">,
  slot: Slot,
): { module: string; conv1d: boolean; fused: FusedLayout | null } {
  const source: SourceSpec | undefined = spec.tensors.sources[slot];
  if (source === undefined) throw new Error(`families.ts: ${spec.family} has no source for ${slot}`);
  return typeof source === "string"
    ? { module: source, conv1d: false, fused: null }
    : { module: source.module, conv1d: source.conv1d ?? false, fused: source.fused ?? null };
}

/** The stored shape of an entry's source, and how to turn it into the canonical tensor. */
function transform(
  source: { conv1d: boolean; fused: FusedLayout | null },
  entry: LayoutEntry,
  f: ArchFeatures,
): Pick<TensorSource, "sourceShape" | "transpose" | "rows"> {
  const split = source.fused === null ? null : fusedRows(source.fused, entry.slot, f);
  const [rows, ...rest] = entry.shape as [number, ...number[]];
  const stored = [split?.total ?? rows, ...rest];
  // Conv1D stores [in, out]; biases are 1-D and need no transpose.
  const transpose = source.conv1d && stored.length === 2;
  return {
    sourceShape: transpose ? [stored[1]!, stored[0]!] : stored,
    transpose,
    rows: split?.rows ?? null,
  };
}

/** Row ranges of one part of a fused projection, and the fused tensor's row count. */
function fusedRows(layout: FusedLayout, slot: Slot, f: ArchFeatures): { total: number; rows: Array<[number, number]> } {
  const D = f.headDim;
  const q = f.numHeads * D;
  const kv = f.numKvHeads * D;
  const part = (names: readonly Slot[]): number => {
    const index = names.indexOf(slot);
    if (index < 0) throw new Error(`families.ts: ${slot} cannot come from a ${layout} tensor`);
    return index;
  };
  switch (layout) {
    case "qkv": {
      const ranges: Array<[number, number]> = [
        [0, q],
        [q, kv],
        [q + kv, kv],
      ];
      return { total: q + 2 * kv, rows: [ranges[part(QKV)]!] };
    }
    case "qkv_per_head": {
      // gpt_neox: [heads, 3, D]; head h's q, k, v rows are h*3D + [0, D), [D, 2D), [2D, 3D).
      const offset = part(QKV) * D;
      const rows: Array<[number, number]> = [];
      for (let h = 0; h < f.numHeads; h++) rows.push([h * 3 * D + offset, D]);
      return { total: 3 * q, rows };
    }
    case "gate_up": {
      const I = f.intermediateSize;
      return { total: 2 * I, rows: [[part(GATE_UP) * I, I]] };
    }
  }
}

const QKV: readonly Slot[] = ["attn.q_proj", "attn.k_proj", "attn.v_proj"];
const GATE_UP: readonly Slot[] = ["mlp.gate_proj", "mlp.up_proj"];

/** A name template ({l} = any layer index) as an exact-match pattern. */
function templatePattern(template: string): RegExp {
  const escaped = template.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replaceAll("\\{l\\}", "\\d+");
  return new RegExp(`^${escaped}$`);
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

function shapeText(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}
