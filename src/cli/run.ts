/**
 * The one place where a command's outcome becomes an exit code: every
 * handler runs through `runCommand`, which turns errors into one line on
 * stderr and Ctrl-C/SIGTERM into an abort signal the library honours.
 */
import { BamError, isBamError } from "../errors.js";

const EXIT_ERROR = 1;
const EXIT_INTERRUPTED = 130;

export interface CommandContext {
  /** Aborted on the first SIGINT or SIGTERM; the library cleans up and throws ABORTED. */
  signal: AbortSignal;
}

export async function runCommand(body: (context: CommandContext) => Promise<void>): Promise<void> {
  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = (name: NodeJS.Signals) => {
    interrupts += 1;
    if (interrupts > 1) process.exit(EXIT_INTERRUPTED); // a second Ctrl-C means now
    controller.abort(new BamError("ABORTED", `interrupted by ${name}; cleaning up`));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    await body({ signal: controller.signal });
  } catch (error) {
    process.exitCode = reportError(error);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

/** Prints one line for the error and returns the exit code. */
export function reportError(error: unknown): number {
  const debug = process.env.BAM_DEBUG === "1";
  if (isBamError(error)) {
    process.stderr.write(`bam: ${error.message}\n`);
    if (debug && error.stack) process.stderr.write(`${error.stack}\n`);
    return error.code === "ABORTED" ? EXIT_INTERRUPTED : EXIT_ERROR;
  }
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`bam: internal error: ${message.split("\n")[0]} (please report it; BAM_DEBUG=1 shows details)\n`);
  if (debug && error instanceof Error && error.stack) process.stderr.write(`${error.stack}\n`);
  return EXIT_ERROR;
}

/** Prints a result for scripts: one JSON document on stdout. */
export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
