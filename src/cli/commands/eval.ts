import { BamError } from "../../errors.js";
import type { Perplexity, PerplexityReport } from "../../onnx/index.js";
import { BIN_DTYPES } from "../../onnx/token-files.js";
import { onnxEngine } from "../engine.js";
import { inFlagWords } from "../flag-words.js";
import { progressBar } from "../progress.js";
import { defineCommand, numberFlag, printJson, runCommand } from "../run.js";

export const evalCommand = defineCommand({
  command: "eval <dir>",
  describe:
    "Perplexity of text or token files, or logits of token ids, on CPU (a dense seed, a BAM model, or a mixtral or qwen3_moe one)",
  builder: (y) =>
    y
      .positional("dir", {
        type: "string",
        demandOption: true,
        describe: "Model folder (config.json + safetensors + tokenizer.json)",
      })
      .option("text", { type: "string", array: true, describe: "Text files: perplexity per file and overall" })
      .option("tokens", {
        type: "string",
        array: true,
        describe: "Token-id files (flat little-endian, as scripts/data writes): perplexity per file and overall",
      })
      .option("bin-dtype", {
        choices: BIN_DTYPES,
        describe: "Width of --tokens ids (default: uint16 when the vocabulary fits)",
      })
      .option("context", { type: "string", default: "512", describe: "Tokens per window (non-overlapping)" })
      .option("max-tokens", { type: "string", describe: "Evaluate only the first N tokens of each file" })
      .option("ids", { type: "string", describe: "Safetensors file holding input_ids (int64 [batch, seq])" })
      .option("save-logits", {
        type: "string",
        describe: "With --ids: write logits (f32 [batch, seq, vocab]) to this safetensors file",
      })
      .option("json", { type: "boolean", default: false, describe: "Print one JSON result on stdout" })
      .option("force", {
        type: "boolean",
        default: false,
        describe: "With --save-logits: replace an existing file (never one of the model's or the ids file)",
      })
      .conflicts("text", ["ids", "tokens"])
      .conflicts("tokens", "ids")
      .example("$0 eval out/bam --text wiki.txt code.txt", "perplexity per file and overall")
      .example("$0 eval out/bam --tokens code.heldout.bin --max-tokens 65536", "perplexity of token ids")
      .example("$0 eval out/bam --ids ids.safetensors --save-logits logits.safetensors", "raw logits"),
  handler: (args) =>
    runCommand(
      // binDType's hint comes with a TENSOR_INVALID token out of the vocabulary
      inFlagWords(
        EVAL_FLAGS,
        async ({ signal }) => {
          const { evaluatePerplexity, evaluateTokenFiles, saveLogits } = await onnxEngine();
          const build = progressBar("exporting", "bytes");
          if (args.ids !== undefined) {
            if (args.saveLogits === undefined)
              throw new BamError("OPTIONS_INVALID", "--ids needs --save-logits OUT.safetensors");
            const { shape } = await saveLogits(args.dir, args.ids, args.saveLogits, {
              force: args.force,
              signal,
              onBuild: build.update,
            });
            if (args.json) printJson({ model: args.dir, ids: args.ids, logits: args.saveLogits, shape });
            else process.stdout.write(`wrote ${args.saveLogits}: logits [${shape.join(", ")}]\n`);
            return;
          }
          const text = args.text ?? [];
          const tokens = args.tokens ?? [];
          if (text.length === 0 && tokens.length === 0)
            throw new BamError(
              "OPTIONS_INVALID",
              "name text files with --text FILE..., token files with --tokens FILE..., or token ids with --ids FILE --save-logits OUT",
            );
          if (args.saveLogits !== undefined) throw new BamError("OPTIONS_INVALID", "--save-logits goes with --ids");
          const bar = progressBar("evaluating", "items");
          const options = {
            context: numberFlag("--context", args.context),
            maxTokens: numberFlag("--max-tokens", args.maxTokens),
            signal,
            onBuild: build.update,
            onProgress: bar.update,
          };
          const report =
            tokens.length > 0
              ? await evaluateTokenFiles(args.dir, tokens, { ...options, binDType: args.binDtype })
              : await evaluatePerplexity(args.dir, text, options);
          bar.finish();
          if (args.json) printJson(report);
          else printReport(report);
        },
        ["OPTIONS_INVALID", "TENSOR_INVALID"],
      ),
    ),
});

/** The library names options as the API does; the CLI user typed flags. */
const EVAL_FLAGS: ReadonlyMap<string, string> = new Map([
  ["context", "--context"],
  ["maxTokens", "--max-tokens"],
  ["binDType", "--bin-dtype"],
]);

function printReport(report: PerplexityReport): void {
  const rows: Array<[string, Perplexity]> = [
    ...report.files.map((f): [string, Perplexity] => [f.file, f]),
    ["overall", report.overall],
  ];
  const width = Math.max(...rows.map(([name]) => name.length));
  const lines = rows.map(
    ([name, p]) =>
      `${name.padEnd(width)}  perplexity ${p.perplexity.toFixed(3)}  (${p.predicted} tokens predicted, nll ${(p.nll / Math.max(p.predicted, 1)).toFixed(4)})`,
  );
  lines.push(
    `${report.overall.tokens} tokens in ${report.seconds.toFixed(1)}s: ${report.tokensPerSecond.toFixed(1)} tokens/s, context ${report.context}`,
  );
  process.stdout.write(`${lines.join("\n")}\n`);
}
