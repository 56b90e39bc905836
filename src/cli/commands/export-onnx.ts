import { onnxEngine } from "../engine.js";
import { progressBar } from "../progress.js";
import { defineCommand, printJson, runCommand } from "../run.js";

export const exportOnnxCommand = defineCommand({
  command: "export-onnx <dir>",
  describe: "Write a model (dense seed, BAM, mixtral or qwen3_moe) as ONNX for onnxruntime and transformers.js",
  builder: (y) =>
    y
      .positional("dir", { type: "string", demandOption: true, describe: "Model folder (config.json + safetensors)" })
      .option("output", {
        alias: "o",
        type: "string",
        describe:
          "Folder to write (default: a folder named by the model's content in the user cache, BAM_CACHE_DIR or ~/.cache/bam-upcycle/onnx; never <dir>)",
      })
      .option("force", {
        type: "boolean",
        default: false,
        describe: "Rebuild even when up to date; replace a folder that is not an export",
      })
      .option("json", { type: "boolean", default: false, describe: "Print one JSON result on stdout" })
      .example("$0 export-onnx out/bam -o out/bam-onnx", "writes out/bam-onnx/{config.json,onnx/model.onnx,...}")
      .epilogue(
        "The folder loads in transformers.js: AutoModelForCausalLM.from_pretrained(folder) or pipeline('text-generation', folder).",
      ),
  handler: (args) =>
    runCommand(async ({ signal }) => {
      const { prepareOnnx } = await onnxEngine();
      const bar = progressBar("exporting", "bytes");
      const result = await prepareOnnx(args.dir, {
        output: args.output,
        force: args.force,
        signal,
        onProgress: bar.update,
      });
      if (result.built) bar.finish();
      if (args.json) printJson(result);
      else process.stdout.write(`${result.built ? "wrote" : "up to date:"} ${result.folder} (${result.modelFile})\n`);
    }),
});
