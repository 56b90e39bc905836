/**
 * One error type for the whole package. Callers and tests match on `code`,
 * never on message text; the message is one line that names the file (and
 * tensor, where there is one) and says what to do.
 */
export type ErrorCode =
  // safetensors container
  | "HEADER_TOO_LARGE"
  | "HEADER_INVALID"
  | "TENSOR_INVALID"
  | "INVALID_OFFSET"
  | "DATA_INCOMPLETE"
  | "METADATA_INVALID"
  | "TENSOR_NOT_FOUND"
  | "DTYPE_UNSUPPORTED"
  // checkpoint folders
  | "INDEX_INVALID"
  | "PATH_ESCAPE"
  | "PICKLE_REFUSED"
  | "NOT_A_CHECKPOINT"
  | "CONFIG_INVALID"
  | "FAMILY_UNSUPPORTED"
  | "FEATURE_UNSUPPORTED"
  | "TENSOR_MISSING"
  | "TENSOR_SHAPE"
  // upcycling
  | "SEED_MISMATCH"
  | "OPTIONS_INVALID"
  | "RECIPE_INVALID"
  | "OUTPUT_EXISTS"
  /** The output would be, hold or lie inside an input, the current folder, the root folder or a mount point. */
  | "OUTPUT_UNSAFE"
  /** Another run holds the output's lock. */
  | "OUTPUT_BUSY"
  /** executePlan: a seed's files changed since the plan was made. */
  | "PLAN_STALE"
  /** executePlan: not a plan, or not the plan its own options give for its seeds (edited by hand). */
  | "PLAN_INVALID"
  // seeds from the Hugging Face Hub
  | "SEED_MISSING"
  | "HUB_ERROR"
  // runtime
  | "IO_ERROR"
  | "DISK_FULL"
  /** onnxruntime-node or @huggingface/transformers (optional dependencies) is not installed. */
  | "ENGINE_MISSING"
  | "ABORTED";

export class BamError extends Error {
  /** Stable across versions: match on it, not on the message. */
  readonly code: ErrorCode;

  constructor(
    code: ErrorCode,
    message: string,
    options?: {
      /** The error this one words (e.g. the system error of a failed read). */
      cause?: unknown;
    },
  ) {
    super(oneLine(message), options);
    this.name = "BamError";
    this.code = code;
  }
}

/** Control characters and line or paragraph separators, which untrusted names and parser messages may carry. */
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is what this pattern is for
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g;
const ESCAPES: Readonly<Record<string, string>> = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };
/** Longest message kept whole; past it the middle is elided (a tensor name can be megabytes long). */
const MAX_MESSAGE = 2000;

/**
 * A message is one printable line: control characters are escaped (so a
 * tensor named "\n" or "\x1b[2J" cannot break the line or drive the
 * terminal) and an overlong message keeps its start (the file) and its end
 * (what is wrong).
 */
function oneLine(message: string): string {
  const text = message.replace(UNPRINTABLE, (c) => ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
  if (text.length <= MAX_MESSAGE) return text;
  const half = MAX_MESSAGE / 2 - 10;
  return `${text.slice(0, half)} ...(${text.length - 2 * half} characters)... ${text.slice(-half)}`;
}

export function isBamError(error: unknown, code?: ErrorCode): error is BamError {
  return error instanceof BamError && (code === undefined || error.code === code);
}

/** Wraps a Node file-system error into a BamError naming the path. */
export function ioError(path: string, error: unknown): BamError {
  if (error instanceof BamError) return error;
  const errno = (error as NodeJS.ErrnoException | undefined)?.code;
  if (errno === "ENOSPC" || errno === "EDQUOT") {
    return new BamError(
      "DISK_FULL",
      `${path}: no space left on device; free some space or choose another output folder`,
      { cause: error },
    );
  }
  if (errno === "ABORT_ERR" || (error as Error | undefined)?.name === "AbortError") {
    return new BamError("ABORTED", `${path}: interrupted`, { cause: error });
  }
  const reason =
    errno === "ENOENT"
      ? "no such file or folder"
      : errno === "EACCES" || errno === "EPERM"
        ? "permission denied"
        : errno === "EISDIR"
          ? "is a folder, expected a file"
          : errno === "ENOTDIR"
            ? "not a folder"
            : ((error as Error | undefined)?.message ?? String(error));
  return new BamError("IO_ERROR", `${path}: ${reason}`, { cause: error });
}
