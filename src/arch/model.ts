/**
 * Any model folder we read: a dense seed of a supported family, a BAM
 * folder written by the upcycler (or saved back by modeling_bam.py after
 * fine-tuning), or a native Mixtral or Qwen3-MoE folder (`bam upcycle
 * --format`, ./native.ts). All come out as the BAM view of docs/format.md: a
 * dense seed is a BAM model with one expert, merged attention, no routers,
 * and its FFN under mlp.experts.0.
 */
import { basename, join, resolve } from "node:path";
import { BamError } from "../errors.js";
import { CheckpointFiles } from "../safetensors/index.js";
import type { DType } from "../safetensors/index.js";
import { readConfigFile, show, type HfConfig } from "./config.js";
import { featuresFromConfig } from "./features.js";
import { canonicalLayout } from "./layout.js";
import { denseToBamName } from "./names.js";
import { openSeed } from "./load.js";
import { fromNativeName, nativeFormatOf, nativeModel, NATIVE_LAYOUTS } from "./native.js";
import { tokenizerHash as tokenizerContentHash } from "./hash.js";
import type { ArchFeatures } from "./types.js";

/** The attention of a mixture: soft attention experts, per-expert q/o with shared k/v, or averaged (BTX). The list is `bam upcycle --attention`'s choices. */
export const ATTENTION_EXPERTS = ["moa", "shared-kv", "merged"] as const;
export type AttentionExperts = (typeof ATTENTION_EXPERTS)[number];
/** How attention and FFN combine in a layer. The list is `bam upcycle --block`'s choices. */
export const BLOCK_KINDS = ["parallel", "sequential"] as const;
export type BlockKind = (typeof BLOCK_KINDS)[number];

export interface SeedRecord {
  /** The seed's repo id, or its folder's name. */
  name: string;
  /** sha256 of the seed's sha256sum manifest of its files (docs/format.md). */
  sha256: string;
}

/** The mixture part of a BAM config.json. */
export interface MoeSettings {
  /** FFN experts per layer (and attention experts, unless merged). */
  numExperts: number;
  /** Top-k of the FFN router. */
  expertsPerToken: number;
  /** FFN gate: true renormalises the top-k probabilities to sum 1 (Mixtral); false weights each chosen expert by its softmax probability over all experts (BAM, Switch). docs/method.md. */
  normTopkProb: boolean;
  /** Attention experts: soft MoA, shared K/V, or merged. */
  attentionExperts: AttentionExperts;
  /** Parallel (BAM) or sequential block. */
  block: BlockKind;
  /** Weight of the load-balancing loss in fine-tuning (router_aux_loss_coef). */
  routerAuxLossCoef: number;
  /** Weight of the router z-loss in fine-tuning (router_z_loss_coef). */
  routerZLossCoef: number;
  /** The seeds, in expert order. */
  upcycledFrom: SeedRecord[];
}

export interface ModelTensor {
  name: string;
  shape: number[];
  dtype: DType;
  /** The tensor's name in the weights file (a dense seed's own name; part of it, for fused q/k/v). */
  stored: string;
}

/** What a folder holds: a dense seed, a BAM folder, or a native MoE folder (its model_type). */
export type ModelKind = "dense" | "bam" | "mixtral" | "qwen3_moe";

export interface OpenedModel {
  kind: ModelKind;
  dir: string;
  name: string;
  features: ArchFeatures;
  moe: MoeSettings;
  /** BAM-view name -> tensor, in file order. */
  tensors: ReadonlyMap<string, ModelTensor>;
  /** Safetensors files holding the weights. */
  files: readonly string[];
  tokenizerHash: string | null;
  rawConfig: Record<string, unknown>;
  /** Bytes of a tensor in its stored dtype, little-endian, [out, in] layout. */
  read(name: string): Promise<Uint8Array>;
  close(): Promise<void>;
}

export async function openModel(dir: string): Promise<OpenedModel> {
  const config = await readConfigFile(dir);
  if (config.raw.model_type === "bam")
    return openMixture(
      dir,
      config,
      "bam",
      featuresFromConfig(config.raw, config.file),
      moeFromConfig(config.raw, config.file),
      (name) => name,
    );
  const native = nativeFormatOf(config.raw.model_type);
  if (native === undefined) return openDense(dir);
  const { features, moe } = nativeModel(native, config);
  return openMixture(dir, config, NATIVE_LAYOUTS[native].modelType, features, moe, fromNativeName(native));
}

async function openDense(dir: string): Promise<OpenedModel> {
  const seed = await openSeed(dir);
  const byBamName = new Map<string, string>();
  const tensors = new Map<string, ModelTensor>();
  for (const tensor of seed.tensors.values()) {
    const bamName = denseToBamName(tensor.name);
    byBamName.set(bamName, tensor.name);
    tensors.set(bamName, { name: bamName, shape: tensor.shape, dtype: tensor.dtype, stored: tensor.source.sourceName });
  }
  return {
    kind: "dense",
    dir,
    name: seed.name,
    features: seed.features,
    moe: {
      numExperts: 1,
      expertsPerToken: 1,
      normTopkProb: true, // one expert, no router: either gate is the weight 1
      attentionExperts: "merged",
      block: seed.features.parallelBlock ? "parallel" : "sequential",
      routerAuxLossCoef: 0,
      routerZLossCoef: 0,
      upcycledFrom: [],
    },
    tensors,
    files: seed.files,
    tokenizerHash: seed.tokenizerHash,
    rawConfig: seed.rawConfig,
    read: (name) => {
      const canonical = byBamName.get(name);
      if (canonical === undefined) throw new BamError("TENSOR_NOT_FOUND", `${dir}: no tensor ${name}`);
      return seed.read(canonical);
    },
    close: () => seed.close(),
  };
}

