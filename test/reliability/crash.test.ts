/**
 * Crash safety of `bam upcycle`: the process is killed with SIGKILL at many
 * points (chosen by the bytes already in its temporary folder), and
 * interrupted with SIGINT, SIGTERM and SIGHUP. Afterwards the target folder does not
 * exist, or with --force is the untouched previous one; the next run
 * succeeds, writes the same bytes as an uninterrupted run and removes what
 * the killed runs left. A full disk (a small tmpfs where the machine allows
 * mounting one, and a simulated ENOSPC at the file layer everywhere) gives
 * DISK_FULL, one line, and no output.
 */
import assert from "node:assert/strict";
import { execFileSync, type spawn } from "node:child_process";
import { mkdir, mkdtemp, open, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import { BamError, isBamError } from "../../src/errors.js";
import { RECIPE_MARKER } from "../../src/export/atomic.js";
import { upcycle } from "../../src/upcycle/index.js";
import { deadPid, fixture } from "../helpers.js";
import { folderBytes, folderHashes, runCli, type CliRun, writeSeed } from "./synth.js";

let root: string;
let seed: string;
let reference: Record<string, string>;
let outputBytes: number;

/** About 106 MB of bf16; with 4 experts the output is about 220 MB, a run of about a second. */
const SHAPE = { vocab: 16000, hidden: 768, intermediate: 2048, layers: 4, heads: 12, kvHeads: 12 };

/** Run in the output's parent folder with `-o out`: recipe.yaml and the model card repeat the path as given. */
const args = (...extra: string[]) => ["upcycle", seed, "--experts", "4", "-o", "out", ...extra];

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-crash-"));
  seed = await writeSeed(join(root, "seed"), SHAPE);
  // The uninterrupted run, in a folder of the same name (the model card names it).
  const ref = join(root, "ref", "out");
  await mkdir(join(root, "ref"));
  const run = await runCli(args(), { cwd: join(root, "ref") });
  assert.equal(run.code, 0, run.stderr);
  reference = await folderHashes(ref);
  outputBytes = await folderBytes(ref);
  await rm(join(root, "ref"), { recursive: true });
});

after(() => rm(root, { recursive: true, force: true }));

/** The CLI runs one upcycle: its temporary folder is call 1 of its pid. */
const tempOf = (parent: string, pid: number) => join(parent, `.bam-tmp-out-${pid}-1`);

/**
 * Runs the CLI and sends `signal` once its temporary folder holds at least
 * `threshold` bytes; `killed` tells whether the signal went out before the
 * run ended on its own.
 */
async function interruptAt(
  parent: string,
  threshold: number,
  signal: NodeJS.Signals,
  extra: string[] = [],
): Promise<CliRun & { killed: boolean; sentAt: number }> {
  let killed = false;
  let sentAt = -1;
  const run = await runCli(args(...extra), {
    cwd: parent,
    during: (child: ReturnType<typeof spawn>) => {
      const poll = setInterval(async () => {
        if (killed || child.exitCode !== null || child.signalCode !== null) return;
        const temp = tempOf(parent, child.pid!);
        const entries = await readdir(temp).catch(() => undefined);
        if (entries === undefined) return;
        const bytes = await folderBytes(temp);
        if (bytes >= threshold && !killed) {
          killed = child.kill(signal);
          sentAt = bytes;
          clearInterval(poll);
        }
      }, 2);
      child.on("close", () => clearInterval(poll));
    },
  });
  return { ...run, killed, sentAt };
}

/** A previous output of bam (config.json and its recipe.yaml), which --force may replace, with a marker file. */
async function writePrevious(folder: string): Promise<void> {
  await writeFile(join(folder, "config.json"), '{"model_type": "previous"}\n');
  await writeFile(join(folder, "recipe.yaml"), `${RECIPE_MARKER}\nseeds: [previous]\n`);
  await writeFile(join(folder, "marker.txt"), "the previous model\n");
}

const leftovers = async (parent: string) => (await readdir(parent)).filter((e) => e.startsWith(".bam-"));

