import { inspectModel, type ModelSummary } from "../../arch/describe.js";
import { BamError } from "../../errors.js";
import { defineCommand, printJson, runCommand } from "../run.js";
import { progressBar } from "../progress.js";

export const inspectCommand = defineCommand({
  command: "inspect <dir>",
  describe: "Describe a model folder (a dense seed, a BAM model, or a mixtral or qwen3_moe one)",
  builder: (y) =>
    y
      .positional("dir", {
        type: "string",
        demandOption: true,
        describe: "Hugging Face model folder (config.json + safetensors)",
      })
      .option("json", { type: "boolean", default: false, describe: "Print one JSON document on stdout" })
      .option("scan", {
        type: "boolean",
        default: false,
        describe: "Read every tensor and check for NaN/Inf (exit 1 if any)",
      })
      .example("$0 inspect fixtures/llama/base", "family, shapes, parameters, dtypes, shards")
      .example("$0 inspect out/bam --scan --json", "also scan every tensor; machine-readable"),
  handler: (args) =>
    runCommand(async ({ signal }) => {
      const bar = args.scan ? progressBar("scanning", "bytes") : null;
      const { scan, ...summary } = await inspectModel(args.dir, { scan: args.scan, onProgress: bar?.update, signal });
      bar?.finish();
      if (args.json) printJson({ ...summary, scan });
      else printSummary(summary, scan);
      if (scan && scan.length > 0) {
        throw new BamError(
          "TENSOR_INVALID",
          `${args.dir}: ${scan.length} tensor(s) hold NaN or Inf, first ${scan[0]!.tensor}`,
        );
      }
    }),
});

function printSummary(s: ModelSummary, findings: { tensor: string; nan: number; inf: number }[] | null): void {
  const f = s.features;
  const mixture = s.kind !== "dense";
  const millions = (n: number) => `${(n / 1e6).toFixed(n < 1e7 ? 3 : 1)}M`;
  const rows: Array<[string, string]> = [
    ["model", `${s.dir} (${mixture ? `${s.kind === "bam" ? "BAM" : s.kind} mixture` : "dense"}, family ${s.family})`],
    [
      "block",
      `${s.block}${mixture && f.parallelBlock !== (s.block === "parallel") ? ` (seeds are ${f.parallelBlock ? "parallel" : "sequential"})` : ""}`,
    ],
    ["layers", String(s.layers)],
    ["hidden", `${s.hiddenSize}, FFN ${s.intermediateSize} (${f.gatedMlp ? "gated " : ""}${f.activation})`],
    ["heads", `${s.heads} query, ${s.kvHeads} key/value, head_dim ${s.headDim}`],
    [
      "norm",
      `${f.norm === "rms" ? "RMSNorm" : "LayerNorm"} eps ${f.normEps}${f.normBias ? " +bias" : ""}${f.normUnitOffset ? " (1+w)" : ""}${f.qkNorm !== "none" ? `, qk-norm ${f.qkNorm}` : ""}`,
    ],
    [
      "positions",
      f.learnedPositions
        ? `learned, ${f.maxPositions}`
        : f.rope
          ? `rotary ${f.rope.dim}/${s.headDim} dims, theta ${f.rope.theta}, ${f.rope.style}${f.rope.scaling ? `, scaling ${f.rope.scaling.type}` : ""}`
          : "none",
    ],
    ["vocab", `${s.vocabSize}, embeddings ${s.tiedEmbeddings ? "tied" : "untied"}`],
    [
      "parameters",
      mixture
        ? `${millions(s.parameters.total)} total, ${millions(s.parameters.activePerToken)} active per token`
        : millions(s.parameters.total),
    ],
    [
      "dtypes",
      Object.entries(s.dtypes)
        .map(([d, n]) => `${d} x${n}`)
        .join(", "),
    ],
    ["shards", `${s.shards.length}: ${s.shards.join(", ")}`],
    ["tokenizer", s.tokenizerSha256 ? `sha256 ${s.tokenizerSha256.slice(0, 16)}...` : "none"],
  ];
  if (mixture) {
    rows.push(["experts", `${s.experts} FFN experts, top-${s.expertsPerToken}; attention ${s.attentionExperts}`]);
    if (s.upcycledFrom.length > 0) rows.push(["seeds", s.upcycledFrom.map((seed) => seed.name).join(", ")]);
  }
  if (findings)
    rows.push([
      "scan",
      findings.length === 0
        ? "every tensor finite"
        : findings.map((x) => `${x.tensor}: ${x.nan} NaN, ${x.inf} Inf`).join("; "),
    ]);
  const width = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(`${rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join("\n")}\n`);
}
