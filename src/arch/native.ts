/**
 * The native MoE layouts stock transformers loads without remote code
 * (Mixtral, Qwen3-MoE), as one table per format read both ways: the writer
 * (src/export/formats.ts) renames BAM tensors and names config keys from it,
 * and the opener (./model.ts) reads the same folders back into the BAM view
 * of docs/format.md. Both formats hold a BAM model with merged attention, a
 * sequential block and llama-style layers. The BAM side of every name comes
 * from ./names.ts; the modules and config keys from python/native_formats.json,
 * which scripts/bamtrain/native.py reads for the Python side.
 */
import { readFileSync } from "node:fs";
import { BamError } from "../errors.js";
import { featuresFromHfConfig, show, type HfConfig } from "./config.js";
import { familySpec, LAYER_SLOTS, type FamilySpec, type LayerSlot } from "./families.js";
import { parseTensorName, ROUTER_SLOTS, tensorName, type Part, type RouterSlot } from "./names.js";
import type { ModelKind, MoeSettings } from "./model.js";
import type { ArchFeatures, Family } from "./types.js";

export type NativeFormat = "mixtral" | "qwen3-moe";

export interface NativeLayout {
  /** config.json `model_type` and `architectures`. */
  modelType: Exclude<ModelKind, "dense" | "bam">;
  architecture: string;
  /** Seed families the format holds; the first is the one its folders read back as. */
  families: readonly Family[];
  /**
   * The native module of each BAM slot the format names otherwise, under `model.layers.{l}.` ({e}: the
   * expert); every other tensor keeps its BAM name (src/arch/names.ts).
   */
  modules: Readonly<Partial<Record<LayerSlot | RouterSlot, string>>>;
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

/** python/native_formats.json, the table scripts/bamtrain/native.py reads too: what both halves share of a format. */
interface SharedLayout {
  architecture: string;
  modules: Record<string, string>;
  experts_key: string;
  intermediate_key: string;
  norm_topk_prob_key: string | null;
  norm_topk_prob_default: boolean;
  required: Record<string, unknown>;
}

const SHARED = JSON.parse(
  readFileSync(new URL("../../../python/native_formats.json", import.meta.url), "utf8"),
) as Record<string, SharedLayout>;

const MAPPED_SLOTS: readonly string[] = [...LAYER_SLOTS, ...ROUTER_SLOTS];

function layout(
  modelType: NativeLayout["modelType"],
  families: readonly Family[],
  spec: NativeLayout["spec"],
): NativeLayout {
  const shared = SHARED[modelType]!;
  for (const slot of Object.keys(shared.modules)) {
    if (!MAPPED_SLOTS.includes(slot))
      throw new Error(`python/native_formats.json: ${modelType}: "${slot}" is no BAM layer slot`);
  }
  return {
    modelType,
    architecture: shared.architecture,
    families,
    modules: shared.modules as NativeLayout["modules"],
    expertsKey: shared.experts_key,
    intermediateKey: shared.intermediate_key,
    normTopkProbKey: shared.norm_topk_prob_key,
    normTopkProbDefault: shared.norm_topk_prob_default,
    required: shared.required,
    spec,
  };
}

export const NATIVE_LAYOUTS: Readonly<Record<NativeFormat, NativeLayout>> = {
  // MixtralConfig: no window unless one is set, rope base 1e6.
  mixtral: layout("mixtral", ["mistral", "llama"], (s) => ({
    ...s,
    modelTypes: ["mixtral"],
    slidingWindow: { window: { keys: ["sliding_window"], default: null }, enabled: true },
    rope: s.rope === null ? null : { ...s.rope, theta: { keys: ["rope_theta"], default: 1e6 } },
  })),
  "qwen3-moe": layout("qwen3_moe", ["qwen3"], (s) => ({
    ...s,
    modelTypes: ["qwen3_moe"],
    sizes: { ...s.sizes, intermediateSize: ["moe_intermediate_size"] },
  })),
};

export const NATIVE_FORMATS = Object.keys(NATIVE_LAYOUTS) as NativeFormat[];

/** The native format whose folders have this `model_type`, or undefined. */
export function nativeFormatOf(modelType: unknown): NativeFormat | undefined {
  return NATIVE_FORMATS.find((format) => NATIVE_LAYOUTS[format].modelType === modelType);
}

type Renamer = (name: string) => string;

/** BAM tensor name -> the format's. */
export function toNativeName(format: NativeFormat): Renamer {
  const { modules } = NATIVE_LAYOUTS[format];
  return (name) => {
    const t = parseTensorName(name);
    const module = t === undefined || t.layer === null ? undefined : modules[t.slot as LayerSlot | RouterSlot];
    // a module per expert only for a tensor of one expert, a shared one only for a shared tensor
    if (t === undefined || module === undefined || module.includes("{e}") !== (t.expert !== null)) return name;
    return `${NATIVE_LAYER}${t.layer}.${module.replace("{e}", String(t.expert))}.${t.part}`;
  };
}

/** The format's tensor name -> BAM's. */
export function fromNativeName(format: NativeFormat): Renamer {
  const toNative = toNativeName(format);
  const patterns = Object.entries(NATIVE_LAYOUTS[format].modules).map(([slot, module]) => {
    const escaped = `${NATIVE_LAYER}{l}.${module}.`.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const parts = (ROUTER_SLOTS as readonly string[]).includes(slot) ? "weight" : "weight|bias";
    const regex = new RegExp(
      `^${escaped.replace("\\{l\\}", "(?<layer>\\d+)").replace("\\{e\\}", "(?<expert>\\d+)")}(?<part>${parts})$`,
    );
    return { slot: slot as LayerSlot | RouterSlot, regex };
  });
  return (name) => {
    for (const { slot, regex } of patterns) {
      const groups = regex.exec(name)?.groups;
      if (groups === undefined) continue;
      const expert = groups.expert === undefined ? null : Number(groups.expert);
      const bam = tensorName({ layer: Number(groups.layer), slot, expert, part: groups.part as Part });
      // one name each way: a spelling that does not come back (a zero-padded index) is no tensor of the format
      return toNative(bam) === name ? bam : name;
    }
    return name;
  };
}

/** Where both formats keep a layer's tensors. */
const NATIVE_LAYER = "model.layers.";

/** The features and mixture of a native folder's config.json; refuses one that holds more than the BAM view can. */
export function nativeModel(format: NativeFormat, config: HfConfig): { features: ArchFeatures; moe: MoeSettings } {
  const layout = NATIVE_LAYOUTS[format];
  const { file, raw } = config;
  const bad = (key: string, want: string): never => {
    throw new BamError("CONFIG_INVALID", `${file}: "${key}" must be ${want}, found ${show(raw[key])}`);
  };
  for (const [key, want] of Object.entries(layout.required)) {
    if (raw[key] != null && JSON.stringify(raw[key]) !== JSON.stringify(want)) {
      throw new BamError(
        "FEATURE_UNSUPPORTED",
        `${file}: "${key}" is ${show(raw[key])}; ${layout.modelType} folders are read with ${show(want)}, as bam upcycle --format ${format} writes them`,
      );
    }
  }
  const family = layout.families[0]!;
  const features = featuresFromHfConfig(config, layout.spec(familySpec(family)));
  const int = (key: string, max: number): number => {
    const v = raw[key];
    return typeof v === "number" && Number.isInteger(v) && v >= 1 && v <= max
      ? v
      : bad(key, `an integer from 1 to ${max}`);
  };
  const numExperts = int(layout.expertsKey, 4096);
  const expertsPerToken = int("num_experts_per_tok", numExperts);
  const normTopkProb =
    layout.normTopkProbKey === null ? true : (raw[layout.normTopkProbKey] ?? layout.normTopkProbDefault);
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