test("SIGKILL at any point leaves no target folder; the next run succeeds, matches an uninterrupted run and cleans up", {
  timeout: 120_000,
}, async () => {
  const parent = join(root, "kill");
  await mkdir(parent);
  const fractions = [0, 0.05, 0.25, 0.5, 0.75, 0.95];
  let kills = 0;
  for (const fraction of fractions) {
    const run = await interruptAt(parent, Math.floor(fraction * outputBytes), "SIGKILL");
    if (!run.killed) continue; // finished first: nothing to check here
    kills += 1;
    assert.equal(run.signal, "SIGKILL");
    assert.deepEqual(
      (await readdir(parent)).filter((e) => e === "out"),
      [],
      `killed at ${run.sentAt} bytes: the target must not exist`,
    );
    assert.ok(
      (await leftovers(parent)).includes(`.bam-tmp-out-${run.pid}-1`),
      "a killed run leaves its temporary folder",
    );
  }
  assert.ok(kills >= 5, `only ${kills} of ${fractions.length} kills landed before the run ended`);
  const next = await runCli(args(), { cwd: parent });
  assert.equal(next.code, 0, next.stderr);
  assert.deepEqual(await leftovers(parent), [], "the next run removes the leftovers of killed runs");
  assert.deepEqual(await folderHashes(join(parent, "out")), reference, "same bytes as an uninterrupted run");
  const model = await openModel(join(parent, "out"));
  assert.equal(model.moe.numExperts, 4);
  await model.close();
  await rm(parent, { recursive: true });
});

test("SIGKILL with --force leaves the previous folder untouched", { timeout: 60_000 }, async () => {
  const parent = join(root, "force");
  const previous = join(parent, "out");
  await mkdir(previous, { recursive: true });
  await writePrevious(previous);
  const before = await folderHashes(previous);
  let kills = 0;
  for (const fraction of [0.1, 0.7]) {
    const run = await interruptAt(parent, Math.floor(fraction * outputBytes), "SIGKILL", ["--force"]);
    if (!run.killed) continue;
    kills += 1;
    assert.deepEqual(
      await folderHashes(previous),
      before,
      `killed at ${run.sentAt} bytes: the previous folder must be untouched`,
    );
  }
  assert.ok(kills >= 1, `only ${kills} kills landed`);
  const next = await runCli(args("--force"), { cwd: parent });
  assert.equal(next.code, 0, next.stderr);
  assert.deepEqual(await leftovers(parent), []);
  assert.deepEqual(await folderHashes(previous), reference);
  await rm(parent, { recursive: true });
});

for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  test(`${signal} stops the run: exit 130, one line on stderr, no output, no temporary folder`, {
    timeout: 60_000,
  }, async () => {
    const parent = join(root, signal);
    await mkdir(parent);
    for (const fraction of [0, 0.4]) {
      const started = performance.now();
      const run = await interruptAt(parent, Math.floor(fraction * outputBytes), signal);
      assert.ok(run.killed, "the signal went out while the run was going");
      assert.equal(run.code, 130, `exit code (stderr: ${run.stderr})`);
      const lines = run.stderr.trim().split("\n");
      assert.equal(lines.length, 1, `one line on stderr: ${JSON.stringify(run.stderr)}`);
      assert.match(lines[0]!, /^bam: .*interrupt/i);
      assert.deepEqual(await readdir(parent), [], "no output and no temporary folder");
      assert.ok(performance.now() - started < 30_000);
    }
    // With --force, the previous folder stays as it was.
    const previous = join(parent, "out");
    await mkdir(previous);
    await writePrevious(previous);
    const before = await folderHashes(previous);
    const run = await interruptAt(parent, Math.floor(0.5 * outputBytes), signal, ["--force"]);
    assert.equal(run.code, 130);
    assert.deepEqual(await readdir(parent), ["out"]);
    assert.deepEqual(await folderHashes(previous), before);
    await rm(parent, { recursive: true });
  });
}

test("a run killed between moving the previous folder aside and moving the new one in: the previous folder comes back", async () => {
  const parent = join(root, "commit");
  const pid = deadPid();
  const aside = join(parent, `.bam-old-out-${pid}`);
  await mkdir(aside, { recursive: true });
  await writePrevious(aside);
  await mkdir(join(parent, `.bam-tmp-out-${pid}`));
  await writeFile(join(parent, `.bam-tmp-out-${pid}`, "model.safetensors"), "whatever the killed run had written");
  const options = { seeds: [fixture("llama", "base")], experts: 2, output: join(parent, "out") };
  // Without --force the restored folder is refused like any existing one.
  await assert.rejects(upcycle(options), (error: unknown) => isBamError(error, "OUTPUT_EXISTS"));
  assert.deepEqual(await readdir(parent), ["out"]);
  assert.deepEqual(await readdir(join(parent, "out")), ["config.json", "marker.txt", "recipe.yaml"]);
  // With --force it is replaced by the new model.
  await upcycle({ ...options, force: true });
  assert.deepEqual(await readdir(parent), ["out"]);
  assert.ok((await readdir(join(parent, "out"))).includes("model.safetensors"));
  await rm(parent, { recursive: true });
});

