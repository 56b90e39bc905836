/** The README's API example (examples/merge.mjs) runs as written and imports the package by name. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { withTempDir } from "../helpers.js";

test("examples/merge.mjs upcycles the qwen3 fixtures through the public API", () =>
  withTempDir(async (dir) => {
    const out = join(dir, "example");
    const run = spawnSync(process.execPath, ["examples/merge.mjs", out], { encoding: "utf8" });
    assert.equal(run.status, 0, run.stderr);
    assert.match(run.stdout, /3 experts, .* the FLOPs of one seed/);
    assert.ok((await readdir(out)).includes("model.safetensors"));
  }));
