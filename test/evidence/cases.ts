/**
 * Folders written by our code that Python (safetensors, transformers) must
 * load: every family in every attention mode, and the native formats. The
 * GPU machine checks them once (scripts/check_transformers.py) and the
 * result is kept in fixtures/evidence/transformers.json with each file's
 * sha256; CI rebuilds the folders and checks the bytes are still those.
 */
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { openSeed } from "../../src/arch/index.js";
import type { AttentionExperts } from "../../src/arch/model.js";
import type { Family } from "../../src/arch/types.js";
import { upcycle, type UpcycleOptions } from "../../src/upcycle/index.js";
import { fixture, fixtureFamilies } from "../helpers.js";

export interface EvidenceCase {
  name: string;
  family: Family;
  /** Key of the reference logits in fixtures/<family>/reference.safetensors the model must give. */
  reference: string;
  /** Whether transformers loads it with trust_remote_code (bam) or natively. */
  remoteCode: boolean;
  options: (output: string) => UpcycleOptions;
}

export async function evidenceCases(): Promise<EvidenceCase[]> {
  const cases: EvidenceCase[] = [];
  for (const family of fixtureFamilies()) {
    const base = fixture(family, "base");
    const seed = await openSeed(base);
    const block = seed.features.parallelBlock ? "parallel" : "sequential";
    await seed.close();
    for (const attention of ["moa", "shared-kv", "merged"] as AttentionExperts[]) {
      // shared-kv runs on the bf16 copy, so bf16 files are checked too.
      const seedDir = attention === "shared-kv" ? fixture(family, "bf16") : base;
      cases.push({
        name: `${family}-${attention}`, family, reference: attention === "shared-kv" ? "logits_bf16" : "logits_base", remoteCode: true,
        options: (output) => ({ seeds: [seedDir, seedDir, seedDir], output, attention, block, expertsPerToken: 2, normTopkProb: true }),
      });
    }
  }
  const native: Array<[Family, UpcycleOptions["format"]]> = [["mistral", "mixtral"], ["qwen3", "qwen3-moe"]];
  for (const [family, format] of native) {
    const base = fixture(family, "base");
    cases.push({
      name: `${family}-${format}`, family, reference: "logits_base", remoteCode: false,
      options: (output) => ({ seeds: [base, base], output, attention: "merged", block: "sequential", format, expertsPerToken: 1, normTopkProb: true }),
    });
  }
  return cases;
}

export async function buildCase(c: EvidenceCase, output: string): Promise<void> {
  await upcycle(c.options(output));
}

/** sha256 of every file in a folder, by name. */
export async function folderHashes(dir: string): Promise<Record<string, string>> {
  const hashes: Record<string, string> = {};
  for (const file of (await readdir(dir)).sort()) {
    hashes[file] = createHash("sha256").update(await readFile(join(dir, file))).digest("hex");
  }
  return hashes;
}
