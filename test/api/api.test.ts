/**
 * The API's one-call entry points, through the package's root module (what a
 * user imports): inspectModel is `bam inspect --json`; generateText takes a
 * model folder (a BAM mixture: transformers.js alone refuses model_type bam)
 * with default settings and generates what `bam generate` does; planUpcycle
 * and upcycle stop on an aborted signal before reading a seed; back-to-back
 * upcycles in one process reuse their buffers (bench/upcycle-rss/repeat.ts
 * measures the RSS).
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  DEFAULT_GENERATION,
  generateText,
  inspectModel,
  planUpcycle,
  upcycle,
  type Generation,
  type Inspection,
} from "../../src/index.js";
import { fixture, refused } from "../helpers.js";
import { runCli, writeSeed } from "../reliability/synth.js";

const seeds = (["base", "code", "math"] as const).map((variant) => fixture("llama", variant));
let root: string;
let model: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-api-"));
  model = join(root, "bam3");
  await upcycle({ seeds, output: model });
});
after(() => rm(root, { recursive: true, force: true }));

test("inspectModel(dir) is what bam inspect --json prints", async () => {
  for (const dir of [model, seeds[0]!]) {
    const cli = await runCli(["inspect", dir, "--json"]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.deepEqual(await inspectModel(dir), JSON.parse(cli.stdout) as Inspection);
  }
  const scanned = await inspectModel(model, { scan: true });
  assert.deepEqual(scanned.scan, []);
  assert.equal(scanned.experts, 3);
});

test("generateText takes a BAM model folder and defaults to DEFAULT_GENERATION, as bam generate", async () => {
  const pieces: string[] = [];
  const ours = await generateText(model, "The experts", { onText: (text) => pieces.push(text) });
  const cli = await runCli(["generate", model, "--prompt", "The experts", "--json"]);
  assert.equal(cli.code, 0, cli.stderr);
  const printed = JSON.parse(cli.stdout) as Generation;
  assert.deepEqual(ours.newIds, printed.newIds);
  assert.equal(ours.text, printed.text);
  assert.ok(ours.newIds.length > 0 && ours.newIds.length <= DEFAULT_GENERATION.maxNewTokens);
  assert.equal(pieces.join(""), ours.text);
});

test("planUpcycle and upcycle stop on an aborted signal before reading a seed", async () => {
  const signal = AbortSignal.abort();
  await refused(
    planUpcycle({ seeds, output: join(root, "never") }, { signal }),
    "ABORTED",
    /interrupted before the seed was read/,
  );
  await refused(upcycle({ seeds, output: join(root, "never") }, { signal }), "ABORTED", /interrupted/);
  assert.equal((await planUpcycle({ seeds, output: join(root, "never") })).summary.experts, 3);
});

test("back-to-back upcycles in one process reuse their shared buffers instead of leaving them to the GC", async () => {
  const synth = await Promise.all(
    [1, 2, 3].map((valueSeed) =>
      writeSeed(join(root, `synth${valueSeed}`), {
        vocab: 8000,
        hidden: 256,
        intermediate: 768,
        layers: 2,
        heads: 4,
        kvHeads: 4,
        dtype: "BF16",
        valueSeed,
      }),
    ),
  );
  const held: number[] = [];
  for (let run = 0; run < 3; run++) {
    await upcycle({ seeds: synth, output: join(root, "again"), force: true });
    held.push(process.memoryUsage().arrayBuffers);
  }
  // each run allocated its pools afresh: arrayBuffers grew by a run's buffers every time (no gc() here)
  assert.ok(
    held[2]! - held[0]! < 4 * 2 ** 20,
    `array buffers ${held.map((b) => (b / 2 ** 20).toFixed(1)).join(" -> ")} MiB`,
  );
});
