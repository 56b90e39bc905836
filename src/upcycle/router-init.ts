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
 * prompts.yaml, one entry per expert in seed order (mergekit's key names,
 * so a mergekit config's experts list can be pasted):
 *   experts:
 *     - positive_prompts: ["def quicksort(xs):", "import numpy as np"]
 *       negative_prompts: ["Once upon a time"]      # optional
 */
import { denseToBamName, type ModelTensor, type OpenedModel } from "../arch/model.js";
import type { Seed } from "../arch/index.js";
import { BamError } from "../errors.js";
import { fromFloat32, isFloatDType, toFloat32 } from "../safetensors/index.js";
import { readYamlFile } from "./options.js";
import type { UpcyclePlan } from "./plan.js";

export interface ExpertPrompts {
  positive: string[];
  negative: string[];
}

const EXPERT_KEYS = new Set(["positive_prompts", "negative_prompts", "source_model"]);

export async function readPrompts(path: string, experts: number): Promise<ExpertPrompts[]> {
  const parsed = await readYamlFile(path);
  const fail = (why: string): never => {
    throw new BamError("RECIPE_INVALID", `${path}: ${why}`);
  };
  const list = (parsed as { experts?: unknown } | null)?.experts;
  if (!Array.isArray(list)) fail('must hold "experts:", a list with one entry per expert');
  const entries = list as unknown[];
  if (entries.length !== experts) fail(`lists ${entries.length} experts; the model has ${experts}`);
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
    return { positive: strings(record.positive_prompts, `expert ${e}: positive_prompts`, true), negative: strings(record.negative_prompts, `expert ${e}: negative_prompts`, false) };
  });
}

/** Router name -> rows [E, H] (float32), for every router of the plan. */
export async function promptRouterRows(plan: UpcyclePlan, seeds: Seed[], promptsFile: string, signal?: AbortSignal): Promise<Map<string, Float32Array>> {
  const E = plan.moe.numExperts;
  const experts = await readPrompts(promptsFile, E);
  // The CPU engine loads only here: upcycles without prompts start without it.
  const { loadTokenizer, meanLayerInputs } = await import("../onnx/index.js");
  const tokenizer = await loadTokenizer(seeds[0]!.dir);
  // Counted before the model runs: a prompt past the model's positions would ask onnxruntime for O(tokens^2) memory.
  const positions = plan.features.maxPositions;
  const tokenize = (prompts: string[], where: string) => prompts.map((prompt, i) => {
    const ids = tokenizer.encode(prompt);
    if (ids.length === 0 || ids.length > positions) {
      throw new BamError("RECIPE_INVALID", `${promptsFile}: ${where}[${i}] is ${ids.length} tokens; each prompt must be 1 to ${positions} tokens (the model's positions): shorten or split it`);
    }
    return ids;
  });
  const lists = experts.flatMap((x, e) => [tokenize(x.positive, `expert ${e}: positive_prompts`), tokenize(x.negative, `expert ${e}: negative_prompts`)]).filter((l) => l.length > 0);
  const means = await meanLayerInputs(averagedModel(plan, seeds), lists, signal);
  let next = 0;
  const perExpert = experts.map((x) => ({ positive: means[next++]!, negative: x.negative.length > 0 ? means[next++]! : null }));
  const H = plan.features.hiddenSize;
  const rows = new Map<string, Float32Array>();
  for (let l = 0; l < plan.features.numLayers; l++) {
    for (const [router, site] of [["attn", "attention"], ["mlp", "ffn"]] as const) {
      const name = `model.layers.${l}.${router}.router.weight`;
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

/** The seeds' weighted average as one dense model (merged attention, one FFN) with the plan's block. */
function averagedModel(plan: UpcyclePlan, seeds: Seed[]): OpenedModel {
  const first = seeds[0]!;
  const canonical = new Map<string, string>();
  const tensors = new Map<string, ModelTensor>();
  for (const t of first.tensors.values()) {
    const name = denseToBamName(t.name);
    canonical.set(name, t.name);
    tensors.set(name, { name, shape: t.shape, dtype: "F32", stored: name });
  }
  const weights = plan.options.weights;
  return {
    kind: "dense",
    dir: first.dir,
    name: "average",
    features: plan.features,
    moe: { ...plan.moe, numExperts: 1, expertsPerToken: 1, attentionExperts: "merged" },
    tensors,
    files: [],
    tokenizerHash: first.tokenizerHash,
    rawConfig: first.rawConfig,
    async read(name) {
      const source = canonical.get(name);
      if (source === undefined) throw new BamError("TENSOR_NOT_FOUND", `averaged model: no tensor ${name}`);
      let sum: Float64Array | null = null;
      for (const [i, seed] of seeds.entries()) {
        const dtype = seed.tensors.get(source)!.dtype;
        if (!isFloatDType(dtype)) throw new BamError("DTYPE_UNSUPPORTED", `${seed.dir}: tensor ${source} is ${dtype}`);
        const values = toFloat32(await seed.read(source), dtype);
        sum ??= new Float64Array(values.length);
        for (let j = 0; j < values.length; j++) sum[j] = sum[j]! + weights[i]! * values[j]!;
      }
      return fromFloat32(Float32Array.from(sum!), "F32");
    },
    close: async () => {},
  };
}
