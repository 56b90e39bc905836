#!/usr/bin/env node
/**
 * The `bam` command line. Each command lives in ./commands as a yargs module
 * whose handler is a thin call into the library API.
 *
 * Exit codes: 0 success, 1 a reported error (one line on stderr, no stack
 * trace; BAM_DEBUG=1 adds it), 2 bad usage (yargs' own errors here, and
 * OPTIONS_INVALID from a command, in run.ts), 130 interrupted (Ctrl-C,
 * SIGTERM, SIGHUP).
 */
import { reportError, trapSignals } from "./run.js";

// Before the commands load (a few hundred ms): a signal from now on is an interrupt, not a default death.
trapSignals();

const EXIT_USAGE = 2;

const [
  { default: yargs },
  { hideBin },
  { evalCommand },
  { exportOnnxCommand },
  { generateCommand },
  { inspectCommand },
  { upcycleCommand },
] = await Promise.all([
  import("yargs"),
  import("yargs/helpers"),
  import("./commands/eval.js"),
  import("./commands/export-onnx.js"),
  import("./commands/generate.js"),
  import("./commands/inspect.js"),
  import("./commands/upcycle.js"),
]);

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
  // An option given twice becomes a list; only list options may be (`-o x -o y` would otherwise reach the library as a list).
  .check((argv, options: { array?: string[] }) => {
    for (const [key, value] of Object.entries(argv)) {
      if (key === "_" || key.length === 1 || !Array.isArray(value) || (options.array ?? []).includes(key)) continue;
      throw new Error(
        `--${key} given more than once (${value.map((v) => JSON.stringify(String(v))).join(", ")}); give it once`,
      );
    }
    return true;
  }, true)
  .recommendCommands()
  .wrap(Math.min(100, process.stdout.columns ?? 100))
  .epilogue(
    "Exit codes: 0 success, 1 error, 2 bad usage, 130 interrupted. The output format: docs/format.md. BAM_DEBUG=1 prints stack traces.",
  )
  .fail((message, error) => {
    if (error && !message) {
      process.exitCode = reportError(error);
      return;
    }
    // One line, as every error: yargs writes some of its messages on several ("Invalid values:\n  Argument: ...").
    process.stderr.write(
      `bam: ${(message ?? error?.message ?? "").replace(/\s*\n\s*/g, " ")}\nRun \`bam --help\` for usage.\n`,
    );
    process.exit(EXIT_USAGE);
  })
  .parseAsync();
