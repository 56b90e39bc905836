import { ATTENTION_EXPERTS, BLOCK_KINDS } from "../../arch/model.js";
import { BamError } from "../../errors.js";
import {
  DEFAULT_NORM_TOPK_PROB,
  OUTPUT_DTYPES,
  OUTPUT_FORMATS,
  ROUTER_INITS,
  UPCYCLE_FLAGS,
} from "../../upcycle/options.js";
import {
  planUpcycle,
  readRecipe,
  upcycle,
  type DownloadProgress,
  type UpcycleOptions,
  type UpcyclePlan,
  type UpcycleProgress,
  type UpcycleStage,
} from "../../upcycle/index.js";
import { inFlagWords } from "../flag-words.js";
import { formatBytes, formatDuration, progressBar, type ProgressBar } from "../progress.js";
import { defineCommand, numberFlag, printJson, runCommand } from "../run.js";

export const upcycleCommand = defineCommand({
  command: "upcycle [seeds..]",
  describe: "Build a Mixture-of-Experts model from dense seeds (BAM, BTX, sparse upcycling, Drop-Upcycling)",
  builder: (y) =>
    y
      .positional("seeds", {
        type: "string",
        array: true,
        default: [],
        describe:
          "Seed folders or Hugging Face ids owner/name[@revision]: one expert per seed (the generalist first), or one seed with --experts. An existing path is a folder, always; otherwise owner/name[@rev] is read from the Hugging Face cache (HF_HUB_CACHE, HF_HOME) or downloaded into it (HF_ENDPOINT, HF_TOKEN; not with HF_HUB_OFFLINE=1)",
      })
      .option("output", { alias: "o", type: "string", describe: "Output folder (written atomically)" })
      .option("recipe", {
        type: "string",
        describe:
          "YAML file with the same options (flags override it), or a mergekit-moe config; written into the output",
      })
      .option("attention", {
        choices: ATTENTION_EXPERTS,
        describe:
          "moa: soft attention experts (default); shared-kv: per-expert q/o with shared k/v; merged: averaged attention (BTX)",
      })
      .option("block", {
        choices: BLOCK_KINDS,
        describe: "parallel (default, as BAM) or sequential (keeps sequential seeds' function)",
      })
      .option("experts", { type: "string", describe: "With one seed: number of FFN copies (sparse upcycling)" })
      .option("drop-ratio", {
        type: "string",
        describe:
          "With one seed: Drop-Upcycling, re-initialise this fraction of each expert's FFN dimensions (0.5 is best)",
      })
      .option("experts-per-token", {
        alias: "k",
        type: "string",
        describe: "Top-k FFN experts per token (default 1, as BAM; BTX used 2)",
      })
      .option("norm-topk-prob", {
        type: "boolean",
        describe:
          "FFN gate: renormalise the top-k probabilities to sum 1 (Mixtral; [s, s, s] stays s at any k, but at k = 1 the router gets no LM gradient); " +
          "--no-norm-topk-prob: each expert weighted by its probability over all experts (BAM, Switch; learns at every k). " +
          `Default ${DEFAULT_NORM_TOPK_PROB ? "--norm-topk-prob" : "--no-norm-topk-prob"}`,
      })
      .option("weights", {
        type: "string",
        nargs: 1,
        describe: "Averaging weights of the shared tensors, one per seed, comma-separated (default uniform)",
      })
      .option("shared-from", {
        type: "string",
        describe:
          "Copy every shared tensor (embeddings, norms, head, merged attention) from this model instead of averaging (mergekit-moe's base_model)",
      })
      .option("router-init", {
        choices: ROUTER_INITS,
        describe:
          "random (Switch's 0.1-scaled truncated normal, default), zero, uniform-random (U(-1/sqrt(hidden), 1/sqrt(hidden)), torch.nn.Linear's init), " +
          "hidden (the prompts' hidden states) or cheap-embed (the prompts' token embeddings, no forward pass); the last two from --prompts, as mergekit's gate modes",
      })
      .option("prompts", {
        type: "string",
        describe:
          "With --router-init hidden or cheap-embed: YAML of prompts per expert (experts: [{positive_prompts, negative_prompts}]), or a mergekit-moe config",
      })
      .option("router-scale", { type: "string", describe: "Scale of the random router init (default 0.1)" })
      .option("seed", { type: "string", describe: "Random seed for routers and Drop-Upcycling (default 0)" })
      .option("dtype", {
        choices: OUTPUT_DTYPES,
        describe: "Output dtype (default keep: the seeds' dtype, f32 when they differ)",
      })
      .option("max-shard-size", { type: "string", describe: "Largest safetensors shard, e.g. 5GB (default), 500MB" })
      .option("format", {
        choices: OUTPUT_FORMATS,
        describe: "bam (default, remote code), or native mixtral / qwen3-moe where the model fits",
      })
      .option("name", { type: "string", describe: "Title of the model card (default: the output folder's name)" })
      .option("force", {
        type: "boolean",
        default: false,
        describe: "Replace an existing output folder (only once the new one is complete)",
      })
      .option("dry-run", { type: "boolean", default: false, describe: "Print the plan and write nothing" })
      .option("json", { type: "boolean", default: false, describe: "Print one JSON result on stdout" })
      .example("$0 upcycle base code math -o bam-3x", "BAM with soft attention experts, parallel block, top-1")
      .example("$0 upcycle base code math -o btx --attention merged --block sequential -k 2", "the BTX baseline")
      .example(
        "$0 upcycle Qwen/Qwen3-0.6B org/qwen3-code@v1 -o bam-2x",
        "seeds by Hugging Face id, from the cache or downloaded",
      )
      .example("$0 upcycle base -o sparse --experts 4 --drop-ratio 0.5", "Drop-Upcycling from one seed")
      .example("$0 upcycle --recipe recipe.yaml --dry-run", "show the plan of a recipe")
      .example("$0 upcycle --recipe mergekit-moe.yml -o moe", "a mergekit-moe config as the recipe"),
  handler: (args) =>
    runCommand(
      inFlagWords(UPCYCLE_FLAGS, async ({ signal }) => {
        const options = await optionsFrom(args);
        const onDownload = downloadBars();
        if (args.dryRun) {
          const plan = await planUpcycle(options, { signal, onDownload });
          if (args.json) printJson(planJson(plan));
          else printPlan(plan);
          return;
        }
        const stages = stageBars();
        const result = await upcycle(options, { signal, onDownload, onProgress: stages.update });
        stages.finish();
        // On stderr either way: --json's stdout stays one JSON document (which lists them too).
        for (const warning of result.plan.warnings) process.stderr.write(`bam: warning: ${warning}\n`);
        if (args.json) {
          printJson({
            ...planJson(result.plan),
            output: result.output,
            files: result.files,
            bytesWritten: result.bytesWritten,
            seconds: result.seconds,
            seeds: result.seeds,
          });
          return;
        }
        process.stdout.write(
          `wrote ${result.output}: ${result.plan.summary.experts} experts, attention ${result.plan.summary.attention}, ${result.plan.summary.block} block; ` +
            `${result.files.length} shard(s), ${formatBytes(result.bytesWritten)} in ${formatDuration(result.seconds)} (${formatBytes(result.bytesWritten / Math.max(result.seconds, 1e-3))}/s)\n`,
        );
      }),
    ),
});