/** Mounts a tmpfs of `bytes` at `dir`; false where this machine does not allow it. */
function mountTmpfs(dir: string, bytes: number): boolean {
  if (process.platform !== "linux" || process.getuid?.() !== 0) return false;
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${bytes}`, "tmpfs", dir], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

test("a full disk (a small tmpfs): DISK_FULL in one line and no output", { timeout: 60_000 }, async (t) => {
  const options = (output: string) => ({ seeds: [fixture("llama", "base")], experts: 16, output });
  const probe = join(root, "probe");
  await mkdir(probe);
  if (!mountTmpfs(probe, 1 << 20)) {
    t.skip("cannot mount a tmpfs here; the simulated ENOSPC test covers the file layer");
    return;
  }
  execFileSync("umount", [probe]);
  // The output's size on an ordinary disk, to pick tmpfs sizes that fill up in the tensors and in the side files.
  const sized = join(root, "sized", "out");
  await upcycle(options(sized));
  const total = await folderBytes(sized);
  const page = 4096;
  const sizes = [page, 0.25 * total, 0.5 * total, 0.9 * total, total - 4 * page, total - page].map((b) =>
    Math.max(page, Math.ceil(b / page) * page),
  );
  let refused = 0;
  for (const size of sizes) {
    const dir = join(root, `tmpfs-${size}`);
    await mkdir(dir);
    assert.ok(mountTmpfs(dir, size));
    try {
      try {
        await upcycle(options(join(dir, "out")));
        assert.deepEqual(
          await folderHashes(join(dir, "out")),
          await folderHashes(sized),
          `${size} bytes: a run that fits must be complete`,
        );
        continue;
      } catch (error) {
        assert.ok(isBamError(error, "DISK_FULL"), `${size} bytes: ${String(error)}`);
        assert.doesNotMatch(error.message, /\n/);
      }
      refused += 1;
      assert.deepEqual(await readdir(dir), [], `${size} bytes: no output, no temporary folder`);
      if (refused === 2) {
        // The CLI says it in one line and exits 1.
        const run = await runCli(["upcycle", fixture("llama", "base"), "--experts", "16", "-o", join(dir, "out")]);
        assert.equal(run.code, 1, run.stderr);
        const lines = run.stderr.trim().split("\n");
        assert.equal(lines.length, 1, `one line: ${JSON.stringify(run.stderr)}`);
        assert.match(lines[0]!, /^bam: .*no space left on device/);
        assert.deepEqual(await readdir(dir), []);
      }
    } finally {
      execFileSync("umount", [dir]);
    }
  }
  assert.ok(refused >= 4, `${refused} of ${sizes.length} sizes ran out of space`);
});

test("a full disk (ENOSPC simulated at the file layer, at many byte counts): DISK_FULL and no output", async () => {
  const parent = join(root, "enospc");
  await mkdir(parent);
  const small = await writeSeed(join(root, "small-seed"), {
    vocab: 512,
    hidden: 128,
    intermediate: 256,
    layers: 2,
    heads: 4,
    kvHeads: 2,
  });
  const options = { seeds: [small], experts: 3, output: join(parent, "out") };
  const probe = await open(join(root, "probe-file"), "w");
  const FileHandle = Object.getPrototypeOf(probe) as {
    write: (...args: unknown[]) => Promise<{ bytesWritten: number }>;
  };
  await probe.close();
  const write = FileHandle.write;
  let budget = 0;
  FileHandle.write = async function (this: unknown, ...writeArgs: unknown[]) {
    const length = typeof writeArgs[2] === "number" ? writeArgs[2] : (writeArgs[0] as Uint8Array).length;
    if (length > budget) {
      throw Object.assign(new Error("ENOSPC: no space left on device, write"), {
        code: "ENOSPC",
        errno: -28,
        syscall: "write",
      });
    }
    budget -= length;
    return write.apply(this, writeArgs);
  };
  try {
    let checked = 0;
    for (const bytes of [0, 1, 8, 4096, 100_000, 500_000, 1_000_000, 1_500_000, 2_000_000]) {
      budget = bytes;
      try {
        await upcycle(options);
        await rm(options.output, { recursive: true }); // it fitted
        continue;
      } catch (error) {
        assert.ok(error instanceof BamError && error.code === "DISK_FULL", `${bytes} bytes: ${String(error)}`);
        assert.match(error.message, /no space left on device/);
        assert.doesNotMatch(error.message, /\n/);
      }
      assert.deepEqual(await readdir(parent), [], `${bytes} bytes: no output, no temporary folder`);
      checked += 1;
    }
    assert.ok(checked >= 7, `${checked} byte counts ran out of space`);
  } finally {
    FileHandle.write = write;
  }
});
