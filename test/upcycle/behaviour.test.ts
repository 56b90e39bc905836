/**
 * The upcycler's other promises on the fixtures: refusals before any write,
 * atomic output, determinism, sparse upcycling and Drop-Upcycling, dtype
 * conversion, sharding, the recipe, and the dry-run plan.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cp, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { openSeed } from "../../src/arch/index.js";
import { openModel } from "../../src/arch/model.js";
import { isBamError, type ErrorCode } from "../../src/errors.js";
import { toFloat32 } from "../../src/safetensors/index.js";
import { planUpcycle, readRecipe, upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { bytesEqual, fixture, fixtureFamilies, withTempDir } from "../helpers.js";

const families = fixtureFamilies();
const skip = families.length === 0 ? "fixtures not made yet" : false;
const llama = () => fixture("llama", "base");

async function expectRefusal(options: UpcycleOptions, code: ErrorCode, pattern: RegExp): Promise<void> {
  await assert.rejects(upcycle(options), (error: unknown) => {
    assert.ok(isBamError(error, code), `expected ${code}, got ${String(error)}`);
    assert.match((error as Error).message, pattern);
    assert.doesNotMatch((error as Error).message, /\n/, "one line");
    return true;
  });
}

async function folderHashes(dir: string): Promise<Record<string, string>> {
  const hashes: Record<string, string> = {};
  for (const file of (await readdir(dir)).sort()) {
    hashes[file] = createHash("sha256")
      .update(await readFile(join(dir, file)))
      .digest("hex");
  }
  return hashes;
}

test("mismatched seeds are refused before any write, naming both seeds", { skip }, () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    const other = families.find((f) => f !== "llama")!;
    await expectRefusal(
      { seeds: [llama(), fixture(other, "base")], output: out },
      "SEED_MISMATCH",
      /seed .*base.* differs from seed .*base/,
    );
    assert.deepEqual(await readdir(dir), [], "nothing written, no temporary folder");
  }),
);

test("a seed with another tokenizer is refused", { skip }, () =>
  withTempDir(async (dir) => {
    const odd = join(dir, "odd");
    await cp(llama(), odd, { recursive: true });
    const tokenizer = JSON.parse(await readFile(join(odd, "tokenizer.json"), "utf8"));
    tokenizer.added_tokens = [...(tokenizer.added_tokens ?? []), { id: 999999, content: "<odd>", special: true }];
    await writeFile(join(odd, "tokenizer.json"), JSON.stringify(tokenizer));
    await expectRefusal({ seeds: [llama(), odd], output: join(dir, "out") }, "SEED_MISMATCH", /tokenizer/);
  }),
);

test("an existing output folder is kept unless --force, then replaced whole", { skip }, () =>
  withTempDir(async (dir) => {
    const out = join(dir, "out");
    await mkdir(out);
    await writeFile(join(out, "keep.txt"), "mine");
    await expectRefusal({ seeds: [llama(), llama()], output: out }, "OUTPUT_EXISTS", /--force/);
    assert.deepEqual(await readdir(out), ["keep.txt"]);
    // --force replaces only a folder bam wrote (test/reliability/output.test.ts has the rest)
    await expectRefusal(
      { seeds: [llama(), llama()], output: out, force: true },
      "OUTPUT_EXISTS",
      /not a folder bam wrote/,
    );
    await rm(join(out, "keep.txt"));
    await upcycle({ seeds: [llama(), llama()], output: out });
    await writeFile(join(out, "keep.txt"), "mine");
    await upcycle({ seeds: [llama(), llama()], output: out, force: true });
    assert.ok(!(await readdir(out)).includes("keep.txt"));
    assert.deepEqual((await readdir(dir)).sort(), ["out"], "no temporary folders left");
  }),
);

test("an aborted run leaves no output and no temporary folder", { skip }, () =>
  withTempDir(async (dir) => {
    const controller = new AbortController();
    const run = upcycle(
      { seeds: [llama(), llama(), llama()], output: join(dir, "out") },
      {
        signal: controller.signal,
        onProgress: () => controller.abort(),
      },
    );
    await assert.rejects(run, (error: unknown) => isBamError(error, "ABORTED"));
    assert.deepEqual(await readdir(dir), []);
  }),
);

test("two runs give byte-identical folders; shard size changes files, not tensors", { skip }, () =>
  withTempDir(async (dir) => {
    const seeds = [llama(), fixture("llama", "code"), fixture("llama", "math")];
    await upcycle({ seeds, output: join(dir, "a"), seed: 7 });
    const first = await folderHashes(join(dir, "a"));
    await upcycle({ seeds, output: join(dir, "a"), seed: 7, force: true });
    assert.deepEqual(await folderHashes(join(dir, "a")), first);
    await upcycle({ seeds, output: join(dir, "c"), seed: 7, maxShardSize: 40_000 });
    await upcycle({ seeds, output: join(dir, "d"), seed: 8 });
    const [single, sharded, reseeded] = await Promise.all(["a", "c", "d"].map((name) => openModel(join(dir, name))));
    try {
      assert.ok(sharded!.files.length >= 2, "several shards");
      assert.deepEqual([...sharded!.tensors.keys()], [...single!.tensors.keys()]);
      for (const name of single!.tensors.keys())
        assert.ok(bytesEqual(await sharded!.read(name), await single!.read(name)), name);
      const router = "model.layers.0.mlp.router.weight";
      assert.ok(!bytesEqual(await reseeded!.read(router), await single!.read(router)), "--seed changes the routers");
    } finally {
      await Promise.all([single, sharded, reseeded].map((m) => m!.close()));
    }
  }),
);

test("sparse upcycling copies one seed's FFN into N experts; Drop-Upcycling redraws a fraction", { skip }, () =>
  withTempDir(async (dir) => {
    const seed = await openSeed(llama());
    await upcycle({ seeds: [llama()], output: join(dir, "sparse"), experts: 4 });
    await upcycle({ seeds: [llama()], output: join(dir, "drop"), experts: 4, dropRatio: 0.5, seed: 3 });
    const sparse = await openModel(join(dir, "sparse"));
    const drop = await openModel(join(dir, "drop"));
    try {
      assert.equal(sparse.moe.numExperts, 4);
      assert.equal(sparse.moe.attentionExperts, "merged", "one seed: attention stays merged");
      const gate = await seed.read("model.layers.0.mlp.up_proj.weight");
      const [rows, cols] = seed.tensors.get("model.layers.0.mlp.up_proj.weight")!.shape as [number, number];
      const original = toFloat32(gate, "F32");
      const droppedRowSets: string[] = [];
      for (let e = 0; e < 4; e++) {
        const name = `model.layers.0.mlp.experts.${e}.up_proj.weight`;
        assert.ok(bytesEqual(await sparse.read(name), gate), `${name} is the seed's`);
        const dropped = toFloat32(await drop.read(name), "F32");
        const changedRows: number[] = [];
        for (let r = 0; r < rows; r++) {
          const same = original.subarray(r * cols, (r + 1) * cols).every((v, c) => v === dropped[r * cols + c]);
          if (!same) changedRows.push(r);
        }
        assert.equal(changedRows.length, Math.round(0.5 * rows), `expert ${e} redraws half its rows`);
        const down = toFloat32(await drop.read(`model.layers.0.mlp.experts.${e}.down_proj.weight`), "F32");
        const downOriginal = toFloat32(await seed.read("model.layers.0.mlp.down_proj.weight"), "F32");
        const hidden = seed.features.hiddenSize;
        const changedColumns = [...Array(rows).keys()].filter((c) =>
          [...Array(hidden).keys()].some((r) => down[r * rows + c] !== downOriginal[r * rows + c]),
        );
        assert.deepEqual(changedColumns, changedRows, "down_proj drops the same dimensions, as columns");
        droppedRowSets.push(changedRows.join(","));
      }
      assert.equal(new Set(droppedRowSets).size, 4, "each expert drops different dimensions");
    } finally {
      await Promise.all([sparse.close(), drop.close(), seed.close()]);
    }
  }),
);

test("--dtype bf16 rounds every tensor, and a bf16 seed mixes with f32 seeds as f32", { skip }, () =>
  withTempDir(async (dir) => {
    await upcycle({ seeds: [llama(), fixture("llama", "code")], output: join(dir, "bf16"), dtype: "bf16" });
    const model = await openModel(join(dir, "bf16"));
    try {
      assert.deepEqual(new Set([...model.tensors.values()].map((t) => t.dtype)), new Set(["BF16"]));
    } finally {
      await model.close();
    }
    const plan = await planUpcycle({ seeds: [llama(), fixture("llama", "bf16")], output: join(dir, "mixed") });
    assert.ok(plan.tensors.filter((t) => t.operation.kind === "average").every((t) => t.dtype === "F32"));
  }),
);

test("the recipe written into the output reproduces the model", { skip }, () =>
  withTempDir(async (dir) => {
    await upcycle({
      seeds: [llama(), fixture("llama", "code")],
      output: join(dir, "first"),
      attention: "shared-kv",
      expertsPerToken: 2,
      seed: 5,
    });
    const recipe = await readRecipe(join(dir, "first", "recipe.yaml"));
    await upcycle({ ...(recipe as UpcycleOptions), output: join(dir, "second") });
    const first = await folderHashes(join(dir, "first"));
    const second = await folderHashes(join(dir, "second"));
    for (const file of Object.keys(first).filter((f) => f.endsWith(".safetensors")))
      assert.equal(second[file], first[file], file);
  }),
);

test("the dry-run plan counts parameters and FLOPs", { skip }, async () => {
  const seeds = [llama(), fixture("llama", "code"), fixture("llama", "math")];
  const moa = await planUpcycle({ seeds, output: "unused" });
  const btx = await planUpcycle({ seeds, output: "unused", attention: "merged", expertsPerToken: 2 });
  const seed = await openSeed(llama());
  const size = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
  let perExpert = 0;
  for (const t of seed.tensors.values()) if (/\.(attn|mlp)\./.test(t.name)) perExpert += size(t.shape);
  await seed.close();
  const seedParams = moa.summary.seedParameters;
  const routers = 2 * moa.features.numLayers * 3 * moa.features.hiddenSize;
  assert.equal(
    moa.summary.totalParameters,
    seedParams + 2 * perExpert + routers,
    "two more copies of attention and FFN, plus routers",
  );
  assert.ok(moa.summary.activeParameters < moa.summary.totalParameters);
  assert.ok(
    moa.summary.flopsPerTokenRatio > btx.summary.flopsPerTokenRatio,
    "soft attention runs every attention expert",
  );
  assert.ok(btx.summary.activeParameters > seedParams, "top-2 of 3");
  assert.equal(moa.tensors.filter((t) => t.operation.kind === "router").length, 2 * moa.features.numLayers);
});
