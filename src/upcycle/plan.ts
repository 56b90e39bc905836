/**
 * The plan of an upcycle: which output tensor comes from which seed tensors
 * by which operation, with shapes and dtypes. Pure: built from the seeds'
 * descriptions alone (no tensor data), printed by --dry-run, executed by
 * ./execute.ts.
 */
import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { BamError, ioError } from "../errors.js";
import { countParameters } from "../arch/describe.js";
import { featuresToConfig } from "../arch/features.js";
import type { AttentionExperts, BlockKind } from "../arch/model.js";
import { planFormat, type FormatMoe, type FormatPlan } from "../export/formats.js";
import {
  canonicalLayout,
  chatSettingWarnings,
  expertModule,
  moduleName,
  parseTensorName,
  siteOf,
  tensorName,
  type LayoutEntry,
  type RouterSlot,
  type Seed,
} from "../arch/index.js";
import type { Slot } from "../arch/families.js";
import type { ArchFeatures, DenseModel } from "../arch/types.js";
import {
  BATCHES_IN_FLIGHT,
  DTYPE_SIZE,
  EARLY_BATCHES_IN_FLIGHT,
  WRITE_BATCH_BYTES,
  type DType,
  type FloatDType,
} from "../safetensors/index.js";
import { filesToHash, hashingMemoryBytes } from "./hash-seeds.js";
import { PROMPT_ROUTER_INITS, type ResolvedOptions, type UpcycleOptions } from "./options.js";

export interface SourceRef {
  /** Index of the seed in the options' `seeds`. */
  seed: number;
  /** Canonical seed tensor name. */
  tensor: string;
}

export type Operation =
  /** The seed tensor, converted to the output dtype if it differs. */
  | {
      /** Which operation. */
      kind: "copy";
      /** The seed tensor copied. */
      from: SourceRef;
    }
  /** Weighted sum of the seeds' tensors (weights sum to 1), in float64. */
  | {
      /** Which operation. */
      kind: "average";
      /** The seed tensors averaged. */
      from: SourceRef[];
      /** Their weights, in the same order. */
      weights: number[];
    }
  /** A new router (./router-init.ts for the rows from prompts). */
  | {
      /** Which operation. */
      kind: "router";
      /** Std of the truncated normal draw; 0 for zeros. */
      std: number;
      /** Keys this tensor's draws, with the run's seed. */
      key: string;
      /** Rows computed from the prompts, not drawn. */
      fromPrompts?: true;
      /** Uniform in [-bound, bound) instead of the normal (torch.nn.Linear's init, mergekit's uniform_random). */
      bound?: number;
    }
  /** Drop-Upcycling: a copy in which some intermediate dimensions are re-drawn from N(mean, std) of the source matrix. */
  | {
      /** Which operation. */
      kind: "drop";
      /** The seed tensor copied. */
      from: SourceRef;
      /** Fraction of the intermediate dimensions re-drawn. */
      ratio: number;
      /** 0 = rows (gate/up), 1 = columns (down). */
      axis: 0 | 1;
      /** Chooses the dimensions, the same for an expert's gate, up and down. */
      key: string;
    };

export interface PlannedTensor {
  /** Output name (docs/format.md, "Tensor names"). */
  name: string;
  /** Output shape. */
  shape: number[];
  /** Output dtype. */
  dtype: FloatDType;
  /** How the tensor is made from the seeds. */
  operation: Operation;
}

export interface SeedInfo {
  /** The seed's folder (a Hugging Face id's snapshot folder). */
  dir: string;
  /** How the output names it: the repo id for a Hub seed, else the folder's name. */
  name: string;
  /** The dtypes of its weights. */
  dtypes: DType[];
  /** Its config.json and weight files (what `upcycled_from` hashes) as they were when planned: executePlan refuses the plan when one differs. */
  files: SeedFile[];
}

export interface SeedFile {
  /** Absolute path. */
  path: string;
  /** Size in bytes. */
  bytes: number;
  /** Last modification, in milliseconds since 1970 (stat's mtimeMs). */
  modifiedMs: number;
}