/** A BAM or native MoE folder: its tensors under their BAM names (`toBamName` of the stored ones). */
async function openMixture(
  dir: string,
  { raw: config }: HfConfig,
  kind: ModelKind,
  features: ArchFeatures,
  moe: MoeSettings,
  toBamName: (stored: string) => string,
): Promise<OpenedModel> {
  const checkpoint = await CheckpointFiles.open(dir);
  try {
    const tensors = new Map<string, ModelTensor>();
    for (const info of checkpoint.tensors.values()) {
      const name = toBamName(info.name);
      tensors.set(name, { name, shape: info.shape, dtype: info.dtype, stored: info.name });
    }
    checkSharedTensors(features, tensors, dir);
    const tokenizerHash = await tokenizerContentHash(join(dir, "tokenizer.json"));
    return {
      kind,
      dir,
      name: basename(resolve(dir)),
      features,
      moe,
      tensors,
      files: checkpoint.files,
      tokenizerHash,
      rawConfig: config,
      read: (name) => {
        const stored = tensors.get(name)?.stored;
        if (stored === undefined) throw new BamError("TENSOR_NOT_FOUND", `${dir}: no tensor ${name}`);
        return checkpoint.read(stored);
      },
      close: () => checkpoint.close(),
    };
  } catch (error) {
    await checkpoint.close();
    throw error;
  }
}

/**
 * The tensors every BAM model of these features shares (embeddings, final
 * norm, head), with their shapes: a folder whose weights file holds
 * something else (logits saved over it, another model) is not this model.
 */
function checkSharedTensors(features: ArchFeatures, tensors: ReadonlyMap<string, ModelTensor>, dir: string): void {
  for (const entry of canonicalLayout(features)) {
    if (entry.layer !== null) continue;
    const found = tensors.get(entry.name);
    const shape = `[${entry.shape.join(", ")}]`;
    if (found === undefined) {
      const held = [...tensors.keys()].slice(0, 3).join(", ");
      throw new BamError(
        "TENSOR_MISSING",
        `${dir}: the weights lack "${entry.name}" ${shape} that config.json requires (they hold ${tensors.size} tensor(s): ${held}${tensors.size > 3 ? ", ..." : ""}); this folder's weights are not its model's`,
      );
    }
    if (found.shape.length !== entry.shape.length || found.shape.some((n, i) => n !== entry.shape[i])) {
      throw new BamError(
        "TENSOR_SHAPE",
        `${dir}: tensor "${entry.name}" has shape [${found.shape.join(", ")}], expected ${shape} from config.json`,
      );
    }
  }
}

export function moeFromConfig(config: Record<string, unknown>, file: string): MoeSettings {
  const bad = (key: string, want: string): never => {
    throw new BamError("CONFIG_INVALID", `${file}: "${key}" must be ${want}, found ${show(config[key])}`);
  };
  const int = (key: string): number => {
    const v = config[key];
    return typeof v === "number" && Number.isInteger(v) && v >= 1 && v <= 4096
      ? v
      : bad(key, "an integer from 1 to 4096");
  };
  const num = (key: string): number => {
    const v = config[key];
    return typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : bad(key, "a non-negative number");
  };
  const numExperts = int("num_experts");
  const expertsPerToken = int("num_experts_per_tok");
  if (expertsPerToken > numExperts) bad("num_experts_per_tok", `at most num_experts (${numExperts})`);
  // Absent: renormalised, what every folder written before the key existed computes.
  const normTopkProb = config.norm_topk_prob ?? true;
  if (typeof normTopkProb !== "boolean") bad("norm_topk_prob", "true or false");
  const attention = config.attention_experts as AttentionExperts;
  if (!ATTENTION_EXPERTS.includes(attention)) bad("attention_experts", ATTENTION_EXPERTS.join(" or "));
  const block = config.block as BlockKind;
  if (!BLOCK_KINDS.includes(block)) bad("block", BLOCK_KINDS.join(" or "));
  const upcycledFrom = Array.isArray(config.upcycled_from)
    ? // Strings only: String() of a deeply nested list recurses until the stack runs out.
      config.upcycled_from.map((entry) => ({
        name: typeof entry?.name === "string" ? entry.name : "?",
        sha256: typeof entry?.sha256 === "string" ? entry.sha256 : "",
      }))
    : [];
  return {
    numExperts,
    expertsPerToken,
    normTopkProb: normTopkProb as boolean,
    attentionExperts: attention,
    block,
    routerAuxLossCoef: num("router_aux_loss_coef"),
    routerZLossCoef: num("router_z_loss_coef"),
    upcycledFrom,
  };
}
