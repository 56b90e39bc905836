/**
 * Python's safetensors and transformers load what we write (checked once on
 * the GPU machine, fixtures/evidence/transformers.json), and what we write
 * today is byte for byte what was checked. If an intended change alters the
 * output bytes, rebuild the evidence: see scripts/check_transformers.py.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { FIXTURES, withTempDir } from "../helpers.js";
import { buildCase, evidenceCases, folderHashes } from "./cases.js";

interface EvidenceCaseResult {
  name: string;
  files: Record<string, string>;
  ok: boolean;
  max_abs_error_cpu?: number;
  max_abs_error_cuda?: number;
}

const file = join(FIXTURES, "evidence", "transformers.json");
const evidence = existsSync(file) ? (JSON.parse(readFileSync(file, "utf8")) as { device: string; cases: EvidenceCaseResult[] }) : null;

test("every case passed in transformers, on CPU and on the GPU", { skip: evidence ? false : "no evidence yet" }, () => {
  assert.notEqual(evidence!.device, "cpu", "the evidence comes from the GPU machine");
  for (const c of evidence!.cases) {
    assert.ok(c.ok, `${c.name} failed in transformers`);
    assert.ok(c.max_abs_error_cpu! <= 1e-4 && c.max_abs_error_cuda! <= 1e-4, `${c.name}: logits off by ${c.max_abs_error_cpu} / ${c.max_abs_error_cuda}`);
  }
});

test("today's output is byte for byte what transformers loaded", { skip: evidence ? false : "no evidence yet" }, () =>
  withTempDir(async (dir) => {
    const checked = new Map(evidence!.cases.map((c) => [c.name, c.files]));
    const cases = await evidenceCases();
    assert.deepEqual(cases.map((c) => c.name).sort(), [...checked.keys()].sort(), "the same cases");
    // recipe.yaml and README.md name the output path, which differs here; transformers reads neither.
    const loaded = (hashes: Record<string, string>) => Object.fromEntries(Object.entries(hashes).filter(([file]) => !/^(recipe\.yaml|README\.md)$/.test(file)));
    for (const c of cases) {
      await buildCase(c, join(dir, c.name));
      assert.deepEqual(loaded(await folderHashes(join(dir, c.name))), loaded(checked.get(c.name)!), `${c.name}: output changed since the evidence; rerun scripts/check_transformers.py`);
    }
  }));
