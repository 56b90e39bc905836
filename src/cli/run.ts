/**
 * The one place where a command's outcome becomes an exit code: every
 * handler runs through `runCommand`, which turns errors into one line on
 * stderr (exit 1; 2 for OPTIONS_INVALID, bad usage) and Ctrl-C, SIGTERM and
 * SIGHUP into an abort signal the library honours (exit 130).
 */
import type { ArgumentsCamelCase, Argv, CommandModule } from "yargs";
import { BamError, isBamError } from "../errors.js";

const EXIT_ERROR = 1;
const EXIT_USAGE = 2;
const EXIT_INTERRUPTED = 130;
/** Signals that stop a run the same way: clean up, one line, exit 130. */
const STOP_SIGNALS: readonly NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];

export interface CommandContext {
  /** Aborted on the first SIGINT, SIGTERM or SIGHUP; the library cleans up and throws ABORTED. */
  signal: AbortSignal;
}

const controller = new AbortController();
let interrupts = 0;
function onSignal(name: NodeJS.Signals): void {
  interrupts += 1;
  if (interrupts > 1) process.exit(EXIT_INTERRUPTED); // a second Ctrl-C means now
  controller.abort(new BamError("ABORTED", `interrupted by ${name}; cleaning up`));
}

/**
 * Turns the stop signals into an abort of the command. main.ts calls it
 * before it loads the commands, so a signal during start-up is an interrupt
 * (130), not a default death (143, 129) that could leave a temporary folder.
 */
export function trapSignals(): void {
  for (const signal of STOP_SIGNALS) if (!process.listeners(signal).includes(onSignal)) process.on(signal, onSignal);
}

export async function runCommand(body: (context: CommandContext) => Promise<void>): Promise<void> {
  trapSignals();
  try {
    if (controller.signal.aborted)
      throw new BamError("ABORTED", "interrupted before the command started; nothing was written");
    await body({ signal: controller.signal });
  } catch (error) {
    process.exitCode = reportError(error);
  } finally {
    for (const signal of STOP_SIGNALS) process.off(signal, onSignal);
  }
}

/**
 * A command whose handler's arguments are typed by its builder: each option's
 * type is inferred from its declaration (`choices: ATTENTION_EXPERTS` gives
 * AttentionExperts, `type: "boolean", default: false` a boolean), so no
 * interface repeats the options and no handler casts them.
 */
export function defineCommand<U>(command: {
  command: string;
  describe: string;
  builder: (y: Argv) => Argv<U>;
  handler: (args: ArgumentsCamelCase<U>) => Promise<void>;
}): CommandModule<object, U> {
  return command;
}

/**
 * A number flag as typed: the message quotes the text (`-k abc` is not
 * "abc", `--context ''` is not ""). Ranges are the library's to check.
 */
export function numberFlag(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text.trim());
  if (text.trim() === "" || !Number.isFinite(value))
    throw new BamError("OPTIONS_INVALID", `${flag} must be a number, not ${JSON.stringify(text)}`);
  return value;
}

/** Prints one line for the error and returns the exit code. */
export function reportError(error: unknown): number {
  const debug = process.env.BAM_DEBUG === "1";
  if (isBamError(error)) {
    process.stderr.write(`bam: ${error.message}\n`);
    if (debug && error.stack) process.stderr.write(`${error.stack}\n`);
    // OPTIONS_INVALID is what the command line asked for: a flag missing, out of range or in conflict
    return error.code === "ABORTED" ? EXIT_INTERRUPTED : error.code === "OPTIONS_INVALID" ? EXIT_USAGE : EXIT_ERROR;
  }
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(
    `bam: internal error: ${message.split("\n")[0]} (please report it; BAM_DEBUG=1 shows details)\n`,
  );
  if (debug && error instanceof Error && error.stack) process.stderr.write(`${error.stack}\n`);
  return EXIT_ERROR;
}

/** Prints a result for scripts: one JSON document on stdout. */
export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
