/**
 * Folders written by our code that Python (safetensors, transformers) must
 * load: every family in every attention mode, and the native formats.
 * test/evidence/evidence.test.ts builds them and runs scripts/check_transformers.py
 * on them in CI (CPU); on a GPU machine the same script adds the CUDA check.
 */
import { createHash } from "node:crypto";
import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
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
        name: `${family}-${attention}`,
        family,
        reference: attention === "shared-kv" ? "logits_bf16" : "logits_base",
        remoteCode: true,
        options: (output) => ({
          seeds: [seedDir, seedDir, seedDir],
          output,
          attention,
          block,
          expertsPerToken: 2,
          normTopkProb: true,
        }),
      });
    }
  }
  const native: Array<[Family, UpcycleOptions["format"]]> = [
    ["mistral", "mixtral"],
    ["qwen3", "qwen3-moe"],
  ];
  for (const [family, format] of native) {
    const base = fixture(family, "base");
    cases.push({
      name: `${family}-${format}`,
      family,
      reference: "logits_base",
      remoteCode: false,
      options: (output) => ({
        seeds: [base, base],
        output,
        attention: "merged",
        block: "sequential",
        format,
        expertsPerToken: 1,
        normTopkProb: true,
      }),
    });
  }
  return cases;
}

export async function buildCase(c: EvidenceCase, output: string): Promise<void> {
  await upcycle(c.options(output));
}

/** Writes every case folder under `out` and the cases.json that scripts/check_transformers.py reads. */
export async function buildEvidence(out: string): Promise<number> {
  await mkdir(out, { recursive: true });
  const manifest = [];
  for (const c of await evidenceCases()) {
    await buildCase(c, join(out, c.name));
    manifest.push({
      name: c.name,
      family: c.family,
      reference: c.reference,
      remote_code: c.remoteCode,
      files: await folderHashes(join(out, c.name)),
    });
  }
  await writeFile(join(out, "cases.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  return manifest.length;
}

/** sha256 of every file in a folder, by name. */
export async function folderHashes(dir: string): Promise<Record<string, string>> {
  const hashes: Record<string, string> = {};
  for (const file of (await readdir(dir)).sort()) {
    hashes[file] = createHash("sha256")
      .update(await readFile(join(dir, file)))
      .digest("hex");
  }
  return hashes;
}
