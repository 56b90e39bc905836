/**
 * The plan/execute boundary: planUpcycle's plan is frozen plain data that
 * nothing changes (the output format is decided in it, upcycled_from is the
 * run's), and executePlan runs a plan, its JSON parsed back included, only
 * once it has checked it against the seeds as they are now.
 */
import assert from "node:assert/strict";
import { cp, readdir, readFile, rename, stat, utimes } from "node:fs/promises";
import { join } from "node:path";
import test from "node:test";
import { executePlan, planUpcycle, upcycle, type UpcycleOptions, type UpcyclePlan } from "../../src/upcycle/index.js";
import { fixture, refused, withTempDir } from "../helpers.js";

const qwen3 = [fixture("qwen3", "base"), fixture("qwen3", "code"), fixture("qwen3", "math")];

/** Every object and list reachable from `value` is frozen. */
function assertDeepFrozen(value: unknown, path: string): void {
  if (value === null || typeof value !== "object") return;
  assert.ok(Object.isFrozen(value), `${path} is frozen`);
  for (const [key, item] of Object.entries(value)) assertDeepFrozen(item, `${path}.${key}`);
}

/** File name -> bytes, of a folder. */
async function folderBytes(dir: string): Promise<Map<string, Buffer>> {
  const names = (await readdir(dir)).sort();
  return new Map(
    await Promise.all(names.map(async (name) => [name, await readFile(join(dir, name))] as [string, Buffer])),
  );
}

const jsonCopy = (plan: UpcyclePlan): UpcyclePlan => JSON.parse(JSON.stringify(plan)) as UpcyclePlan;

test("the plan is frozen, holds the format's decisions, and is the same after the run; upcycled_from is the run's hashes", async () => {
  await withTempDir(async (dir) => {
    for (const format of ["bam", "qwen3-moe"] as const) {
      const options: UpcycleOptions = { seeds: [...qwen3], output: join(dir, format), format, prompts: undefined };
      const plan = await planUpcycle(options);
      assertDeepFrozen(plan, "plan");
      assert.ok(!Object.isFrozen(options.seeds), "the caller's own list is not frozen");
      assert.equal(plan.format.remoteCode, format === "bam");
      assert.ok(
        !("upcycled_from" in plan.format.config) && !("upcycledFrom" in plan.moe),
        "the seeds' hashes are no plan fact",
      );
      // native names are the plan's: the executor writes them as planned
      if (format === "qwen3-moe")
        assert.equal(
          plan.format.tensorNames["model.layers.0.attn.q_proj.weight"],
          "model.layers.0.self_attn.q_proj.weight",
        );
      else assert.deepEqual(plan.format.tensorNames, {});
      const before = JSON.stringify(plan);
      const result = await executePlan(plan);
      assert.equal(JSON.stringify(plan), before);
      assert.equal(JSON.stringify(result.plan), before);
      const config = JSON.parse(await readFile(join(dir, format, "config.json"), "utf8")) as Record<string, unknown>;
      const { upcycled_from: upcycledFrom, ...rest } = config;
      assert.deepEqual(rest, plan.format.config, "config.json is the plan's config");
      assert.deepEqual(upcycledFrom, format === "bam" ? result.seeds : undefined);
      const header = (await readFile(join(dir, format, "model.safetensors"))).subarray(8, 400).toString("latin1");
      assert.match(
        header,
        format === "bam" ? /model\.layers\.\d+\.(attn|mlp)\./ : /model\.layers\.\d+\.(self_attn|mlp)\./,
      );
    }
  });
});

test("a plan's JSON parsed back runs to the folder upcycle writes, byte for byte", async () => {
  await withTempDir(async (dir) => {
    // weights that normalise to numbers normalising again moves by an ulp: the plan's own must still be accepted
    const options: UpcycleOptions = {
      seeds: [...qwen3],
      output: join(dir, "out"),
      weights: [6.4, 8.1, 5.1],
      attention: "shared-kv",
      maxShardSize: "100KB",
    };
    const plan = jsonCopy(await planUpcycle(options));
    await upcycle(options);
    await rename(join(dir, "out"), join(dir, "first"));
    const result = await executePlan(plan);
    assert.ok(result.files.length > 1, "sharded");
    const [first, again] = [await folderBytes(join(dir, "first")), await folderBytes(join(dir, "out"))];
    assert.deepEqual([...again.keys()], [...first.keys()]);
    for (const [name, bytes] of first) assert.ok(bytes.equals(again.get(name)!), name);
  });
});

