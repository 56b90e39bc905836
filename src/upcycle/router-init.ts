/**
 * Prompt-based router init (`--router-init hidden --prompts prompts.yaml`),
 * as mergekit's `hidden` gate mode: each expert gets prompts; the averaged
 * model runs them on the CPU engine, and router row e of every layer is the
 * mean hidden state of expert e's prompts at that router's own input (the
 * attention router reads the attention's normed input, the FFN router the
 * FFN's), minus the mean over its negative prompts, scaled to unit length.
 *
 * "The averaged model" is the mixture with every expert collapsed to the
 * seeds' weighted average (the weights of --weights): a dense model with
 * the mixture's block kind. mergekit runs its base model instead; with
 * attention experts the average is the closest dense model to what the
 * routers will see. Deterministic: same seeds and prompts, same rows.
 *
 * `--router-init cheap-embed` is mergekit's `cheap_embed`: no forward pass;
 * row e of every router is the sum of the embedding rows (of the averaged
 * model, or of --shared-from) of all tokens of expert e's prompts, scaled to
 * unit length, minus the same over its negative prompts, scaled to unit
 * length again. With --shared-from, both modes run that model, as mergekit
 * runs its base model.
 *
 * prompts.yaml, one entry per expert in seed order (mergekit's key names,
 * so a mergekit config's experts list can be pasted):
 *   experts:
 *     - positive_prompts: ["def quicksort(xs):", "import numpy as np"]
 *       negative_prompts: ["Once upon a time"]      # optional
 * A mergekit-moe config (a file with base_model) is a prompts file too: its
 * entries are matched to the experts by `source_model` (./mergekit.ts),
 * never by position.
 */
import { resolve } from "node:path";
import type { ModelTensor, OpenedModel } from "../arch/model.js";
import { denseToBamName, tensorName } from "../arch/names.js";
import type { Seed } from "../arch/index.js";
import { BamError } from "../errors.js";
import { elementsOf, isFloatDType, toFloat32, type FloatDType } from "../safetensors/index.js";
import { averageInto } from "./average.js";
import { resolveModelReference } from "./mergekit.js";
import { readYamlFile, type ExpertPrompts, type PromptsMapping } from "./options.js";
import { sharedIndex, type UpcyclePlan } from "./plan.js";

const EXPERT_KEYS = new Set(["positive_prompts", "negative_prompts", "source_model"]);

/** How messages name the prompts: the file, or the mapping a recipe holds inline. */
export function promptsLabel(source: string | PromptsMapping): string {
  return typeof source === "string" ? source : "prompts (inline in the recipe)";
}

/**
 * The prompts of each expert, from a YAML file or the same mapping inline
 * (a recipe's `prompts:`); `expertModels[e]` is the seed expert e comes from,
 * for a mergekit config's `source_model`.
 */
export async function readPrompts(source: string | PromptsMapping, expertModels: string[]): Promise<ExpertPrompts[]> {
  const parsed = typeof source === "string" ? await readYamlFile(source) : source;
  const path = promptsLabel(source);
  const fail = (why: string): never => {
    throw new BamError("RECIPE_INVALID", `${path}: ${why}`);
  };
  const list = (parsed as { experts?: unknown } | null)?.experts;
  if (!Array.isArray(list)) fail('must hold "experts:", a list with one entry per expert');
  const experts = expertModels.length;
  let entries = list as unknown[];
  if (entries.length !== experts) fail(`lists ${entries.length} experts; the model has ${experts}`);
  // A whole mergekit-moe config (it names base_model), not a prompts file that annotates entries with source_model.
  if (Object.hasOwn(parsed as object, "base_model")) entries = bySourceModel(entries, expertModels, path, fail);
  const strings = (value: unknown, where: string, required: boolean): string[] => {
    if (value === undefined && !required) return [];
    const ok = Array.isArray(value) && value.length > 0 && value.every((p) => typeof p === "string" && p.length > 0);
    return ok ? (value as string[]) : fail(`${where} must be a non-empty list of non-empty strings`);
  };
  return entries.map((entry, e) => {
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) fail(`expert ${e} must be a mapping`);
    const record = entry as Record<string, unknown>;
    const unknown = Object.keys(record).find((key) => !EXPERT_KEYS.has(key));
    if (unknown !== undefined) fail(`expert ${e}: unknown key "${unknown}" (known: ${[...EXPERT_KEYS].join(", ")})`);
    return {
      positive: strings(record.positive_prompts, `expert ${e}: positive_prompts`, true),
      negative: strings(record.negative_prompts, `expert ${e}: negative_prompts`, false),
    };
  });
}