export interface PlanSummary {
  /** FFN experts per layer. */
  experts: number;
  /** Top-k of the FFN router. */
  expertsPerToken: number;
  /** Attention experts. */
  attention: AttentionExperts;
  /** Block kind of the output. */
  block: BlockKind;
  /** Parameters of one seed. */
  seedParameters: number;
  /** Parameters of the output. */
  totalParameters: number;
  /** Parameters one token runs through (k of the FFN experts, every attention expert). */
  activeParameters: number;
  /** Forward FLOPs per token relative to one seed, at a context of FLOP_CONTEXT tokens. */
  flopsPerTokenRatio: number;
  /** Bytes of the output's tensor data. */
  outputBytes: number;
  /** Estimated peak resident memory of the upcycle: the executor and, on a first run, the threads hashing the seeds. */
  peakMemoryBytes: number;
}

export interface UpcyclePlan {
  /** The options with every default filled in. */
  options: ResolvedOptions;
  /** The seeds, in order: expert e is seed e. */
  seeds: SeedInfo[];
  /** The architecture the seeds share. */
  features: ArchFeatures;
  /** The mixture settings written into config.json (upcycled_from, the seeds' hashes, is the run's: UpcycleResult.seeds). */
  moe: FormatMoe;
  /** The output format's config.json (less upcycled_from), tensor names and remote code. */
  format: FormatPlan;
  /** Every output tensor and how it is made, in writing order. */
  tensors: PlannedTensor[];
  /** Sizes and costs of the output. */
  summary: PlanSummary;
  /** Choices that are allowed but probably unintended, one line each. */
  warnings: string[];
}

/** Context length the FLOP ratio is quoted at. */
export const FLOP_CONTEXT = 2048;
/** A worker thread's own footprint (its V8 isolate), for the memory estimate. */
const AVERAGE_WORKER_BYTES = 10e6;
/** Node's own footprint, for the memory estimate. */
const BASE_MEMORY_BYTES = 120e6;

/** The attention slots that shared-kv averages instead of giving each expert its own. */
const SHARED_KV_SLOTS: readonly Slot[] = ["attn.k_proj", "attn.v_proj", "attn.k_norm"];
/** The token embedding: what a router's dtype follows under --dtype keep (it has no seed tensor of its own). */
const EMBEDDING = tensorName({ layer: null, slot: "embed_tokens", expert: null, part: "weight" });
/** Embedding lookups: no matmul, so no FLOPs. */
const isEmbeddingSlot = (slot: string | undefined) => slot === "embed_tokens" || slot === "embed_positions";

/** Checks the seeds agree on everything the mixture needs; names both seeds and the difference. */
export function checkSeeds(seeds: DenseModel[]): void {
  const [first, ...rest] = seeds;
  if (first === undefined) throw new BamError("OPTIONS_INVALID", "name at least one seed folder");
  const label = (s: DenseModel) => `${s.name} (${s.dir})`;
  const firstConfig = featuresToConfig(first.features) as unknown as Record<string, unknown>;
  for (const seed of rest) {
    const config = featuresToConfig(seed.features) as unknown as Record<string, unknown>;
    for (const key of Object.keys(firstConfig)) {
      const a = JSON.stringify(firstConfig[key]);
      const b = JSON.stringify(config[key]);
      if (a !== b) {
        throw new BamError(
          "SEED_MISMATCH",
          `seed ${label(seed)} differs from seed ${label(first)} in ${key}: ${b} vs ${a}; seeds must share one architecture`,
        );
      }
    }
    if (seed.tokenizerHash !== first.tokenizerHash) {
      throw new BamError(
        "SEED_MISMATCH",
        `seed ${label(seed)} has a different tokenizer.json from seed ${label(first)} (sha256 ${short(seed.tokenizerHash)} vs ${short(first.tokenizerHash)}); experts must share one vocabulary`,
      );
    }
    for (const tensor of first.tensors.values()) {
      const other = seed.tensors.get(tensor.name);
      if (other === undefined) {
        throw new BamError(
          "SEED_MISMATCH",
          `seed ${label(seed)} lacks tensor ${tensor.name} that seed ${label(first)} has`,
        );
      }
      if (other.shape.join("x") !== tensor.shape.join("x")) {
        throw new BamError(
          "SEED_MISMATCH",
          `seed ${label(seed)}: tensor ${tensor.name} has shape [${other.shape}], seed ${label(first)} has [${tensor.shape}]`,
        );
      }
    }
    for (const name of seed.tensors.keys()) {
      if (!first.tensors.has(name))
        throw new BamError("SEED_MISMATCH", `seed ${label(seed)} has tensor ${name} that seed ${label(first)} lacks`);
    }
  }
}

