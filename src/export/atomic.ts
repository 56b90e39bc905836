/**
 * Atomic output folders that never cost the user a file.
 *
 * Everything is written into a temporary folder beside the target, named
 * `.bam-tmp-<target>-<pid>-<call>` (unique per call, so two calls of one
 * process never share it), and renamed into place only when complete. While
 * a run writes, it holds `.bam-lock-<target>` in the same parent, so a second
 * run to the same target (another process or another call in this one) is
 * refused instead of racing it.
 *
 * Rules (docs/reliability.md, "Output safety"):
 * - the target must not be, hold or lie inside any input (real paths after
 *   resolving links, and device/inode, both ways), the current folder or one
 *   of its parents, the root folder or a mount point;
 * - an existing non-empty target is replaced only with `force`, only when it
 *   is a folder this tool wrote (it holds `config.json` and a `recipe.yaml`
 *   that starts with RECIPE_MARKER), and only after the new one is complete;
 * - a target that appears, or changes, while the run writes makes the run
 *   fail; nothing is replaced;
 * - a previous folder moved aside (`.bam-old-`) is never deleted by a later
 *   run: a run killed between the two renames leaves it, and the next run
 *   puts it back where the target is missing, or refuses and says where it is;
 * - temporary folders and locks of processes that no longer run are
 *   reclaimed by any run in that parent folder;
 * - parent folders created for the target are removed again when the run fails.
 */
import {
  link,
  lstat,
  mkdir,
  open,
  readdir,
  readFile,
  realpath,
  rename,
  rm,
  rmdir,
  stat,
  unlink,
} from "node:fs/promises";
import { basename, dirname, join, relative, resolve, sep } from "node:path";
import { BamError, ioError } from "../errors.js";

const TEMP_PREFIX = ".bam-tmp-";
const OLD_PREFIX = ".bam-old-";
const LOCK_PREFIX = ".bam-lock-";
/** How every recipe.yaml this tool writes begins (recipeYaml in src/upcycle/options.ts): what `force` looks for. */
export const RECIPE_MARKER = "# bam-upcycle recipe";
/** `<name>-<pid>-<call>`, or `<name>-<pid>` as written before the call number existed. */
const LEFTOVER = [/^(.+)-(\d+)-\d+$/, /^(.+)-(\d+)$/];

/** Numbers the temporary folders of this process's calls. */
let calls = 0;

export interface AtomicFolder {
  /** The temporary folder to write into. */
  path: string;
  /** Moves the finished folder into place (replacing the old one when forced); fails if the target appeared meanwhile. */
  commit(): Promise<void>;
  /** Removes the temporary folder, the lock and the parents this run created; safe to call after commit. */
  discard(): Promise<void>;
  /** The error with the temporary folder's path replaced by the target the caller named. */
  explain(error: unknown): unknown;
}

export interface OutputOptions {
  /** Replace an existing folder this tool wrote. */
  force: boolean;
  /** Every path the run reads (seed folders and files, prompt files): the target may not touch them. */
  inputs: readonly string[];
  /** Whether an existing folder is one this tool wrote, which `force` may replace (default: an upcycle output). */
  ours?: (folder: string) => Promise<boolean>;
}

/** Opens the target for writing: checks it, takes its lock, reclaims leftovers of dead runs, makes the temporary folder. */
export async function openAtomicFolder(target: string, options: OutputOptions): Promise<AtomicFolder> {
  const absolute = resolve(target);
  await checkOutputPath(target, options.inputs);
  const parent = dirname(absolute);
  const name = basename(absolute);
  const created = await makeParents(target, parent);
  let lock: string | undefined;
  try {
    lock = await takeLock(target, parent, name);
    await reclaimLeftovers(target, parent, name);
    const ours = options.ours ?? isUpcycleOutput;
    const before = await checkTarget(target, absolute, options.force, ours);
    const path = await makeTemp(target, parent, name);
    let done = false;
    const release = async () => {
      if (done) return;
      done = true;
      await unlink(lock!).catch(() => undefined);
    };
    return {
      path,
      explain: (error) => renamePath(error, path, target),
      async commit() {
        try {
          await moveIntoPlace(target, absolute, path, parent, name, before, ours);
        } finally {
          await release();
        }
      },
      async discard() {
        await rm(path, { recursive: true, force: true });
        if (!done) {
          await release();
          await removeCreated(created);
        }
      },
    };
  } catch (error) {
    if (lock !== undefined) await unlink(lock).catch(() => undefined);
    await removeCreated(created);
    throw error;
  }
}