type UpcycleArgs = Parameters<typeof upcycleCommand.handler>[0];

/** The recipe's options, each overridden by its flag where one was given; the library checks the whole. */
async function optionsFrom(args: UpcycleArgs): Promise<UpcycleOptions> {
  const recipe = args.recipe ? await readRecipe(args.recipe) : {};
  const flags: Partial<UpcycleOptions> = {
    seeds: args.seeds.length > 0 ? args.seeds : undefined,
    output: args.output,
    attention: args.attention,
    block: args.block,
    experts: numberFlag("--experts", args.experts),
    dropRatio: numberFlag("--drop-ratio", args.dropRatio),
    expertsPerToken: numberFlag("--experts-per-token (-k)", args.expertsPerToken),
    normTopkProb: args.normTopkProb,
    weights: args.weights === undefined ? undefined : parseWeights(args.weights),
    sharedFrom: args.sharedFrom,
    routerInit: args.routerInit,
    prompts: args.prompts,
    routerScale: numberFlag("--router-scale", args.routerScale),
    seed: numberFlag("--seed", args.seed),
    dtype: args.dtype,
    maxShardSize: args.maxShardSize,
    format: args.format,
    force: args.force || undefined,
    name: args.name,
  };
  // A flag not given leaves the recipe's value (a spread would overwrite it with undefined).
  const merged: Partial<UpcycleOptions> = { ...recipe };
  for (const [key, value] of Object.entries(flags)) if (value !== undefined) Object.assign(merged, { [key]: value });
  return { ...merged, seeds: merged.seeds ?? [] }; // none: the library's message says to name them
}

/** What each stage's bar says, and what it counts. */
const STAGE_BARS: Readonly<Record<UpcycleStage, [string, "bytes" | "items"]>> = {
  "router-init": ["routers from prompts", "items"],
  writing: ["writing", "bytes"],
  hashing: ["hashing seeds", "bytes"],
};

