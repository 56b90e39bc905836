/**
 * A Hugging Face cache laid out as huggingface_hub writes it, built from
 * fixture folders: `models--owner--name/blobs/<hash>` (sha256 for weights, as
 * LFS oids; git blob sha1 for small files), `snapshots/<commit>/<file>` as
 * relative links into blobs/, and `refs/<branch>` holding the commit.
 */
import { createHash } from "node:crypto";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, symlink, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";

export function repoDir(cacheDir: string, repoId: string): string {
  return join(cacheDir, `models--${repoId.replace("/", "--")}`);
}

/** Adds `folder`'s files as one commit of `repoId` (its hash derived from the names), pointed at by `refs`; returns the commit. */
export async function addSnapshot(
  cacheDir: string,
  repoId: string,
  folder: string,
  refs: string[],
  label = folder,
): Promise<string> {
  const root = repoDir(cacheDir, repoId);
  const commit = createHash("sha1").update(`${repoId}\0${label}`).digest("hex");
  const snapshot = join(root, "snapshots", commit);
  await mkdir(join(root, "blobs"), { recursive: true });
  await mkdir(snapshot, { recursive: true });
  for (const name of await readdir(folder)) {
    const bytes = await readFile(join(folder, name));
    const blob = name.endsWith(".safetensors")
      ? createHash("sha256").update(bytes).digest("hex")
      : createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
    if (!existsSync(join(root, "blobs", blob))) await writeFile(join(root, "blobs", blob), bytes);
    await symlink(join("..", "..", "blobs", blob), join(snapshot, name));
  }
  for (const ref of refs) {
    await mkdir(dirname(join(root, "refs", ref)), { recursive: true });
    await writeFile(join(root, "refs", ref), commit);
  }
  return commit;
}

/** The safetensors files of an output folder, by name: what "byte-equal weights" compares. */
export async function weights(dir: string): Promise<Map<string, Buffer>> {
  const names = (await readdir(dir)).filter((name) => name.endsWith(".safetensors")).sort();
  return new Map(await Promise.all(names.map(async (name) => [name, await readFile(join(dir, name))] as const)));
}

const CANDIDATES = [process.env.BAM_PYTHON, ".venv/bin/python", "python3"].filter((p): p is string => Boolean(p));
/** A python with huggingface_hub, to check a cache the way Python tools read it; null when there is none. */
export const HUB_PYTHON =
  CANDIDATES.find((python) => spawnSync(python, ["-c", "import huggingface_hub"], { stdio: "ignore" }).status === 0) ??
  null;
if (HUB_PYTHON === null && process.env.BAM_REQUIRE_PYTHON)
  throw new Error("BAM_REQUIRE_PYTHON is set but no python has huggingface_hub (pip install -r requirements.txt)");

/** What huggingface_hub's snapshot_download(local_files_only=True) finds in `cacheDir`: the snapshot folder. */
export function pythonSnapshot(cacheDir: string, repoId: string, revision: string): string {
  const script =
    "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3], local_files_only=True))";
  const run = spawnSync(HUB_PYTHON!, ["-c", script, repoId, revision, cacheDir], {
    encoding: "utf8",
    env: { ...process.env, HF_HUB_OFFLINE: "1" },
  });
  if (run.status !== 0) throw new Error(`snapshot_download failed: ${run.stderr.trim().split("\n").pop()}`);
  return run.stdout.trim();
}

/** Runs `body` with environment variables set, restoring them after. */
export async function withEnv<T>(vars: Record<string, string | undefined>, body: () => Promise<T>): Promise<T> {
  const previous = Object.fromEntries(Object.keys(vars).map((key) => [key, process.env[key]]));
  const apply = (values: Record<string, string | undefined>) => {
    for (const [key, value] of Object.entries(values)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  };
  apply(vars);
  try {
    return await body();
  } finally {
    apply(previous);
  }
}
