import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rename, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BamError, type ErrorCode, isBamError } from "../../src/errors.js";
import { CheckpointFiles } from "../../src/safetensors/checkpoint.js";
import { type TensorToWrite, writeSafetensors, writeShardedSafetensors } from "../../src/safetensors/writer.js";

let root: string;
let folderCount = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "bam-st-checkpoint-"));
});
after(() => rm(root, { recursive: true, force: true }));

async function newFolder(): Promise<string> {
  const dir = join(root, `model-${++folderCount}`);
  await mkdir(dir);
  return dir;
}

/** `count` U8 tensors of 100 bytes each, filled with their index. */
function tensors(count: number, prefix = "w"): TensorToWrite[] {
  return Array.from({ length: count }, (_, i) => ({
    name: `${prefix}${i}`,
    dtype: "U8",
    shape: [10, 10],
    data: () => new Uint8Array(100).fill(i),
  }));
}

/** A folder sharded as model-0000k-of-00003.safetensors plus its index. */
async function shardedFolder(): Promise<string> {
  const dir = await newFolder();
  await writeShardedSafetensors(dir, tensors(5), { maxShardBytes: 200, metadata: { format: "pt" } });
  return dir;
}

const INDEX = "model.safetensors.index.json";
const SHARD1 = "model-00001-of-00003.safetensors";

async function editIndex(dir: string, edit: (index: { weight_map: Record<string, string> }) => void): Promise<void> {
  const path = join(dir, INDEX);
  const index = JSON.parse(await readFile(path, "utf8")) as { weight_map: Record<string, string> };
  edit(index);
  await writeFile(path, JSON.stringify(index));
}

/** Opening must fail with `code` and a message containing each of `mentions`. */
async function assertOpenFails(dir: string, code: ErrorCode, ...mentions: string[]): Promise<BamError> {
  let caught: BamError | undefined;
  await assert.rejects(CheckpointFiles.open(dir), (error: unknown) => {
    assert.ok(isBamError(error), String(error));
    assert.equal(error.code, code, error.message);
    for (const text of mentions) assert.ok(error.message.includes(text), `"${text}" in: ${error.message}`);
    caught = error;
    return true;
  });
  return caught!;
}

const openFds = () => (existsSync("/proc/self/fd") ? readdirSync("/proc/self/fd").length : 0);

