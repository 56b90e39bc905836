/**
 * Downloads the files a seed needs into the Hugging Face cache with the
 * official client (@huggingface/hub, loaded only when a download happens), so
 * Python tools find them too. Only config.json, the safetensors weights and
 * the side files (tokenizer, generation defaults: src/arch/folder.ts) are
 * fetched; pickle-only repositories are refused before a byte of weights
 * moves.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { isSideFile } from "../arch/folder.js";
import { BamError, ioError } from "../errors.js";
import { COMMIT_HASH, fetchCommand, indexShards, repoFolder, type HubSettings, type RepoRef } from "./cache.js";

export interface DownloadProgress {
  /** The repository being downloaded (owner/name). */
  repoId: string;
  /** Bytes received so far for this repository. */
  bytes: number;
  /** Size of the files being downloaded (those already cached included). */
  totalBytes: number;
}

export interface DownloadOptions {
  settings: HubSettings;
  onProgress?: (progress: DownloadProgress) => void;
  signal?: AbortSignal;
}

const INDEX_FILE = "model.safetensors.index.json";
const SINGLE_FILE = "model.safetensors";
const PICKLE_PATTERN = /\.(bin|pt|pth|ckpt)$/;

/** Downloads `ref`'s seed files; returns the commit and its snapshot folder. */
export async function downloadSeed(
  ref: RepoRef,
  options: DownloadOptions,
): Promise<{ commit: string; snapshot: string }> {
  const { settings, signal } = options;
  const label = `${ref.repoId}@${ref.revision}`;
  const hub = await import("@huggingface/hub");
  let bytes = 0;
  let totalBytes = 0;
  const params = {
    repo: { type: "model" as const, name: ref.repoId },
    hubUrl: settings.endpoint,
    accessToken: settings.token,
    fetch: countingFetch(signal, (n) => {
      bytes += n;
      options.onProgress?.({ repoId: ref.repoId, bytes, totalBytes });
    }),
  };
  try {
    const { sha: commit } = await hub.modelInfo({
      ...params,
      name: ref.repoId,
      revision: ref.revision,
      additionalFields: ["sha"],
    });
    // The answer names a cache folder: only a commit hash may.
    if (typeof commit !== "string" || !COMMIT_HASH.test(commit))
      throw new BamError(
        "HUB_ERROR",
        `${label}: ${settings.endpoint} answered with no commit hash for the revision (${JSON.stringify(commit)}); check HF_ENDPOINT`,
      );
    const sizes = new Map<string, number>();
    for await (const entry of hub.listFiles({ ...params, revision: commit }))
      if (entry.type === "file") sizes.set(entry.path, entry.size);
    const snapshot = join(repoFolder(settings.cacheDir, ref.repoId), "snapshots", commit);
    const download = (path: string) =>
      quietly(() => hub.downloadFileToCacheDir({ ...params, path, revision: commit, cacheDir: settings.cacheDir }));
    const weights = weightsFile(label, [...sizes.keys()]);
    const first = ["config.json", ...(weights === INDEX_FILE ? [INDEX_FILE] : [])].filter((file) => sizes.has(file));
    for (const file of first) await download(file);
    const shards =
      weights === INDEX_FILE
        ? (await indexShards(join(snapshot, INDEX_FILE))).filter((shard) => sizes.has(shard))
        : [weights];
    const rest = [...shards, ...[...sizes.keys()].filter(isSideFile).sort()];
    totalBytes = [...first, ...rest].reduce((sum, file) => sum + sizes.get(file)!, 0);
    for (const file of rest) await download(file);
    if (ref.revision !== commit) {
      // What snapshotDownload and huggingface_hub write, once the snapshot holds every file.
      const refFile = join(repoFolder(settings.cacheDir, ref.repoId), "refs", ref.revision);
      await mkdir(dirname(refFile), { recursive: true });
      await writeFile(refFile, commit);
    }
    return { commit, snapshot };
  } catch (error) {
    throw hubError(ref, settings, error, signal);
  }
}

