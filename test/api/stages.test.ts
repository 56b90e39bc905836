/**
 * The stage folders of src/ (safetensors, arch, hub, upcycle, export, onnx,
 * cli) depend on each other in one direction: no folder imports, through
 * any chain of folders, one that imports it back. Read from the sources'
 * import and export lines, so a new cycle fails here before review.
 */
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import test from "node:test";

const SRC = resolve("src");
/** `import ... from "./x"`, `export ... from "./x"`, `import("./x")`, `import "./x"`: relative specifiers only (packages are no stage). */
const SPECIFIER = /(?:\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)["'](\.{1,2}\/[^"']+)["']/gm;

/** Stage folder -> the stage folders its files import. */
async function stageGraph(): Promise<Map<string, Set<string>>> {
  const graph = new Map<string, Set<string>>();
  const stageOf = (file: string) => {
    const parts = relative(SRC, file).split(sep);
    return parts.length > 1 ? parts[0]! : undefined; // src/errors.ts and src/index.ts are no stage
  };
  for (const entry of await readdir(SRC, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith(".ts")) continue;
    const file = join(entry.parentPath, entry.name);
    const from = stageOf(file);
    if (from === undefined) continue;
    const edges = graph.get(from) ?? new Set<string>();
    graph.set(from, edges);
    for (const match of (await readFile(file, "utf8")).matchAll(SPECIFIER)) {
      const to = stageOf(resolve(dirname(file), match[1]!));
      if (to !== undefined && to !== from) edges.add(to);
    }
  }
  return graph;
}

/** Every cycle of folders, each as the path that closes it (a -> b -> a). */
function cycles(graph: Map<string, Set<string>>): string[] {
  const found = new Set<string>();
  const walk = (path: string[]) => {
    for (const next of graph.get(path.at(-1)!) ?? []) {
      const at = path.indexOf(next);
      if (at >= 0) {
        const loop = path.slice(at);
        const start = loop.indexOf([...loop].sort()[0]!); // one name per cycle, whichever folder it was reached from
        found.add([...loop.slice(start), ...loop.slice(0, start), loop[start]!].join(" -> "));
      } else {
        walk([...path, next]);
      }
    }
  };
  for (const stage of graph.keys()) walk([stage]);
  return [...found].sort();
}

test("no import cycle between the stage folders of src/", async () => {
  const graph = await stageGraph();
  // the reader works: it sees the stages and edges that exist
  for (const stage of ["safetensors", "arch", "hub", "upcycle", "export", "onnx", "cli"])
    assert.ok(graph.has(stage), stage);
  assert.ok(graph.get("upcycle")!.has("export"), "upcycle imports export");
  assert.ok(graph.get("cli")!.has("upcycle"), "cli/commands imports upcycle (two levels up)");
  assert.deepEqual(cycles(graph), []);
});

test("the cycle finder names a cycle it is shown", () => {
  const graph = new Map([
    ["upcycle", new Set(["export", "arch"])],
    ["export", new Set(["upcycle"])],
    ["arch", new Set<string>()],
  ]);
  assert.deepEqual(cycles(graph), ["export -> upcycle -> export"]);
});
