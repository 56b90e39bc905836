/** Writes every evidence case folder and cases.json: node dist/test/evidence/build.js OUT_DIR */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { buildCase, evidenceCases, folderHashes } from "./cases.js";

const out = process.argv[2];
if (!out) throw new Error("usage: node dist/test/evidence/build.js OUT_DIR");
await mkdir(out, { recursive: true });
const manifest = [];
for (const c of await evidenceCases()) {
  await buildCase(c, join(out, c.name));
  manifest.push({ name: c.name, family: c.family, reference: c.reference, remote_code: c.remoteCode, files: await folderHashes(join(out, c.name)) });
}
await writeFile(join(out, "cases.json"), `${JSON.stringify(manifest, null, 2)}\n`);
process.stdout.write(`wrote ${manifest.length} cases to ${out}\n`);
