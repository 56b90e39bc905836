/**
 * Output formats: the BAM folder of docs/format.md (remote code), and the
 * native Mixtral and Qwen3-MoE layouts that stock transformers loads with no
 * remote code, where the model fits them.
 */
import { BamError } from "../errors.js";
import { featuresToConfig, sizeConfig } from "../arch/features.js";
import { tokenIds } from "../arch/folder.js";
import type { AttentionExperts, BlockKind, MoeSettings, SeedRecord } from "../arch/model.js";
import type { ArchFeatures } from "../arch/types.js";
import type { FloatDType } from "../safetensors/index.js";
import { NATIVE_LAYOUTS, toNativeName, type NativeFormat } from "../arch/native.js";

/** The type's one source and the CLI flag's choices (`--format`). */
export const OUTPUT_FORMATS = ["bam", "mixtral", "qwen3-moe"] as const;
export type OutputFormat = (typeof OUTPUT_FORMATS)[number];

/** The mixture settings a format writes; upcycled_from (the seeds' hashes) is known only once the seeds are hashed. */
export type FormatMoe = Omit<MoeSettings, "upcycledFrom">;

/** What the output format makes of the model, decided while planning: plain data, part of the plan. */
export interface FormatPlan {
  /** config.json of the output folder, less `upcycled_from` (configJson adds it). */
  config: Record<string, unknown>;
  /** BAM tensor name -> its name in the format's weights files, for each name the format changes. */
  tensorNames: Record<string, string>;
  /** Whether modeling_bam.py and configuration_bam.py go into the folder (the BAM format), and `upcycled_from` into config.json. */
  remoteCode: boolean;
}

/** The key `upcycled_from` follows in a BAM config.json (docs/format.md's order, as every folder so far has it). */
const UPCYCLED_FROM_AFTER = "capacity_factor";

const TORCH_DTYPE: Record<FloatDType, string> = { F32: "float32", F16: "float16", BF16: "bfloat16" };

/**
 * The format's plan for a model whose tensors have these BAM `names`;
 * refuses (OPTIONS_INVALID) a native format that cannot hold the model.
 */
export function planFormat(
  format: OutputFormat,
  features: ArchFeatures,
  moe: FormatMoe,
  dtype: FloatDType,
  seedConfig: Record<string, unknown>,
  names: readonly string[],
): FormatPlan {
  if (format === "bam") {
    return {
      remoteCode: true,
      tensorNames: {},
      config: {
        model_type: "bam",
        architectures: ["BamForCausalLM"],
        auto_map: { AutoConfig: "configuration_bam.BamConfig", AutoModelForCausalLM: "modeling_bam.BamForCausalLM" },
        ...featuresToConfig(features),
        num_experts: moe.numExperts,
        num_experts_per_tok: moe.expertsPerToken,
        norm_topk_prob: moe.normTopkProb,
        attention_experts: moe.attentionExperts,
        block: moe.block,
        router_aux_loss_coef: moe.routerAuxLossCoef,
        router_z_loss_coef: moe.routerZLossCoef,
        router_jitter: 0,
        expert_dropout: 0,
        capacity_factor: null,
        ...tokenIds(seedConfig),
        dtype: TORCH_DTYPE[dtype],
        use_cache: true,
      },
    };
  }
  const problems = nativeProblems(format, features, moe);
  if (problems.length > 0) {
    throw new BamError(
      "OPTIONS_INVALID",
      `--format ${format} cannot hold this model: ${problems.join("; ")}; ${problems.length > 1 ? "change all of these" : "change this"}, or use --format bam`,
    );
  }
  const layout = NATIVE_LAYOUTS[format];
  const rename = toNativeName(format);
  return {
    remoteCode: false,
    tensorNames: Object.fromEntries(names.filter((name) => rename(name) !== name).map((name) => [name, rename(name)])),
    config: {
      model_type: layout.modelType,
      architectures: [layout.architecture],
      ...nativeCommon(features, moe),
      [layout.intermediateKey]: features.intermediateSize,
      [layout.expertsKey]: moe.numExperts,
      // transformers' Mixtral ignores the key and always renormalises; written so the folder says which gate it computes
      norm_topk_prob: moe.normTopkProb,
      ...layout.required,
      ...(format === "mixtral" ? { sliding_window: features.slidingWindow } : {}),
      ...tokenIds(seedConfig),
      dtype: TORCH_DTYPE[dtype],
    },
  };
}

/**
 * config.json's text: the plan's config, with `upcycledFrom` (each seed's
 * record as hashed, its files' hashes included: docs/format.md) as
 * `upcycled_from` where the format has remote code.
 */
