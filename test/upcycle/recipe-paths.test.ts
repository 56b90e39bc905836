/**
 * Recipe paths: seeds, shared-from and a prompts file resolve relative to the
 * recipe file (a Hugging Face id with no such folder stays an id), and the
 * recipe written into an output reproduces it from any folder: seeds as
 * absolute paths, prompts inline.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFile, cp, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import YAML from "yaml";
import { readRecipe, upcycle } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

function bam(args: string[], cwd: string): void {
  const run = spawnSync(process.execPath, [CLI, ...args], {
    cwd,
    encoding: "utf8",
    env: { ...process.env, BAM_CACHE_DIR: join(cwd, ".cache") },
  });
  assert.equal(run.status, 0, run.stderr);
}

async function weights(folder: string): Promise<Map<string, Buffer>> {
  const files = (await readdir(folder)).filter((f) => f.endsWith(".safetensors")).sort();
  return new Map(await Promise.all(files.map(async (f) => [f, await readFile(join(folder, f))] as [string, Buffer])));
}

const PROMPTS = {
  experts: [
    { positive_prompts: ["Once upon a time"], negative_prompts: ["def f(x):"] },
    { positive_prompts: ["def f(x): return x"] },
    { positive_prompts: ["Let x be a real number"] },
  ],
};

test("paths in a recipe are relative to the recipe's folder; an id with no such folder stays an id", () =>
  withTempDir(async (dir) => {
    await mkdir(join(dir, "recipes"));
    for (const v of ["base", "code"])
      await cp(fixture("llama", v as "base"), join(dir, "seeds", v), { recursive: true });
    const file = join(dir, "recipes", "r.yaml");
    await writeFile(join(dir, "recipes", "p.yaml"), YAML.stringify(PROMPTS));
    await writeFile(
      file,
      YAML.stringify({
        seeds: ["../seeds/base", "../seeds/code", "org/math@v1"],
        "shared-from": "../seeds/base",
        "router-init": "cheap-embed",
        prompts: "p.yaml",
      }),
    );
    assert.deepEqual(await readRecipe(file), {
      seeds: [join(dir, "seeds", "base"), join(dir, "seeds", "code"), "org/math@v1"],
      sharedFrom: join(dir, "seeds", "base"),
      routerInit: "cheap-embed",
      prompts: join(dir, "recipes", "p.yaml"),
    });
    await writeFile(file, YAML.stringify({ seeds: ["../seeds/base"], "router-init": "hidden", prompts: PROMPTS }));
    assert.deepEqual((await readRecipe(file)).prompts, PROMPTS, "prompts inline: the mapping itself");
  }));

test("an output's recipe.yaml, copied elsewhere and run from another folder, gives byte-equal weights", () =>
  withTempDir(async (dir) => {
    const work = join(dir, "work");
    await mkdir(join(work, "seeds"), { recursive: true });
    for (const v of ["base", "code", "math"])
      await cp(fixture("llama", v as "base"), join(work, "seeds", v), { recursive: true });
    await writeFile(join(work, "prompts.yaml"), YAML.stringify(PROMPTS));
    // Relative paths on the command line, from the work folder.
    bam(
      [
        "upcycle",
        "seeds/base",
        "seeds/code",
        "seeds/math",
        "-o",
        "first",
        "--router-init",
        "cheap-embed",
        "--prompts",
        "prompts.yaml",
        "--shared-from",
        "seeds/base",
      ],
      work,
    );
    const written = YAML.parse(await readFile(join(work, "first", "recipe.yaml"), "utf8")) as Record<string, unknown>;
    assert.deepEqual(
      written.seeds,
      ["base", "code", "math"].map((v) => join(work, "seeds", v)),
      "seeds as absolute paths",
    );
    assert.equal(written["shared-from"], join(work, "seeds", "base"));
    assert.deepEqual(written.prompts, PROMPTS, "prompts inline, as read");

    await mkdir(join(dir, "elsewhere"));
    await mkdir(join(dir, "other"));
    await copyFile(join(work, "first", "recipe.yaml"), join(dir, "elsewhere", "copy.yaml"));
    await rm(join(work, "prompts.yaml")); // the copy needs it no more
    bam(["upcycle", "--recipe", "../elsewhere/copy.yaml", "-o", "x"], join(dir, "other"));
    const first = await weights(join(work, "first"));
    assert.ok(first.size > 0);
    assert.deepEqual(await weights(join(dir, "other", "x")), first);
  }));

test("the API takes prompts inline as it takes a file", () =>
  withTempDir(async (dir) => {
    const seeds = ["base", "code", "math"].map((v) => fixture("llama", v as "base"));
    const file = join(dir, "p.yaml");
    await writeFile(file, YAML.stringify(PROMPTS));
    const a = await upcycle({ seeds, output: join(dir, "a"), routerInit: "cheap-embed", prompts: file });
    const b = await upcycle({ seeds, output: join(dir, "b"), routerInit: "cheap-embed", prompts: PROMPTS });
    assert.deepEqual(await weights(b.output), await weights(a.output));
  }));
