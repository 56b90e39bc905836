import type { CommandModule } from "yargs";
import { BamError } from "../../errors.js";
import { onnxEngine } from "../engine.js";
import { progressBar } from "../progress.js";
import { printJson, runCommand } from "../run.js";

interface GenerateArgs {
  dir: string;
  prompt: string;
  "max-new-tokens": number;
  temperature: number;
  "top-p": number;
  seed?: number;
  json: boolean;
}

export const generateCommand: CommandModule<object, GenerateArgs> = {
  command: "generate <dir>",
  describe: "Generate text on CPU with the KV cache (transformers.js), streaming it to stdout",
  builder: (y) =>
    y
      .positional("dir", { type: "string", demandOption: true, describe: "Model folder (config.json + safetensors + tokenizer.json)" })
      .option("prompt", { type: "string", demandOption: true, describe: "Text to continue" })
      .option("max-new-tokens", { type: "number", default: 64, describe: "Tokens to generate at most" })
      .option("temperature", { type: "number", default: 0, describe: "0 = greedy; above 0 samples" })
      .option("top-p", { type: "number", default: 1, describe: "Nucleus sampling: keep the smallest set of tokens with this much probability" })
      .option("seed", { type: "number", describe: "Seed of the sampler (sampling is reproducible with it)" })
      .option("json", { type: "boolean", default: false, describe: "No streaming; print one JSON result on stdout" })
      .example("$0 generate out/bam --prompt 'def fibonacci(n):' --max-new-tokens 40", "greedy continuation"),
  handler: (args) =>
    runCommand(async ({ signal }) => {
      const maxNewTokens = args["max-new-tokens"];
      if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new BamError("OPTIONS_INVALID", `--max-new-tokens must be a positive integer, not ${maxNewTokens}`);
      if (!(args.temperature >= 0) || !Number.isFinite(args.temperature)) throw new BamError("OPTIONS_INVALID", `--temperature must be 0 or more, not ${args.temperature}`);
      if (!(args["top-p"] > 0 && args["top-p"] <= 1)) throw new BamError("OPTIONS_INVALID", `--top-p must be in (0, 1], not ${args["top-p"]}`);
      if (args.seed !== undefined && !(Number.isSafeInteger(args.seed) && args.seed >= 0)) throw new BamError("OPTIONS_INVALID", `--seed must be a non-negative integer, not ${args.seed}`);
      const { generateText, prepareOnnx } = await onnxEngine();
      const bar = progressBar("exporting", "bytes");
      const prepared = await prepareOnnx(args.dir, { signal, onProgress: bar.update });
      if (prepared.built) bar.finish();
      const result = await generateText(prepared.folder, args.prompt, {
        maxNewTokens,
        temperature: args.temperature,
        topP: args["top-p"],
        seed: args.seed ?? null,
        onText: args.json ? undefined : (text) => process.stdout.write(text),
      });
      if (args.json) {
        printJson({ model: args.dir, prompt: args.prompt, text: result.text, promptIds: result.promptIds, newIds: result.newIds, seconds: result.seconds });
        return;
      }
      process.stdout.write("\n");
      process.stderr.write(`bam: ${result.newIds.length} tokens in ${result.seconds.toFixed(2)}s (${(result.newIds.length / Math.max(result.seconds, 1e-9)).toFixed(1)} tokens/s)\n`);
    }),
};
