import { BamError, isBamError } from "../../errors.js";
import { DEFAULT_GENERATION } from "../../onnx/generation.js";
import { onnxEngine } from "../engine.js";
import { progressBar } from "../progress.js";
import { defineCommand, printJson, runCommand } from "../run.js";

export const generateCommand = defineCommand({
  command: "generate <dir>",
  describe: "Generate text on CPU with the KV cache, streaming it to stdout",
  builder: (y) =>
    y
      .positional("dir", {
        type: "string",
        demandOption: true,
        describe: "Model folder (config.json + safetensors + tokenizer.json)",
      })
      .option("prompt", { type: "string", demandOption: true, describe: "Text to continue" })
      .option("max-new-tokens", {
        type: "number",
        default: DEFAULT_GENERATION.maxNewTokens,
        describe: "Tokens to generate at most",
      })
      .option("temperature", {
        type: "number",
        default: DEFAULT_GENERATION.temperature,
        describe: "0 = greedy; above 0 samples",
      })
      .option("top-k", {
        type: "number",
        default: DEFAULT_GENERATION.topK,
        describe: "Sampling keeps the k most probable tokens (0: all)",
      })
      .option("top-p", {
        type: "number",
        default: DEFAULT_GENERATION.topP,
        describe: "Nucleus sampling: keep the smallest set of tokens with this much probability",
      })
      .option("seed", { type: "number", describe: "Seed of the sampler (sampling is reproducible with it)" })
      .option("json", { type: "boolean", default: false, describe: "No streaming; print one JSON result on stdout" })
      .example("$0 generate out/bam --prompt 'def fibonacci(n):' --max-new-tokens 40", "greedy continuation"),
  handler: (args) =>
    runCommand(async ({ signal }) => {
      const settings = {
        maxNewTokens: args.maxNewTokens,
        temperature: args.temperature,
        topK: args.topK,
        topP: args.topP,
        seed: args.seed ?? null,
        signal,
        onText: args.json ? undefined : (text: string) => process.stdout.write(text),
      };
      const { checkGeneration, generateFromExport, prepareOnnx } = await onnxEngine();
      // The library's checks, before an export that can take minutes, in the words of the flags.
      try {
        checkGeneration(args.prompt, settings);
      } catch (error) {
        throw isBamError(error) ? new BamError(error.code, flagNames(error.message)) : error;
      }
      const bar = progressBar("exporting", "bytes");
      const prepared = await prepareOnnx(args.dir, { signal, onProgress: bar.update });
      if (prepared.built) bar.finish();
      const result = await generateFromExport(prepared.folder, args.prompt, settings).catch((error: unknown) => {
        throw isBamError(error, "OPTIONS_INVALID") ? new BamError(error.code, flagNames(error.message)) : error;
      });
      if (args.json) {
        printJson({
          model: args.dir,
          prompt: args.prompt,
          text: result.text,
          promptIds: result.promptIds,
          newIds: result.newIds,
          seconds: result.seconds,
        });
        return;
      }
      process.stdout.write("\n");
      process.stderr.write(
        `bam: ${result.newIds.length} tokens in ${result.seconds.toFixed(2)}s (${(result.newIds.length / Math.max(result.seconds, 1e-9)).toFixed(1)} tokens/s)\n`,
      );
    }),
});

/** The library names settings as the API does; the CLI user typed flags. */
const FLAGS: Readonly<Record<string, string>> = {
  prompt: "--prompt",
  maxNewTokens: "--max-new-tokens",
  temperature: "--temperature",
  topK: "--top-k",
  topP: "--top-p",
  seed: "--seed",
};
const flagNames = (message: string) =>
  message.replace(/\b(prompt|maxNewTokens|temperature|topK|topP|seed)\b/g, (name) => FLAGS[name]!);
