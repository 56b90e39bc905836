/**
 * Python's safetensors and transformers load what we write, today: every case of ./cases.ts (each family
 * in each attention mode, and the native formats) is built and run through scripts/check_transformers.py
 * with the pinned torch and transformers of requirements.txt (CPU in CI): each safetensors file through
 * safetensors.torch.load_file, each folder through AutoModelForCausalLM.from_pretrained (trust_remote_code
 * for the bam format, stock classes for native ones), its logits against the ones transformers computed
 * for the seed (fixtures/<family>/reference.safetensors).
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { FIXTURES, withTempDir } from "../helpers.js";
import { NO_TORCH, runPython } from "../pytorch/python.js";
import { buildEvidence, evidenceCases } from "./cases.js";

interface EvidenceCaseResult {
  name: string;
  ok: boolean;
  max_abs_error_cpu?: number;
}

test("every case loads in transformers and gives the seed's logits", { skip: NO_TORCH }, () =>
  withTempDir(async (dir) => {
    const cases = join(dir, "cases");
    const built = await buildEvidence(cases);
    const report = join(dir, "transformers.json");
    runPython(["scripts/check_transformers.py", cases, FIXTURES, report]);
    const evidence = JSON.parse(await readFile(report, "utf8")) as { tolerance: number; cases: EvidenceCaseResult[] };
    assert.equal(evidence.cases.length, built, "every case checked");
    assert.deepEqual(evidence.cases.map((c) => c.name).sort(), (await evidenceCases()).map((c) => c.name).sort());
    for (const c of evidence.cases) {
      assert.ok(c.ok, `${c.name} failed in transformers`);
      assert.ok(
        c.max_abs_error_cpu !== undefined && c.max_abs_error_cpu <= 1e-4,
        `${c.name}: logits off by ${c.max_abs_error_cpu}`,
      );
    }
  }),
);
