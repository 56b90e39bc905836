/**
 * Sharded folders: `model.safetensors.index.json` edited (shards missing,
 * named with `..` or absolute paths, linked out of the folder, a tensor in two
 * shards, duplicated tensors, wrong types, broken JSON) and the folder itself
 * changed (odd files in place of shards or of the index, two indexes, pickle
 * only, the Hugging Face cache layout of links into `blobs/`).
 *
 * Entry points: CheckpointFiles.open and read, openModel, then an upcycle.
 */
import { cp, lstat, mkdir, readdir, readFile, rename, rm, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { openModel } from "../../../src/arch/model.js";
import { FAMILIES } from "../../../src/arch/types.js";
import { CheckpointFiles } from "../../../src/safetensors/index.js";
import { fixture } from "../../helpers.js";
import { type CaseContext, maybeUpcycle, type Step } from "../harness.js";
import {
  deepJsonText,
  encoder,
  makeFifo,
  makeOddFile,
  mutateBytes,
  mutateTextRepeatedly,
  ODD_FILES,
  oddJsonValue,
} from "../mutate.js";
import type { Rng } from "../rng.js";
import { mutatedSafetensors } from "./safetensors.js";

const INDEX = "model.safetensors.index.json";

interface Index {
  metadata?: unknown;
  weight_map?: unknown;
  [key: string]: unknown;
}

type FolderOp = (rng: Rng, seed: string, index: Index, ctx: CaseContext, shards: string[]) => Promise<string>;

const isPlainFile = async (path: string) => (await lstat(path).catch(() => undefined))?.isFile() ?? false;

/** The weight_map when it is still an object (an earlier edit may have replaced it), else a detached one. */
const weightMap = (index: Index): Record<string, unknown> =>
  index.weight_map !== null && typeof index.weight_map === "object" && !Array.isArray(index.weight_map)
    ? (index.weight_map as Record<string, unknown>)
    : {};

const OPS: ReadonlyArray<readonly [number, FolderOp]> = [
  [
    6,
    async (rng, _seed, index, ctx, shards) => {
      const map = weightMap(index);
      if (Object.keys(map).length === 0) return "weight_map has no entries to edit";
      const name = rng.pick(Object.keys(map));
      const value = rng.pick<() => unknown>([
        () => "",
        () => ".",
        () => "..",
        () => "../outside/secret.safetensors",
        () => join(ctx.outside, "secret.safetensors"),
        () => "/etc/passwd",
        () => "/dev/zero",
        () => `sub/../${shards[0]}`,
        () => `./${shards[0]}`,
        () => "model-00009-of-00009.safetensors",
        () => rng.pick(shards),
        () => `a\u0000b.safetensors`,
        () => "..\\outside\\secret.safetensors",
        () => "%2e%2e/outside/secret.safetensors",
        () => "s".repeat(5000),
        () => "dirshard",
        () => "sub/",
        () => 1,
        () => null,
        () => [shards[0]],
        () => ({ file: shards[0] }),
      ])();
      map[name] = value;
      return `weight_map[${name}] -> ${JSON.stringify(value)?.slice(0, 60)}`;
    },
  ],
  [
    2,
    async (rng, _seed, index) => {
      const map = weightMap(index);
      if (Object.keys(map).length === 0) return "weight_map has no entries to remove";
      const name = rng.pick(Object.keys(map));
      delete map[name];
      return `weight_map lacks ${name}`;
    },
  ],
  [
    2,
    async (rng, _seed, index, _ctx, shards) => {
      const map = weightMap(index);
      const name = rng.pick([
        "model.extra.weight",
        "__proto__",
        "constructor",
        "",
        "\n",
        (Object.keys(map)[0] ?? "x").toUpperCase(),
      ]);
      map[name] = rng.pick(shards);
      return `weight_map lists an absent tensor ${JSON.stringify(name)}`;
    },
  ],
  [
    2,
    async (rng, _seed, index) => {
      const field = rng.pick(["weight_map", "metadata"]);
      const value = rng.pick<() => unknown>([
        () => null,
        () => [],
        () => "x",
        () => 1,
        () => ({}),
        () => ({ total_size: "x" }),
        () => ({ total_size: -1 }),
        () => oddJsonValue(rng),
      ])();
      if (rng.chance(0.2)) delete index[field];
      else index[field] = value;
      return `${field} -> ${JSON.stringify(value)?.slice(0, 60)}`;
    },
  ],
  [
    2,
    async (rng, seed, index, _ctx, shards) => {
      // A tensor in two shards: a copy of a shard under another name, listed for one of its tensors, or linked.
      const shard = rng.pick(shards);
      const copy = rng.pick(["copy.safetensors", "link.safetensors"]);
      await rm(join(seed, copy), { force: true });
      if (copy === "copy.safetensors" && (await isPlainFile(join(seed, shard))))
        await cp(join(seed, shard), join(seed, copy));
      else await symlink(shard, join(seed, copy));
      const map = weightMap(index);
      const listed = Object.keys(map).filter((name) => map[name] === shard);
      if (listed.length > 0 && rng.chance(0.7)) map[rng.pick(listed)] = copy;
      return `${copy} duplicates ${shard}`;
    },
  ],
  [
    3,
    async (rng, seed, _index, ctx, shards) => {
      const shard = rng.pick(shards);
      const kind = rng.pick(ODD_FILES);
      ctx.fifos.push(...(await makeOddFile(join(seed, shard), kind, join(ctx.outside, "secret.safetensors"))));
      return `shard ${shard} -> ${kind}`;
    },
  ],
  [
    2,
    async (rng, seed, _index, ctx) => {
      const kind = rng.pick(ODD_FILES);
      ctx.fifos.push(...(await makeOddFile(join(seed, INDEX), kind, join(ctx.outside, "secret.txt"))));
      return `index -> ${kind}`;
    },
  ],
  [
    2,
    async (rng, seed, _index, ctx, shards) => {
      const what = rng.pick(["second index", "single file too", "pickle only", "no index", "fifo shard listed"]);
      if (what === "second index" && (await isPlainFile(join(seed, INDEX))))
        await cp(join(seed, INDEX), join(seed, "other.safetensors.index.json"));
      const shard = rng.pick(shards);
      if (what === "single file too" && (await isPlainFile(join(seed, shard))))
        await cp(join(seed, shard), join(seed, "model.safetensors"));
      if (what === "no index") await rm(join(seed, INDEX), { force: true, recursive: true });
      if (what === "pickle only") {
        for (const name of await readdir(seed))
          if (name.includes("safetensors")) await rm(join(seed, name), { recursive: true }); // an odd file may be a folder
        await writeFile(join(seed, "pytorch_model.bin"), "PK\u0003\u0004 not really");
      }
      if (what === "fifo shard listed" && makeFifo(join(seed, "fifo.safetensors")))
        ctx.fifos.push(join(seed, "fifo.safetensors"));
      return what;
    },
  ],
  [
    2,
    async (rng, seed, _index, _ctx, shards) => {
      const shard = rng.pick(shards);
      if (!(await isPlainFile(join(seed, shard)))) return `shard ${shard} is not a plain file: left alone`;
      const notes: string[] = [];
      const { bytes } = await mutatedSafetensors(rng, notes, join(seed, shard));
      await writeFile(join(seed, shard), bytes);
      return `shard ${shard}: ${notes.join(", ")}`;
    },
  ],
  [
    1,
    async (_rng, seed, _index, _ctx, shards) => {
      // Shards and index moved into a sub-folder, listed as sub/<shard>: allowed.
      await mkdir(join(seed, "sub"), { recursive: true }); // an earlier op may have made it
      for (const shard of shards) await rename(join(seed, shard), join(seed, "sub", shard)).catch(() => undefined);
      return "shards in sub/ (listed there below)";
    },
  ],
];

/** The Hugging Face cache layout: snapshots/<rev>/<file> are relative links into blobs/. */
async function hubCacheLayout(ctx: CaseContext, source: string): Promise<string> {
  const repo = join(ctx.dir, "models--x--y");
  const snapshot = join(repo, "snapshots", "abc123");
  await mkdir(join(repo, "blobs"), { recursive: true });
  await mkdir(snapshot, { recursive: true });
  let n = 0;
  for (const name of await readdir(source)) {
    const blob = `blob${n++}`;
    await cp(join(source, name), join(repo, "blobs", blob));
    await symlink(join("..", "..", "blobs", blob), join(snapshot, name));
  }
  return snapshot;
}

export async function indexCase(ctx: CaseContext): Promise<Step[]> {
  const { rng, dir, notes } = ctx;
  const family = rng.pick(FAMILIES);
  const source = fixture(family, "sharded");
  notes.push(`from ${family}/sharded`);
  let seed = join(dir, "seed");
  if (rng.chance(0.1)) {
    seed = await hubCacheLayout(ctx, source);
    notes.push("hub cache layout");
  } else {
    await cp(source, seed, { recursive: true });
  }
  const text = await readFile(join(seed, INDEX), "utf8");
  const index = JSON.parse(text) as Index;
  const shards = [...new Set(Object.values(weightMap(index)) as string[])].sort();
  let raw: string | Uint8Array | undefined;
  const ops = rng.weighted<number>([
    [1, 0],
    [6, 1],
    [3, 2],
  ]);
  let inSub = false;
  for (let i = 0; i < ops; i++) {
    const op = rng.weighted(OPS);
    const note = await op(rng, seed, index, ctx, shards);
    if (note.startsWith("shards in sub/")) inSub = true;
    notes.push(note);
  }
  if (inSub) {
    const map = weightMap(index);
    if (map !== null && typeof map === "object")
      for (const [name, file] of Object.entries(map))
        if (shards.includes(file as string)) map[name] = `sub/${file as string}`;
  }
  // Text-level damage, on top or instead.
  if (rng.chance(0.25)) {
    raw = mutateTextRepeatedly(rng, JSON.stringify(index, null, 2), notes);
  } else if (rng.chance(0.1)) {
    const choice = rng.pick<() => [string | Uint8Array, string]>([
      () => [deepJsonText(rng.int(1000, 100_000), "object"), "deeply nested index"],
      () => [
        text.replace('"weight_map": {', '"weight_map": {\n    "lm_head.weight": "x.safetensors",'),
        "repeated key in weight_map",
      ],
      () => [mutateBytes(rng, encoder.encode(text))[0], "bytes of the index damaged"],
      () => [`${text.slice(0, -2)},\n  "weight_map": {}\n}`, "weight_map given twice"],
    ])();
    raw = choice[0];
    notes.push(choice[1]);
  }
  // The index may have been removed or replaced by an odd file: then leave it alone.
  const indexIsPlain = (await lstat(join(seed, INDEX)).catch(() => undefined))?.isFile() ?? false;
  const leave = notes.some((n) => n.startsWith("index ->") || n === "pickle only" || n === "no index");
  if (indexIsPlain && !leave) {
    await writeFile(join(seed, INDEX), raw ?? JSON.stringify(index, null, 2));
  }
  const steps: Step[] = [
    {
      name: "CheckpointFiles",
      run: async () => {
        const files = await CheckpointFiles.open(seed);
        try {
          for (const name of files.tensors.keys()) await files.read(name);
        } finally {
          await files.close();
        }
      },
    },
    {
      name: "openModel",
      run: async () => {
        const model = await openModel(seed);
        await model.close();
      },
    },
    ...maybeUpcycle(ctx, () => ({ seeds: [seed], experts: 2, output: ctx.output })),
  ];
  return steps;
}