export function configJson(format: FormatPlan, upcycledFrom: readonly SeedRecord[]): string {
  const entries = Object.entries(format.config);
  if (format.remoteCode)
    entries.splice(entries.findIndex(([key]) => key === UPCYCLED_FROM_AFTER) + 1, 0, ["upcycled_from", upcycledFrom]);
  return `${JSON.stringify(Object.fromEntries(entries), null, 2)}\n`;
}

/** BAM tensor name -> its name in the format's weights files. */
export function formatTensorName(format: FormatPlan, name: string): string {
  return Object.hasOwn(format.tensorNames, name) ? format.tensorNames[name]! : name;
}

/** Options a native format picks where the user chose none. */
export interface FormatDefaults {
  /** Attention experts. */
  attention?: AttentionExperts;
  /** Block kind. */
  block?: BlockKind;
  /** FFN gate renormalised. */
  normTopkProb?: boolean;
}

/**
 * What the native formats need of the options, picked by the format where
 * the user chose nothing (src/upcycle/options.ts resolves the rest): merged
 * attention in a sequential block, and Mixtral's renormalised gate.
 */
export function formatDefaults(format: OutputFormat | undefined): FormatDefaults {
  // Not yet validated (the API takes any string): anything but a native format implies nothing, and ./options.ts refuses it.
  const layout =
    typeof format === "string" && Object.hasOwn(NATIVE_LAYOUTS, format)
      ? NATIVE_LAYOUTS[format as NativeFormat]
      : undefined;
  if (layout === undefined) return {};
  return {
    attention: "merged",
    block: "sequential",
    ...(layout.normTopkProbKey === null ? { normTopkProb: true } : {}),
  };
}

/** Config keys shared by the native MoE families (v5 rope_parameters, v4 rope_theta). */
function nativeCommon(f: ArchFeatures, moe: FormatMoe): Record<string, unknown> {
  const rope = f.rope!;
  return {
    ...sizeConfig(f),
    hidden_act: "silu",
    rms_norm_eps: f.normEps,
    rope_theta: rope.theta,
    rope_scaling: rope.scaling,
    rope_parameters: { rope_type: rope.scaling?.type ?? "default", ...(rope.scaling ?? {}), rope_theta: rope.theta },
    tie_word_embeddings: f.tiedEmbeddings,
    num_experts_per_tok: moe.expertsPerToken,
    router_aux_loss_coef: moe.routerAuxLossCoef,
    output_router_logits: false,
    attention_dropout: 0,
    use_cache: true,
  };
}

/**
 * Everything that keeps the model out of a native format (a plain sequential
 * llama-style block with merged attention), each saying what to change; all
 * of them, so one run names every flag to fix.
 */
function nativeProblems(format: NativeFormat, f: ArchFeatures, moe: FormatMoe): string[] {
  const layout = NATIVE_LAYOUTS[format];
  const problems: string[] = [];
  if (!layout.families.includes(f.family))
    problems.push(`it takes ${layout.families.join(" or ")} seeds, not ${f.family}`);
  if (moe.attentionExperts !== "merged")
    problems.push(
      `it has no attention experts (--attention ${moe.attentionExperts}; leave it out or pass --attention merged)`,
    );
  if (moe.block !== "sequential")
    problems.push(`its block is sequential (--block ${moe.block}; leave it out or pass --block sequential)`);
  if (layout.normTopkProbKey === null && !moe.normTopkProb) {
    // transformers' Mixtral always renormalises the top-k weights: it cannot hold the paper's gate.
    problems.push(
      "it always renormalises the top-k weights, so it cannot hold the paper's gate (--no-norm-topk-prob; leave it out or pass --norm-topk-prob, or use --format qwen3-moe)",
    );
  }
  if (moe.numExperts < 2) problems.push("it needs at least 2 experts");
  if (f.qkvBias || f.attnOutBias || f.mlpBias) problems.push("the seeds have projection biases");
  if (f.norm !== "rms" || f.normUnitOffset || f.activation !== "silu" || !f.gatedMlp)
    problems.push("the seeds are not llama-style (RMSNorm, gated SiLU MLP)");
  if (f.rope === null || f.rope.dim !== f.headDim || f.rope.style !== "half")
    problems.push("the seeds' rotary embedding is not full half-split rope");
  if (format === "qwen3-moe" && f.slidingWindow !== null) problems.push("the seeds use sliding-window attention");
  if (f.embeddingScale !== null || f.logitScale !== null) problems.push("the seeds scale embeddings or logits");
  const qkNorm = format === "qwen3-moe" ? "shared" : "none";
  if (f.qkNorm !== qkNorm)
    problems.push(
      qkNorm === "none"
        ? "the seeds have query/key norms, which it lacks"
        : "the seeds lack the shared query/key norms it has",
    );
  return problems;
}
