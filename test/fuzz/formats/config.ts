/**
 * config.json of every family: fields missing or of the wrong type, absurd
 * sizes (10^12 layers), negative numbers, heads that do not divide, another
 * family's model_type, rope settings, a BAM config, broken JSON, odd files.
 *
 * Entry points: openSeed, openModel, then an upcycle of the seed with itself
 * (which also runs the seed check) or sparse upcycling.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { cp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openSeed } from "../../../src/arch/index.js";
import { openModel } from "../../../src/arch/model.js";
import { FAMILIES } from "../../../src/arch/types.js";
import { upcycle } from "../../../src/upcycle/index.js";
import { fixture } from "../../helpers.js";
import { type CaseContext, maybeUpcycle, type Step } from "../harness.js";
import {
  deepArray,
  encoder,
  stringifyDeep,
  makeOddFile,
  maybeInvalidUtf8,
  mutateTextRepeatedly,
  ODD_FILES,
  oddJsonValue,
} from "../mutate.js";
import type { Rng } from "../rng.js";

/** Keys any family reads, in v4 and v5 spellings. */
const KEYS = [
  "model_type",
  "vocab_size",
  "hidden_size",
  "n_embd",
  "intermediate_size",
  "n_inner",
  "num_hidden_layers",
  "n_layer",
  "num_attention_heads",
  "n_head",
  "num_key_value_heads",
  "head_dim",
  "max_position_embeddings",
  "n_positions",
  "hidden_act",
  "activation_function",
  "rms_norm_eps",
  "layer_norm_eps",
  "layer_norm_epsilon",
  "rope_theta",
  "rope_scaling",
  "rope_parameters",
  "partial_rotary_factor",
  "rotary_pct",
  "rotary_emb_base",
  "tie_word_embeddings",
  "attention_bias",
  "mlp_bias",
  "use_parallel_residual",
  "sliding_window",
  "use_sliding_window",
  "max_window_layers",
  "layer_types",
  "qk_layernorm",
  "use_qk_norm",
  "logit_scale",
  "quantization_config",
  "original_max_position_embeddings",
  "scale_attn_weights",
  "torch_dtype",
  "dtype",
  "num_experts",
  "__proto__",
  "constructor",
];

const SIZE_KEYS = [
  "vocab_size",
  "hidden_size",
  "n_embd",
  "intermediate_size",
  "num_hidden_layers",
  "n_layer",
  "num_attention_heads",
  "n_head",
  "num_key_value_heads",
  "head_dim",
  "max_position_embeddings",
  "n_positions",
];

type Config = Record<string, unknown>;
type ConfigOp = (rng: Rng, config: Config) => string;

function presentKey(rng: Rng, config: Config, keys = Object.keys(config)): string | undefined {
  const present = keys.filter((k) => k in config);
  return present.length === 0 ? undefined : rng.pick(present);
}

