/**
 * Recipes (YAML), and mergekit-moe configs read as recipes: values of every type for every key, unknown keys
 * (`__proto__`, `constructor`, ...), seeds and weights lists holding the
 * wrong things, YAML features (anchors and alias bombs, tags, merge keys,
 * directives, several documents, deep nesting), broken syntax, odd files.
 *
 * Entry points: readRecipe, then planUpcycle of the recipe (the output always
 * overridden, as `-o` does), then sometimes the upcycle itself.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readRecipe, type UpcycleOptions } from "../../../src/upcycle/index.js";
import { fixture } from "../../helpers.js";
import { type CaseContext, maybeUpcycle, reportViolation, type Step } from "../harness.js";
import { encoder, makeOddFile, maybeInvalidUtf8, mutateTextRepeatedly, ODD_FILES } from "../mutate.js";
import type { Rng } from "../rng.js";

const KEYS = [
  "seeds",
  "output",
  "attention",
  "block",
  "experts",
  "drop-ratio",
  "experts-per-token",
  "weights",
  "router-init",
  "router-scale",
  "seed",
  "dtype",
  "max-shard-size",
  "format",
  "router-aux-loss-coef",
  "router-z-loss-coef",
];

const ODD_KEYS = [
  "__proto__",
  "constructor",
  "toString",
  "hasOwnProperty",
  "valueOf",
  '""',
  "? [a, b]",
  "<<",
  "force",
  "Seeds",
  "seeds ",
  "0",
];

function oddValue(rng: Rng): string {
  return rng.pick<() => string>([
    () => "null",
    () => "~",
    () => "true",
    () => "yes",
    () => "0",
    () => "-1",
    () => "1",
    () => "2",
    () => "1.5",
    () => "1e400",
    () => ".nan",
    () => ".inf",
    () => "-.inf",
    () => '""',
    () => "x",
    () => "[]",
    () => "[1, 2]",
    () => "{}",
    () => "{a: 1}",
    () => "99999999999999999999",
    () => "0x10",
    () => "0o7",
    () => "x".repeat(rng.int(100, 100_000)),
    () => "!!binary aGVsbG8=",
    () => "2001-12-14",
    () => "!!str 3",
    () => '!!int "3"',
    () => "!!float 1",
    () => "!foo bar",
    () => '!!js/function "function () { process.exit(9) }"',
    () => '!!python/object/apply:os.system ["echo pwned"]',
    () => "&a 1",
    () => "*nowhere",
    () => "|\n  multi\n  line",
    () => '"\\0"',
    () => '"\\u0085\\e[31m"',
    () => "moa",
    () => "merged",
    () => "shared-kv",
    () => "sequential",
    () => "bf16",
    () => "f16",
    () => "mixtral",
    () => "qwen3-moe",
    () => "1KB",
    () => "1",
    () => "0.5",
    () => "5GB",
    () => "1e3",
    () => "256",
    () => "257",
    () => "9007199254740993",
  ])();
}

function seedList(rng: Rng, good: string[]): string {
  if (rng.chance(0.5)) return `\n${good.map((s) => `  - ${s}`).join("\n")}`;
  const items = rng.pick<() => string[]>([
    () => good,
    () => [good[0]!],
    () => [...good, good[0]!],
    () => ["1", "null", "true"],
    () => [good[0]!, "[]"],
    () => [good[0]!, "{a: 1}"],
    () => ['""', good[0]!],
    () => ["/nonexistent/seed", good[0]!],
    () => ["../../..", good[0]!],
    () => [".", good[0]!],
    () => ['"a\\0b"', good[0]!],
    () => [good[0]!, fixture("gpt2", "base")],
    () => Array.from({ length: 300 }, () => good[0]!),
    () => [],
  ])();
  return items.length === 0 ? "[]" : `\n${items.map((s) => `  - ${s}`).join("\n")}`;
}

function weightList(rng: Rng): string {
  return rng.pick([
    "[1, 1]",
    "[1]",
    "[0, 0]",
    "[-1, 2]",
    "[1e308, 1e308]",
    "[.nan, 1]",
    "[.inf, 1]",
    '["a", 1]',
    "[null, 1]",
    "[[1], 1]",
    "[1, 1, 1]",
    "[0.3, 0.7]",
    "[1e-320, 1e-320]",
    "[]",
  ]);
}

function wholeDocument(rng: Rng, good: string[]): [string, string] {
  const seeds = `seeds:\n${good.map((s) => `  - ${s}`).join("\n")}\n`;
  return rng.pick<() => [string, string]>([
    () => ["", "empty"],
    () => ["---\n", "empty document"],
    () => ["null\n", "null"],
    () => ["- a\n- b\n", "a list"],
    () => ['"x"\n', "a string"],
    () => [`${seeds}---\n${seeds}`, "two documents"],
    () => [`%YAML 1.1\n---\n${seeds}`, "YAML 1.1 directive"],
    () => [`%TAG ! tag:example.com,2000:\n---\n${seeds}`, "TAG directive"],
    () => {
      const levels = rng.int(3, 9);
      let doc = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
      for (let i = 1; i <= levels; i++)
        doc += `a${i}: &a${i} [${Array.from({ length: 10 }, () => `*a${i - 1}`).join(", ")}]\n`;
      return [`${seeds}${doc}`, `alias bomb, ${levels} levels`];
    },
    () => {
      const depth = rng.int(1000, 100_000);
      return [`${seeds}seed: ${"[".repeat(depth)}${"]".repeat(depth)}\n`, `flow nesting ${depth} deep`];
    },
    () => {
      const depth = rng.int(100, 3000);
      let doc = `${seeds}seed:\n`;
      for (let i = 1; i <= depth; i++) doc += `${" ".repeat(i)}k:\n`;
      return [doc, `block nesting ${depth} deep`];
    },
    () => [
      `${`${seeds}attention: moa\n`.repeat(1)}# ${"c".repeat(rng.int(1, 5) * 1_000_000)}\n`,
      "megabytes of comment",
    ],
    () => [`${seeds}attention: *undefined\n`, "undefined alias"],
    () => [`${seeds}\tattention: moa\n`, "tab indentation"],
    () => [`base: &base {attention: merged}\n<<: *base\n${seeds}`, "merge key"],
    () => [`${seeds}attention: moa\nattention: merged\n`, "repeated key"],
    () => [`{seeds: [${good.join(", ")}], attention: moa}\n`, "flow mapping"],
    () => [`? seeds\n: [${good.join(", ")}]\n`, "explicit key"],
  ])();
}

/** A mergekit-moe config (./src/upcycle/mergekit.ts): its keys with good and odd values, and the keys it refuses. */
function mergekitDocument(rng: Rng, good: string[]): string {
  const model = () =>
    rng.chance(0.8)
      ? rng.pick(good)
      : rng.pick(["/nonexistent/seed", "org/name", "../../..", ".", '""', oddValue(rng)]);
  const prompts = () => (rng.chance(0.8) ? '["def f(x):", "Once upon a time"]' : oddValue(rng));
  const expert = () => {
    const keys = [`source_model: ${model()}`];
    if (rng.chance(0.7)) keys.push(`positive_prompts: ${prompts()}`);
    if (rng.chance(0.3)) keys.push(`negative_prompts: ${prompts()}`);
    if (rng.chance(0.05)) keys.push(`${rng.pick(["residual_scale", "noise_scale", "model"])}: ${oddValue(rng)}`);
    return `  - {${keys.join(", ")}}`;
  };
  const lines = [
    `base_model: ${model()}`,
    rng.chance(0.9)
      ? `experts:\n${Array.from({ length: rng.int(1, 3) }, expert).join("\n")}`
      : `experts: ${oddValue(rng)}`,
  ];
  // hidden runs the CPU engine; the other gate modes keep a case well inside its time
  lines.push(
    `gate_mode: ${rng.chance(0.9) ? rng.pick(["random", "uniform_random", "cheap_embed"]) : rng.pick(["hidden", oddValue(rng)])}`,
  );
  if (rng.chance(0.4))
    lines.push(`dtype: ${rng.pick(["bfloat16", "float16", "float32", "torch.bfloat16", "int64", oddValue(rng)])}`);
  if (rng.chance(0.4)) lines.push(`experts_per_token: ${rng.pick(["1", "2", "0", oddValue(rng)])}`);
  if (rng.chance(0.3))
    lines.push(`architecture: ${rng.pick(["mixtral", "Mixtral", "qwen3_moe", "qwen", "deepseek", oddValue(rng)])}`);
  if (rng.chance(0.05))
    lines.push(`${rng.pick(["shared_experts", "tokenizer_source", "seeds", ...ODD_KEYS])}: ${oddValue(rng)}`);
  return `${lines.join("\n")}\n`;
}

