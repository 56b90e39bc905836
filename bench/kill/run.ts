/**
 * The kill benchmark (issue 17): `bam upcycle` is killed with SIGKILL at
 * random moments, from start-up to after the commit, with and without
 * --force over a previous model, and each time the folder is checked and a
 * next run is made. A violation is any state in which a model is lost or
 * mixed:
 *
 * - the target holds neither the previous model nor the complete new one;
 * - the target is missing while no moved-aside `.bam-old-*` holds the previous model (with --force);
 * - the next run fails other than by refusing, in one line naming it, to touch a kept `.bam-old-*`,
 *   or ends with a target other than the new model, or leaves `.bam-tmp-*` or a lock behind.
 *
 * Writes bench/results/kill.json: rounds, where the kills landed, violations, the commit measured.
 *
 *   npm run build && node dist/bench/kill/run.js [--rounds 40] [--seed 1] [--out bench/results/kill.json]
 */
import { cp, mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { folderHashes, runCli, writeSeed } from "../../test/reliability/synth.js";
import { measuredTree, machineInfo } from "../provenance.js";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "40" },
    seed: { type: "string", default: "1" },
    out: { type: "string", default: "bench/results/kill.json" },
  },
});
const rounds = Number(values.rounds);
const tree = measuredTree();

/** About 36 MB of bf16; with 4 experts about 70 MB of output. */
const SHAPE = { vocab: 8000, hidden: 512, intermediate: 1024, layers: 4, heads: 8, kvHeads: 8 };

let state = Number(values.seed) >>> 0 || 1;
function random(): number {
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  return (state >>> 0) / 2 ** 32;
}

const root = await mkdtemp(join(tmpdir(), "bam-kill-"));
const seed = await writeSeed(join(root, "seed"), SHAPE);
const args = (...extra: string[]) => ["upcycle", seed, "--experts", "4", "-o", "out", ...extra];

/** Reference folders, made in a parent of their own each (the model card names the output as given). */
async function reference(...extra: string[]): Promise<{ hashes: Record<string, string>; ms: number; dir: string }> {
  const parent = await mkdtemp(join(root, "ref-"));
  const started = performance.now();
  const run = await runCli(args(...extra), { cwd: parent });
  if (run.code !== 0) throw new Error(run.stderr);
  return { hashes: await folderHashes(join(parent, "out")), ms: performance.now() - started, dir: join(parent, "out") };
}
const same = (a: Record<string, string>, b: Record<string, string>) => JSON.stringify(a) === JSON.stringify(b);
const fresh = await reference();
// Another model of the same seed (other router values): what --force replaces.
const previous = await reference("--seed", "7");
if (same(previous.hashes, fresh.hashes)) throw new Error("the previous model must differ from the new one");
/** The fastest of three uninterrupted runs (the first also hashes the seeds): the scale of the kill delays. */
const runMs = Math.min(fresh.ms, previous.ms, (await reference()).ms);

type Landing =
  | "target absent"
  | "previous intact"
  | "new model complete"
  | "previous moved aside, target absent"
  | "new model in, previous kept aside";
const landings: Record<string, number> = {};
const violations: Array<{ round: number; force: boolean; delayMs: number; what: string }> = [];
let nextRunRefusals = 0;
const started = performance.now();

for (let round = 0; round < rounds; round++) {
  const force = round % 2 === 1;
  const parent = join(root, `round-${round}`);
  await mkdir(parent);
  if (force) await cp(previous.dir, join(parent, "out"), { recursive: true });
  // One round in four aims at the end of the run, where the commit's renames are.
  const delayMs = Math.round((round % 4 === 3 ? 0.8 + 0.3 * random() : 1.3 * random()) * runMs);
  const run = await runCli(args(...(force ? ["--force"] : [])), {
    cwd: parent,
    during: (child) => {
      setTimeout(() => child.kill("SIGKILL"), delayMs);
    },
  });
  const violation = (what: string) => violations.push({ round, force, delayMs, what });
  const entries = await readdir(parent);
  const aside = entries.filter((e) => e.startsWith(".bam-old-"));
  const target = entries.includes("out") ? await folderHashes(join(parent, "out")) : undefined;
  let landing: Landing;
  if (target === undefined) {
    if (!force) landing = "target absent";
    else if (aside.length === 1 && same(await folderHashes(join(parent, aside[0]!)), previous.hashes))
      landing = "previous moved aside, target absent";
    else {
      violation("target missing and no moved-aside previous model");
      continue;
    }
  } else if (same(target, fresh.hashes)) {
    landing = aside.length > 0 ? "new model in, previous kept aside" : "new model complete";
    if (aside.length > 0 && !same(await folderHashes(join(parent, aside[0]!)), previous.hashes))
      violation("the kept previous model changed");
  } else if (force && same(target, previous.hashes)) {
    landing = "previous intact";
  } else {
    violation(`target holds neither model (${Object.keys(target).join(", ")})`);
    continue;
  }
  const key = `${landing}${run.signal === "SIGKILL" ? "" : " (ran to the end before the kill)"}`;
  landings[key] = (landings[key] ?? 0) + 1;

  // The next run: as the user would, the same command again.
  let next = await runCli(args(...(force ? ["--force"] : [])), { cwd: parent });
  if (landing === "new model in, previous kept aside" || (!force && landing === "new model complete")) {
    // Refusals expected: a kept previous model is named, an existing output needs --force.
    if (next.code !== 1 || next.stderr.trim().split("\n").length !== 1)
      violation(`next run: exit ${next.code}, ${next.stderr}`);
    nextRunRefusals += 1;
    if (aside.length > 0) {
      if (!next.stderr.includes(aside[0]!))
        violation(`next run's refusal does not say where the previous model is: ${next.stderr}`);
      await rm(join(parent, aside[0]!), { recursive: true }); // the user deletes it, having read the message
    }
    next = await runCli(args("--force"), { cwd: parent });
  }
  if (next.code !== 0) violation(`next run: exit ${next.code}, ${next.stderr}`);
  else if (!same(await folderHashes(join(parent, "out")), fresh.hashes))
    violation("next run's output differs from an uninterrupted run");
  const left = (await readdir(parent)).filter((e) => e.startsWith(".bam-"));
  if (left.length > 0) violation(`left behind: ${left.join(", ")}`);
  await rm(parent, { recursive: true });
  process.stderr.write(
    `round ${round + 1}/${rounds} (${force ? "--force, " : ""}kill at ${delayMs} ms): ${key}, ${violations.length} violations\n`,
  );
}

const result = {
  benchmark: "kill (SIGKILL at random moments, bench/kill/run.ts)",
  ...tree,
  date: new Date().toISOString(),
  machine: machineInfo(),
  seed: values.seed,
  rounds,
  uninterruptedRunMs: Math.round(runMs),
  killDelaysMs: `from the start: uniform in [0, ${Math.round(1.3 * runMs)}], one round in four in [${Math.round(0.8 * runMs)}, ${Math.round(1.1 * runMs)}]`,
  seconds: Math.round((performance.now() - started) / 1000),
  landings,
  nextRunRefusals,
  violations,
};
await rm(root, { recursive: true, force: true });
const file = resolve(values.out!);
await mkdir(dirname(file), { recursive: true });
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(
  `${rounds} rounds in ${result.seconds} s: ${JSON.stringify(landings)}; ${violations.length} violations; wrote ${file}\n`,
);
