/**
 * The output never costs the user a file (issue 17): each case is one that
 * lost data before, run against copies of the fixtures in a temporary folder.
 * After every refusal the seeds and the user's files are byte for byte as
 * they were (a snapshot of the whole tree), and no temporary folder or lock
 * is left.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { cp, lstat, mkdir, readdir, readFile, symlink, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { test } from "node:test";
import { openModel } from "../../src/arch/model.js";
import { isBamError } from "../../src/errors.js";
import { openAtomicFolder, writeFileAtomically } from "../../src/export/atomic.js";
import { SafetensorsReader } from "../../src/safetensors/index.js";
import { upcycle } from "../../src/upcycle/index.js";
import { deadPid, fixture, withTempDir } from "../helpers.js";
import { runCli, TINY, writeSeed } from "./synth.js";

/** Relative path -> sha256 (or "dir") of everything under `root`, links not followed. */
async function snapshot(root: string): Promise<Record<string, string>> {
  const entries: Record<string, string> = {};
  const walk = async (dir: string): Promise<void> => {
    for (const name of (await readdir(dir)).sort()) {
      const path = join(dir, name);
      const info = await lstat(path);
      if (info.isDirectory()) {
        entries[relative(root, path)] = "dir";
        await walk(path);
      } else {
        entries[relative(root, path)] = info.isSymbolicLink()
          ? "link"
          : createHash("sha256")
              .update(await readFile(path))
              .digest("hex");
      }
    }
  };
  await walk(root);
  return entries;
}

/** `work/` holding copies of two llama fixtures and a file of the user's. */
async function workFolder(dir: string): Promise<{ work: string; base: string; code: string }> {
  const work = join(dir, "work");
  await cp(fixture("llama", "base"), join(work, "base"), { recursive: true });
  await cp(fixture("llama", "code"), join(work, "code"), { recursive: true });
  await writeFile(join(work, "notes.txt"), "weeks of work\n");
  return { work, base: join(work, "base"), code: join(work, "code") };
}