const OPS: ReadonlyArray<readonly [number, ConfigOp]> = [
  [
    3,
    (rng, config) => {
      const key = presentKey(rng, config);
      if (key === undefined) return "delete: empty config";
      delete config[key];
      return `deleted ${key}`;
    },
  ],
  [
    5,
    (rng, config) => {
      const key = rng.chance(0.6) ? (presentKey(rng, config) ?? rng.pick(KEYS)) : rng.pick(KEYS);
      const current = config[key];
      const value =
        typeof current === "number" && rng.chance(0.4)
          ? rng.pick([current + 1, current - 1, current * 2, current / 2, -current, current + 0.5, current * 1e6])
          : oddJsonValue(rng);
      setKey(config, key, value);
      return `${key} -> ${show(value)}`;
    },
  ],
  [
    3,
    (rng, config) => {
      const key = presentKey(rng, config, SIZE_KEYS) ?? rng.pick(SIZE_KEYS);
      const value = rng.pick([
        1e12,
        2 ** 40,
        2 ** 31,
        1e6,
        0,
        -1,
        -(2 ** 31),
        1024,
        1025,
        2 ** 22,
        2 ** 22 + 1,
        2 ** 17 + 1,
        2 ** 27,
      ]);
      config[key] = value;
      return `${key} -> ${value}`;
    },
  ],
  [
    2,
    (rng, config) => {
      const heads = typeof config.num_attention_heads === "number" ? config.num_attention_heads : 4;
      const choice = rng.int(0, 3);
      if (choice === 0) config.num_key_value_heads = heads + 1;
      if (choice === 1) config.num_key_value_heads = rng.pick([3, 5, 7]);
      if (choice === 2) config.num_attention_heads = rng.pick([3, 5, 7, 33]);
      if (choice === 3) config.head_dim = rng.pick([3, 7, 1, 4096, 4097]);
      return ["kv heads = heads + 1", "kv heads do not divide heads", "heads do not divide hidden", "head_dim changed"][
        choice
      ]!;
    },
  ],
  [
    2,
    (rng, config) => {
      const value = rng.pick<unknown>([
        ...FAMILIES,
        "bam",
        "mixtral",
        "",
        "LLAMA",
        "__proto__",
        "constructor",
        "toString",
        null,
        7,
        ["llama"],
      ]);
      config.model_type = value;
      return `model_type -> ${show(value)}`;
    },
  ],
  [
    3,
    (rng, config) => {
      const choice = rng.int(0, 7);
      const rope = (config.rope_parameters ?? {}) as Record<string, unknown>;
      switch (choice) {
        case 0:
          config.rope_parameters = {
            ...rope,
            rope_type: rng.pick(["yarn", "dynamic", "linear", "llama3", "longrope", "su", "foo", 3, null]),
            factor: rng.pick([2, -1, 0, "x", null]),
          };
          break;
        case 1:
          config.rope_parameters = { full_attention: { rope_type: "default", rope_theta: 10000 } };
          break;
        case 2:
          config.rope_parameters = {
            ...rope,
            partial_rotary_factor: rng.pick([0, -0.5, 0.3, 1.5, 0.125, 1e-9, "0.5"]),
          };
          break;
        case 3:
          config.rope_scaling = rng.pick<unknown>([
            { type: "linear", factor: 2 },
            { type: "ntk" },
            "linear",
            [],
            { rope_type: null },
            { type: "yarn", __proto__: { x: 1 } },
          ]);
          break;
        case 4:
          config.rope_parameters = { ...rope, rope_theta: rng.pick([0, -1, 1e308, "1e4", null, 1e-300]) };
          break;
        case 5:
          config.layer_types = rng.pick<unknown>([
            [],
            ["full_attention"],
            "full_attention",
            Array.from({ length: 2 }, () => "sliding_attention"),
            ["x", "y"],
          ]);
          config.use_sliding_window = true;
          break;
        case 6:
          config.sliding_window = rng.pick([0, -1, 1, 2 ** 40, "4096", null]);
          config.use_sliding_window = rng.chance(0.5);
          break;
        default:
          config.rope_parameters = rng.pick<unknown>([null, [], "x", 1, deepLike(rng)]);
          break;
      }
      return `rope/sliding case ${choice}`;
    },
  ],
  [
    1,
    (rng, config) => {
      config.quantization_config = rng.pick<unknown>([{ quant_method: "gptq" }, null, false, {}]);
      return `quantization_config -> ${show(config.quantization_config)}`;
    },
  ],
  [
    1,
    (rng, config) => {
      // A value too deep for JSON.stringify, where a message quotes it.
      const key = rng.pick([
        "model_type",
        "hidden_act",
        "hidden_size",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "rms_norm_eps",
        "sliding_window",
      ]);
      config[key] = deepLike(rng, rng.int(20_000, 100_000));
      return `${key} -> deeply nested value`;
    },
  ],
  [
    1,
    (rng, config) => {
      Object.assign(config, {
        model_type: "bam",
        seed_model_type: rng.pick([...FAMILIES, "x"]),
        num_experts: rng.pick([2, 0, 5000, "2"]),
        num_experts_per_tok: rng.pick([1, 3, -1]),
        attention_experts: rng.pick(["moa", "x"]),
        block: rng.pick(["parallel", 1]),
        rotary_dim: rng.pick([0, 8, -1]),
        norm_type: rng.pick(["rms", "x"]),
        upcycled_from: rng.pick<unknown>([
          [],
          [null],
          "x",
          [{ name: {} }],
          [{ name: deepArray(20_000), sha256: deepLike(rng, 20_000) }],
        ]),
      });
      return "made a partial BAM config";
    },
  ],
];

/** Nested arrays built iteratively (a literal would overflow the stack). */
function deepLike(rng: Rng, depth = rng.int(10, 200)): unknown {
  let value: unknown = rng.chance(0.5) ? [] : {};
  for (let i = 0; i < depth; i++) value = rng.chance(0.5) ? [value] : { a: value };
  return value;
}

