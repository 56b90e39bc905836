/**
 * The library names options as the API spells them (expertsPerToken,
 * maxNewTokens, context); a command-line user typed flags. These reword a
 * command's errors into flags.
 */
import { type ErrorCode, BamError, isBamError } from "../errors.js";

/**
 * `message` with option names as flags: camel-case names anywhere, a
 * one-word name only where it starts the message ("seed must be ...": "seed"
 * is also a word).
 */
export function flagWords(message: string, flags: ReadonlyMap<string, string>): string {
  const camel = [...flags.keys()].filter((name) => /[A-Z]/.test(name));
  const named =
    camel.length > 0
      ? message.replace(new RegExp(`\\b(${camel.join("|")})\\b`, "g"), (name) => flags.get(name)!)
      : message;
  return named.replace(/^([a-z]+)(?=[: ])/, (name) => flags.get(name) ?? name);
}

/** A command body whose BamErrors of `codes` come out with flags for option names (flagWords). */
export function inFlagWords<A extends unknown[]>(
  flags: ReadonlyMap<string, string>,
  body: (...args: A) => Promise<void>,
  codes: readonly ErrorCode[] = ["OPTIONS_INVALID"],
): (...args: A) => Promise<void> {
  return (...args) =>
    body(...args).catch((error: unknown) => {
      if (!isBamError(error) || !codes.includes(error.code)) throw error;
      throw new BamError(error.code, flagWords(error.message, flags), { cause: error });
    });
}