/**
 * Refuses an output path that would overwrite what the user keeps: the root
 * folder, a mount point, the current folder or a parent of it, and any path
 * that is, holds or lies inside an input. Pure apart from reading the file
 * system; call it before any work.
 */
export async function checkOutputPath(target: string, inputs: readonly string[]): Promise<void> {
  const absolute = resolve(target);
  if (dirname(absolute) === absolute)
    throw new BamError(
      "OUTPUT_UNSAFE",
      `${target}: is the root folder; name a new folder for the output, such as ${join(absolute, "bam-model")}`,
    );
  const chain = await pathChain(absolute);
  const info = await lstat(absolute).catch(() => undefined);
  if (info?.isDirectory()) {
    const parentInfo = await stat(dirname(absolute)).catch(() => undefined);
    if (parentInfo !== undefined && parentInfo.dev !== info.dev) {
      throw new BamError(
        "OUTPUT_UNSAFE",
        `${target}: is a mount point and cannot be replaced; name a new folder inside it, such as ${join(target, "bam-model")}`,
      );
    }
  }
  const cwd = await pathChain(process.cwd());
  if (chain.real === cwd.real || isInside(chain.real, cwd.real) || (chain.exists && cwd.ids.includes(chain.ids[0]!))) {
    throw new BamError(
      "OUTPUT_UNSAFE",
      `${target}: is the current folder or holds it; name a new folder for the output`,
    );
  }
  for (const input of inputs) {
    const source = await pathChain(resolve(input));
    if (!source.exists) continue;
    const targetHoldsInput =
      chain.real === source.real ||
      isInside(chain.real, source.real) ||
      (chain.exists && source.ids.includes(chain.ids[0]!));
    const inputHoldsTarget = isInside(source.real, chain.real) || chain.ids.includes(source.ids[0]!);
    if (targetHoldsInput || inputHoldsTarget) {
      const how =
        chain.real === source.real || (chain.exists && chain.ids[0] === source.ids[0])
          ? "is"
          : targetHoldsInput
            ? "holds"
            : "lies inside";
      throw new BamError(
        "OUTPUT_UNSAFE",
        `${target}: ${how} the input ${input}; the output must be a new folder apart from every seed and input file`,
      );
    }
  }
}

/**
 * Refuses an existing file at `file` unless `force`, and always a file that is
 * or lies inside an input (for single-file outputs such as `--save-logits`).
 */
export async function checkOutputFile(file: string, options: OutputOptions): Promise<void> {
  await checkOutputPath(file, options.inputs);
  const info = await lstat(file).catch(() => undefined);
  if (info === undefined) return;
  if (!info.isFile())
    throw new BamError("OUTPUT_EXISTS", `${file}: exists and is not a file; choose another output file`);
  if (!options.force)
    throw new BamError("OUTPUT_EXISTS", `${file}: exists; choose another file or pass --force to replace it`);
}

/**
 * Writes one file whole or not at all: `write` fills `.bam-tmp-<name>-<pid>-<call>` beside it, which then
 * takes the file's place, so a failed or interrupted write leaves the old file (or none), never a partial
 * one. Without `overwrite`, a file that appeared at the target meanwhile is kept and the write fails.
 * Check the target first (checkOutputFile).
 */
export async function writeFileAtomically(
  file: string,
  overwrite: boolean,
  write: (path: string) => Promise<void>,
): Promise<void> {
  const temp = join(dirname(resolve(file)), `${TEMP_PREFIX}${basename(file)}-${process.pid}-${++calls}`);
  try {
    await write(temp);
    if (overwrite) {
      await rename(temp, file).catch((error: unknown) => {
        throw ioError(file, error);
      });
    } else {
      // link, unlike rename, refuses an existing target
      await link(temp, file).catch((error: unknown) => {
        if ((error as NodeJS.ErrnoException).code === "EEXIST")
          throw new BamError("OUTPUT_EXISTS", `${file}: appeared while it was being written; it is kept as it is`);
        throw ioError(file, error);
      });
    }
  } finally {
    await unlink(temp).catch(() => undefined); // gone already after the rename
  }
}

interface PathChain {
  /** The real path: links resolved in the part that exists, the rest appended. */
  real: string;
  exists: boolean;
  /** `dev:ino` of the path (when it exists) and of each existing parent, nearest first. */
  ids: string[];
}