function short(hash: string | null): string {
  return hash === null ? "none" : `${hash.slice(0, 12)}...`;
}

/** The output dtype of a tensor made from sources of these dtypes. */
function outputDType(option: ResolvedOptions["dtype"], sources: DType[]): FloatDType {
  if (option !== "keep") return ({ bf16: "BF16", f16: "F16", f32: "F32" } as const)[option];
  const first = sources[0];
  const same = sources.every((d) => d === first);
  if (same && (first === "F32" || first === "F16" || first === "BF16")) return first;
  return "F32"; // mixed seed dtypes: widen rather than pick one seed's rounding
}

/** Where the shared tensors come from with --shared-from: a seed, or the model opened after the seeds. */
export function sharedIndex(seeds: string[], sharedFrom: string): number {
  const at = seeds.findIndex((seed) => resolve(seed) === resolve(sharedFrom));
  return at === -1 ? seeds.length : at;
}

/** The models an upcycle opens: the seeds, then the --shared-from model when it is none of them. */
export function inputModels(options: Pick<UpcycleOptions, "seeds" | "sharedFrom">): string[] {
  const { seeds, sharedFrom } = options;
  return typeof sharedFrom === "string" && sharedIndex(seeds, sharedFrom) === seeds.length
    ? [...seeds, sharedFrom]
    : seeds;
}

/** The files of a seed the plan records (SeedInfo.files), as they are now. */
export async function seedFiles(seed: Seed): Promise<SeedFile[]> {
  return Promise.all(
    filesToHash(seed).files.map(async (file) => {
      const path = resolve(file);
      const info = await stat(path).catch((error: unknown) => {
        throw ioError(path, error);
      });
      return { path, bytes: info.size, modifiedMs: info.mtimeMs };
    }),
  );
}

/**
 * Builds the plan from the opened `inputModels` and their `seedFiles`;
 * `options` must already be resolved and the models checked. The plan is a
 * frozen copy (plain data): nothing changes it once made.
 */
