/**
 * Determinism and memory bounds. Two runs with the same inputs write
 * byte-identical folders (sha256 of every file), for every family and
 * attention mode; across --max-shard-size values the tensors themselves are
 * identical. Peak RSS of the CLI at two model sizes (both past the
 * executor's chunk size) is the same within noise, and within the dry run's
 * estimate: memory does not grow with the model. bench/upcycle-rss measures
 * it at 200 MB and 1 GB seeds.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { FAMILIES } from "../../src/arch/types.js";
import { CheckpointFiles, WRITE_BATCH_BYTES } from "../../src/safetensors/index.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture } from "../helpers.js";
import { folderHashes, RSS_PROBE, runCli, writeSeed } from "./synth.js";

let root: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-determinism-"));
});
after(() => rm(root, { recursive: true, force: true }));

/** Runs the upcycle twice into the same path and returns both folders' hashes. */
async function twice(
  options: Omit<UpcycleOptions, "output">,
  name: string,
): Promise<[Record<string, string>, Record<string, string>]> {
  const output = join(root, name, "out");
  const hashes: Record<string, string>[] = [];
  for (let i = 0; i < 2; i++) {
    await upcycle({ ...options, output, force: true });
    hashes.push(await folderHashes(output));
  }
  await rm(join(root, name), { recursive: true });
  return [hashes[0]!, hashes[1]!];
}

test("two runs write byte-identical folders, for every family and attention mode", async () => {
  for (const family of FAMILIES) {
    const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
    const modes =
      family === "llama" || family === "gpt_neox" ? (["moa", "shared-kv", "merged"] as const) : (["moa"] as const);
    for (const attention of modes) {
      const [first, second] = await twice({ seeds, attention }, `${family}-${attention}`);
      assert.deepEqual(second, first, `${family} ${attention}`);
      assert.ok(Object.keys(first).includes("model.safetensors"));
    }
  }
  // Random routers and Drop-Upcycling draw from the seed: the same seed gives the same bytes.
  const [a, b] = await twice({ seeds: [fixture("llama", "base")], experts: 4, dropRatio: 0.5, seed: 7 }, "drop");
  assert.deepEqual(b, a);
});

async function tensorsOf(dir: string): Promise<Map<string, { dtype: string; shape: string; sha256: string }>> {
  const { createHash } = await import("node:crypto");
  const files = await CheckpointFiles.open(dir);
  try {
    const out = new Map<string, { dtype: string; shape: string; sha256: string }>();
    for (const [name, info] of files.tensors) {
      out.set(name, {
        dtype: info.dtype,
        shape: info.shape.join("x"),
        sha256: createHash("sha256")
          .update(await files.read(name))
          .digest("hex"),
      });
    }
    return out;
  } finally {
    await files.close();
  }
}

test("across --max-shard-size values the tensors are identical", async () => {
  for (const family of ["llama", "gpt2", "phi3"] as const) {
    const seeds = ["base", "code", "math"].map((v) => fixture(family, v as "base"));
    let reference: Map<string, { dtype: string; shape: string; sha256: string }> | undefined;
    let referenceConfig: string | undefined;
    for (const maxShardSize of ["5GB", "100KB", "20KB", "1"]) {
      const output = join(root, `${family}-shards-${maxShardSize}`, "out");
      const result = await upcycle({ seeds, output, maxShardSize });
      if (maxShardSize !== "5GB")
        assert.ok(result.files.length > 1, `${family} ${maxShardSize}: ${result.files.length} shard(s)`);
      const tensors = await tensorsOf(output);
      const config = await readFile(join(output, "config.json"), "utf8");
      if (reference === undefined) {
        reference = tensors;
        referenceConfig = config;
      } else {
        assert.deepEqual(
          [...tensors.keys()].sort(),
          [...reference.keys()].sort(),
          `${family} ${maxShardSize}: tensor names`,
        );
        for (const [name, tensor] of tensors)
          assert.deepEqual(tensor, reference.get(name), `${family} ${maxShardSize}: ${name}`);
        assert.equal(config, referenceConfig, `${family} ${maxShardSize}: config.json`);
      }
      await rm(join(root, `${family}-shards-${maxShardSize}`), { recursive: true });
    }
  }
});

/** Peak RSS of a first run (fresh seed files: every one is hashed), and the dry run's estimate of it. */
async function peakRss(seeds: string[], output: string): Promise<{ measured: number; planned: number }> {
  const dryRun = await runCli(["upcycle", ...seeds, "-o", output, "--dry-run", "--json"]);
  assert.equal(dryRun.code, 0, dryRun.stderr);
  const file = `${output}.rss`;
  const run = await runCli(["upcycle", ...seeds, "-o", output], {
    nodeArgs: ["--import", RSS_PROBE],
    env: { BAM_TEST_RSS_FILE: file },
  });
  assert.equal(run.code, 0, run.stderr);
  return {
    measured: (JSON.parse(await readFile(file, "utf8")) as { maxRssBytes: number }).maxRssBytes,
    planned: (JSON.parse(dryRun.stdout) as { summary: { peakMemoryBytes: number } }).summary.peakMemoryBytes,
  };
}

test("peak RSS does not grow with the model and stays within the plan's estimate (two sizes, both past the write batch)", {
  timeout: 120_000,
}, async (t) => {
  // Largest tensors (embeddings) of 6M and 12M elements, many write batches each: the working set is at its bound in both.
  const shapes = {
    small: { vocab: 8000, hidden: 768, intermediate: 2048, layers: 2, heads: 12, kvHeads: 12 },
    large: { vocab: 16000, hidden: 768, intermediate: 2048, layers: 10, heads: 12, kvHeads: 12 },
  };
  assert.ok(shapes.small.vocab * shapes.small.hidden * 2 > WRITE_BATCH_BYTES);
  const rss: Record<string, number> = {};
  const mb = (bytes: number) => Math.round(bytes / 2 ** 20);
  for (const [name, shape] of Object.entries(shapes)) {
    const dir = join(root, `rss-${name}`);
    await mkdir(dir);
    const seeds = [
      await writeSeed(join(dir, "a"), { ...shape, valueSeed: 1 }),
      await writeSeed(join(dir, "b"), { ...shape, valueSeed: 2 }),
    ];
    const { measured, planned } = await peakRss(seeds, join(dir, "out"));
    assert.ok(
      measured <= planned,
      `${name}: peak RSS ${mb(measured)} MiB is over the plan's estimate of ${mb(planned)} MiB`,
    );
    rss[name] = measured;
    await rm(dir, { recursive: true });
  }
  t.diagnostic(`peak RSS: ${mb(rss.small!)} MiB with 2 x 54 MB seeds, ${mb(rss.large!)} MiB with 2 x 190 MB seeds`);
  assert.ok(rss.large! < 512 * 2 ** 20, `${mb(rss.large!)} MiB`);
  assert.ok(
    rss.large! - rss.small! < 64 * 2 ** 20,
    `grew by ${mb(rss.large! - rss.small!)} MiB from ${mb(rss.small!)} MiB`,
  );
});
