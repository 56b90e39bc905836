/**
 * onProgress reports every long stage, in order: the routers from prompts
 * (counted in prompts), the output's bytes, then the seed files still being
 * hashed for upcycled_from, which a fresh hash cache makes all of them.
 */
import assert from "node:assert/strict";
import { stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { upcycle, type UpcycleProgress } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";

/** Runs body with BAM_CACHE_DIR (the seed hash cache) set to a fresh folder, so every seed file is hashed. */
async function withFreshCache<T>(dir: string, body: () => Promise<T>): Promise<T> {
  const saved = process.env.BAM_CACHE_DIR;
  process.env.BAM_CACHE_DIR = join(dir, "cache");
  try {
    return await body();
  } finally {
    if (saved === undefined) delete process.env.BAM_CACHE_DIR;
    else process.env.BAM_CACHE_DIR = saved;
  }
}

test("onProgress sees router-init, writing and hashing, in that order, each counting up to its total", () =>
  withTempDir(async (dir) => {
    const seeds = ["base", "code", "math"].map((v) => fixture("llama", v as "base"));
    const prompts = join(dir, "prompts.yaml");
    await writeFile(
      prompts,
      JSON.stringify({
        experts: [
          { positive_prompts: ["Once upon a time", "The cat sat"] },
          { positive_prompts: ["def f(x): return x"], negative_prompts: ["Rain fell."] },
          { positive_prompts: ["Let x be a real number"] },
        ],
      }),
    );
    const events: UpcycleProgress[] = [];
    const result = await withFreshCache(dir, () =>
      upcycle(
        { seeds, output: join(dir, "out"), routerInit: "hidden", prompts },
        { onProgress: (p) => events.push({ ...p }) },
      ),
    );

    const stages = events.map((e) => e.stage).filter((stage, i, all) => stage !== all[i - 1]);
    assert.deepEqual(stages, ["router-init", "writing", "hashing"]);
    const of = (stage: string) => events.filter((e) => e.stage === stage);
    for (const stage of ["router-init", "writing", "hashing"]) {
      const list = of(stage);
      const last = list.at(-1)!;
      assert.equal(last.done, last.total, `${stage} ends complete`);
      assert.ok(
        list.every((e, i) => e.done <= e.total && (i === 0 || e.done >= list[i - 1]!.done)),
        `${stage} counts up`,
      );
    }
    assert.equal(of("router-init").at(-1)!.total, 5, "every prompt, negative ones included");
    assert.equal(of("writing").at(-1)!.done, result.bytesWritten);
    // A fresh hash cache: every seed file is hashed (the threads may have finished before the copy did).
    const seedBytes = (
      await Promise.all(seeds.flatMap((s) => ["config.json", "model.safetensors"].map((f) => stat(join(s, f)))))
    ).reduce((sum, s) => sum + s.size, 0);
    assert.ok(
      of("hashing").at(-1)!.total === seedBytes && of("hashing").every((e) => e.bytesWritten === result.bytesWritten),
    );
  }));
