import { DEFAULT_GENERATION } from "../../onnx/generation.js";
import { onnxEngine } from "../engine.js";
import { inFlagWords } from "../flag-words.js";
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
        describe: `Tokens to generate at most (default: the model's max_new_tokens, else ${DEFAULT_GENERATION.maxNewTokens})`,
      })
      .option("temperature", {
        type: "number",
        describe:
          "0 = greedy; above 0 samples (default: the model's temperature when its generation_config.json " +
          "has do_sample true, as transformers samples; else 0)",
      })
      .option("top-k", {
        type: "number",
        describe: `Sampling keeps the k most probable tokens, 0: all (default: the model's top_k, else ${DEFAULT_GENERATION.topK})`,
      })
      .option("top-p", {
        type: "number",
        describe: `Nucleus sampling: keep the smallest set of tokens with this much probability (default: the model's top_p, else ${DEFAULT_GENERATION.topP})`,
      })
      .option("seed", { type: "number", describe: "Seed of the sampler (sampling is reproducible with it)" })
      .option("json", { type: "boolean", default: false, describe: "No streaming; print one JSON result on stdout" })
      .example(
        "$0 generate out/bam --prompt 'def fibonacci(n):' --max-new-tokens 40",
        "as the model's generation_config.json says",
      )
      .example("$0 generate out/bam --prompt 'def fibonacci(n):' --temperature 0", "greedy, whatever the model says"),
  handler: (args) =>
    runCommand(
      inFlagWords(GENERATE_FLAGS, async ({ signal }) => {
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
        checkGeneration(args.prompt, settings); // the library's checks, before an export that can take minutes
        const bar = progressBar("exporting", "bytes");
        const prepared = await prepareOnnx(args.dir, { signal, onProgress: bar.update });
        if (prepared.built) bar.finish();
        const result = await generateFromExport(prepared.folder, args.prompt, settings);
        if (args.json) {
          printJson({
            model: args.dir,
            prompt: args.prompt,
            text: result.text,
            promptIds: result.promptIds,
            newIds: result.newIds,
            seconds: result.seconds,
            settings: result.settings,
            modelSettings: result.modelSettings,
          });
          return;
        }
        process.stdout.write("\n");
        const { temperature, topK, topP } = result.settings;
        const decoding =
          temperature > 0 ? `sampled at temperature ${temperature}, top-k ${topK}, top-p ${topP}` : "greedy";
        // top-k and top-p of the model's do_sample shape nothing greedy
        const shaped = result.modelSettings.filter((key) => temperature > 0 || key === "maxNewTokens");
        const fromModel = shaped.length > 0 ? " (as the model's generation_config.json says)" : "";
        process.stderr.write(
          `bam: ${result.newIds.length} tokens, ${decoding}${fromModel}, in ${result.seconds.toFixed(2)}s (${(result.newIds.length / Math.max(result.seconds, 1e-9)).toFixed(1)} tokens/s)\n`,
        );
      }),
    ),
});

/** The library names settings as the API does; the CLI user typed flags. */
const GENERATE_FLAGS: ReadonlyMap<string, string> = new Map([
  ["prompt", "--prompt"],
  ["maxNewTokens", "--max-new-tokens"],
  ["temperature", "--temperature"],
  ["topK", "--top-k"],
  ["topP", "--top-p"],
  ["seed", "--seed"],
]);