export async function recipeCase(ctx: CaseContext): Promise<Step[]> {
  const { rng, dir, notes } = ctx;
  const good = [fixture("llama", "base"), fixture("llama", "code")];
  const file = join(dir, "recipe.yaml");
  const lines = new Map<string, string>([["seeds", seedList(rng, good)]]);
  if (rng.chance(0.5)) lines.set("attention", rng.pick(["moa", "shared-kv", "merged"]));
  if (rng.chance(0.3)) lines.set("max-shard-size", rng.pick(["5GB", "100KB", "1"]));
  let text: string;
  if (rng.chance(0.12)) {
    const [doc, note] = wholeDocument(rng, good);
    text = doc;
    notes.push(note);
  } else if (rng.chance(0.15)) {
    text = mergekitDocument(rng, good);
    notes.push(`mergekit-moe config: ${text.replace(/\n\s*/g, " ").slice(0, 120)}`);
    if (rng.chance(0.2)) text = mutateTextRepeatedly(rng, text, notes, ":-[]{}&*!|>%@`'\"#\t\n ,?<0123456789abcz");
  } else {
    notes.push(`seeds: ${lines.get("seeds")!.replace(/\n\s*/g, " ").slice(0, 80)}`);
    const ops = rng.weighted<number>([
      [1, 0],
      [5, 1],
      [3, 2],
      [1, 3],
    ]);
    for (let i = 0; i < ops; i++) {
      const choice = rng.int(0, 9);
      if (choice <= 5) {
        const key = rng.pick(KEYS);
        const value =
          key === "seeds"
            ? seedList(rng, good)
            : key === "weights" && rng.chance(0.7)
              ? weightList(rng)
              : oddValue(rng);
        lines.set(key, value);
        notes.push(`${key}: ${value.slice(0, 60)}`);
      } else if (choice <= 7) {
        const key = rng.pick(ODD_KEYS);
        lines.set(key, oddValue(rng));
        notes.push(`unknown key ${key}`);
      } else {
        lines.set("weights", weightList(rng));
        notes.push(`weights: ${lines.get("weights")}`);
      }
    }
    text = `${[...lines].map(([k, v]) => (k.startsWith("?") ? `${k}\n: ${v}` : `${k}: ${v}`)).join("\n")}\n`;
    if (rng.chance(0.2)) text = mutateTextRepeatedly(rng, text, notes, ":-[]{}&*!|>%@`'\"#\t\n ,?<0123456789abcz");
  }
  const bytes = maybeInvalidUtf8(rng, encoder.encode(text), 0.04, notes);
  if (rng.chance(0.05)) {
    const kind = rng.pick(ODD_FILES);
    ctx.fifos.push(...(await makeOddFile(file, kind, join(ctx.outside, "secret.txt"))));
    notes.push(`recipe -> ${kind}`);
  } else {
    await writeFile(file, bytes);
  }
  let options: UpcycleOptions | undefined;
  const warnings: string[] = [];
  return [
    {
      name: "readRecipe",
      run: async () => {
        const emit = process.emitWarning;
        process.emitWarning = ((warning: string | Error) =>
          void warnings.push(
            String(warning instanceof Error ? warning.message : warning),
          )) as typeof process.emitWarning;
        try {
          options = { ...(await readRecipe(file)), output: ctx.output } as UpcycleOptions;
        } finally {
          process.emitWarning = emit;
          // A warning is printed on stderr around the CLI's one line, and means the recipe was read with a guess.
          if (warnings.length > 0)
            reportViolation(`readRecipe printed warnings: ${warnings.join(" | ").slice(0, 200)}`);
        }
      },
    },
    { name: "planUpcycle", upcycle: () => options!, dryRun: true },
    ...maybeUpcycle(ctx, () => options!),
  ];
}
