/**
 * The fuzzer in CI: a fixed seed, a few thousand cases over every input
 * format, in two child processes (one per core) with a 256 MB heap. Every
 * case must end in success or a one-line BamError, within the time bound,
 * without writing beside its output. `bench/fuzz` runs the same cases by the
 * ten thousand. Replay a case with
 *   node dist/test/fuzz/worker.js --seed ci-1 --format config --index 42
 *
 * Also here: truncation of real weights files at every region boundary,
 * which must always be refused.
 */
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { FAMILIES } from "../../src/arch/types.js";
import { BamError } from "../../src/errors.js";
import { SafetensorsReader } from "../../src/safetensors/index.js";
import { fixture, withTempDir } from "../helpers.js";
import { NOT_ONE_LINE } from "./harness.js";
import { type FuzzSummary, runWorker } from "./run-worker.js";

const SEED = "ci-1";

function report(summary: FuzzSummary): string[] {
  return Object.entries(summary.formats).map(
    ([format, s]) =>
      `${format}: ${s.cases} cases, ${s.violations} violations, slowest ${s.slowest?.ms ?? 0} ms; ${Object.entries(
        s.outcomes,
      )
        .map(([k, v]) => `${k} ${v}`)
        .join(", ")}`,
  );
}

test("fuzz: every input format ends in success or a one-line BamError (fixed seed)", {
  timeout: 180_000,
}, async (t) => {
  const options = { seed: SEED, upcycleRate: 0.1, timeoutSeconds: 150 };
  const runs = await Promise.all([
    runWorker({ safetensors: 800, config: 550, recipe: 450 }, options),
    runWorker({ index: 450, tokenizer: 150 }, options),
  ]);
  let cases = 0;
  for (const summary of runs) {
    for (const line of report(summary)) t.diagnostic(line);
    t.diagnostic(
      `worker: ${summary.seconds.toFixed(1)} s, peak RSS ${summary.maxRssMB} MB, open files ${summary.fds?.start} -> ${summary.fds?.end}`,
    );
    assert.equal(summary.stopped, null, summary.stopped ?? "");
    for (const [format, s] of Object.entries(summary.formats)) {
      cases += s.cases;
      assert.equal(s.violations, 0, `${format}: ${JSON.stringify(s.examples.slice(0, 3), null, 1)}`);
      assert.ok(
        (s.outcomes.ok ?? 0) > 0,
        `${format}: some cases must get through (the generator only makes broken inputs otherwise)`,
      );
    }
    if (summary.fds !== null)
      assert.ok(
        summary.fds.end - summary.fds.start < 16,
        `open files grew from ${summary.fds.start} to ${summary.fds.end}`,
      );
    assert.ok(summary.maxRssMB < 700, `peak RSS ${summary.maxRssMB} MB`);
  }
  assert.ok(cases >= 2000, `${cases} cases`);
});

/** Byte offsets where a file's regions begin and end: the length prefix, the header, every tensor. */
function boundaries(bytes: Uint8Array, reader: SafetensorsReader): number[] {
  const offsets = new Set<number>();
  for (let i = 0; i <= 16; i++) offsets.add(i);
  const dataStart = 8 + reader.headerLength;
  for (const at of [dataStart - 1, dataStart, dataStart + 1]) offsets.add(at);
  for (const info of reader.tensors.values()) {
    for (const at of [info.byteOffset, info.byteOffset + info.byteLength])
      for (const d of [-1, 0, 1]) offsets.add(at + d);
  }
  return [...offsets].filter((at) => at >= 0 && at < bytes.length).sort((a, b) => a - b);
}

test("a weights file cut at any region boundary is refused with a one-line error", async () => {
  await withTempDir(async (dir) => {
    let checked = 0;
    for (const family of FAMILIES) {
      const source = join(fixture(family, "base"), "model.safetensors");
      const bytes = new Uint8Array(await readFile(source));
      const whole = await SafetensorsReader.open(source);
      const cuts = boundaries(bytes, whole);
      await whole.close();
      const file = join(dir, `${family}.safetensors`);
      for (const at of cuts) {
        await writeFile(file, bytes.subarray(0, at));
        await assert.rejects(SafetensorsReader.open(file), (error: unknown) => {
          assert.ok(error instanceof BamError, `${family} cut at ${at}: ${String(error)}`);
          assert.ok(
            ["HEADER_INVALID", "DATA_INCOMPLETE", "INVALID_OFFSET"].includes(error.code),
            `${family} cut at ${at}: ${error.code}`,
          );
          assert.doesNotMatch(error.message, NOT_ONE_LINE);
          return true;
        });
        checked += 1;
      }
    }
    assert.ok(checked > 500, `${checked} cuts`);
  });
});
