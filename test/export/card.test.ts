/**
 * The model card the Hub reads: its front matter parsed with the yaml
 * package, every key checked; base_model holds repo ids only (a local seed
 * counts by its config's _name_or_path); --name is the title; the load
 * snippet runs under transformers against the very output (remote code for
 * bam, stock for mixtral), and the fine-tune line is README's own.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cp, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import YAML from "yaml";
import { finetuneCommand, loadSnippet } from "../../src/export/card.js";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, refused, withTempDir } from "../helpers.js";
import { NO_TORCH, PYTHON } from "../pytorch/python.js";

async function card(output: string): Promise<{ meta: Record<string, unknown>; body: string }> {
  const text = await readFile(join(output, "README.md"), "utf8");
  const match = /^---\n([\s\S]*?)\n---\n([\s\S]*)$/.exec(text);
  assert.ok(match, "the card starts with YAML front matter");
  return { meta: YAML.parse(match[1]!) as Record<string, unknown>, body: match[2]! };
}

/** A copy of a fixture seed whose config names the repository it came from, as transformers writes it. */
async function namedSeed(dir: string, nameOrPath: string): Promise<string> {
  const seed = join(dir, "named-code");
  await cp(fixture("llama", "code"), seed, { recursive: true });
  const config = JSON.parse(await readFile(join(seed, "config.json"), "utf8")) as Record<string, unknown>;
  await writeFile(join(seed, "config.json"), JSON.stringify({ ...config, _name_or_path: nameOrPath }));
  return seed;
}

describe("model card", () => {
  test("front matter: base_model as repo ids, merge relation, tags, library; --name is the title; local folders named in the text", () =>
    withTempDir(async (dir) => {
      const seeds = [fixture("llama", "base"), await namedSeed(dir, "org/code-model"), fixture("llama", "math")];
      const result = await upcycle({ seeds, output: join(dir, "out"), name: "Tiny BAM 3x" });
      const { meta, body } = await card(result.output);
      assert.deepEqual(meta, {
        base_model: ["org/code-model"],
        base_model_relation: "merge",
        tags: ["moe", "bam", "merge", "mixture-of-experts"],
        library_name: "transformers",
      });
      assert.match(body, /^\n# Tiny BAM 3x\n/);
      assert.match(body, /local folders, with no Hugging Face id: `base`, `math`/);
      assert.ok(body.includes(loadSnippet(result.output, true)));
      assert.ok(body.includes(finetuneCommand(result.output)));
      assert.match(await readFile(join(result.output, "recipe.yaml"), "utf8"), /^name: Tiny BAM 3x$/m);
    }));

  test("no repo id known: no base_model (nor relation), the title is the folder's name; a local path in _name_or_path is no id", () =>
    withTempDir(async (dir) => {
      const seeds = [fixture("llama", "base"), await namedSeed(dir, "/home/me/ckpt"), fixture("llama", "math")];
      const result = await upcycle({ seeds, output: join(dir, "bam-out") });
      const { meta, body } = await card(result.output);
      assert.deepEqual(meta, { tags: ["moe", "bam", "merge", "mixture-of-experts"], library_name: "transformers" });
      assert.match(body, /^\n# bam-out\n/);
    }));

  test("the fine-tune line is README's, and a name of several lines is refused", async () => {
    const readme = await readFile("README.md", "utf8");
    assert.ok(readme.includes(finetuneCommand("bam3")), "README's one-GPU line");
    await refused(
      upcycle({ seeds: [fixture("llama", "base")], output: "never", name: "two\nlines" }),
      "OPTIONS_INVALID",
      /^name must be one line/,
    );
  });

  test(
    "the load snippet loads the output with transformers: remote code for bam, stock for mixtral",
    { skip: NO_TORCH },
    () =>
      withTempDir(async (dir) => {
        const seeds = ["base", "code"].map((v) => fixture("mistral", v as "base"));
        for (const format of ["bam", "mixtral"] as const) {
          const output = join(dir, format);
          await upcycle({
            seeds,
            output,
            format,
            attention: "merged",
            block: "sequential",
            normTopkProb: true,
            expertsPerToken: 2,
          });
          const snippet = /```python\n([\s\S]*?)```/.exec((await card(output)).body)![1]!;
          assert.equal(snippet, loadSnippet(output, format === "bam"));
          const printed = execFileSync(
            PYTHON!,
            [
              "-c",
              `${snippet}print(type(model).__name__, model.config.num_local_experts if hasattr(model.config, "num_local_experts") else model.config.num_experts, len(tokenizer("hi").input_ids) > 0)`,
            ],
            { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
          );
          assert.match(printed.trim(), new RegExp(`^${format === "bam" ? "Bam" : "Mixtral"}\\w*ForCausalLM 2 True$`));
        }
      }),
  );
});
