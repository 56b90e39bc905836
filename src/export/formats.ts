/**
 * Output formats: the BAM folder of docs/format.md (remote code), and the
 * native Mixtral and Qwen3-MoE layouts that stock transformers loads with no
 * remote code, where the model fits them.
 */
import { BamError } from "../errors.js";
import { featuresToConfig, sizeConfig } from "../arch/features.js";
import type { MoeSettings } from "../arch/model.js";
import type { ArchFeatures } from "../arch/types.js";
import type { FloatDType } from "../safetensors/index.js";
import type { OutputFormat } from "../upcycle/options.js";

export interface FormatWriter {
  /** config.json for the output folder. */
  config: Record<string, unknown>;
  /** BAM tensor name -> the format's tensor name. */
  rename: (name: string) => string;
  /** Whether modeling_bam.py and configuration_bam.py go into the folder. */
  remoteCode: boolean;
}

const TORCH_DTYPE: Record<FloatDType, string> = { F32: "float32", F16: "float16", BF16: "bfloat16" };

/** Token ids and generation defaults carried over from the first seed's config. */
function tokenIds(seedConfig: Record<string, unknown>): Record<string, unknown> {
  const kept: Record<string, unknown> = {};
  for (const key of ["bos_token_id", "eos_token_id", "pad_token_id"]) {
    if (seedConfig[key] !== undefined) kept[key] = seedConfig[key];
  }
  return kept;
}

export function formatWriter(
  format: OutputFormat, features: ArchFeatures, moe: MoeSettings, dtype: FloatDType, seedConfig: Record<string, unknown>,
): FormatWriter {
  switch (format) {
    case "bam":
      return {
        remoteCode: true,
        rename: (name) => name,
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
          upcycled_from: moe.upcycledFrom,
          ...tokenIds(seedConfig),
          dtype: TORCH_DTYPE[dtype],
          use_cache: true,
        },
      };
    case "mixtral":
      requireNative(format, features, moe, ["llama", "mistral"]);
      if (!moe.normTopkProb) {
        // transformers' Mixtral always renormalises the top-k weights: it cannot hold the paper's gate.
        throw new BamError("OPTIONS_INVALID", "--format mixtral always renormalises the top-k weights, so it cannot hold the paper's gate (--no-norm-topk-prob); pass --norm-topk-prob, or use --format bam or qwen3-moe");
      }
      return {
        remoteCode: false,
        rename: (name) =>
          name
            .replace(".attn.", ".self_attn.")
            .replace(".mlp.router.", ".block_sparse_moe.gate.")
            .replace(/\.mlp\.experts\.(\d+)\.gate_proj\./, ".block_sparse_moe.experts.$1.w1.")
            .replace(/\.mlp\.experts\.(\d+)\.down_proj\./, ".block_sparse_moe.experts.$1.w2.")
            .replace(/\.mlp\.experts\.(\d+)\.up_proj\./, ".block_sparse_moe.experts.$1.w3."),
        config: {
          model_type: "mixtral",
          architectures: ["MixtralForCausalLM"],
          ...nativeCommon(features, moe),
          num_local_experts: moe.numExperts,
          norm_topk_prob: true, // transformers' Mixtral ignores the key and always renormalises; written so the folder says which gate it computes
          sliding_window: features.slidingWindow,
          ...tokenIds(seedConfig),
          dtype: TORCH_DTYPE[dtype],
        },
      };
    case "qwen3-moe":
      requireNative(format, features, moe, ["qwen3"]);
      return {
        remoteCode: false,
        rename: (name) => name.replace(".attn.", ".self_attn.").replace(".mlp.router.", ".mlp.gate."),
        config: {
          model_type: "qwen3_moe",
          architectures: ["Qwen3MoeForCausalLM"],
          ...nativeCommon(features, moe),
          moe_intermediate_size: features.intermediateSize,
          num_experts: moe.numExperts,
          norm_topk_prob: moe.normTopkProb,
          decoder_sparse_step: 1,
          mlp_only_layers: [],
          attention_bias: false,
          use_sliding_window: false,
          ...tokenIds(seedConfig),
          dtype: TORCH_DTYPE[dtype],
        },
      };
  }
}

/** Config keys shared by the native MoE families (v5 rope_parameters, v4 rope_theta). */
function nativeCommon(f: ArchFeatures, moe: MoeSettings): Record<string, unknown> {
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

/** The native formats hold a plain sequential llama-style block with merged attention. */
function requireNative(format: OutputFormat, f: ArchFeatures, moe: MoeSettings, families: string[]): void {
  const refuse = (why: string): never => {
    throw new BamError("OPTIONS_INVALID", `--format ${format} cannot hold this model: ${why}; use --format bam`);
  };
  if (!families.includes(f.family)) refuse(`it takes ${families.join(" or ")} seeds, not ${f.family}`);
  if (moe.attentionExperts !== "merged") refuse(`it has no attention experts (pass --attention merged), not ${moe.attentionExperts}`);
  if (moe.block !== "sequential") refuse("its block is sequential (pass --block sequential)");
  if (moe.numExperts < 2) refuse("it needs at least 2 experts");
  if (f.qkvBias || f.attnOutBias || f.mlpBias) refuse("the seeds have projection biases");
  if (f.norm !== "rms" || f.normUnitOffset || f.activation !== "silu" || !f.gatedMlp) refuse("the seeds are not llama-style (RMSNorm, gated SiLU MLP)");
  if (f.rope === null || f.rope.dim !== f.headDim || f.rope.style !== "half") refuse("the seeds' rotary embedding is not full half-split rope");
  if (f.embeddingScale !== null || f.logitScale !== null) refuse("the seeds scale embeddings or logits");
  if ((f.qkNorm !== "none") !== (f.family === "qwen3")) refuse("the seeds' query/key norms do not match the format");
}
