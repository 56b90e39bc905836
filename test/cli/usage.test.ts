/**
 * Exit codes as documented (0 success, 1 error, 2 bad usage, 130
 * interrupted) and messages that quote what the user typed (issue 17).
 */
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { fixture, withTempDir } from "../helpers.js";
import { runCli } from "../reliability/synth.js";

const SIGNAL_AT_LOAD = fileURLToPath(new URL("./signal-at-load.js", import.meta.url));

function oneLine(stderr: string): string {
  const lines = stderr
    .trim()
    .split("\n")
    .filter((line) => !line.startsWith("Run `bam --help`"));
  assert.equal(lines.length, 1, `one line: ${stderr}`);
  return lines[0]!;
}

test("bad usage exits 2 with one line, and writes nothing", { timeout: 120_000 }, () =>
  withTempDir(async (dir) => {
    const seed = fixture("llama", "base");
    const ids = join(fixture("llama", "base"), "..", "reference.safetensors");
    const out = join(dir, "out");
    const cases: Array<[string[], RegExp]> = [
      [["upcycle", seed, seed], /^bam: --output: name the output folder$/],
      [["upcycle", "-o", out], /^bam: seeds: name at least one seed folder$/],
      [
        ["upcycle", seed, seed, "-o", out, "--attention", "sideways"],
        /^bam: Invalid values: Argument: attention, Given: "sideways", Choices: "moa", "shared-kv", "merged"$/,
      ],
      [["upcycle", seed, seed, "-o", out, "-k", "0"], /--experts-per-token .*not 0/],
      [["upcycle", seed, seed, "-o", out, "-o", join(dir, "other")], /--output given more than once/],
      [["upcycle", seed, seed, "-o", out, "-k", "abc"], /--experts-per-token \(-k\) must be a number, not "abc"/],
      [["upcycle", seed, seed, "-o", out, "--weights", "-1,2"], /--weights .*non-negative/],
      [["upcycle", seed, "-o", out, "--experts", "four"], /--experts must be a number, not "four"/],
      [
        ["eval", seed, "--text", join(dir, "a.txt"), "--context", "0"],
        /--context must be an integer of at least 2, not 0/,
      ],
      [["eval", seed, "--text", join(dir, "a.txt"), "--context", ""], /--context must be a number, not ""/],
      [["eval", seed, "--ids", ids], /--save-logits/],
    ];
    const runs = await Promise.all(cases.map(([args]) => runCli(args, { cwd: dir })));
    runs.forEach((run, i) => {
      assert.equal(run.code, 2, `${cases[i]![0].join(" ")}: ${run.stderr}`);
      assert.match(oneLine(run.stderr), cases[i]![1]);
    });
    assert.deepEqual(await readdir(dir), []);
  }),
);

for (const signal of ["SIGTERM", "SIGHUP"] as const) {
  test(
    `${signal} while the CLI is still loading its commands: exit 130, one line, nothing written`,
    { timeout: 60_000 },
    () =>
      withTempDir(async (dir) => {
        const run = await runCli(["upcycle", fixture("llama", "base"), "--experts", "2", "-o", join(dir, "out")], {
          nodeArgs: ["--import", SIGNAL_AT_LOAD],
          env: { BAM_TEST_SIGNAL: signal },
        });
        assert.equal(run.signal, null, `died of ${run.signal}`);
        assert.equal(run.code, 130, run.stderr);
        assert.match(oneLine(run.stderr), /^bam: interrupted/);
        assert.deepEqual(await readdir(dir), []);
      }),
  );
}