/** One labelled bar per upcycle stage, each finished when the next starts. */
function stageBars(): { update: (progress: UpcycleProgress) => void; finish: () => void } {
  let current: { stage: UpcycleStage; bar: ProgressBar } | undefined;
  return {
    update: ({ stage, done, total }) => {
      if (current?.stage !== stage) {
        current?.bar.finish();
        current = { stage, bar: progressBar(...STAGE_BARS[stage]) };
      }
      current.bar.update(done, total);
    },
    finish: () => current?.bar.finish(),
  };
}

/** One progress bar per repository downloaded (files already cached never reach the total; the next bar then redraws over it). */
function downloadBars(): (progress: DownloadProgress) => void {
  let current: { repoId: string; bar: ProgressBar; done: boolean } | undefined;
  return ({ repoId, bytes, totalBytes }) => {
    if (current?.repoId !== repoId)
      current = { repoId, bar: progressBar(`downloading ${repoId}`, "bytes"), done: false };
    if (current.done) return;
    current.bar.update(bytes, Math.max(bytes, totalBytes));
    if (totalBytes > 0 && bytes >= totalBytes) {
      current.bar.finish();
      current.done = true;
    }
  };
}

function parseWeights(text: string): number[] {
  const weights = text.split(",").map((part) => Number(part.trim()));
  if (weights.some((w) => !Number.isFinite(w)))
    throw new BamError("OPTIONS_INVALID", `--weights must be numbers separated by commas, not "${text}"`);
  return weights;
}

function planJson(plan: UpcyclePlan) {
  return {
    options: plan.options,
    seeds: plan.seeds,
    format: plan.format,
    summary: plan.summary,
    warnings: plan.warnings,
    tensors: plan.tensors.map((t) => ({ name: t.name, shape: t.shape, dtype: t.dtype, operation: t.operation })),
  };
}

function describeOperation(plan: UpcyclePlan, op: UpcyclePlan["tensors"][number]["operation"]): string {
  const seedName = (i: number) => plan.seeds[i]!.name;
  switch (op.kind) {
    case "copy":
      return `copy ${seedName(op.from.seed)}:${op.from.tensor}`;
    case "average":
      return `average of ${op.from.length} seeds`;
    case "router":
      if (op.fromPrompts)
        return `new router, from the prompts' ${plan.options.routerInit === "cheap-embed" ? "token embeddings" : "hidden states"}`;
      if (op.bound !== undefined) return `new router, U(-${op.bound.toPrecision(3)}, ${op.bound.toPrecision(3)})`;
      return op.std === 0 ? "new router, zeros" : `new router, N(0, ${op.std.toPrecision(3)}) truncated`;
    case "drop":
      return `drop ${Math.round(op.ratio * 100)}% of ${seedName(op.from.seed)}:${op.from.tensor}`;
  }
}

function printPlan(plan: UpcyclePlan): void {
  const s = plan.summary;
  const millions = (n: number) => `${(n / 1e6).toFixed(n < 1e7 ? 3 : 1)}M`;
  const lines = [
    ...plan.seeds.map(
      (x, i) =>
        `${(i === 0 ? "seeds" : "").padEnd(12)}${x.name} (${x.dtypes.join("/")})${x.dir === x.name ? "" : ` <- ${x.dir}`}`,
    ),
    `family      ${plan.features.family}, ${plan.features.numLayers} layers, hidden ${plan.features.hiddenSize}`,
    `experts     ${s.experts} FFN experts, top-${s.expertsPerToken}, ${plan.moe.normTopkProb ? "renormalised gate (--norm-topk-prob)" : "gate: probability over all experts (--no-norm-topk-prob)"}`,
    `shared      ${plan.options.sharedFrom === null ? "averaged over the seeds" : `copied from ${plan.options.sharedFrom}`}`,
    `attention   ${s.attention}`,
    `block       ${s.block}`,
    `parameters  ${millions(s.totalParameters)} total, ${millions(s.activeParameters)} active per token (one seed: ${millions(s.seedParameters)})`,
    `FLOPs       ${s.flopsPerTokenRatio.toFixed(2)}x one seed per token (context 2048)`,
    `output      ${plan.options.output === null ? "" : `${plan.options.output}, `}${formatBytes(s.outputBytes)} in ${plan.options.format} format, ${plan.tensors.length} tensors`,
    `memory      about ${formatBytes(s.peakMemoryBytes)} peak`,
    "",
    ...plan.tensors.map(
      (t) => `  ${t.name} [${t.shape.join(", ")}] ${t.dtype} <- ${describeOperation(plan, t.operation)}`,
    ),
    ...plan.warnings.map((w) => `warning: ${w}`),
  ];
  process.stdout.write(`${lines.join("\n")}\n`);
}