async function pathChain(absolute: string): Promise<PathChain> {
  let existing = absolute;
  const rest: string[] = [];
  for (;;) {
    try {
      existing = await realpath(existing);
      break;
    } catch {
      if (dirname(existing) === existing) break;
      rest.unshift(basename(existing));
      existing = dirname(existing);
    }
  }
  const ids: string[] = [];
  for (let dir = existing; ; dir = dirname(dir)) {
    const info = await stat(dir).catch(() => undefined);
    if (info !== undefined) ids.push(`${info.dev}:${info.ino}`);
    if (dirname(dir) === dir) break;
  }
  return { real: join(existing, ...rest), exists: rest.length === 0, ids };
}

function isInside(folder: string, path: string): boolean {
  const rel = relative(folder, path);
  return rel !== "" && !rel.startsWith(`..${sep}`) && rel !== ".." && !rel.startsWith(sep);
}

/** Creates the missing parents of the target; returns those it created, deepest first. */
async function makeParents(target: string, parent: string): Promise<string[]> {
  const missing: string[] = [];
  for (
    let dir = parent;
    (await lstat(dir).catch(() => undefined)) === undefined && dirname(dir) !== dir;
    dir = dirname(dir)
  )
    missing.push(dir);
  try {
    await mkdir(parent, { recursive: true });
  } catch (error) {
    throw new BamError(
      ioError(parent, error).code,
      `${target}: cannot create its parent folder ${parent}: ${reasonOf(error)}`,
      { cause: error },
    );
  }
  return missing;
}

async function removeCreated(created: readonly string[]): Promise<void> {
  for (const dir of created) await rmdir(dir).catch(() => undefined); // only if empty: a folder someone else filled stays
}

/** Takes `.bam-lock-<name>`, reclaiming it from a process that no longer runs. */
async function takeLock(target: string, parent: string, name: string): Promise<string> {
  const lock = join(parent, `${LOCK_PREFIX}${name}`);
  for (let attempt = 0; ; attempt++) {
    try {
      const handle = await open(lock, "wx");
      await handle.writeFile(`${process.pid}\n`);
      await handle.close();
      return lock;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST")
        throw new BamError(
          ioError(lock, error).code,
          `${target}: cannot lock the output (${lock}): ${reasonOf(error)}`,
          { cause: error },
        );
    }
    const owner = /^(\d+)\n$/.exec(await readFile(lock, "utf8").catch(() => ""));
    if (attempt > 0 || owner === null || processAlive(Number(owner[1]))) {
      throw new BamError(
        "OUTPUT_BUSY",
        `${target}: another bam run is writing this output; wait for it to finish, or remove ${lock} if none is running`,
      );
    }
    await unlink(lock).catch(() => undefined);
  }
}

/**
 * Temporary folders of dead processes, for any target in this parent, are
 * removed. A previous folder moved aside by a dead run for this target is put
 * back when the target is missing (that run's new folder never arrived), and
 * otherwise kept: the run stops and says where it is.
 */
async function reclaimLeftovers(target: string, parent: string, name: string): Promise<void> {
  const entries = await readdir(parent).catch((error: unknown) => {
    throw ioError(parent, error);
  });
  for (const entry of entries.sort()) {
    const prefix = entry.startsWith(TEMP_PREFIX) ? TEMP_PREFIX : entry.startsWith(OLD_PREFIX) ? OLD_PREFIX : undefined;
    const rest = prefix === undefined ? "" : entry.slice(prefix.length);
    const match = LEFTOVER.map((pattern) => pattern.exec(rest)).find((m) => m !== null);
    if (prefix === undefined || match === undefined || processAlive(Number(match[2]))) continue;
    const leftover = join(parent, entry);
    if (!(await lstat(leftover)).isDirectory()) continue;
    if (prefix === TEMP_PREFIX) {
      await rm(leftover, { recursive: true, force: true }).catch((error: unknown) => {
        throw ioError(leftover, error);
      });
    } else if (match[1] === name) {
      if ((await lstat(join(parent, name)).catch(() => undefined)) === undefined) {
        await rename(leftover, join(parent, name)).catch((error: unknown) => {
          throw ioError(leftover, error);
        });
      } else {
        throw new BamError(
          "OUTPUT_EXISTS",
          `${target}: a run that was killed left the previous ${name} at ${leftover}; keep it (move it elsewhere) or delete it, then run again`,
        );
      }
    }
  }
}

interface TargetState {
  /** `dev:ino` of the target when the run started, if it existed. */
  id: string | undefined;
  /** Whether it held anything. */
  filled: boolean;
}

