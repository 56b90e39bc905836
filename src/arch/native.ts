/**
 * The native MoE layouts stock transformers loads without remote code
 * (Mixtral, Qwen3-MoE), as one table per format read both ways: the writer
 * (src/export/formats.ts) renames BAM tensors and names config keys from it,
 * and the opener (./model.ts) reads the same folders back into the BAM view
 * of docs/format.md. Both formats hold a BAM model with merged attention, a
 * sequential block and llama-style layers. scripts/bamtrain/native.py holds
 * the same table for the Python side.
 */
import { BamError } from "../errors.js";
import { featuresFromHfConfig, show, type HfConfig } from "./config.js";
import { familySpec, type FamilySpec } from "./families.js";
import type { ModelKind, MoeSettings } from "./model.js";
import type { ArchFeatures, Family } from "./types.js";

export type NativeFormat = "mixtral" | "qwen3-moe";

export interface NativeLayout {
  /** config.json `model_type` and `architectures`. */
  modelType: Exclude<ModelKind, "dense" | "bam">;
  architecture: string;
  /** Seed families the format holds; the first is the one its folders read back as. */
  families: readonly Family[];
  /** (BAM fragment, native fragment) of tensor names, applied in order; {e} is an expert index. */
  tensors: ReadonlyArray<readonly [string, string]>;
  /** Config keys of the expert count and of each expert's intermediate size. */
  expertsKey: string;
  intermediateKey: string;
  /** Config key of the gate's renormalisation; null: the format always renormalises (Mixtral). */
  normTopkProbKey: string | null;
  /** transformers' default of that key, for a config.json that leaves it out. */
  normTopkProbDefault: boolean;
  /** Config keys that must hold these values (or be absent) for the folder to be a BAM model. */
  required: Readonly<Record<string, unknown>>;
  /** The family adapter reading the rest of config.json (sizes, norm eps, rope, window). */
  spec: (family: FamilySpec) => FamilySpec;
}

export const NATIVE_LAYOUTS: Readonly<Record<NativeFormat, NativeLayout>> = {
  mixtral: {
    modelType: "mixtral",
    architecture: "MixtralForCausalLM",
    families: ["mistral", "llama"],
    tensors: [
      [".attn.", ".self_attn."],
      [".mlp.router.", ".block_sparse_moe.gate."],
      [".mlp.experts.{e}.gate_proj.", ".block_sparse_moe.experts.{e}.w1."],
      [".mlp.experts.{e}.down_proj.", ".block_sparse_moe.experts.{e}.w2."],
      [".mlp.experts.{e}.up_proj.", ".block_sparse_moe.experts.{e}.w3."],
    ],
    expertsKey: "num_local_experts",
    intermediateKey: "intermediate_size",
    normTopkProbKey: null,
    normTopkProbDefault: true,
    required: {},
    // MixtralConfig: no window unless one is set, rope base 1e6.
    spec: (s) => ({
      ...s,
      modelTypes: ["mixtral"],
      slidingWindow: { window: { keys: ["sliding_window"], default: null }, enabled: true },
      rope: s.rope === null ? null : { ...s.rope, theta: { keys: ["rope_theta"], default: 1e6 } },
    }),
  },
  "qwen3-moe": {
    modelType: "qwen3_moe",
    architecture: "Qwen3MoeForCausalLM",
    families: ["qwen3"],
    tensors: [
      [".attn.", ".self_attn."],
      [".mlp.router.", ".mlp.gate."],
    ],
    expertsKey: "num_experts",
    intermediateKey: "moe_intermediate_size",
    normTopkProbKey: "norm_topk_prob",
    normTopkProbDefault: false,
    required: { decoder_sparse_step: 1, mlp_only_layers: [], attention_bias: false, use_sliding_window: false },
    spec: (s) => ({ ...s, modelTypes: ["qwen3_moe"], sizes: { ...s.sizes, intermediateSize: ["moe_intermediate_size"] } }),
  },
};

export const NATIVE_FORMATS = Object.keys(NATIVE_LAYOUTS) as NativeFormat[];

/** The native format whose folders have this `model_type`, or undefined. */
export function nativeFormatOf(modelType: unknown): NativeFormat | undefined {
  return NATIVE_FORMATS.find((format) => NATIVE_LAYOUTS[format].modelType === modelType);
}

type Renamer = (name: string) => string;

function renamer(format: NativeFormat, toNative: boolean): Renamer {
  const patterns = NATIVE_LAYOUTS[format].tensors.map(([bam, native]) => {
    const [from, to] = toNative ? [bam, native] : [native, bam];
    const regex = new RegExp(from.split("{e}").map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("(\\d+)"));
    return [regex, to.replace("{e}", "$1")] as const;
  });
  return (name) => patterns.reduce((renamed, [regex, to]) => renamed.replace(regex, to), name);
}

/** BAM tensor name -> the format's. */
export const toNativeName = (format: NativeFormat): Renamer => renamer(format, true);
/** The format's tensor name -> BAM's. */
export const fromNativeName = (format: NativeFormat): Renamer => renamer(format, false);

/** The features and mixture of a native folder's config.json; refuses one that holds more than the BAM view can. */
export function nativeModel(format: NativeFormat, config: HfConfig): { features: ArchFeatures; moe: MoeSettings } {
  const layout = NATIVE_LAYOUTS[format];
  const { file, raw } = config;
  const bad = (key: string, want: string): never => {
    throw new BamError("CONFIG_INVALID", `${file}: "${key}" must be ${want}, found ${show(raw[key])}`);
  };
  for (const [key, want] of Object.entries(layout.required)) {
    if (raw[key] != null && JSON.stringify(raw[key]) !== JSON.stringify(want)) {
      throw new BamError("FEATURE_UNSUPPORTED", `${file}: "${key}" is ${show(raw[key])}; ${layout.modelType} folders are read with ${show(want)}, as bam upcycle --format ${format} writes them`);
    }
  }
  const family = layout.families[0]!;
  const features = featuresFromHfConfig(config, layout.spec(familySpec(family)));
  const int = (key: string, max: number): number => {
    const v = raw[key];
    return typeof v === "number" && Number.isInteger(v) && v >= 1 && v <= max ? v : bad(key, `an integer from 1 to ${max}`);
  };
  const numExperts = int(layout.expertsKey, 4096);
  const expertsPerToken = int("num_experts_per_tok", numExperts);
  const normTopkProb = layout.normTopkProbKey === null ? true : raw[layout.normTopkProbKey] ?? layout.normTopkProbDefault;
  if (typeof normTopkProb !== "boolean") bad(layout.normTopkProbKey!, "true or false");
  const auxLoss = raw.router_aux_loss_coef ?? 0.001;
  if (typeof auxLoss !== "number" || !(auxLoss >= 0)) bad("router_aux_loss_coef", "a non-negative number");
  return {
    features,
    moe: {
      numExperts,
      expertsPerToken,
      normTopkProb: normTopkProb as boolean,
      attentionExperts: "merged",
      block: "sequential",
      routerAuxLossCoef: auxLoss as number,
      routerZLossCoef: 0, // the native classes have no z-loss
      upcycledFrom: [],
    },
  };
}
