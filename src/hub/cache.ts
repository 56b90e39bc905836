/**
 * The local Hugging Face cache, read as huggingface_hub lays it out:
 * `<cache>/models--owner--name/{blobs, refs/<revision>,
 * snapshots/<commit>/<file>}`, snapshot files being links into blobs/. Nothing
 * here writes: a cached seed is read-only input.
 */
import { readFileSync } from "node:fs";
import { lstat, readdir, readFile, stat } from "node:fs/promises";
import { homedir } from "node:os";
import { basename, dirname, join } from "node:path";
import { BamError } from "../errors.js";
import { readTextFile } from "../safetensors/index.js";

/** Where and how to reach the Hub; from the environment by default (hubSettings). */
export interface HubSettings {
  /** The hub cache folder: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. */
  cacheDir: string;
  /** HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1/ON/YES/TRUE: never contact the Hub. */
  offline: boolean;
  /** HF_ENDPOINT, else https://huggingface.co. */
  endpoint: string;
  /** HF_TOKEN, else the file `hf auth login` writes ($HF_TOKEN_PATH, else $HF_HOME/token): for private and gated models. */
  token: string | undefined;
}

/** A repository at a revision: `owner/name`, and a branch, tag or commit hash (default main). */
export interface RepoRef {
  repoId: string;
  revision: string;
}

export const COMMIT_HASH = /^[0-9a-f]{40}$/;
const DEFAULT_ENDPOINT = "https://huggingface.co";
const DEFAULT_REVISION = "main";
/** huggingface_hub's true values of a boolean environment variable. */
const TRUE_VALUES = new Set(["1", "ON", "YES", "TRUE"]);
/** The Hub's repository names: letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters. */
const REPO_PART = /^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$/;
/** Branch and tag names as git allows them, slashes included (refs/pr/1); no `..` segment. */
const REVISION = /^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/;
const REPO_FOLDER = /^models--(.+)--(.+)$/;
const INDEX_FILE = "model.safetensors.index.json";
const SINGLE_FILE = "model.safetensors";
/** Far above any real index (tens of thousands of tensors take a few MB). */
const MAX_INDEX_BYTES = 100_000_000;

/** The settings huggingface_hub would use in this environment (its constants.py precedence). */
export function hubSettings(env: NodeJS.ProcessEnv = process.env): HubSettings {
  const expand = (path: string) => (path === "~" || path.startsWith("~/") ? join(homedir(), path.slice(1)) : path);
  const home = expand(env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "huggingface"));
  const isTrue = (value: string | undefined) => value !== undefined && TRUE_VALUES.has(value.toUpperCase());
  return {
    cacheDir: expand(env.HF_HUB_CACHE || env.HUGGINGFACE_HUB_CACHE || join(home, "hub")),
    offline: isTrue(env.HF_HUB_OFFLINE || env.TRANSFORMERS_OFFLINE),
    endpoint: (env.HF_ENDPOINT || DEFAULT_ENDPOINT).replace(/\/+$/, ""),
    token: env.HF_TOKEN || savedToken(expand(env.HF_TOKEN_PATH || join(home, "token"))),
  };
}

function savedToken(file: string): string | undefined {
  try {
    return readFileSync(file, "utf8").trim() || undefined;
  } catch {
    return undefined;
  }
}

/** `owner/name[@revision]` as a repository reference, or undefined when the text is not of that form. */
export function parseRepoRef(text: string): RepoRef | undefined {
  const at = text.indexOf("@");
  const id = at < 0 ? text : text.slice(0, at);
  const revision = at < 0 ? DEFAULT_REVISION : text.slice(at + 1);
  const parts = id.split("/");
  if (
    parts.length !== 2 ||
    !parts.every((part) => REPO_PART.test(part) && !part.includes("--") && !part.includes(".."))
  )
    return undefined;
  if (!REVISION.test(revision) || revision.split("/").some((segment) => segment === "." || segment === ".."))
    return undefined;
  return { repoId: id, revision };
}

/** `hf download` command that fetches a reference, for messages. */
export function fetchCommand({ repoId, revision }: RepoRef): string {
  return `hf download ${repoId}${revision === DEFAULT_REVISION ? "" : ` --revision ${revision}`}`;
}

export function repoFolder(cacheDir: string, repoId: string): string {
  return join(cacheDir, `models--${repoId.replace("/", "--")}`);
}

