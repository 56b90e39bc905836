/**
 * Seeds named by Hugging Face id. The rule: an argument that is an existing
 * local path is a folder, always (a cache repository root means its
 * refs/main snapshot); otherwise `owner/name[@revision]` is a repository id,
 * found in the local cache or downloaded into it; anything else is a folder
 * path, which the seed reader reports as missing.
 */
import { basename, resolve } from "node:path";
import { BamError } from "../errors.js";
import {
  cacheFolder,
  cachedCommit,
  fetchCommand,
  hubSettings,
  missingFiles,
  parseRepoRef,
  pathExists,
  repoFolder,
  type HubSettings,
  type RepoRef,
} from "./cache.js";
import { downloadSeed, type DownloadProgress } from "./download.js";

export { hubSettings, parseRepoRef, type HubSettings, type RepoRef } from "./cache.js";
export type { DownloadProgress } from "./download.js";

/** Where a seed's files are and what to call it. */
export interface SeedSource {
  /** The folder to read: the argument itself, or a cache snapshot. */
  dir: string;
  /** The seed's name in upcycled_from and the model card: the repository id for the Hub, else the folder name. */
  name: string;
  /** Set for a seed from the Hub or the Hugging Face cache. */
  repoId?: string;
  /** The revision asked for (branch, tag or commit); with `commit`, the one it resolved to. */
  revision?: string;
  commit?: string;
}

export interface ResolveOptions {
  /** The cache and Hub settings; from the environment when absent. */
  settings?: HubSettings;
  onDownload?: (progress: DownloadProgress) => void;
  signal?: AbortSignal;
}

export async function resolveSeed(argument: string, options: ResolveOptions = {}): Promise<SeedSource> {
  if (await pathExists(argument)) {
    const cached = await cacheFolder(resolve(argument));
    if (cached === undefined) return { dir: argument, name: basename(resolve(argument)) };
    await checkComplete(cached.snapshot, { repoId: cached.repoId, revision: cached.commit }, "");
    return {
      dir: cached.snapshot,
      name: cached.repoId,
      repoId: cached.repoId,
      revision: cached.commit,
      commit: cached.commit,
    };
  }
  const ref = parseRepoRef(argument);
  if (ref === undefined) return { dir: argument, name: basename(resolve(argument)) };
  const settings = options.settings ?? hubSettings();
  const commit = await cachedCommit(repoFolder(settings.cacheDir, ref.repoId), ref.revision);
  const snapshot =
    commit === undefined ? undefined : resolve(repoFolder(settings.cacheDir, ref.repoId), "snapshots", commit);
  const missing = snapshot === undefined ? undefined : await missingFiles(snapshot);
  if (snapshot !== undefined && missing!.length === 0) return { dir: snapshot, name: ref.repoId, ...ref, commit };
  if (settings.offline) {
    const where =
      snapshot === undefined
        ? `no such folder, and not in the Hugging Face cache ${settings.cacheDir}`
        : `the cached snapshot ${snapshot} lacks ${missing!.join(", ")}`;
    throw new BamError(
      "SEED_MISSING",
      `${argument}: ${where} (HF_HUB_OFFLINE is set); fetch it with \`${fetchCommand(ref)}\`, or unset HF_HUB_OFFLINE to download it`,
    );
  }
  const downloaded = await downloadSeed(ref, { settings, onProgress: options.onDownload, signal: options.signal });
  await checkComplete(downloaded.snapshot, ref, " after the download");
  return { dir: downloaded.snapshot, name: ref.repoId, ...ref, commit: downloaded.commit };
}

async function checkComplete(snapshot: string, ref: RepoRef, when: string): Promise<void> {
  const missing = await missingFiles(snapshot);
  if (missing.length > 0) {
    throw new BamError(
      "SEED_MISSING",
      `${snapshot}: the cached snapshot of ${ref.repoId} lacks ${missing.join(", ")}${when}; fetch them with \`${fetchCommand(ref)}\``,
    );
  }
}