/** Refuses an existing non-empty target unless `force` and it is a folder this tool wrote. */
async function checkTarget(
  target: string,
  absolute: string,
  force: boolean,
  ours: (folder: string) => Promise<boolean>,
): Promise<TargetState> {
  const info = await lstat(absolute).catch((error: unknown) => {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw ioError(target, error);
  });
  if (info === undefined) return { id: undefined, filled: false };
  if (!info.isDirectory())
    throw new BamError("OUTPUT_EXISTS", `${target}: exists and is not a folder; choose another output path`);
  const entries = await readdir(absolute).catch((error: unknown) => {
    throw ioError(target, error);
  });
  const state = { id: `${info.dev}:${info.ino}`, filled: entries.length > 0 };
  if (!state.filled) return state;
  if (!force)
    throw new BamError(
      "OUTPUT_EXISTS",
      `${target}: output folder exists and is not empty; choose another folder or pass --force to replace it`,
    );
  if (!(await ours(absolute))) {
    throw new BamError(
      "OUTPUT_EXISTS",
      `${target}: exists and is not a folder bam wrote, so --force does not replace it; choose another folder, or move it away yourself`,
    );
  }
  return state;
}

/** An upcycle output: `config.json` and a `recipe.yaml` that starts with RECIPE_MARKER. */
export async function isUpcycleOutput(folder: string): Promise<boolean> {
  const config = await lstat(join(folder, "config.json")).catch(() => undefined);
  const recipe = await readFile(join(folder, "recipe.yaml"), "utf8").catch(() => "");
  return config?.isFile() === true && recipe.startsWith(RECIPE_MARKER);
}

async function makeTemp(target: string, parent: string, name: string): Promise<string> {
  for (;;) {
    const path = join(parent, `${TEMP_PREFIX}${name}-${process.pid}-${++calls}`);
    try {
      await mkdir(path);
      return path;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST")
        throw new BamError(
          ioError(path, error).code,
          `${target}: cannot create a temporary folder beside it: ${reasonOf(error)}`,
          { cause: error },
        );
    }
  }
}

/**
 * The two renames. Without a previous folder, the new one is renamed onto the
 * target path, which fails if anything non-empty appeared there meanwhile
 * (rename replaces only an empty folder). With one, it must still be the same
 * folder the run checked at the start.
 */
async function moveIntoPlace(
  target: string,
  absolute: string,
  temp: string,
  parent: string,
  name: string,
  before: TargetState,
  ours: (folder: string) => Promise<boolean>,
): Promise<void> {
  const now = await lstat(absolute).catch(() => undefined);
  const appeared = () =>
    new BamError(
      "OUTPUT_EXISTS",
      `${target}: appeared or changed while the model was written; it was left as it is and the new model was not kept; choose another output folder`,
    );
  if (now !== undefined && (!now.isDirectory() || `${now.dev}:${now.ino}` !== before.id)) throw appeared();
  if (now === undefined && before.id !== undefined) throw appeared();
  if (now === undefined || !before.filled) {
    try {
      await rename(temp, absolute);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "ENOTEMPTY" || code === "EEXIST" || code === "ENOTDIR") throw appeared();
      throw new BamError(ioError(target, error).code, `${target}: ${reasonOf(error)}`, { cause: error });
    }
    return;
  }
  if (!(await ours(absolute))) throw appeared();
  const aside = join(parent, `${OLD_PREFIX}${name}-${basename(temp).slice(TEMP_PREFIX.length + name.length + 1)}`);
  try {
    await rename(absolute, aside);
  } catch (error) {
    throw new BamError(
      ioError(target, error).code,
      `${target}: cannot move the previous folder aside: ${reasonOf(error)}`,
      { cause: error },
    );
  }
  try {
    await rename(temp, absolute);
  } catch (error) {
    await rename(aside, absolute).catch(() => undefined);
    throw new BamError(
      ioError(target, error).code,
      `${target}: ${reasonOf(error)}; the previous folder is still in place`,
      { cause: error },
    );
  }
  await rm(aside, { recursive: true, force: true });
}

/** A process id is live when the process exists; our own pid is live too (another call of this process). */
function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

function reasonOf(error: unknown): string {
  const message = ioError("", error).message;
  return message.startsWith(": ") ? message.slice(2) : message;
}

function renamePath(error: unknown, temp: string, target: string): unknown {
  if (!(error instanceof BamError) || !error.message.includes(temp)) return error;
  const renamed = new BamError(error.code, error.message.split(temp).join(target), { cause: error.cause ?? error });
  return renamed;
}