/** The commit a revision names in the cache: itself when a hash, else `refs/<revision>`'s content; undefined when not cached. */
export async function cachedCommit(repoDir: string, revision: string): Promise<string | undefined> {
  if (COMMIT_HASH.test(revision)) return revision;
  const ref = join(repoDir, "refs", revision);
  const text = await readFile(ref, "utf8").catch(() => undefined);
  if (text === undefined) return undefined;
  const commit = text.trim();
  if (!COMMIT_HASH.test(commit))
    throw new BamError(
      "CONFIG_INVALID",
      `${ref}: expected a 40-character commit hash, found ${JSON.stringify(commit.slice(0, 60))}; delete the file and download the model again`,
    );
  return commit;
}

/** A cache path given as a folder: the repository root, or one of its snapshots. */
export interface CacheFolder {
  repoId: string;
  /** The snapshot folder: the one given, or refs/main's. */
  snapshot: string;
  commit: string;
}

/** `path` as a folder of the cache (a repository root or a snapshot), or undefined when it is neither. */
export async function cacheFolder(path: string): Promise<CacheFolder | undefined> {
  const root = REPO_FOLDER.exec(basename(path));
  if (root !== null && (await isFolder(join(path, "snapshots")))) {
    const repoId = `${root[1]}/${root[2]}`;
    const commit = await cachedCommit(path, DEFAULT_REVISION);
    if (commit === undefined) {
      throw new BamError(
        "SEED_MISSING",
        `${path}: a Hugging Face cache folder without refs/main; name one of its snapshots (${join(path, "snapshots", "<commit>")}), or fetch main with \`${fetchCommand({ repoId, revision: DEFAULT_REVISION })}\``,
      );
    }
    return { repoId, snapshot: join(path, "snapshots", commit), commit };
  }
  const parent = dirname(path);
  const repo = REPO_FOLDER.exec(basename(dirname(parent)));
  if (repo !== null && basename(parent) === "snapshots" && COMMIT_HASH.test(basename(path))) {
    return { repoId: `${repo[1]}/${repo[2]}`, snapshot: path, commit: basename(path) };
  }
  return undefined;
}

/**
 * The files a seed needs that `snapshot` lacks (a link into blobs/ whose blob
 * is gone counts as missing): config.json and the weights, every shard its
 * index names. An unreadable index is left for the checkpoint reader to report.
 */
export async function missingFiles(snapshot: string): Promise<string[]> {
  const names = await readdir(snapshot).catch(() => undefined);
  if (names === undefined) return ["config.json", `${SINGLE_FILE} or ${INDEX_FILE}`];
  const missing: string[] = [];
  const present = async (name: string) =>
    names.includes(name) &&
    (await stat(join(snapshot, name)).then(
      (s) => s.isFile(),
      () => false,
    ));
  if (!(await present("config.json"))) missing.push("config.json");
  if (await present(SINGLE_FILE)) return missing;
  if (!(await present(INDEX_FILE))) {
    if (!names.some((name) => name.endsWith(".safetensors") || name.endsWith(".safetensors.index.json")))
      missing.push(`${SINGLE_FILE} or ${INDEX_FILE}`);
    return missing;
  }
  for (const shard of await indexShards(join(snapshot, INDEX_FILE))) {
    if (
      !(await stat(join(snapshot, shard)).then(
        (s) => s.isFile(),
        () => false,
      ))
    )
      missing.push(shard);
  }
  return missing;
}

/** The shard files an index names (plain relative names only; the checkpoint reader refuses the rest). */
export async function indexShards(indexFile: string): Promise<string[]> {
  try {
    const index = JSON.parse(await readTextFile(indexFile, MAX_INDEX_BYTES, "INDEX_INVALID")) as {
      weight_map?: Record<string, unknown>;
    };
    const shards = Object.values(index.weight_map ?? {}).filter((shard): shard is string => typeof shard === "string");
    return [...new Set(shards)]
      .filter((shard) => !shard.startsWith("/") && !shard.split(/[\\/]/).includes(".."))
      .sort();
  } catch {
    return [];
  }
}

/** Whether something exists at `path` (a dangling link too: it is the user's path, and its own error says what is wrong). */
export async function pathExists(path: string): Promise<boolean> {
  return lstat(path).then(
    () => true,
    () => false,
  );
}

async function isFolder(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isDirectory(),
    () => false,
  );
}
