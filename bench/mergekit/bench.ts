/**
 * `bam upcycle` against `mergekit-moe` (issue 19), on the same synthetic llama seeds in the same run:
 * wall time and peak RSS of each, with `cp` of the seed bytes as the floor. Not a test:
 *
 *   python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install -r bench/mergekit/requirements.txt
 *   npm run build && node dist/bench/mergekit/bench.js [--sizes small,1b] [--repeats 3]
 *
 * The job both do: three bf16 seeds into a Mixtral folder with one FFN expert per seed, top-2, random
 * routers (mergekit's `gate_mode: random`; ours `--router-init random`), merged attention, sequential
 * block, every shared tensor copied from the base model (mergekit's `base_model`, our `--shared-from`): the
 * same output bytes to produce. Contenders run interleaved, `sync` before each; peak RSS is the
 * child's maximum resident set from GNU time (`%M`), which mergekit's and node's worker threads share.
 *
 *   --work DIR        seeds and outputs (default /tmp/bam-bench-mergekit)
 *   --sizes LIST      small (~0.1B per seed), 1b (~1B per seed); default both
 *   --repeats N       default 3
 *   --mergekit PATH   the mergekit-moe executable (default .venv-mergekit/bin/mergekit-moe)
 *   --result FILE     default bench/results/mergekit.json
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { CLI, folderBytes } from "../../test/reliability/synth.js";
import { measuredTree, machineInfo, argOption } from "../provenance.js";
import { median } from "../stats.js";
import { ONE_BILLION, writeLlamaSeed, type LlamaShape } from "../upcycle/synthetic.js";

const args = process.argv.slice(2);
const work = resolve(argOption("--work", "/tmp/bam-bench-mergekit"));
const repeats = Number(argOption("--repeats", "3"));
const mergekit = resolve(argOption("--mergekit", ".venv-mergekit/bin/mergekit-moe"));
const SHAPES: Record<string, LlamaShape> = {
  small: { layers: 4, hidden: 1024, intermediate: 2816, heads: 16, kvHeads: 16, vocab: 32000 },
  "1b": ONE_BILLION,
};
const sizes = argOption("--sizes", "small,1b").split(",");
for (const size of sizes) if (!(size in SHAPES)) throw new Error(`--sizes: unknown size "${size}" (small, 1b)`);
if (!existsSync(mergekit))
  throw new Error(`${mergekit}: not found; install the peer as this file's header says, or pass --mergekit`);

interface Run {
  seconds: number;
  peakRssBytes: number;
}

/** Runs a command under GNU time after a sync: wall seconds and the child's peak RSS. */
function measured(command: string, commandArgs: string[]): Run {
  execFileSync("sync");
  const start = performance.now();
  const run = spawnSync("/usr/bin/time", ["-f", "%M", command, ...commandArgs], {
    encoding: "utf8",
    maxBuffer: 64 << 20,
  });
  const seconds = (performance.now() - start) / 1000;
  if (run.status !== 0)
    throw new Error(`${command} ${commandArgs.join(" ")} failed (${run.status}): ${run.stderr.slice(-2000)}`);
  const kib = Number(run.stderr.trim().split("\n").at(-1));
  return { seconds, peakRssBytes: kib * 1024 };
}