export function buildPlan(seeds: Seed[], options: ResolvedOptions, files: SeedFile[][]): UpcyclePlan {
  const first = seeds[0]!;
  const features = first.features;
  const E = options.experts;
  const attention: AttentionExperts = E === 1 ? "merged" : options.attention;
  const hasRouters = E > 1;
  const seedCount = options.seeds.length; // the --shared-from model may follow the seeds
  const expertSeed = (e: number) => (seedCount === 1 ? 0 : e);
  const seedIndices = options.seeds.map((_, i) => i);
  const shared = options.sharedFrom === null ? null : sharedIndex(options.seeds, options.sharedFrom);
  const dtypeOf = (ref: SourceRef) => seeds[ref.seed]!.tensors.get(ref.tensor)!.dtype;
  const shapeOf = (name: string) => first.tensors.get(name)!.shape;

  const tensors: PlannedTensor[] = [];
  const add = (name: string, shape: number[], sources: SourceRef[], operation: Operation) => {
    // "keep" looks at the tensor in every seed, not only the one copied: an expert copied from a bf16 seed beside an f32 one is widened too
    const refs = sources.length > 0 ? sources : [{ seed: 0, tensor: EMBEDDING }];
    const sourceDtypes = refs.flatMap((ref) => seeds.map((_, seed) => dtypeOf({ ...ref, seed })));
    tensors.push({ name, shape, dtype: outputDType(options.dtype, sourceDtypes), operation });
  };
  const average = (outName: string, tensor: string) => {
    const from = shared === null ? seedIndices.map((seed) => ({ seed, tensor })) : [{ seed: shared, tensor }];
    const operation: Operation =
      from.length === 1 ? { kind: "copy", from: from[0]! } : { kind: "average", from, weights: options.weights };
    add(outName, shapeOf(tensor), from, operation);
  };
  const copy = (outName: string, seed: number, tensor: string) => {
    const from = { seed, tensor };
    add(outName, shapeOf(tensor), [from], { kind: "copy", from });
  };
  const router = (layer: number, slot: RouterSlot) => {
    const name = tensorName({ layer, slot, expert: null, part: "weight" });
    const key = moduleName({ layer, slot, expert: null });
    // Switch: truncated normal with std sqrt(scale / fan_in); zero routers start uniform.
    const std = options.routerInit === "zero" ? 0 : Math.sqrt(options.routerScale / features.hiddenSize);
    const operation: Operation = PROMPT_ROUTER_INITS.includes(options.routerInit)
      ? { kind: "router", std: 0, key, fromPrompts: true }
      : options.routerInit === "uniform-random"
        ? { kind: "router", std: 0, key, bound: 1 / Math.sqrt(features.hiddenSize) }
        : { kind: "router", std, key };
    add(name, [E, features.hiddenSize], [], operation);
  };

  // The seeds' canonical layout, in order: embeddings, then per layer its norms, attention router and
  // attention, FFN router and experts, then the final norm and head.
  const layout = canonicalLayout(features);
  const expertName = (entry: LayoutEntry, expert: number) =>
    tensorName({ layer: entry.layer, slot: entry.slot, expert, part: entry.suffix });
  const globals = layout.filter((entry) => entry.layer === null);

  for (const entry of globals.filter((x) => isEmbeddingSlot(x.slot))) average(entry.name, entry.name);
  for (let layer = 0; layer < features.numLayers; layer++) {
    const entries = layout.filter((entry) => entry.layer === layer);
    const attentionEntries = entries.filter((entry) => siteOf(entry.slot) === "attn");
    const mlpEntries = entries.filter((entry) => siteOf(entry.slot) === "mlp");
    for (const entry of entries) {
      if (siteOf(entry.slot) === null) average(entry.name, entry.name);
    }
    if (hasRouters && attention !== "merged") router(layer, "attn.router");
    if (attention === "merged") {
      for (const entry of attentionEntries) average(entry.name, entry.name);
    } else {
      const isShared = (entry: LayoutEntry) => attention === "shared-kv" && SHARED_KV_SLOTS.includes(entry.slot);
      for (let e = 0; e < E; e++) {
        for (const entry of attentionEntries.filter((x) => !isShared(x)))
          copy(expertName(entry, e), expertSeed(e), entry.name);
      }
      for (const entry of attentionEntries.filter(isShared)) average(entry.name, entry.name);
    }
    if (hasRouters) router(layer, "mlp.router");
    for (let e = 0; e < E; e++) {
      for (const entry of mlpEntries) {
        const outName = expertName(entry, e);
        const from = { seed: expertSeed(e), tensor: entry.name };
        if (options.dropRatio > 0 && entry.suffix === "weight") {
          const axis = entry.slot === "mlp.down_proj" ? 1 : 0;
          add(outName, shapeOf(entry.name), [from], {
            kind: "drop",
            from,
            ratio: options.dropRatio,
            axis,
            key: expertModule(layer, "mlp", e),
          });
        } else {
          add(outName, shapeOf(entry.name), [from], { kind: "copy", from });
        }
      }
    }
  }
  for (const entry of globals.filter((x) => !isEmbeddingSlot(x.slot))) average(entry.name, entry.name);

  const moe: FormatMoe = {
    numExperts: E,
    expertsPerToken: options.expertsPerToken,
    normTopkProb: options.normTopkProb,
    attentionExperts: attention,
    block: options.block,
    routerAuxLossCoef: options.routerAuxLossCoef,
    routerZLossCoef: options.routerZLossCoef,
  };
  return deepFreeze(
    structuredClone({
      options,
      seeds: seeds.map((s, i) => ({
        dir: s.dir,
        name: s.name,
        dtypes: [...new Set([...s.tensors.values()].map((t) => t.dtype))],
        files: files[i]!,
      })),
      features,
      moe,
      format: planFormat(
        options.format,
        features,
        moe,
        tensors[0]!.dtype,
        first.rawConfig,
        tensors.map((t) => t.name),
      ), // refuses a format that cannot hold the model
      tensors,
      summary: summarise(
        first,
        seeds.length,
        tensors,
        moe,
        hashingMemoryBytes(seeds.map(filesToHash)) + seeds.reduce((n, s) => n + s.entryBytes, 0),
      ),
      warnings: [...planWarnings(features, options, seedCount, attention), ...chatSettingWarnings(seeds)],
    }),
  );
}

/** Freezes every object and list reachable from `value` (plain data without cycles, as a plan is). */
function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object") {
    for (const item of Object.values(value)) deepFreeze(item);
    Object.freeze(value);
  }
  return value;
}

