/**
 * BAM tensor names (docs/format.md, "Tensor names"), built and parsed here
 * and nowhere else. A name is a `TensorName`: a global tensor (embeddings,
 * final norm, head), one of a layer's slots (its norms, an attention or FFN
 * projection, a q/k norm), of one expert or shared, or a layer's router. A
 * dense seed's canonical names (src/arch/types.ts) are the same names with no
 * expert; a BAM folder holds every FFN under `mlp.experts.{e}`.
 */
import { GLOBAL_SLOTS, LAYER_SLOTS, type GlobalSlot, type LayerSlot, type Slot, type TensorNames } from "./families.js";

/** Which tensor of a module: every name ends in one. */
export type Part = "weight" | "bias";
/** The two halves of a layer that have experts and routers. */
export type Site = "attn" | "mlp";
export const ROUTER_SLOTS = ["attn.router", "mlp.router"] as const;
/** A layer's router over its attention or FFN experts (weight only, [E, hidden]). */
export type RouterSlot = (typeof ROUTER_SLOTS)[number];

export interface TensorName {
  /** Layer index; null for the global tensors (embeddings, final norm, head). */
  layer: number | null;
  /** What the tensor is: a canonical slot (src/arch/families.ts) or a router. */
  slot: Slot | RouterSlot;
  /** The attention or FFN expert it belongs to; null for a merged, shared or dense one (and every other slot). */
  expert: number | null;
  /** The weight or the bias. */
  part: Part;
}

const GLOBAL_MODULES: Readonly<Record<GlobalSlot, string>> = {
  embed_tokens: "model.embed_tokens",
  embed_positions: "model.embed_positions",
  norm: "model.norm",
  lm_head: "lm_head",
};
const LAYERS = "model.layers";
const EXPERTS = "experts";

const isGlobalSlot = (slot: string): slot is GlobalSlot => (GLOBAL_SLOTS as readonly string[]).includes(slot);
const isLayerSlot = (slot: string): slot is LayerSlot => (LAYER_SLOTS as readonly string[]).includes(slot);
const isRouterSlot = (slot: string): slot is RouterSlot => (ROUTER_SLOTS as readonly string[]).includes(slot);

/** The site (attn or mlp) of a slot inside one, or null for the layer's norms and the global slots. */
export function siteOf(slot: Slot | RouterSlot): Site | null {
  return slot.startsWith("attn.") ? "attn" : slot.startsWith("mlp.") ? "mlp" : null;
}

/**
 * The module that holds one expert's projections of a layer's attention or
 * FFN (`model.layers.l.mlp.experts.e`), or the merged/shared one with expert
 * null (`model.layers.l.attn`).
 */
export function expertModule(layer: number, site: Site, expert: number | null): string {
  const module = `${LAYERS}.${layer}.${site}`;
  return expert === null ? module : `${module}.${EXPERTS}.${expert}`;
}

/** Why docs/format.md has no name for this combination, or null when it has one. */
function problem(t: TensorName): string | null {
  const { layer, slot, expert, part } = t;
  if (expert !== null && (!isLayerSlot(slot) || siteOf(slot) === null))
    return "only attention and FFN slots have experts";
  if (expert !== null && !(Number.isInteger(expert) && expert >= 0)) return "the expert is an index";
  if (isGlobalSlot(slot)) return layer === null ? null : "a global slot has no layer";
  if (layer === null || !(Number.isInteger(layer) && layer >= 0)) return "a layer slot needs a layer index";
  if (isRouterSlot(slot) && part !== "weight") return "a router has a weight only";
  return null;
}

/** A tensor's module: its name without `.weight` or `.bias` (router and drop keys, ONNX weight prefixes). */
export function moduleName(t: Omit<TensorName, "part">): string {
  return validModule(checked({ ...t, part: "weight" }));
}

/** The name of a tensor; throws on a combination docs/format.md has no name for (a programming error). */
export function tensorName(t: TensorName): string {
  return `${validModule(checked(t))}.${t.part}`;
}

function checked(t: TensorName): TensorName {
  const why = problem(t);
  if (why !== null) throw new Error(`names.ts: ${JSON.stringify(t)} is no BAM tensor: ${why}`);
  return t;
}

function validModule({ layer, slot, expert }: TensorName): string {
  if (isGlobalSlot(slot)) return GLOBAL_MODULES[slot];
  const site = siteOf(slot);
  if (isRouterSlot(slot)) return `${expertModule(layer!, site!, null)}.router`;
  if (site === null) return `${LAYERS}.${layer}.${slot}`;
  return `${expertModule(layer!, site, expert)}.${slot.slice(site.length + 1)}`;
}

const GLOBAL_BY_MODULE = new Map(Object.entries(GLOBAL_MODULES).map(([slot, module]) => [module, slot as GlobalSlot]));
const LAYER_MODULE = /^model\.layers\.(\d+)\.(?:(attn|mlp)\.experts\.(\d+)\.)?(.+)$/;

/**
 * What a name is, or undefined for a name docs/format.md does not define
 * (another model's tensor, a stray buffer, a non-canonical spelling such as
 * a zero-padded index): a parsed name always rebuilds to itself.
 */
export function parseTensorName(name: string): TensorName | undefined {
  const dot = name.lastIndexOf(".");
  const part = name.slice(dot + 1);
  if (dot < 0 || (part !== "weight" && part !== "bias")) return undefined;
  const module = name.slice(0, dot);
  let parsed: TensorName | undefined;
  const global = GLOBAL_BY_MODULE.get(module);
  if (global !== undefined) {
    parsed = { layer: null, slot: global, expert: null, part };
  } else {
    const match = LAYER_MODULE.exec(module);
    if (match === null) return undefined;
    const [, layer, site, expert, rest] = match as unknown as [
      string,
      string,
      string | undefined,
      string | undefined,
      string,
    ];
    const slot = site === undefined ? rest : `${site}.${rest}`;
    if (!isLayerSlot(slot) && !isRouterSlot(slot)) return undefined;
    parsed = { layer: Number(layer), slot, expert: expert === undefined ? null : Number(expert), part };
  }
  // an expert where there is none, a router bias, a zero-padded index: not a name
  return problem(parsed) === null && `${validModule(parsed)}.${part}` === name ? parsed : undefined;
}

/** A dense seed's canonical name in the BAM view (src/arch/model.ts): its FFN is expert 0. */
export function denseToBamName(name: string): string {
  const t = parseTensorName(name);
  return t !== undefined && t.expert === null && siteOf(t.slot) === "mlp" && isLayerSlot(t.slot)
    ? tensorName({ ...t, expert: 0 })
    : name;
}

/**
 * How a BAM folder of one FFN expert and merged attention (`bam upcycle SEED
 * --experts 1`) names each canonical slot, `{l}` for the layer
 * (src/arch/layout.ts's source templates): what reads such a folder back as
 * a dense seed.
 */
export const SINGLE_EXPERT_BAM_TENSORS: TensorNames = {
  prefix: "model.",
  sources: Object.fromEntries([
    ...GLOBAL_SLOTS.map((slot) => [slot, GLOBAL_MODULES[slot]]),
    ...LAYER_SLOTS.map((slot) => {
      const site = siteOf(slot);
      const layer = `${LAYERS}.{l}`;
      return [slot, site === "mlp" ? `${layer}.mlp.${EXPERTS}.0.${slot.slice(site.length + 1)}` : `${layer}.${slot}`];
    }),
  ]),
  ignored: [],
};