const tree = measuredTree(args.includes("--commit") ? argOption("--commit", "") : undefined);
const results = [];
for (const size of sizes) {
  const shape = SHAPES[size]!;
  const dir = join(work, size);
  const seeds = ["base", "code", "math"].map((name) => join(dir, name));
  for (const [n, seed] of seeds.entries()) {
    if (!existsSync(join(seed, "config.json"))) {
      process.stderr.write(`writing synthetic seed ${seed}\n`);
      await writeLlamaSeed(seed, shape, n + 1);
    }
  }
  const config = join(dir, "mergekit.yaml");
  await writeFile(
    config,
    [
      `base_model: ${seeds[0]}`,
      "gate_mode: random",
      "dtype: bfloat16",
      "experts_per_token: 2",
      "experts:",
      ...seeds.map((s) => `  - source_model: ${s}`),
      "",
    ].join("\n"),
  );
  const out = join(dir, "out");
  const contenders: Record<string, () => Run> = {
    cp: () =>
      measured("bash", [
        "-c",
        // One flat folder, so its size counts like the others' (a seed's files prefixed by its number).
        `mkdir -p ${out} && ${seeds.map((s, n) => `for f in ${s}/*.safetensors; do cp --reflink=never "$f" "${out}/${n}-$(basename "$f")"; done`).join(" && ")}`,
      ]),
    "mergekit-moe": () => measured(mergekit, [config, out, "--random-seed", "0", "--quiet"]),
    "bam upcycle": () =>
      measured(process.execPath, [
        CLI,
        "upcycle",
        ...seeds,
        "-o",
        out,
        "--format",
        "mixtral",
        "--attention",
        "merged",
        "--block",
        "sequential",
        "-k",
        "2",
        "--norm-topk-prob",
        "--shared-from",
        seeds[0]!,
        "--dtype",
        "bf16",
        "--json",
      ]),
  };
  const runs: Record<string, Run[]> = Object.fromEntries(Object.keys(contenders).map((name) => [name, []]));
  const outputBytes: Record<string, number> = {};
  for (let i = 0; i < repeats; i++) {
    for (const [name, run] of Object.entries(contenders)) {
      await rm(out, { recursive: true, force: true });
      await mkdir(dir, { recursive: true });
      runs[name]!.push(run());
      outputBytes[name] = await folderBytes(out);
      process.stderr.write(`${size} ${name}: ${runs[name]!.at(-1)!.seconds.toFixed(2)} s\n`);
    }
  }
  await rm(out, { recursive: true, force: true });
  const summary = Object.fromEntries(
    Object.entries(runs).map(([name, list]) => [
      name,
      {
        seconds: list.map((r) => r.seconds),
        medianSeconds: median(list.map((r) => r.seconds)),
        peakRssBytes: Math.max(...list.map((r) => r.peakRssBytes)),
        outputBytes: outputBytes[name],
      },
    ]),
  );
  const ours = summary["bam upcycle"]!;
  const peer = summary["mergekit-moe"]!;
  results.push({
    size,
    shape,
    seeds: seeds.length,
    contenders: summary,
    ratios: {
      timeVsMergekit: ours.medianSeconds / peer.medianSeconds,
      peakRssVsMergekit: ours.peakRssBytes / peer.peakRssBytes,
      timeVsCp: ours.medianSeconds / summary.cp!.medianSeconds,
      mergekitTimeVsCp: peer.medianSeconds / summary.cp!.medianSeconds,
    },
  });
}

const result = {
  benchmark: "bam upcycle vs mergekit-moe",
  ...tree,
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadAverage: loadavg() },
  mergekit: execFileSync(
    resolve(mergekit, "..", "python"),
    ["-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
    { encoding: "utf8" },
  ).trim(),
  repeats,
  results,
};
const file = resolve(argOption("--result", "bench/results/mergekit.json"));
await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
for (const r of results) {
  const line = (name: string) => {
    const c = r.contenders[name]!;
    return `  ${name.padEnd(13)} ${c.medianSeconds.toFixed(2).padStart(7)} s   ${(c.peakRssBytes / 2 ** 20).toFixed(0).padStart(6)} MiB`;
  };
  process.stdout.write(
    `${r.size}:\n${["cp", "mergekit-moe", "bam upcycle"].map(line).join("\n")}\n` +
      `  bam / mergekit: ${r.ratios.timeVsMergekit.toFixed(2)}x time, ${r.ratios.peakRssVsMergekit.toFixed(2)}x peak RSS\n`,
  );
}
process.stdout.write(`wrote ${file}\n`);