/** A mergekit config's entries reordered to the experts: each expert takes the next entry naming its seed. */
function bySourceModel(
  entries: unknown[],
  expertModels: string[],
  path: string,
  fail: (why: string) => never,
): unknown[] {
  const models = entries.map((entry, e) => {
    const name = (entry as { source_model?: unknown } | null)?.source_model;
    return typeof name === "string"
      ? resolve(resolveModelReference(name, path))
      : fail(`experts[${e}] needs source_model, the model it routes to`);
  });
  const used = new Set<number>();
  return expertModels.map((model, e) => {
    const at = models.findIndex((m, i) => !used.has(i) && m === resolve(model));
    if (at === -1) fail(`no entry left with source_model ${model} for expert ${e}`);
    used.add(at);
    return entries[at];
  });
}

/** The plan's prompts (--prompts), one entry per expert. */
export function readPlanPrompts(plan: UpcyclePlan, source: string | PromptsMapping): Promise<ExpertPrompts[]> {
  const seedDirs = plan.options.seeds;
  return readPrompts(
    source,
    Array.from({ length: plan.moe.numExperts }, (_, e) => seedDirs[seedDirs.length === 1 ? 0 : e]!),
  );
}

/**
 * Router name -> rows [E, H] (float32), for every router of the plan, from the experts' prompts
 * (readPlanPrompts; `promptsFile` names them in messages) by --router-init hidden or cheap-embed.
 * `onProgress` counts prompts run through the averaged model (all at once for cheap-embed, which runs none).
 */
export async function promptRouterRows(
  plan: UpcyclePlan,
  seeds: Seed[],
  experts: ExpertPrompts[],
  promptsFile: string,
  signal?: AbortSignal,
  onProgress?: (done: number, total: number) => void,
): Promise<Map<string, Float32Array>> {
  const E = plan.moe.numExperts;
  // The CPU engine loads only here: upcycles without prompts start without it.
  const { loadTokenizer, meanLayerInputs } = await import("../onnx/index.js");
  const tokenizer = await loadTokenizer(seeds[0]!.dir);
  // Counted before the model runs: a prompt past the model's positions would ask onnxruntime for O(tokens^2) memory.
  const positions = plan.features.maxPositions;
  const tokenize = (prompts: string[], where: string) =>
    prompts.map((prompt, i) => {
      const ids = tokenizer.encode(prompt);
      if (ids.length === 0 || ids.length > positions) {
        throw new BamError(
          "RECIPE_INVALID",
          `${promptsFile}: ${where}[${i}] is ${ids.length} tokens; each prompt must be 1 to ${positions} tokens (the model's positions): shorten or split it`,
        );
      }
      return ids;
    });
  const tokenized = experts.map((x, e) => ({
    positive: tokenize(x.positive, `expert ${e}: positive_prompts`),
    negative: tokenize(x.negative, `expert ${e}: negative_prompts`),
  }));
  if (plan.options.routerInit === "cheap-embed") {
    const model = averagedModel(plan, seeds);
    const embedding = toFloat32(
      await model.read(tensorName({ layer: null, slot: "embed_tokens", expert: null, part: "weight" })),
      "F32",
    );
    const rows = cheapEmbedRows(embedding, plan.features.hiddenSize, tokenized);
    const prompts = tokenized.reduce((sum, x) => sum + x.positive.length + x.negative.length, 0);
    onProgress?.(prompts, prompts);
    return new Map(plan.tensors.filter((t) => t.operation.kind === "router").map((t) => [t.name, rows]));
  }
  const lists = tokenized.flatMap((x) => [x.positive, x.negative]).filter((l) => l.length > 0);
  const means = await meanLayerInputs(averagedModel(plan, seeds), lists, signal, onProgress);
  let next = 0;
  const perExpert = experts.map((x) => ({
    positive: means[next++]!,
    negative: x.negative.length > 0 ? means[next++]! : null,
  }));
  const H = plan.features.hiddenSize;
  const rows = new Map<string, Float32Array>();
  for (let l = 0; l < plan.features.numLayers; l++) {
    for (const [slot, site] of [
      ["attn.router", "attention"],
      ["mlp.router", "ffn"],
    ] as const) {
      const name = tensorName({ layer: l, slot, expert: null, part: "weight" });
      if (!plan.tensors.some((t) => t.name === name)) continue;
      const values = new Float32Array(E * H);
      perExpert.forEach(({ positive, negative }, e) => {
        const v = Float64Array.from(positive[site][l]!, (x, h) => x - (negative ? negative[site][l]![h]! : 0));
        const norm = Math.sqrt(v.reduce((sum, x) => sum + x * x, 0));
        if (norm > 0) for (let h = 0; h < H; h++) values[e * H + h] = v[h]! / norm;
      });
      rows.set(name, values);
    }
  }
  return rows;
}

