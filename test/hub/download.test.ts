/**
 * The download path against a local Hub on 127.0.0.1 that serves the
 * endpoints @huggingface/hub calls (revision info, tree, paths-info, resolve
 * with ranges): only the seed's files are fetched (no pickle, no README), the
 * token goes along, the cache ends up as huggingface_hub lays it (Python's
 * snapshot_download finds it offline), and the upcycle equals the one of the
 * plain folders. An unreachable Hub or a refused token is one line.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readdir, readFile, readlink, lstat } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join, resolve } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { isBamError } from "../../src/errors.js";
import { resolveSeed } from "../../src/hub/index.js";
import { upcycle, type DownloadProgress } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";
import { HUB_PYTHON, pythonSnapshot, repoDir, weights, withEnv } from "./hub-cache.js";

const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const TOKEN = "hf_test_token";
/** Far above what one download makes (a few requests per file); past it the server answers 429 and the test fails. */
const MAX_REQUESTS = 200;

interface RemoteFile {
  path: string;
  bytes: Buffer;
  oid: string;
  lfs: boolean;
}
interface Repo {
  commit: string;
  files: RemoteFile[];
}

async function remoteRepo(folder: string, extra: Record<string, string>): Promise<Repo> {
  const files: RemoteFile[] = [];
  const add = (path: string, bytes: Buffer) => {
    const lfs = path.endsWith(".safetensors") || path.endsWith(".bin");
    const oid = lfs
      ? createHash("sha256").update(bytes).digest("hex")
      : createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
    files.push({ path, bytes, oid, lfs });
  };
  for (const name of (await readdir(folder)).sort()) add(name, await readFile(join(folder, name)));
  for (const [name, text] of Object.entries(extra)) add(name, Buffer.from(text));
  return { commit: createHash("sha1").update(folder).digest("hex"), files };
}

/** A Hub with `repos`, recording each request as "METHOD path"; `token` required when set. */
async function localHub(
  repos: Record<string, Repo>,
  token?: string,
): Promise<{ url: string; requests: string[]; server: Server }> {
  const requests: string[] = [];
  const json = (res: ServerResponse, body: unknown, status = 200) => {
    res.writeHead(status, { "Content-Type": "application/json" });
    res.end(JSON.stringify(body));
  };
  const entry = (repo: Repo, f: RemoteFile) => ({
    type: "file",
    path: f.path,
    size: f.bytes.length,
    oid: f.oid,
    ...(f.lfs ? { lfs: { oid: f.oid, size: f.bytes.length, pointerSize: 130 } } : {}),
    lastCommit: { id: repo.commit, title: "upload", date: "2026-01-01T00:00:00.000Z" },
  });
  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url!, "http://localhost");
    requests.push(`${req.method} ${url.pathname}`);
    if (requests.length > MAX_REQUESTS) return json(res, { error: "too many requests" }, 429);
    if (token !== undefined && req.headers.authorization !== `Bearer ${token}`)
      return json(res, { error: "Invalid credentials" }, 401);
    let body = "";
    for await (const chunk of req) body += chunk;
    const api = /^\/api\/models\/([^/]+\/[^/]+)\/(revision|tree|paths-info)\/([^/]+)$/.exec(url.pathname);
    if (api !== null) {
      const repo = repos[api[1]!];
      const revision = decodeURIComponent(api[3]!);
      if (repo === undefined || (revision !== "main" && revision !== repo.commit))
        return json(res, { error: "Repository not found" }, 404);
      if (api[2] === "revision")
        return json(res, {
          _id: "0",
          id: api[1],
          sha: repo.commit,
          private: false,
          downloads: 0,
          likes: 0,
          gated: false,
          tags: [],
          siblings: repo.files.map((f) => ({ rfilename: f.path })),
        });
      if (api[2] === "tree")
        return json(
          res,
          repo.files.map((f) => entry(repo, f)),
        );
      const paths = new URLSearchParams(body)
        .getAll("paths")
        .concat(body.startsWith("{") ? (JSON.parse(body) as { paths: string[] }).paths : []);
      return json(
        res,
        repo.files.filter((f) => paths.includes(f.path)).map((f) => entry(repo, f)),
      );
    }
    const file = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const repo = file === null ? undefined : repos[file[1]!];
    const found = repo?.files.find((f) => f.path === decodeURIComponent(file![3]!));
    if (found === undefined) {
      res.writeHead(404, { "X-Error-Code": "EntryNotFound" });
      return res.end();
    }
    const headers = { ETag: `"${found.oid}"`, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream" };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (range === null) {
      res.writeHead(200, { ...headers, "Content-Length": found.bytes.length });
      return res.end(found.bytes);
    }
    const start = Number(range[1]);
    const end = range[2] === "" ? found.bytes.length - 1 : Math.min(Number(range[2]), found.bytes.length - 1);
    res.writeHead(206, {
      ...headers,
      "Content-Length": end - start + 1,
      "Content-Range": `bytes ${start}-${end}/${found.bytes.length}`,
    });
    res.end(found.bytes.subarray(start, end + 1));
  };
  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => json(res, { error: String(error) }, 500));
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, requests, server };
}