test("a seed that changed since planning is refused (PLAN_STALE) and nothing is written", async () => {
  await withTempDir(async (dir) => {
    const seeds = ["base", "code", "math"].map((name) => join(dir, name));
    for (const [i, seed] of seeds.entries()) await cp(qwen3[i]!, seed, { recursive: true });
    const output = join(dir, "out");
    const plan = jsonCopy(await planUpcycle({ seeds, output }));
    // same size, new content: the math seed's weights copied over the code seed's
    await cp(join(seeds[2]!, "model.safetensors"), join(seeds[1]!, "model.safetensors"));
    await refused(
      executePlan(plan),
      "PLAN_STALE",
      /code\/model\.safetensors: was modified since the plan was made; make the plan again with planUpcycle$/,
    );
    const when = (await stat(join(seeds[1]!, "config.json"))).mtime;
    const fresh = jsonCopy(await planUpcycle({ seeds, output }));
    await utimes(join(seeds[1]!, "config.json"), when, new Date(when.getTime() + 5000));
    await refused(executePlan(fresh), "PLAN_STALE", /code\/config\.json: was modified since the plan was made/);
    assert.deepEqual((await readdir(dir)).sort(), ["base", "code", "math"], "nothing written");
  });
});

test("a plan that is not what its options give for its seeds is refused (PLAN_INVALID), naming the first difference", async () => {
  await withTempDir(async (dir) => {
    const plan = await planUpcycle({ seeds: [...qwen3], output: join(dir, "out") });
    /** A JSON copy of the plan with the value at a dotted path (list indices as numbers) replaced. */
    const edited = (path: string, value: unknown) => {
      const copy = jsonCopy(plan);
      const keys = path.split(".");
      let at = copy as unknown as Record<string, unknown>;
      for (const key of keys.slice(0, -1)) at = at[key] as Record<string, unknown>;
      at[keys.at(-1)!] = value;
      return copy;
    };
    const unreadable = jsonCopy(plan);
    Object.defineProperty(unreadable.options, "seed", {
      get: () => {
        throw new Error("boom");
      },
      enumerable: true,
    });
    const cases: Array<[unknown, RegExp]> = [
      [null, /^plan: not an object; pass what planUpcycle returned/],
      ["plan.json", /^plan: not an object/],
      [{ tensors: [] }, /^plan: has no options/],
      [edited("options.expertsPerToken", 0), /^plan: options: expertsPerToken must be an integer from 1 to 3, not 0/],
      [edited("options.seeds", "base"), /^plan: options: seeds must be a list of folder paths/],
      [
        edited("options.expertsPerToken", 2),
        /^plan\.moe\.expertsPerToken is 1 in the plan, but 2 from its options and seeds .*make the plan again with planUpcycle$/,
      ],
      [edited("format.config.num_experts", 8), /^plan\.format\.config\.num_experts is 8 in the plan, but 3 /],
      [
        edited("format.config.auto_map", "evil.Model"),
        /^plan\.format\.config\.auto_map is "evil\.Model" in the plan, but an object /,
      ],
      [
        edited("tensors.1.operation.from.0.seed", 5),
        /^plan\.tensors\[1\]\.operation\.from\[0\]\.seed is 5 in the plan, but 0 /,
      ],
      [edited("tensors.length", plan.tensors.length - 1), /^plan\.tensors\.length is \d+ in the plan, but \d+ /],
      [edited("tensors.0.shape", [1e12, 1e12]), /^plan\.tensors\[0\]\.shape\[0\] is 1000000000000 in the plan/],
      [
        edited("format.tensorNames", { "model.norm.weight": "../../escape" }),
        /^plan\.format\.tensorNames\.model\.norm\.weight is "\.\.\/\.\.\/escape" in the plan, but absent /,
      ],
      [edited("extra", 1), /^plan\.extra is 1 in the plan, but absent /],
      [edited("options.dtype", "f16"), /^plan\.format\.config\.dtype is "float32" in the plan, but "float16" /],
      [unreadable, /^plan: cannot be read \(boom\)/],
    ];
    for (const [bad, message] of cases) await refused(executePlan(bad as UpcyclePlan), "PLAN_INVALID", message);
    assert.deepEqual(await readdir(dir), [], "nothing written");
    // an option the plan records nowhere else gives what planning with it gives
    const moved = await executePlan(edited("options.output", join(dir, "elsewhere")));
    assert.equal(moved.output, join(dir, "elsewhere"));
    assert.deepEqual(await readdir(dir), ["elsewhere"]);
  });
});
