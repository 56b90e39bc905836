/**
 * mergekit-moe configs accepted as recipes (docs/moe.md of arcee-ai/mergekit):
 *
 *   base_model: path/to/base          # every non-expert tensor is this model's
 *   gate_mode: hidden                 # hidden | cheap_embed | random | uniform_random
 *   dtype: bfloat16                   # bfloat16 | float16 | float32
 *   experts_per_token: 2              # mergekit's default is 2
 *   architecture: mixtral             # mixtral | qwen3 (qwen3_moe); absent: our BAM folder
 *   experts:
 *     - source_model: path/to/code
 *       positive_prompts: ["def f(x):"]
 *       negative_prompts: ["Once upon a time"]
 *
 * becomes our options: the experts' source models are the seeds in order,
 * base_model is `sharedFrom` (copied, never averaged), attention is merged
 * (the base's) in a sequential block, as mergekit's Mixtral and Qwen3 MoE
 * outputs. Local paths resolve relative to the config file, as mergekit's
 * users expect; a name with no such folder is left as given (a Hugging Face
 * id). The prompts stay in the config: `prompts` names the config file
 * itself, and ./router-init.ts matches its entries to the experts by
 * `source_model`.
 */
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { BamError } from "../errors.js";
import type { OutputDType, OutputFormat, RouterInit, UpcycleOptions } from "./options.js";

const GATE_MODES: Record<string, RouterInit> = {
  hidden: "hidden",
  cheap_embed: "cheap-embed",
  random: "random",
  uniform_random: "uniform-random",
};
const DTYPES: Record<string, OutputDType> = { bfloat16: "bf16", float16: "f16", float32: "f32" };
const TOP_KEYS = new Set(["base_model", "experts", "gate_mode", "dtype", "experts_per_token", "architecture"]);
const EXPERT_KEYS = new Set(["source_model", "positive_prompts", "negative_prompts"]);
/** mergekit-moe keys with no counterpart here (mergekit/moe/config.py), and why. */
const UNSUPPORTED: Record<string, string> = {
  shared_experts: "a shared expert",
  noise_scale: "noise added to an expert's weights",
  residual_scale: "a scaled expert output",
};

/** A mergekit-moe config names a base model, or lists its experts as mappings (ours has `experts: N`). */
export function isMergekitConfig(parsed: object): boolean {
  return Object.hasOwn(parsed, "base_model") || Array.isArray((parsed as { experts?: unknown }).experts);
}

/**
 * A model named in a mergekit config: a folder relative to the config file
 * when there is one, otherwise the name as given (a Hugging Face id).
 */
export function resolveModelReference(name: string, configPath: string): string {
  const local = resolve(dirname(configPath), name);
  return existsSync(local) ? local : name;
}

/** The options a mergekit-moe config describes; refuses, in one line, every key it cannot honour. */
export function fromMergekit(parsed: Record<string, unknown>, configPath: string): Partial<UpcycleOptions> {
  const fail = (why: string): never => {
    throw new BamError("RECIPE_INVALID", `${configPath}: mergekit-moe config: ${why}`);
  };
  const experts = Array.isArray(parsed.experts)
    ? (parsed.experts as unknown[])
    : fail('"experts" must be a list of {source_model, positive_prompts, negative_prompts}');
  if (experts.length === 0) fail('"experts" is empty');
  const unsupported: string[] = [];
  const unknown: string[] = [];
  const sort = (key: string, where: string, known: Set<string>) => {
    if (Object.hasOwn(UNSUPPORTED, key)) unsupported.push(`${where}${key} (${UNSUPPORTED[key]})`);
    else if (!known.has(key)) unknown.push(`${where}${key}`);
  };
  for (const key of Object.keys(parsed)) sort(key, "", TOP_KEYS);
  experts.forEach((expert, e) => {
    if (expert === null || typeof expert !== "object" || Array.isArray(expert))
      fail(`experts[${e}] must be a mapping with source_model`);
    for (const key of Object.keys(expert as object)) sort(key, `experts[${e}].`, EXPERT_KEYS);
  });
  if (unsupported.length > 0 || unknown.length > 0) {
    const parts = [];
    if (unsupported.length > 0) parts.push(`not supported: ${unsupported.join(", ")}`);
    if (unknown.length > 0) parts.push(`unknown: ${unknown.join(", ")}`);
    fail(
      `${parts.join("; ")}; remove them (supported keys: ${[...TOP_KEYS].join(", ")}; per expert: ${[...EXPERT_KEYS].join(", ")})`,
    );
  }
  const text = (value: unknown, where: string): string =>
    typeof value === "string" && value !== "" && !value.includes("\0")
      ? value
      : fail(`${where} must be a model path or Hugging Face id`);
  const seeds = experts.map((expert, e) =>
    resolveModelReference(
      text((expert as Record<string, unknown>).source_model, `experts[${e}].source_model`),
      configPath,
    ),
  );
  const sharedFrom = resolveModelReference(text(parsed.base_model, "base_model"), configPath);

  const gateMode = parsed.gate_mode ?? "hidden"; // mergekit's default
  const routerInit =
    typeof gateMode === "string" && Object.hasOwn(GATE_MODES, gateMode)
      ? GATE_MODES[gateMode]!
      : fail(`gate_mode must be one of ${Object.keys(GATE_MODES).join(", ")}, not ${JSON.stringify(gateMode)}`);
  const fromPrompts = routerInit === "hidden" || routerInit === "cheap-embed";
  if (fromPrompts) {
    const missing = experts.flatMap((expert, e) =>
      (expert as Record<string, unknown>).positive_prompts === undefined ? [e] : [],
    );
    if (missing.length > 0)
      fail(
        `gate_mode ${String(gateMode)} needs positive_prompts for every expert; experts[${missing.join("], experts[")}] have none (or use gate_mode: random)`,
      );
  }

  const options: Partial<UpcycleOptions> = {
    seeds,
    sharedFrom,
    attention: "merged",
    block: "sequential",
    expertsPerToken:
      parsed.experts_per_token === undefined
        ? 2
        : typeof parsed.experts_per_token === "number"
          ? parsed.experts_per_token
          : fail("experts_per_token must be a number"),
    routerInit,
    ...(fromPrompts ? { prompts: resolve(configPath) } : {}),
  };
  if (parsed.dtype !== undefined && parsed.dtype !== null) {
    const name = typeof parsed.dtype === "string" ? parsed.dtype.replace(/^torch\./, "") : "";
    options.dtype = Object.hasOwn(DTYPES, name)
      ? DTYPES[name]
      : fail(`dtype must be one of ${Object.keys(DTYPES).join(", ")}, not ${JSON.stringify(parsed.dtype)}`);
  }
  if (parsed.architecture !== undefined && parsed.architecture !== null)
    options.format = outputFormat(parsed.architecture, fail);
  return options;
}

/**
 * mergekit picks the output architecture whose name ("Mixtral", "Qwen3 MoE",
 * "Qwen MoE", "DeepSeek MoE") starts with `architecture`, case-insensitively;
 * we write the first two.
 */
function outputFormat(value: unknown, fail: (why: string) => never): OutputFormat {
  const name = typeof value === "string" ? value.toLowerCase().replace(/[\s_-]/g, "") : "";
  if (name !== "" && "mixtral".startsWith(name)) return "mixtral";
  if (name.startsWith("qwen3") && "qwen3moe".startsWith(name)) return "qwen3-moe";
  return fail(
    `architecture ${JSON.stringify(value)} is not written here; use mixtral or qwen3 (qwen3_moe), or leave it out for the BAM folder`,
  );
}
