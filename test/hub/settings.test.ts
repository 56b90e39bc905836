/**
 * The cache folder, offline switch, endpoint and token come from the
 * environment exactly as huggingface_hub reads them: each case is checked
 * against huggingface_hub.constants in Python where it is installed.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { hubSettings, parseRepoRef } from "../../src/hub/index.js";
import { withTempDir } from "../helpers.js";
import { HUB_PYTHON } from "./hub-cache.js";

const HF_VARS = [
  "HF_HUB_CACHE",
  "HUGGINGFACE_HUB_CACHE",
  "HF_HOME",
  "XDG_CACHE_HOME",
  "HF_HUB_OFFLINE",
  "TRANSFORMERS_OFFLINE",
  "HF_ENDPOINT",
  "HF_TOKEN",
  "HF_TOKEN_PATH",
];

/** What huggingface_hub makes of `vars` (nothing else of the caller's HF_* environment). */
function pythonSettings(vars: Record<string, string>): { cacheDir: string; offline: boolean; endpoint: string } {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const key of HF_VARS) delete env[key];
  const script =
    "import json, huggingface_hub.constants as c; print(json.dumps([c.HF_HUB_CACHE, c.HF_HUB_OFFLINE, c.ENDPOINT]))";
  const run = spawnSync(HUB_PYTHON!, ["-c", script], { encoding: "utf8", env: { ...env, ...vars } });
  const [cacheDir, offline, endpoint] = JSON.parse(run.stdout) as [string, boolean, string];
  return { cacheDir, offline, endpoint };
}

test("cache folder, offline switch and endpoint follow huggingface_hub's precedence", () => {
  const cases: Array<[Record<string, string>, { cacheDir: string; offline: boolean; endpoint: string }]> = [
    [
      {},
      { cacheDir: join(homedir(), ".cache", "huggingface", "hub"), offline: false, endpoint: "https://huggingface.co" },
    ],
    [{ XDG_CACHE_HOME: "/x" }, { cacheDir: "/x/huggingface/hub", offline: false, endpoint: "https://huggingface.co" }],
    [
      { XDG_CACHE_HOME: "/x", HF_HOME: "/h" },
      { cacheDir: "/h/hub", offline: false, endpoint: "https://huggingface.co" },
    ],
    [
      { HF_HOME: "/h", HUGGINGFACE_HUB_CACHE: "/legacy" },
      { cacheDir: "/legacy", offline: false, endpoint: "https://huggingface.co" },
    ],
    [
      { HF_HOME: "/h", HUGGINGFACE_HUB_CACHE: "/legacy", HF_HUB_CACHE: "/c" },
      { cacheDir: "/c", offline: false, endpoint: "https://huggingface.co" },
    ],
    [
      { HF_HUB_CACHE: "~/c", HF_HUB_OFFLINE: "yes" },
      { cacheDir: join(homedir(), "c"), offline: true, endpoint: "https://huggingface.co" },
    ],
    [
      { HF_HUB_OFFLINE: "0", TRANSFORMERS_OFFLINE: "1" },
      { cacheDir: join(homedir(), ".cache", "huggingface", "hub"), offline: false, endpoint: "https://huggingface.co" },
    ],
    [
      { TRANSFORMERS_OFFLINE: "ON", HF_ENDPOINT: "http://mirror.local:8080/" },
      {
        cacheDir: join(homedir(), ".cache", "huggingface", "hub"),
        offline: true,
        endpoint: "http://mirror.local:8080",
      },
    ],
  ];
  for (const [vars, expected] of cases) {
    const { cacheDir, offline, endpoint } = hubSettings({ ...vars, HF_TOKEN_PATH: "/nonexistent" });
    assert.deepEqual({ cacheDir, offline, endpoint }, expected, JSON.stringify(vars));
    if (HUB_PYTHON !== null)
      assert.deepEqual(pythonSettings(vars), expected, `huggingface_hub with ${JSON.stringify(vars)}`);
  }
});

test("the token is HF_TOKEN, else the file hf auth login saved", () =>
  withTempDir(async (dir) => {
    await writeFile(join(dir, "token"), "hf_saved\n");
    assert.equal(hubSettings({ HF_HOME: dir }).token, "hf_saved");
    assert.equal(hubSettings({ HF_HOME: dir, HF_TOKEN: "hf_env" }).token, "hf_env");
    assert.equal(hubSettings({ HF_HOME: join(dir, "none") }).token, undefined);
  }));

test("owner/name[@revision] is an id; other forms are not", () => {
  assert.deepEqual(parseRepoRef("Qwen/Qwen3-0.6B"), { repoId: "Qwen/Qwen3-0.6B", revision: "main" });
  assert.deepEqual(parseRepoRef("org/m@refs/pr/1"), { repoId: "org/m", revision: "refs/pr/1" });
  assert.deepEqual(parseRepoRef("org/m@0123456789abcdef0123456789abcdef01234567"), {
    repoId: "org/m",
    revision: "0123456789abcdef0123456789abcdef01234567",
  });
  for (const text of [
    "base",
    "./org/m",
    "/org/m",
    "a/b/c",
    "org/m@",
    "org/m@../x",
    "org/a--b",
    "org/..",
    "../m",
    "org/m@v 1",
    "-org/m",
  ]) {
    assert.equal(parseRepoRef(text), undefined, text);
  }
});