/** One line on stderr naming what the user named, no temporary path, pid, raw errno or install path. */
function assertClean(stderr: string, named: RegExp): void {
  const lines = stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line: ${stderr}`);
  assert.match(lines[0]!, named);
  assert.doesNotMatch(lines[0]!, /\.bam-tmp-|EEXIST|ENOENT|python\/|process \d+/);
}

test("the output folder holds the seeds (-o work --force, -o . --force): refused, nothing touched", () =>
  withTempDir(async (dir) => {
    const { work } = await workFolder(dir);
    const before = await snapshot(dir);
    let run = await runCli(["upcycle", "work/base", "work/code", "-o", "work", "--force"], { cwd: dir });
    assert.equal(run.code, 1, run.stderr);
    assertClean(run.stderr, /^bam: work: holds the input work\/base; .*new folder/);
    run = await runCli(["upcycle", "base", "code", "-o", ".", "--force"], { cwd: work });
    assert.equal(run.code, 1, run.stderr);
    assertClean(run.stderr, /^bam: \.: is the current folder/);
    run = await runCli(["upcycle", "work/base", "work/code", "-o", "..", "--force"], {
      cwd: join(dir, "work", "base"),
    });
    assert.equal(run.code, 1, run.stderr);
    assert.deepEqual(await snapshot(dir), before);
  }));

test("the output is a seed, lies inside one, or is a link to one: refused with --force too", () =>
  withTempDir(async (dir) => {
    const { base, code } = await workFolder(dir);
    await symlink(base, join(dir, "link"));
    const before = await snapshot(dir);
    for (const output of [base, code, join(base, "inside"), join(dir, "link")]) {
      await assert.rejects(
        upcycle({ seeds: [base, code], output, force: true }),
        (error: unknown) => isBamError(error, "OUTPUT_UNSAFE") && /input/.test(error.message),
      );
    }
    const run = await runCli(["upcycle", "work/base", "work/code", "-o", "work/base", "--force"], { cwd: dir });
    assert.equal(run.code, 1);
    assertClean(run.stderr, /^bam: work\/base: is the input work\/base/);
    assert.deepEqual(await snapshot(dir), before);
  }));

test("--force replaces only a folder bam wrote; the user's folder is refused", () =>
  withTempDir(async (dir) => {
    const { base, code } = await workFolder(dir);
    const mine = join(dir, "mine");
    await mkdir(mine);
    await writeFile(join(mine, "config.json"), "{}"); // a config alone is not enough: no recipe.yaml of ours
    const before = await snapshot(mine);
    await assert.rejects(
      upcycle({ seeds: [base, code], output: mine, force: true }),
      (error: unknown) => isBamError(error, "OUTPUT_EXISTS") && /not a folder bam wrote/.test(error.message),
    );
    assert.deepEqual(await snapshot(mine), before);
    const ours = join(dir, "ours");
    await upcycle({ seeds: [base, code], output: ours });
    await upcycle({ seeds: [base, code], output: ours, force: true, attention: "merged" });
    assert.match(await readFile(join(ours, "recipe.yaml"), "utf8"), /attention: merged/);
    assert.deepEqual((await readdir(dir)).sort(), ["mine", "ours", "work"]);
  }));

test("a previous folder moved aside by a run killed between the two renames is never deleted", () =>
  withTempDir(async (dir) => {
    const { base, code } = await workFolder(dir);
    const out = join(dir, "out");
    await upcycle({ seeds: [base, code], output: out });
    // The killed run had moved the previous model aside and its new one in, and died before removing the old one.
    const aside = join(dir, `.bam-old-out-${deadPid()}-1`);
    await cp(out, aside, { recursive: true });
    await writeFile(join(aside, "marker.txt"), "the previous model\n");
    const kept = await snapshot(aside);
    for (const force of [false, true]) {
      await assert.rejects(
        upcycle({ seeds: [base, code], output: out, force }),
        (error: unknown) =>
          isBamError(error, "OUTPUT_EXISTS") && error.message.includes(aside) && /keep it/.test(error.message),
      );
      assert.deepEqual(await snapshot(aside), kept);
    }
    const run = await runCli(["upcycle", base, code, "-o", out, "--force"]);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /previous out at .*\.bam-old-out-/);
    assert.deepEqual(await snapshot(aside), kept);
  }));

test("a folder created at the target during the run makes the run fail; it is kept as it is", () =>
  withTempDir(async (dir) => {
    const { base, code } = await workFolder(dir);
    const out = join(dir, "t");
    let made = false;
    const run = upcycle(
      { seeds: [base, code], output: out },
      {
        onProgress: () => {
          if (made) return;
          made = true;
          execFileSync("sh", ["-c", `mkdir "${out}" && echo mine > "${out}/mine.txt"`]);
        },
      },
    );
    await assert.rejects(
      run,
      (error: unknown) =>
        isBamError(error, "OUTPUT_EXISTS") && /appeared/.test(error.message) && !error.message.includes(".bam-tmp-"),
    );
    assert.deepEqual(await readdir(out), ["mine.txt"]);
    assert.equal(await readFile(join(out, "mine.txt"), "utf8"), "mine\n");
    assert.deepEqual((await readdir(dir)).sort(), ["t", "work"], "no temporary folder or lock left");
    // The same with --force: a folder that was not there at the start is not ours to replace.
    made = false;
    const forced = join(dir, "f");
    await assert.rejects(
      upcycle(
        { seeds: [base, code], output: forced, force: true },
        {
          onProgress: () => {
            if (made) return;
            made = true;
            execFileSync("sh", ["-c", `mkdir "${forced}" && echo mine > "${forced}/mine.txt"`]);
          },
        },
      ),
      (error: unknown) => isBamError(error, "OUTPUT_EXISTS"),
    );
    assert.deepEqual(await readdir(forced), ["mine.txt"]);
  }));

test("an upcycle() to an output another run in this process is writing is refused; the folder stays the first's", () =>
  withTempDir(async (dir) => {
    // Deterministic: the in-flight run is an open atomic folder (what upcycle() holds while it writes), not a
    // second upcycle() raced against the first, which a loaded machine can finish before the other starts.
    const base = await writeSeed(join(dir, "work", "base"), TINY);
    const code = await writeSeed(join(dir, "work", "code"), { ...TINY, valueSeed: 2 });
    const out = join(dir, "out");
    const first = await upcycle({ seeds: [base, code], output: out, attention: "moa" });
    const inFlight = await openAtomicFolder(out, { force: true, inputs: [base, code] });
    let outcome: unknown;
    try {
      outcome = await upcycle({ seeds: [base, code], output: out, attention: "merged", force: true }).then(
        () => "succeeded",
        (error: unknown) => error,
      );
    } finally {
      await inFlight.discard();
    }
    assert.ok(isBamError(outcome, "OUTPUT_BUSY"), `the second call: ${String(outcome)}`);
    assert.match(outcome.message, /another bam run is writing/);
    assert.doesNotMatch(outcome.message, /\.bam-tmp-|python\//);
    assert.equal(first.output, out);
    assert.match(await readFile(join(out, "recipe.yaml"), "utf8"), /attention: moa/);
    const model = await openModel(out);
    assert.equal(model.moe.attentionExperts, "moa", "config and weights of the first call");
    await model.close();
    assert.deepEqual((await readdir(dir)).sort(), ["out", "work"]);
  }));

test("two CLI runs to one -o at once: never both successful", { timeout: 60_000 }, () =>
  withTempDir(async (dir) => {
    const seed = await writeSeed(join(dir, "seed"), { ...TINY, vocab: 4000, hidden: 256, intermediate: 512 });
    const runs = await Promise.all(
      [1, 2].map(() => runCli(["upcycle", seed, "--experts", "4", "-o", "out"], { cwd: dir })),
    );
    assert.deepEqual(runs.map((r) => r.code).sort(), [0, 1], runs.map((r) => r.stderr).join(""));
    const loser = runs.find((r) => r.code === 1)!;
    assertClean(loser.stderr, /^bam: out: (another bam run is writing|output folder exists)/);
    assert.deepEqual((await readdir(dir)).sort(), ["out", "seed"]);
  }),
);

test("leftover temporary folders of dead processes are reclaimed by a run to any target in the folder; live ones are kept", () =>
  withTempDir(async (dir) => {
    const { base } = await workFolder(dir);
    const dead = join(dir, `.bam-tmp-other-${deadPid()}-3`);
    const live = join(dir, `.bam-tmp-other-${process.pid}-99`);
    await mkdir(dead);
    await writeFile(join(dead, "model.safetensors"), "half a model");
    await mkdir(live);
    await upcycle({ seeds: [base], experts: 2, output: join(dir, "out") });
    assert.deepEqual((await readdir(dir)).sort(), [`.bam-tmp-other-${process.pid}-99`, "out", "work"]);
  }));

test("-o / and a mount point are refused before any work", async () => {
  const seed = fixture("llama", "base");
  await assert.rejects(
    upcycle({ seeds: [seed], experts: 2, output: "/", force: true }),
    (error: unknown) => isBamError(error, "OUTPUT_UNSAFE") && /root folder/.test(error.message),
  );
  await assert.rejects(
    upcycle({ seeds: [seed], experts: 2, output: "/proc", force: true }),
    (error: unknown) => isBamError(error, "OUTPUT_UNSAFE") && /mount point/.test(error.message),
  );
  const run = await runCli(["upcycle", seed, "--experts", "2", "-o", "/", "--force"]);
  assert.equal(run.code, 1);
  assertClean(run.stderr, /^bam: \/: is the root folder/);
});

test("a failed run removes the parent folders it created for -o", () =>
  withTempDir(async (dir) => {
    const { base } = await workFolder(dir);
    const controller = new AbortController();
    await assert.rejects(
      upcycle(
        { seeds: [base], experts: 2, output: join(dir, "a", "b", "out") },
        { signal: controller.signal, onProgress: () => controller.abort() },
      ),
      (error: unknown) => isBamError(error, "ABORTED"),
    );
    assert.deepEqual(await readdir(dir), ["work"]);
    // A parent that existed stays.
    await mkdir(join(dir, "kept"));
    const again = new AbortController();
    await assert.rejects(
      upcycle(
        { seeds: [base], experts: 2, output: join(dir, "kept", "new", "out") },
        { signal: again.signal, onProgress: () => again.abort() },
      ),
    );
    assert.deepEqual((await readdir(dir)).sort(), ["kept", "work"]);
    assert.deepEqual(await readdir(join(dir, "kept")), []);
  }));

test(
  "eval --save-logits refuses the model's own files always, and any existing file without --force",
  { timeout: 60_000 },
  () =>
    withTempDir(async (dir) => {
      const { base } = await workFolder(dir);
      const ids = join(dir, "ids.safetensors");
      await cp(join(fixture("llama", "base"), "..", "reference.safetensors"), ids); // holds input_ids
      const existing = join(dir, "logits.safetensors");
      await writeFile(existing, "the user's file");
      const before = await snapshot(dir);
      const cases: Array<[string[], RegExp]> = [
        [
          ["eval", base, "--ids", ids, "--save-logits", join(base, "model.safetensors"), "--force"],
          /lies inside the input/,
        ],
        [["eval", base, "--ids", ids, "--save-logits", ids, "--force"], /is the input/],
        [["eval", base, "--ids", ids, "--save-logits", existing], /exists; choose another file or pass --force/],
      ];
      for (const [args, message] of cases) {
        const run = await runCli(args);
        assert.equal(run.code, 1, run.stderr);
        assertClean(run.stderr, message);
      }
      assert.deepEqual(await snapshot(dir), before);
    }),
);

test("disk full while copying the side files names the output, not the seed's file", { timeout: 60_000 }, async (t) => {
  if (process.platform !== "linux" || process.getuid?.() !== 0) return t.skip("needs a tmpfs mount");
  await withTempDir(async (dir) => {
    const seed = join(dir, "seed");
    await cp(fixture("llama", "base"), seed, { recursive: true });
    // A large tokenizer_config.json: the weights fit, the side files do not.
    const config = JSON.parse(await readFile(join(seed, "tokenizer_config.json"), "utf8")) as Record<string, unknown>;
    await writeFile(join(seed, "tokenizer_config.json"), JSON.stringify({ ...config, padding: "x".repeat(2 << 20) }));
    const disk = join(dir, "disk");
    await mkdir(disk);
    try {
      execFileSync("mount", ["-t", "tmpfs", "-o", "size=1M", "tmpfs", disk], { stdio: "ignore" });
    } catch {
      return t.skip("cannot mount a tmpfs here");
    }
    try {
      const output = join(disk, "out");
      await assert.rejects(
        upcycle({ seeds: [seed], experts: 2, output }),
        (error: unknown) =>
          isBamError(error, "DISK_FULL") &&
          error.message.startsWith(join(output, "tokenizer_config.json")) &&
          !error.message.includes(seed),
      );
      assert.deepEqual(await readdir(disk), []);
    } finally {
      execFileSync("umount", [disk]);
    }
  });
});

test("--dtype keep with an f32 and a bf16 seed writes f32 throughout, as config.json says", () =>
  withTempDir(async (dir) => {
    const f32 = await writeSeed(join(dir, "f32"), { ...TINY, dtype: "F32" });
    const bf16 = await writeSeed(join(dir, "bf16"), { ...TINY, dtype: "BF16", valueSeed: 2 });
    for (const seeds of [
      [f32, bf16],
      [bf16, f32],
    ]) {
      const out = join(dir, `out-${seeds.length}-${seeds[0] === f32 ? "a" : "b"}`);
      await upcycle({ seeds, output: out });
      const config = JSON.parse(await readFile(join(out, "config.json"), "utf8")) as Record<string, unknown>;
      assert.equal(config.dtype ?? config.torch_dtype, "float32");
      const reader = await SafetensorsReader.open(join(out, "model.safetensors"));
      try {
        assert.deepEqual([...new Set([...reader.tensors.values()].map((t) => t.dtype))], ["F32"]);
      } finally {
        await reader.close();
      }
    }
  }));

test("one file written atomically (eval --save-logits): a failed write keeps the old file, a file that appears meanwhile is kept", () =>
  withTempDir(async (dir) => {
    const file = join(dir, "logits.safetensors");
    await writeFile(file, "old");
    const failed = await writeFileAtomically(file, true, async (path) => {
      await writeFile(path, "half");
      throw new Error("disk full");
    }).catch((error: unknown) => error);
    assert.match(String(failed), /disk full/);
    assert.equal(await readFile(file, "utf8"), "old", "the old file is whole");
    const appeared = join(dir, "appeared.safetensors");
    const refused = await writeFileAtomically(appeared, false, async (path) => {
      await writeFile(path, "new");
      await writeFile(appeared, "someone else's");
    }).catch((error: unknown) => error);
    assert.ok(isBamError(refused, "OUTPUT_EXISTS"), String(refused));
    assert.equal(await readFile(appeared, "utf8"), "someone else's");
    await writeFileAtomically(file, true, (path) => writeFile(path, "new"));
    assert.equal(await readFile(file, "utf8"), "new");
    assert.deepEqual(
      (await readdir(dir)).sort(),
      ["appeared.safetensors", "logits.safetensors"],
      "no temporary file left",
    );
  }));