test("sharded write, then read back through the index", async () => {
  const dir = await newFolder();
  const { files, totalSize } = await writeShardedSafetensors(dir, tensors(5), {
    maxShardBytes: 200,
    metadata: { format: "pt" },
  });
  assert.deepEqual(
    files.map((f) => f.slice(dir.length + 1)),
    [SHARD1, "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"],
  );
  assert.equal(totalSize, 500);
  const indexText = await readFile(join(dir, INDEX), "utf8");
  assert.match(
    indexText,
    /^\{\n {2}"metadata": \{\n {4}"total_size": 500\n {2}\},\n {2}"weight_map": \{\n {4}"w0": "model-00001-of-00003.safetensors",/,
  );
  assert.deepEqual(Object.keys(JSON.parse(indexText).weight_map), ["w0", "w1", "w2", "w3", "w4"]);
  const checkpoint = await CheckpointFiles.open(dir);
  try {
    assert.equal(checkpoint.dir, dir);
    assert.deepEqual(checkpoint.files, files);
    assert.deepEqual(checkpoint.indexMetadata, { total_size: 500 });
    assert.deepEqual([...checkpoint.tensors.keys()], ["w0", "w1", "w2", "w3", "w4"]);
    assert.equal(checkpoint.tensors.get("w4")!.file, files[2]);
    assert.deepEqual(await checkpoint.read("w3"), new Uint8Array(100).fill(3));
    assert.deepEqual(await checkpoint.readBytes("w1", 98, 2), Uint8Array.of(1, 1));
    await assert.rejects(
      checkpoint.read("nope"),
      (error: unknown) => isBamError(error, "TENSOR_NOT_FOUND") && error.message.includes(dir),
    );
  } finally {
    await checkpoint.close();
  }
});

test("index keys are sorted by name, not by write order", async () => {
  const dir = await newFolder();
  await writeShardedSafetensors(dir, [...tensors(2, "z"), ...tensors(2, "a")], { maxShardBytes: 100 });
  const index = JSON.parse(await readFile(join(dir, INDEX), "utf8")) as { weight_map: Record<string, string> };
  assert.deepEqual(Object.entries(index.weight_map), [
    ["a0", "model-00003-of-00004.safetensors"],
    ["a1", "model-00004-of-00004.safetensors"],
    ["z0", "model-00001-of-00004.safetensors"],
    ["z1", "model-00002-of-00004.safetensors"],
  ]);
});

test("single files: model.safetensors, or one other *.safetensors; no index is written for one shard", async () => {
  const dir = await newFolder();
  const { files } = await writeShardedSafetensors(dir, tensors(2), { maxShardBytes: 1e9 });
  assert.deepEqual(files, [join(dir, "model.safetensors")]);
  assert.equal(existsSync(join(dir, INDEX)), false);
  let checkpoint = await CheckpointFiles.open(dir);
  assert.equal(checkpoint.indexMetadata, null);
  assert.deepEqual(await checkpoint.read("w1"), new Uint8Array(100).fill(1));
  await checkpoint.close();
  await rename(join(dir, "model.safetensors"), join(dir, "consolidated.safetensors"));
  checkpoint = await CheckpointFiles.open(dir);
  assert.deepEqual(checkpoint.files, [join(dir, "consolidated.safetensors")]);
  await checkpoint.close();
});

test("a differently named index is used when it is the only one", async () => {
  const dir = await shardedFolder();
  await rename(join(dir, INDEX), join(dir, "weights.safetensors.index.json"));
  const checkpoint = await CheckpointFiles.open(dir);
  assert.equal(checkpoint.tensors.size, 5);
  await checkpoint.close();
});

test("no weights, ambiguous weights and pickle-only folders are refused", async () => {
  await assertOpenFails(await newFolder(), "NOT_A_CHECKPOINT");
  const configOnly = await newFolder();
  await writeFile(join(configOnly, "config.json"), "{}");
  await assertOpenFails(configOnly, "NOT_A_CHECKPOINT", configOnly);
  const twoFiles = await newFolder();
  for (const name of ["a.safetensors", "b.safetensors"]) await writeSafetensors(join(twoFiles, name), tensors(1));
  await assertOpenFails(twoFiles, "NOT_A_CHECKPOINT", "a.safetensors", "b.safetensors");
  for (const pickle of ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"]) {
    const dir = await newFolder();
    await writeFile(join(dir, pickle), "not really a pickle");
    await assertOpenFails(
      dir,
      "PICKLE_REFUSED",
      dir,
      pickle,
      "execute code",
      "save_pretrained(dir, safe_serialization=True)",
    );
  }
  await assertOpenFails(join(root, "missing"), "IO_ERROR", "missing");
});

test("malformed index files are INDEX_INVALID", async () => {
  const bodies = [
    "{",
    "[]",
    "{}",
    '{"weight_map": []}',
    '{"weight_map": {}}',
    '{"weight_map": {"w0": 3}}',
    `{"metadata": 5, "weight_map": {"w0": "${SHARD1}"}}`,
    `{"weight_map": {"w0": "${SHARD1}", "w0": "${SHARD1}"}}`,
  ];
  for (const body of bodies) {
    const dir = await shardedFolder();
    await writeFile(join(dir, INDEX), body);
    await assertOpenFails(dir, "INDEX_INVALID", join(dir, INDEX));
  }
});

test("index and shards must agree", async () => {
  const cases: [(index: { weight_map: Record<string, string> }) => void, string][] = [
    [
      (index) => {
        index.weight_map.ghost = SHARD1;
      },
      '"ghost"',
    ], // listed, not stored
    [
      (index) => {
        delete index.weight_map.w3;
      },
      '"w3"',
    ], // stored, not listed
    [
      (index) => {
        index.weight_map.w4 = SHARD1;
      },
      '"w4"',
    ], // listed in the wrong shard
  ];
  for (const [edit, mention] of cases) {
    const dir = await shardedFolder();
    await editIndex(dir, edit);
    await assertOpenFails(dir, "INDEX_INVALID", mention, join(dir, INDEX));
  }
  const twice = await shardedFolder();
  await writeSafetensors(join(twice, "extra.safetensors"), tensors(1));
  await editIndex(twice, (index) => {
    index.weight_map.extra = "extra.safetensors";
  });
  await assertOpenFails(twice, "INDEX_INVALID", '"w0"', "stored in both", "extra.safetensors", SHARD1);
});

test("a missing shard is an IO_ERROR naming it", async () => {
  const dir = await shardedFolder();
  await rm(join(dir, SHARD1));
  await assertOpenFails(dir, "IO_ERROR", SHARD1);
});

test("shard paths may not leave the folder", async () => {
  const outside = join(root, "outside.safetensors");
  await writeSafetensors(outside, tensors(1, "x"));
  const escapes: [string, (dir: string) => Promise<string>][] = [
    ["parent", async () => "../outside.safetensors"],
    ["hidden parent", async () => "sub/../../outside.safetensors"],
    ["absolute", async () => outside],
    [
      "symlink",
      async (dir) => {
        await symlink(outside, join(dir, "link.safetensors"));
        return "link.safetensors";
      },
    ],
  ];
  for (const [label, shardFor] of escapes) {
    const dir = await newFolder();
    await writeFile(join(dir, INDEX), JSON.stringify({ weight_map: { x0: await shardFor(dir) } }));
    const error = await assertOpenFails(dir, "PATH_ESCAPE", join(dir, INDEX));
    assert.ok(error.message.includes(dir), label);
  }
});

test("symlinks inside the folder, and into a Hugging Face cache's blobs, are fine", async () => {
  const repo = join(root, "models--org--name");
  const snapshot = join(repo, "snapshots", "abc123");
  await mkdir(join(repo, "blobs"), { recursive: true });
  await mkdir(snapshot, { recursive: true });
  await writeSafetensors(join(repo, "blobs", "deadbeef"), tensors(1, "x"));
  await symlink("../../blobs/deadbeef", join(snapshot, "real.safetensors"));
  await symlink("real.safetensors", join(snapshot, "alias.safetensors"));
  await writeFile(join(snapshot, INDEX), JSON.stringify({ weight_map: { x0: "alias.safetensors" } }));
  const checkpoint = await CheckpointFiles.open(snapshot);
  assert.deepEqual(await checkpoint.read("x0"), new Uint8Array(100));
  await checkpoint.close();
});

test("every file handle is closed after close() and after a failed open", {
  skip: !existsSync("/proc/self/fd") && "needs /proc",
}, async () => {
  const fdsBefore = openFds();
  const dir = await shardedFolder();
  const checkpoint = await CheckpointFiles.open(dir);
  assert.equal(openFds(), fdsBefore + 3);
  await checkpoint.close();
  assert.equal(openFds(), fdsBefore);
  await editIndex(dir, (index) => {
    delete index.weight_map.w3;
  });
  await assertOpenFails(dir, "INDEX_INVALID");
  await writeFile(join(dir, "model-00003-of-00003.safetensors"), "short");
  await assertOpenFails(dir, "HEADER_INVALID");
  assert.equal(openFds(), fdsBefore);
});