/** The weights file to fetch: model.safetensors, else the index, else the only safetensors file. */
function weightsFile(label: string, files: string[]): string {
  if (files.includes(SINGLE_FILE)) return SINGLE_FILE;
  if (files.includes(INDEX_FILE)) return INDEX_FILE;
  const safetensors = files.filter((file) => file.endsWith(".safetensors") && !file.includes("/"));
  if (safetensors.length === 1) return safetensors[0]!;
  const pickles = files.filter((file) => PICKLE_PATTERN.test(file));
  if (safetensors.length === 0 && pickles.length > 0) {
    throw new BamError(
      "PICKLE_REFUSED",
      `${label}: has only pickle weights (${pickles.join(", ")}), which can execute code when loaded, so they are not downloaded; pick a revision with safetensors weights`,
    );
  }
  throw new BamError(
    "NOT_A_CHECKPOINT",
    `${label}: no ${SINGLE_FILE} or ${INDEX_FILE} in the repository${safetensors.length > 1 ? ` (found ${safetensors.join(", ")})` : ""}`,
  );
}

/** fetch that honours `signal` and counts the bytes of file bodies (everything but /api/ answers). */
function countingFetch(signal: AbortSignal | undefined, onBytes: (n: number) => void): typeof fetch {
  return async (input, init) => {
    const signals = [init?.signal, signal].filter((s): s is AbortSignal => s != null);
    const response = await fetch(input, { ...init, signal: signals.length > 0 ? AbortSignal.any(signals) : undefined });
    const url = new URL(input instanceof Request ? input.url : String(input));
    if (response.body === null || url.pathname.startsWith("/api/")) return response;
    const counted = response.body.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          onBytes(chunk.byteLength);
          controller.enqueue(chunk);
        },
      }),
    );
    const wrapped = new Response(counted, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
    Object.defineProperty(wrapped, "url", { value: response.url });
    return wrapped;
  };
}

/**
 * The client announces each download with console.debug, which goes to
 * stdout and would break `--json`; it is silenced for the call (BAM_DEBUG=1
 * sends it to stderr).
 */
async function quietly<T>(body: () => Promise<T>): Promise<T> {
  const original = console.debug;
  console.debug = (...args: unknown[]) => {
    if (process.env.BAM_DEBUG === "1") console.error(...args);
  };
  try {
    return await body();
  } finally {
    console.debug = original;
  }
}

/** One line for what went wrong talking to the Hub, saying what to do. */
function hubError(ref: RepoRef, settings: HubSettings, error: unknown, signal: AbortSignal | undefined): BamError {
  const label = `${ref.repoId}@${ref.revision}`;
  if (error instanceof BamError) return error;
  if (signal?.aborted)
    return new BamError("ABORTED", `${label}: download interrupted; the cache keeps what was complete`, {
      cause: error,
    });
  const status = (error as { statusCode?: unknown }).statusCode;
  if (typeof status === "number") {
    const why =
      status === 401 || status === 403
        ? "refused access; for a private or gated model accept its terms on the Hub and set HF_TOKEN"
        : status === 404
          ? "has no such model or revision; check the id and the revision"
          : `answered HTTP ${status}`;
    return new BamError("HUB_ERROR", `${label}: ${settings.endpoint} ${why}`, { cause: error });
  }
  const cause = (error as { cause?: NodeJS.ErrnoException }).cause;
  const errno = (error as NodeJS.ErrnoException).code ?? cause?.code;
  if (error instanceof TypeError && String(error.message).includes("fetch failed")) {
    return new BamError(
      "SEED_MISSING",
      `${label}: no such folder, not in the Hugging Face cache ${settings.cacheDir}, and ${settings.endpoint} cannot be reached (${errno ?? cause?.message ?? error.message}); fetch it with \`${fetchCommand(ref)}\` where the Hub is reachable, or check HF_ENDPOINT`,
      { cause: error },
    );
  }
  if (errno !== undefined) return ioError((error as NodeJS.ErrnoException).path ?? settings.cacheDir, error);
  return new BamError(
    "HUB_ERROR",
    `${label}: download from ${settings.endpoint} failed (${(error as Error).message ?? String(error)})`,
    { cause: error },
  );
}