/**
 * mergekit's cheap_embed rows [E, H]: per expert, the unit-length sum of the
 * embedding rows of its prompts' tokens, minus the same for its negative
 * prompts, at unit length (norms clamped at 1e-8, as mergekit).
 */
function cheapEmbedRows(
  embedding: Float32Array,
  H: number,
  experts: { positive: number[][]; negative: number[][] }[],
): Float32Array {
  const unitSum = (prompts: number[][]) => {
    const sum = new Float64Array(H);
    for (const id of prompts.flat()) for (let h = 0; h < H; h++) sum[h] = sum[h]! + embedding[id * H + h]!;
    return unit(sum);
  };
  const rows = new Float32Array(experts.length * H);
  experts.forEach(({ positive, negative }, e) => {
    const v = unitSum(positive);
    if (negative.length > 0) {
      const n = unitSum(negative);
      for (let h = 0; h < H; h++) v[h] = v[h]! - n[h]!;
    }
    rows.set(unit(v), e * H);
  });
  return rows;
}

function unit(v: Float64Array): Float64Array {
  const norm = Math.max(Math.sqrt(v.reduce((sum, x) => sum + x * x, 0)), 1e-8);
  return v.map((x) => x / norm);
}

/** Elements averaged at a time (averageInto's scratch is 14 bytes an element). */
const AVERAGE_CHUNK = 1 << 20;

/**
 * The dense model the prompts run through: the --shared-from model, or else
 * the seeds' weighted average as one dense model (merged attention, one FFN),
 * with the plan's block. Its tensors are averaged `chunk` elements at a time.
 */
export function averagedModel(plan: UpcyclePlan, seeds: Seed[], chunk = AVERAGE_CHUNK): OpenedModel {
  const first = seeds[0]!;
  const canonical = new Map<string, string>();
  const tensors = new Map<string, ModelTensor>();
  for (const t of first.tensors.values()) {
    const name = denseToBamName(t.name);
    canonical.set(name, t.name);
    tensors.set(name, { name, shape: t.shape, dtype: "F32", stored: name });
  }
  const shared = plan.options.sharedFrom === null ? null : sharedIndex(plan.options.seeds, plan.options.sharedFrom);
  const sources =
    shared === null
      ? seeds.slice(0, plan.options.seeds.length).map((seed, i) => ({ seed, weight: plan.options.weights[i]! }))
      : [{ seed: seeds[shared]!, weight: 1 }];
  return {
    kind: "dense",
    dir: first.dir,
    name: "average",
    features: plan.features,
    moe: { ...plan.moe, numExperts: 1, expertsPerToken: 1, attentionExperts: "merged", upcycledFrom: [] },
    tensors,
    files: [],
    tokenizerHash: first.tokenizerHash,
    rawConfig: first.rawConfig,
    async read(name) {
      const source = canonical.get(name);
      if (source === undefined) throw new BamError("TENSOR_NOT_FOUND", `averaged model: no tensor ${name}`);
      const dtypes = sources.map(({ seed }): FloatDType => {
        const dtype = seed.tensors.get(source)!.dtype;
        if (!isFloatDType(dtype)) throw new BamError("DTYPE_UNSUPPORTED", `${seed.dir}: tensor ${source} is ${dtype}`);
        return dtype;
      });
      const count = elementsOf(tensors.get(name)!.shape);
      const out = new Uint8Array(count * 4);
      // The executor's averaging, chunk by chunk: the same numbers, in bounded memory whatever the tensor.
      for (let start = 0; start < count; start += chunk) {
        const n = Math.min(chunk, count - start);
        const read = await Promise.all(sources.map(({ seed }) => seed.readElements(source, start, n)));
        averageInto({
          sources: read.map((bytes, i) => ({ bytes, dtype: dtypes[i]! })),
          weights: sources.map((s) => s.weight),
          out: out.subarray(start * 4, (start + n) * 4),
          dtype: "F32",
        });
      }
      return out;
    },
    close: async () => {},
  };
}
