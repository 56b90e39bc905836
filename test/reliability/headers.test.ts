/**
 * Headers with huge tensor counts: bounded on the raw header before it is
 * parsed (a file) and across shards (a checkpoint), and what is under the
 * bound is in the plan's memory estimate, which --dry-run and the run itself
 * stay within.
 */
import assert from "node:assert/strict";
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { isBamError } from "../../src/errors.js";
import { MAX_TENSORS_PER_FILE, SafetensorsReader } from "../../src/safetensors/index.js";
import { fixture } from "../helpers.js";
import { RSS_PROBE, runCli } from "./synth.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-headers-"));
});
after(() => rm(root, { recursive: true, force: true }));

/** A header of `count` zero-size tensors (no data), as the 900k-entry file. */
async function zeroSizeTensors(file: string, count: number): Promise<void> {
  const header: Record<string, unknown> = {};
  for (let i = 0; i < count; i++) header[`junk.${i}.weight`] = { dtype: "F32", shape: [0], data_offsets: [0, 0] };
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  await writeFile(file, Buffer.concat([length, json]));
}

test("a file listing more tensors than the bound is refused before its header is parsed", async () => {
  const file = join(root, "many.safetensors");
  await zeroSizeTensors(file, MAX_TENSORS_PER_FILE + 1);
  const heapBefore = process.memoryUsage().heapUsed;
  await assert.rejects(SafetensorsReader.open(file), (error: unknown) => {
    assert.ok(isBamError(error, "HEADER_INVALID"), String(error));
    assert.match(error.message, /header lists more than 100000 tensors/);
    return true;
  });
  assert.ok(process.memoryUsage().heapUsed - heapBefore < 50e6, "the header was not parsed");
  await zeroSizeTensors(file, 1000);
  const reader = await SafetensorsReader.open(file);
  assert.equal(reader.tensors.size, 1000);
  await reader.close();
});

test("the plan's memory estimate covers the seeds' open tensor entries: --dry-run and the run stay within it", {
  timeout: 120_000,
}, async () => {
  // A fixture seed with 95,000 extra zero-size tensors (under the bound), opened eight times: without the
  // entries in the estimate, --dry-run peaked at 447 MB against a plan of 416 MB.
  const seed = join(root, "seed");
  await cp(fixture("llama", "base"), seed, { recursive: true });
  const weights = join(seed, "model.safetensors");
  const bytes = await readFile(weights);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString("utf8")) as Record<string, unknown>;
  for (let i = 0; i < 95_000; i++) header[`junk.${i}.weight`] = { dtype: "F32", shape: [0], data_offsets: [0, 0] };
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  await writeFile(weights, Buffer.concat([length, json, bytes.subarray(8 + headerLength)]));
  const seeds: string[] = new Array(8).fill(seed);
  const measure = async (extra: string[], name: string) => {
    const file = join(root, `${name}.rss`);
    const run = await runCli(["upcycle", ...seeds, ...extra], {
      nodeArgs: ["--import", RSS_PROBE],
      env: { BAM_TEST_RSS_FILE: file, BAM_CACHE_DIR: join(root, "cache") },
    });
    assert.equal(run.code, 0, run.stderr);
    return { run, rss: (JSON.parse(await readFile(file, "utf8")) as { maxRssBytes: number }).maxRssBytes };
  };
  const dry = await measure(["--dry-run", "--json"], "dry");
  const planned = (JSON.parse(dry.run.stdout) as { summary: { peakMemoryBytes: number } }).summary.peakMemoryBytes;
  const full = await measure(["-o", join(root, "out")], "run");
  assert.ok(dry.rss <= planned, `--dry-run peaked at ${dry.rss} bytes, over the estimate of ${planned}`);
  assert.ok(full.rss <= planned, `the run peaked at ${full.rss} bytes, over the estimate of ${planned}`);
});
