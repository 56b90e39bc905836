/**
 * Tokenizer and other side files (tokenizer.json, tokenizer_config.json,
 * vocab.json, merges.txt, generation_config.json, chat_template.jinja):
 * corrupted, truncated, not UTF-8, huge, or odd files (links out of the
 * folder, to /dev/zero, FIFOs, folders, loops), in one seed or in both.
 *
 * Entry points: openSeed of each seed, then upcycle of the two seeds. A
 * success must copy the first seed's tokenizer byte for byte and nothing else
 * from outside the seed folders.
 */
import { cp, lstat, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { openSeed } from "../../../src/arch/index.js";
import { fixture } from "../../helpers.js";
import { type CaseContext, checkUpcycleSuccess, reportViolation, type Step } from "../harness.js";
import { upcycle } from "../../../src/upcycle/index.js";
import { deepJsonText, encoder, makeOddFile, mutateBytes, mutateText, ODD_FILES, type OddFile } from "../mutate.js";
import type { Rng } from "../rng.js";

const SIDE_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
  "chat_template.jinja",
  "tokenizer.model",
];

async function corruptContent(rng: Rng, original: Uint8Array): Promise<[Uint8Array, string]> {
  const text = new TextDecoder().decode(original);
  switch (rng.int(0, 8)) {
    case 0:
      return [original.slice(0, rng.int(0, original.length)), "truncated"];
    case 1:
      return mutateBytes(rng, original);
    case 2: {
      const [edited, note] = mutateText(rng, text);
      return [encoder.encode(edited), note];
    }
    case 3:
      return [new Uint8Array(0), "empty"];
    case 4:
      return [encoder.encode(rng.pick(["null", "[]", "1", '"x"', "{}", "\ufeff{}"])), "another JSON value"];
    case 5:
      return [encoder.encode(deepJsonText(rng.int(1000, 100_000))), "deeply nested"];
    case 6: {
      const padding = " ".repeat(rng.int(1, 3) * 1_000_000);
      return [encoder.encode(`${text.slice(0, -1)}${padding}}`), `${padding.length} bytes of padding`];
    }
    case 7:
      return [rng.bytes(rng.int(1, 4096)), "random bytes"];
    default: {
      try {
        const json = JSON.parse(text) as Record<string, unknown>;
        json.added_tokens = [{ id: 0, content: "\u001b[31m\n" }];
        return [encoder.encode(JSON.stringify(json)), "edited added_tokens (still valid JSON)"];
      } catch {
        return [original.slice(1), "first byte removed (the file was no longer JSON)"];
      }
    }
  }
}

export async function tokenizerCase(ctx: CaseContext): Promise<Step[]> {
  const { rng, dir, notes } = ctx;
  const seeds = [join(dir, "a"), join(dir, "b")];
  await cp(fixture("llama", "base"), seeds[0]!, { recursive: true });
  await cp(fixture("llama", "code"), seeds[1]!, { recursive: true });
  const edits = rng.int(1, 2);
  for (let i = 0; i < edits; i++) {
    const file = rng.weighted<string>([
      [6, "tokenizer.json"],
      [2, "tokenizer_config.json"],
      ...SIDE_FILES.slice(2).map((f) => [1, f] as const),
    ]);
    const where = rng.weighted<number[]>([
      [2, [0]],
      [2, [1]],
      [3, [0, 1]],
    ]);
    const odd = rng.chance(0.35);
    let content: Uint8Array | undefined;
    let kind: OddFile | undefined;
    if (odd) kind = rng.pick(ODD_FILES);
    else {
      const plain = (await lstat(join(seeds[0]!, file)).catch(() => undefined))?.isFile() ?? false;
      const existing = plain ? await readFile(join(seeds[0]!, file)) : encoder.encode('{"x": "side file"}\n');
      const [bytes, note] = await corruptContent(rng, new Uint8Array(existing));
      content = bytes;
      notes.push(`${file}: ${note}`);
    }
    for (const s of where) {
      const path = join(seeds[s]!, file);
      if (kind !== undefined) ctx.fifos.push(...(await makeOddFile(path, kind, join(ctx.outside, "secret.txt"))));
      else {
        await rm(path, { recursive: true, force: true }); // an earlier edit may have made it a folder or a link
        await writeFile(path, content!);
      }
    }
    if (kind !== undefined) notes.push(`${file} -> ${kind} in ${where.map((s) => "ab"[s]).join("+")}`);
    else notes.push(`in ${where.map((s) => "ab"[s]).join("+")}`);
  }
  const secret = await readFile(join(ctx.outside, "secret.txt"));
  const full = rng.chance(Math.max(ctx.upcycleRate, 0.3));
  const steps: Step[] = [
    { name: "openSeed a", run: async () => (await openSeed(seeds[0]!)).close() },
    { name: "openSeed b", run: async () => (await openSeed(seeds[1]!)).close() },
    // The dry run checks the side files too; the full run (sampled: a worker thread per run is slow) copies them.
    { name: "planUpcycle", upcycle: () => ({ seeds, output: ctx.output }), dryRun: true },
  ];
  if (full) {
    steps.push({
      name: "upcycle",
      run: async () => {
        const options = { seeds, output: ctx.output };
        const { plan } = await upcycle(options);
        for (const file of SIDE_FILES) {
          const copied = await readFile(join(ctx.output, file)).catch(() => undefined);
          if (copied === undefined) continue;
          if (Buffer.from(copied).equals(secret))
            reportViolation(`${file}: a file from outside the seed folder was copied into the output`);
          const info = await lstat(join(seeds[0]!, file)).catch(() => undefined);
          if (info?.isFile() && !Buffer.from(copied).equals(await readFile(join(seeds[0]!, file)))) {
            reportViolation(`${file}: the output's copy differs from the first seed's`);
          }
        }
        const violations: string[] = [];
        await checkUpcycleSuccess(options, plan, false, violations);
        violations.forEach(reportViolation);
      },
    });
  }
  return steps;
}
