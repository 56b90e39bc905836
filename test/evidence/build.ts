/** Writes every evidence case folder and cases.json: node dist/test/evidence/build.js OUT_DIR (see scripts/check_transformers.py). */
import { buildEvidence } from "./cases.js";

const out = process.argv[2];
if (!out) throw new Error("usage: node dist/test/evidence/build.js OUT_DIR");
process.stdout.write(`wrote ${await buildEvidence(out)} cases to ${out}\n`);
