#!/usr/bin/env node
/**
 * The `bam` command line. Each command lives in ./commands as a yargs module
 * whose handler is a thin call into the library API.
 *
 * Exit codes: 0 success, 1 a reported error (one line on stderr, no stack
 * trace; BAM_DEBUG=1 adds it), 2 bad usage, 130 interrupted (Ctrl-C, SIGTERM).
 */
import yargs from "yargs";
import { hideBin } from "yargs/helpers";
import { evalCommand } from "./commands/eval.js";
import { exportOnnxCommand } from "./commands/export-onnx.js";
import { generateCommand } from "./commands/generate.js";
import { inspectCommand } from "./commands/inspect.js";
import { upcycleCommand } from "./commands/upcycle.js";


await yargs(hideBin(process.argv))
  .scriptName("bam")
  .usage("$0 <command> [options]\n\nUpcycle dense Hugging Face checkpoints into a BAM Mixture-of-Experts model.")
  .command(inspectCommand)
  .command(upcycleCommand)
  .command(exportOnnxCommand)
  .command(evalCommand)
  .command(generateCommand)
  .demandCommand(1, "Name a command; `bam --help` lists them.")
  .strict()
  .recommendCommands()
  .wrap(Math.min(100, process.stdout.columns ?? 100))
  .epilogue("Exit codes: 0 success, 1 error, 2 bad usage, 130 interrupted. The output format: docs/format.md. BAM_DEBUG=1 prints stack traces.")
  .fail((message, error) => {
    if (error) throw error;
    process.stderr.write(`bam: ${message}\nRun \`bam --help\` for usage.\n`);
    process.exit(2); // bad usage
  })
  .parseAsync();
