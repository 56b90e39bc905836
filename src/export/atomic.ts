/**
 * Atomic output folders: everything is written into a temporary folder
 * beside the target, named `.bam-tmp-<target>-<pid>`, and renamed into place
 * only when complete. An error or an interrupt removes the temporary folder;
 * a process killed outright leaves it behind, and the next run for the same
 * target removes it (its pid is gone).
 */
import { mkdir, readdir, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { BamError, ioError } from "../errors.js";

const TEMP_PREFIX = ".bam-tmp-";
const OLD_PREFIX = ".bam-old-";

export interface AtomicFolder {
  /** The temporary folder to write into. */
  path: string;
  /** Moves the finished folder into place (replacing the old one when forced). */
  commit(): Promise<void>;
  /** Removes the temporary folder; safe to call after commit. */
  discard(): Promise<void>;
}

/** Refuses an existing non-empty target unless `force`; cleans up leftovers of killed runs. */
export async function openAtomicFolder(target: string, force: boolean): Promise<AtomicFolder> {
  const absolute = resolve(target);
  const parent = dirname(absolute);
  const name = basename(absolute);
  try {
    await mkdir(parent, { recursive: true });
  } catch (error) {
    throw ioError(parent, error);
  }
  // First, so that a previous folder a killed run had moved aside is back in place before the target is checked.
  await removeLeftovers(parent, name);
  await checkTarget(absolute, force);
  const path = join(parent, `${TEMP_PREFIX}${name}-${process.pid}`);
  try {
    await rm(path, { recursive: true, force: true });
    await mkdir(path);
  } catch (error) {
    throw ioError(path, error);
  }
  let committed = false;
  return {
    path,
    async commit() {
      const old = join(parent, `${OLD_PREFIX}${name}-${process.pid}`);
      try {
        const exists = await pathExists(absolute);
        if (exists) await rename(absolute, old);
        await rename(path, absolute);
        committed = true;
        if (exists) await rm(old, { recursive: true, force: true });
      } catch (error) {
        throw ioError(absolute, error);
      }
    },
    async discard() {
      if (!committed) await rm(path, { recursive: true, force: true });
    },
  };
}

async function checkTarget(target: string, force: boolean): Promise<void> {
  let entries: string[];
  try {
    const info = await stat(target);
    if (!info.isDirectory()) throw new BamError("OUTPUT_EXISTS", `${target}: exists and is not a folder; choose another output path`);
    entries = await readdir(target);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
    throw ioError(target, error);
  }
  if (entries.length > 0 && !force) {
    throw new BamError("OUTPUT_EXISTS", `${target}: output folder exists and is not empty; choose another folder or pass --force to replace it`);
  }
}

/**
 * Removes temporary folders of this target left by processes that no longer
 * run. A previous folder moved aside (`.bam-old-`) by a run killed between
 * its two renames is put back when the target is missing, since that run's
 * new folder was never moved into place; otherwise it is removed.
 */
async function removeLeftovers(parent: string, name: string): Promise<void> {
  let entries: string[];
  try {
    entries = await readdir(parent);
  } catch (error) {
    throw ioError(parent, error);
  }
  const target = join(parent, name);
  for (const entry of entries.sort()) {
    for (const prefix of [TEMP_PREFIX, OLD_PREFIX]) {
      const match = entry.startsWith(`${prefix}${name}-`) && /^\d+$/.exec(entry.slice(prefix.length + name.length + 1));
      if (!match || processAlive(Number(match[0]))) continue;
      const leftover = join(parent, entry);
      try {
        if (prefix === OLD_PREFIX && !(await pathExists(target))) await rename(leftover, target);
        else await rm(leftover, { recursive: true, force: true });
      } catch (error) {
        throw ioError(leftover, error);
      }
    }
  }
}

function processAlive(pid: number): boolean {
  if (pid === process.pid) return false; // our own earlier attempt in this process is over
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

async function pathExists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