/** Sets a key even when it is __proto__ (as JSON.parse would create it). */
function setKey(config: Config, key: string, value: unknown): void {
  Object.defineProperty(config, key, { value, enumerable: true, configurable: true, writable: true });
}

function show(value: unknown): string {
  try {
    return (JSON.stringify(value) ?? String(value)).slice(0, 60);
  } catch {
    return "(deep)";
  }
}

/** Serialises configs with values too deep for JSON.stringify. */
function configText(config: Config): string {
  const parts = Object.entries(config).map(([key, value]) => `${JSON.stringify(key)}: ${stringifyDeep(value)}`);
  return `{\n${parts.join(",\n")}\n}\n`;
}

/** BAM folders (upcycled fixtures), made once per process: their config.json is a BAM config to damage. */
const bamFolders = new Map<string, Promise<string>>();
let bamRoot: string | undefined;

function bamFolder(family: (typeof FAMILIES)[number]): Promise<string> {
  let folder = bamFolders.get(family);
  if (folder === undefined) {
    if (bamRoot === undefined) {
      const root = mkdtempSync(join(tmpdir(), "bam-fuzz-models-"));
      process.once("exit", () => rmSync(root, { recursive: true, force: true }));
      bamRoot = root;
    }
    const output = join(bamRoot, family);
    folder = upcycle({ seeds: [fixture(family, "base"), fixture(family, "code")], output }).then(() => output);
    bamFolders.set(family, folder);
  }
  return folder;
}

const BAM_KEYS = [
  "num_experts",
  "num_experts_per_tok",
  "attention_experts",
  "block",
  "router_aux_loss_coef",
  "router_z_loss_coef",
  "upcycled_from",
  "seed_model_type",
  "rotary_dim",
  "rope_scaling",
  "norm_type",
  "head_dim",
  "tie_word_embeddings",
];

export async function configCase(ctx: CaseContext): Promise<Step[]> {
  const { rng, dir, notes } = ctx;
  const family = rng.pick(FAMILIES);
  const variant = rng.weighted<"base" | "bf16" | "sharded" | "bam">([
    [6, "base"],
    [2, "bf16"],
    [2, "sharded"],
    [2, "bam"],
  ]);
  notes.push(`${family}/${variant}`);
  const seed = join(dir, "seed");
  await cp(variant === "bam" ? await bamFolder(family) : fixture(family, variant), seed, { recursive: true });
  if (variant === "bam") {
    // BAM keys get their own edits too.
    const file = join(seed, "config.json");
    const bam = JSON.parse(await readFile(file, "utf8")) as Config;
    const key = rng.pick(BAM_KEYS);
    const value =
      key === "upcycled_from" && rng.chance(0.5)
        ? [{ name: deepArray(rng.int(10_000, 50_000)), sha256: "x" }]
        : oddJsonValue(rng);
    setKey(bam, key, value);
    notes.push(`${key} -> ${show(value)}`);
    await writeFile(file, configText(bam));
    if (rng.chance(0.5)) return configSteps(ctx, seed);
  }
  const file = join(seed, "config.json");
  const original = await readFile(file, "utf8");
  const config = JSON.parse(original) as Config;
  const fileLevel = rng.chance(0.08);
  if (fileLevel) {
    const kind = rng.pick(ODD_FILES);
    ctx.fifos.push(...(await makeOddFile(file, kind, join(ctx.outside, "secret.txt"))));
    notes.push(`config.json -> ${kind}`);
  } else {
    const ops = rng.weighted<number>([
      [1, 0],
      [5, 1],
      [3, 2],
      [1, 3],
    ]);
    for (let i = 0; i < ops; i++) notes.push(rng.weighted(OPS)(rng, config));
    let text = configText(config);
    if (ops === 0 || rng.chance(0.15)) {
      text = mutateTextRepeatedly(rng, text, notes);
    }
    await writeFile(file, maybeInvalidUtf8(rng, encoder.encode(text), 0.05, notes));
  }
  return configSteps(ctx, seed);
}

function configSteps(ctx: CaseContext, seed: string): Step[] {
  const twoSeeds = ctx.rng.chance(0.5);
  return [
    { name: "openModel", run: async () => (await openModel(seed)).close() },
    { name: "openSeed", run: async () => (await openSeed(seed)).close() },
    ...maybeUpcycle(ctx, () =>
      twoSeeds ? { seeds: [seed, seed], output: ctx.output } : { seeds: [seed], experts: 2, output: ctx.output },
    ),
  ];
}