async function withHub<T>(
  repos: Record<string, Repo>,
  token: string | undefined,
  body: (hub: { url: string; requests: string[] }) => Promise<T>,
): Promise<T> {
  const hub = await localHub(repos, token);
  const stop = setTimeout(() => hub.server.close(), 60_000); // stops by itself whatever the test does
  try {
    return await body(hub);
  } finally {
    clearTimeout(stop);
    hub.server.closeAllConnections();
    await new Promise((done) => hub.server.close(done));
  }
}

/** The CLI in a child process; asynchronous, as the Hub it talks to runs in this one. */
function bam(
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((done) => {
    const child = execFile(
      process.execPath,
      [CLI, ...args],
      { encoding: "utf8", env, timeout: 60_000 },
      (_error, stdout, stderr) => done({ status: child.exitCode, stdout, stderr }),
    );
  });
}

/** A port nothing listens on: one the system just handed out, closed again. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const { port } = server.address() as AddressInfo;
  await new Promise((done) => server.close(done));
  return port;
}

describe("seeds downloaded from the Hub", () => {
  test("missing ids are downloaded into the cache as huggingface_hub lays it, only the seed's files, and upcycle as the folders do", () =>
    withTempDir(async (dir) => {
      const repos = {
        "org/sharded": await remoteRepo(fixture("llama", "sharded"), {
          "README.md": "# card\n",
          "pytorch_model.bin": "pickle",
        }),
        "org/code": await remoteRepo(fixture("llama", "code"), {}),
      };
      await withHub(repos, TOKEN, async (hub) => {
        const cacheDir = join(dir, "hub");
        const progress: DownloadProgress[] = [];
        const result = await withEnv(
          {
            HF_HUB_CACHE: cacheDir,
            HF_ENDPOINT: hub.url,
            HF_TOKEN: TOKEN,
            HF_HUB_OFFLINE: undefined,
            TRANSFORMERS_OFFLINE: undefined,
            BAM_CACHE_DIR: join(dir, "bam-cache"),
          },
          () =>
            upcycle(
              { seeds: ["org/sharded", "org/code@main"], output: join(dir, "ids") },
              { onDownload: (p) => progress.push(p) },
            ),
        );
        const fromFolders = await upcycle({
          seeds: [fixture("llama", "sharded"), fixture("llama", "code")],
          output: join(dir, "folders"),
        });
        assert.deepEqual(await weights(result.output), await weights(fromFolders.output));
        assert.deepEqual(
          result.plan.seeds.map((s) => s.name),
          ["org/sharded", "org/code"],
        );

        const fetched = hub.requests
          .filter((r) => r.startsWith("GET /org/sharded/resolve/"))
          .map((r) => r.split("/").pop());
        assert.deepEqual(
          [...new Set(fetched)].sort(),
          (await readdir(fixture("llama", "sharded"))).sort(),
          `only the seed's files: ${hub.requests.join(", ")}`,
        );
        assert.ok(hub.requests.length < 100, "a bounded number of requests");
        const shardBytes = repos["org/sharded"].files
          .filter((f) => f.path.startsWith("model-0"))
          .reduce((n, f) => n + f.bytes.length, 0);
        const last = progress.filter((p) => p.repoId === "org/sharded").pop()!;
        assert.ok(
          last.bytes >= shardBytes && last.totalBytes >= shardBytes,
          `progress reached the shards' ${shardBytes} bytes: ${JSON.stringify(last)}`,
        );

        // The layout: refs/main holds the commit, snapshot files are relative links into blobs named by their oid.
        const root = repoDir(cacheDir, "org/sharded");
        const { commit, files } = repos["org/sharded"];
        assert.equal(await readFile(join(root, "refs", "main"), "utf8"), commit);
        for (const name of await readdir(join(root, "snapshots", commit))) {
          const link = join(root, "snapshots", commit, name);
          assert.ok((await lstat(link)).isSymbolicLink(), `${name} is a link`);
          assert.equal(
            resolve(join(link, ".."), await readlink(link)),
            join(root, "blobs", files.find((f) => f.path === name)!.oid),
          );
        }
        assert.deepEqual(
          (await readdir(join(root, "blobs"))).filter((n) => n.endsWith(".incomplete")),
          [],
        );
        if (HUB_PYTHON !== null)
          assert.equal(pythonSnapshot(cacheDir, "org/sharded", "main"), join(root, "snapshots", commit));

        // Cached now: offline resolves without the server.
        const before = hub.requests.length;
        const again = await resolveSeed("org/sharded", {
          settings: { cacheDir, offline: true, endpoint: hub.url, token: undefined },
        });
        assert.equal(again.dir, join(root, "snapshots", commit));
        assert.equal(hub.requests.length, before);
      });
    }));

  test("a refused token, an unreachable Hub and an answer without a commit hash are refused in one line, nothing written", () =>
    withTempDir(async (dir) => {
      const repos = { "org/code": await remoteRepo(fixture("llama", "code"), {}) };
      await withHub(repos, TOKEN, async (hub) => {
        const env = {
          ...process.env,
          HF_HUB_CACHE: join(dir, "hub"),
          HF_ENDPOINT: hub.url,
          HF_TOKEN: "hf_wrong",
          HF_HUB_OFFLINE: "",
          TRANSFORMERS_OFFLINE: "",
          BAM_CACHE_DIR: join(dir, "bam-cache"),
        };
        const refused = await bam(["upcycle", "org/code", "-o", join(dir, "out")], env);
        assert.equal(refused.status, 1);
        assert.equal(refused.stderr.trimEnd().split("\n").length, 1, refused.stderr);
        assert.match(refused.stderr, /^bam: org\/code@main: http:\/\/127\.0\.0\.1:\d+ refused access; .* set HF_TOKEN/);
        const closed = { ...env, HF_ENDPOINT: `http://127.0.0.1:${await closedPort()}` };
        const unreachable = await bam(["upcycle", "org/code@v1", "-o", join(dir, "out")], closed);
        assert.equal(unreachable.status, 1);
        assert.equal(unreachable.stderr.trimEnd().split("\n").length, 1, unreachable.stderr);
        assert.match(
          unreachable.stderr,
          /^bam: org\/code@v1: no such folder, not in the Hugging Face cache .* cannot be reached \(ECONNREFUSED\); fetch it with `hf download org\/code --revision v1`/,
        );
        assert.deepEqual(await readdir(dir).then((names) => names.filter((n) => n === "out")), []);
        // A commit hash that is not one would name a folder outside the cache: refused before anything is written.
        const evil = { ...repos["org/code"], commit: "../../../escaped" };
        await withHub({ "org/evil": evil }, undefined, async (other) => {
          const settings = { cacheDir: join(dir, "hub"), offline: false, endpoint: other.url, token: undefined };
          await assert.rejects(
            resolveSeed("org/evil", { settings }),
            (error: unknown) => isBamError(error, "HUB_ERROR") && /no commit hash/.test(error.message),
          );
          assert.deepEqual(
            other.requests.map((r) => r.split(" ")[1]),
            ["/api/models/org/evil/revision/main"],
          );
        });
        assert.equal(existsSync(join(dir, "escaped")), false);
        assert.equal(existsSync(repoDir(join(dir, "hub"), "org/evil")), false);
      });
    }));

  test("bam upcycle --dry-run --json downloads a missing id and prints one JSON document (the client's own messages kept off stdout)", () =>
    withTempDir(async (dir) => {
      await withHub({ "org/code": await remoteRepo(fixture("llama", "code"), {}) }, undefined, async (hub) => {
        const env = {
          ...process.env,
          HF_HUB_CACHE: join(dir, "hub"),
          HF_ENDPOINT: hub.url,
          HF_HUB_OFFLINE: "",
          TRANSFORMERS_OFFLINE: "",
          BAM_CACHE_DIR: join(dir, "bam-cache"),
        };
        const run = await bam(["upcycle", "org/code", "--dry-run", "--json"], env);
        assert.equal(run.status, 0, run.stderr);
        const plan = JSON.parse(run.stdout) as { seeds: Array<{ name: string; dir: string }> };
        assert.deepEqual(
          plan.seeds.map((s) => s.name),
          ["org/code"],
        );
        assert.match(plan.seeds[0]!.dir, /models--org--code\/snapshots\/[0-9a-f]{40}$/);
      });
    }));
});
