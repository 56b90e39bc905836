/** modeling_bam.py's own unit tests (test/python/test_modeling.py), run with the python3 that has torch. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";
import { NO_TORCH, PYTHON } from "./python.js";

test("python -m unittest test/python (modeling_bam.py on CPU)", { skip: NO_TORCH }, () => {
  const run = spawnSync(PYTHON!, ["-m", "unittest", "discover", "-s", "test/python", "-p", "test_*.py"], {
    encoding: "utf8",
  });
  const summary = run.stderr
    .split("\n")
    .filter((line) => /^(Ran|OK|FAILED)/.test(line))
    .join("; ");
  assert.equal(run.status, 0, `${summary}\n${run.stderr.slice(-4000)}`);
  assert.match(summary, /Ran [1-9]\d* tests?/, "ran some tests");
});