function planWarnings(
  features: ArchFeatures,
  options: ResolvedOptions,
  seedCount: number,
  attention: AttentionExperts,
): string[] {
  const warnings: string[] = [];
  const seedBlock = features.parallelBlock ? "parallel" : "sequential";
  if (options.block !== seedBlock) {
    warnings.push(
      `the seeds use a ${seedBlock} block and the model is built with a ${options.block} block: it does not compute the seeds' function until fine-tuned; use --block ${seedBlock} to keep it function-preserving`,
    );
  }
  if (options.experts === 1 && seedCount === 1)
    warnings.push(
      "one seed and one expert: this writes the dense seed in the BAM layout (use --experts N for sparse upcycling)",
    );
  if (options.attention !== attention) warnings.push(`one expert: attention is merged, not ${options.attention}`);
  if (options.experts > 1 && options.expertsPerToken === 1 && options.normTopkProb) {
    // The renormalised top-1 weight is p / p = 1 whatever the router says (docs/method.md, "FFN gating").
    const remedy =
      options.format === "mixtral"
        ? "use -k 2 or more (Mixtral's gate always renormalises), or --format bam or qwen3-moe with --no-norm-topk-prob"
        : "use -k 2 or more, or --no-norm-topk-prob (the paper's gate)";
    warnings.push(
      `top-1 with the renormalised gate (--norm-topk-prob): the FFN router gets no gradient from the language-model loss, only from the load-balance and z-losses; ${remedy}`,
    );
  }
  return warnings;
}

function summarise(
  seed: DenseModel,
  seedCount: number,
  tensors: PlannedTensor[],
  moe: FormatMoe,
  hashingBytes: number,
): PlanSummary {
  const seedParams = countParameters(seed.tensors.values(), 1, 1);
  const params = countParameters(tensors, moe.numExperts, moe.expertsPerToken);
  const f = seed.features;
  const embeddings = (list: Iterable<{ name: string; shape: number[] }>) => {
    let n = 0;
    for (const t of list) {
      if (isEmbeddingSlot(parseTensorName(t.name)?.slot)) n += t.shape.reduce((a, b) => a * b, 1);
    }
    return n;
  };
  // Forward FLOPs per token: 2 per matmul weight (embedding lookups are free), plus attention
  // scores and mixing, 2 x 2 x (average causal context) x heads x head_dim per layer per expert.
  const attentionCopies = moe.attentionExperts === "merged" ? 1 : moe.numExperts;
  const scoreFlops = (copies: number) => 4 * (FLOP_CONTEXT / 2) * f.numHeads * f.headDim * f.numLayers * copies;
  const seedFlops = 2 * (seedParams.total - embeddings(seed.tensors.values())) + scoreFlops(1);
  const flops = 2 * (params.activePerToken - embeddings(tensors)) + scoreFlops(attentionCopies);
  const bytesOf = (t: PlannedTensor) => t.shape.reduce((a, b) => a * b, 1) * DTYPE_SIZE[t.dtype];
  const outputBytes = tensors.reduce((sum, t) => sum + bytesOf(t), 0);
  // Working set: the writer's batches in flight, each with an average's range per source (at most
  // twice the batch each, an F32 source of a 16-bit output); up to 4 averaging workers (an isolate,
  // and the kernel's 14 bytes of scratch per element of a batch); a drop's whole matrix in float32 and encoded;
  // the threads hashing the seeds and the seeds' open tensor entries (hashingBytes holds both).
  const largestDrop = Math.max(
    0,
    ...tensors.filter((t) => t.operation.kind === "drop").map((t) => t.shape.reduce((a, b) => a * b, 1) * 8),
  );
  const chunkBytes =
    (BATCHES_IN_FLIGHT + EARLY_BATCHES_IN_FLIGHT) * WRITE_BATCH_BYTES * (1 + 2 * seedCount) +
    4 * (AVERAGE_WORKER_BYTES + WRITE_BATCH_BYTES * 7);
  return {
    experts: moe.numExperts,
    expertsPerToken: moe.expertsPerToken,
    attention: moe.attentionExperts,
    block: moe.block,
    seedParameters: seedParams.total,
    totalParameters: params.total,
    activeParameters: params.activePerToken,
    flopsPerTokenRatio: flops / seedFlops,
    outputBytes,
    peakMemoryBytes: BASE_MEMORY_BYTES + chunkBytes + largestDrop + hashingBytes,
  };
}
