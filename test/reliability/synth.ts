/**
 * Synthetic llama seeds for the reliability tests, written with our own
 * writer: any size (a few KB to a few hundred MB), deterministic values,
 * and every setting a mismatch test needs to vary.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFile, mkdir, readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type TensorToWrite, writeShardedSafetensors } from "../../src/safetensors/index.js";

export interface LlamaSeed {
  vocab: number;
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  kvHeads: number;
  /** Default hidden / heads. */
  headDim?: number;
  tied?: boolean;
  ropeTheta?: number;
  ropeScaling?: Record<string, unknown> | null;
  rmsNormEps?: number;
  dtype?: "BF16" | "F32";
  /** Values differ per seed number, so seeds are distinct models. */
  valueSeed?: number;
  maxShardBytes?: number;
  /** Contents of tokenizer.json; default the fixtures' tokenizer. */
  tokenizer?: string;
}

export const TINY: LlamaSeed = { vocab: 64, hidden: 32, intermediate: 48, layers: 2, heads: 4, kvHeads: 2 };

/** bf16 or f32 values with small exponents (no Inf, NaN or subnormals), from a xorshift stream. */
function values(elements: number, dtype: "BF16" | "F32", state: { x: number }): Uint8Array {
  const size = dtype === "BF16" ? 2 : 4;
  const bytes = new Uint8Array(elements * size);
  const words = new Uint32Array(bytes.buffer);
  let x = state.x;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    // Each 16-bit half (bf16) or the whole word (f32): sign, exponent 120..123, random mantissa.
    words[i] = dtype === "BF16" ? ((x & 0x807f807f) | 0x3c003c00) >>> 0 : ((x & 0x81ffffff) | 0x3c000000) >>> 0;
  }
  state.x = x;
  return bytes;
}

function tensors(s: LlamaSeed): TensorToWrite[] {
  const headDim = s.headDim ?? s.hidden / s.heads;
  const dtype = s.dtype ?? "BF16";
  const state = { x: 0x9e3779b9 ^ ((s.valueSeed ?? 1) * 0x85ebca6b) };
  const tensor = (name: string, shape: number[]): TensorToWrite => ({
    name,
    dtype,
    shape,
    data: () =>
      values(
        shape.reduce((a, b) => a * b, 1),
        dtype,
        state,
      ),
  });
  const list = [tensor("model.embed_tokens.weight", [s.vocab, s.hidden])];
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}`;
    list.push(
      tensor(`${p}.input_layernorm.weight`, [s.hidden]),
      tensor(`${p}.self_attn.q_proj.weight`, [s.heads * headDim, s.hidden]),
      tensor(`${p}.self_attn.k_proj.weight`, [s.kvHeads * headDim, s.hidden]),
      tensor(`${p}.self_attn.v_proj.weight`, [s.kvHeads * headDim, s.hidden]),
      tensor(`${p}.self_attn.o_proj.weight`, [s.hidden, s.heads * headDim]),
      tensor(`${p}.post_attention_layernorm.weight`, [s.hidden]),
      tensor(`${p}.mlp.gate_proj.weight`, [s.intermediate, s.hidden]),
      tensor(`${p}.mlp.up_proj.weight`, [s.intermediate, s.hidden]),
      tensor(`${p}.mlp.down_proj.weight`, [s.hidden, s.intermediate]),
    );
  }
  list.push(tensor("model.norm.weight", [s.hidden]));
  if (!s.tied) list.push(tensor("lm_head.weight", [s.vocab, s.hidden]));
  return list;
}

export function llamaConfig(s: LlamaSeed): Record<string, unknown> {
  return {
    model_type: "llama",
    architectures: ["LlamaForCausalLM"],
    vocab_size: s.vocab,
    hidden_size: s.hidden,
    intermediate_size: s.intermediate,
    num_hidden_layers: s.layers,
    num_attention_heads: s.heads,
    num_key_value_heads: s.kvHeads,
    ...(s.headDim === undefined ? {} : { head_dim: s.headDim }),
    max_position_embeddings: 4096,
    rms_norm_eps: s.rmsNormEps ?? 1e-5,
    hidden_act: "silu",
    rope_theta: s.ropeTheta ?? 10000,
    rope_scaling: s.ropeScaling ?? null,
    tie_word_embeddings: s.tied ?? false,
    bos_token_id: 0,
    eos_token_id: 0,
    dtype: (s.dtype ?? "BF16") === "BF16" ? "bfloat16" : "float32",
  };
}

/** Writes a llama seed folder: config.json, safetensors (sharded past maxShardBytes), tokenizer.json. */
export async function writeSeed(dir: string, s: LlamaSeed): Promise<string> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, "config.json"), `${JSON.stringify(llamaConfig(s), null, 2)}\n`);
  if (s.tokenizer !== undefined) await writeFile(join(dir, "tokenizer.json"), s.tokenizer);
  else await copyFile(resolve("fixtures/tokenizer/tokenizer.json"), join(dir, "tokenizer.json"));
  await writeShardedSafetensors(dir, tensors(s), { maxShardBytes: s.maxShardBytes ?? 2e9 });
  return dir;
}

/** File name -> sha256 of every file in a folder. */
export async function folderHashes(dir: string): Promise<Record<string, string>> {
  const hashes: Record<string, string> = {};
  for (const file of (await readdir(dir)).sort()) {
    hashes[file] = createHash("sha256")
      .update(await readFile(join(dir, file)))
      .digest("hex");
  }
  return hashes;
}

export async function folderBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir).catch(() => [] as string[]))
    total += (await stat(join(dir, entry)).catch(() => ({ size: 0 }))).size;
  return total;
}

/** The CLI next to this test, whether built into dist/ or elsewhere. */
export const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
/** Writes the process's peak RSS at exit to $BAM_TEST_RSS_FILE (loaded with --import). */
export const RSS_PROBE = fileURLToPath(new URL("./rss-probe.js", import.meta.url));

export interface CliRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  pid: number;
}

/** Runs the CLI; `during` gets the child while it runs (to kill it). */
export function runCli(
  args: string[],
  options: {
    during?: (child: ReturnType<typeof spawn>) => void;
    env?: Record<string, string>;
    nodeArgs?: string[];
    cwd?: string;
  } = {},
): Promise<CliRun> {
  const child = spawn(process.execPath, [...(options.nodeArgs ?? []), CLI, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...options.env },
    cwd: options.cwd,
  });
  let stdout = "";
  let stderr = "";
  child.stdout!.setEncoding("utf8").on("data", (t: string) => {
    stdout += t;
  });
  child.stderr!.setEncoding("utf8").on("data", (t: string) => {
    stderr += t;
  });
  options.during?.(child);
  return new Promise((done) =>
    child.on("close", (code, signal) => done({ code, signal, stdout, stderr, pid: child.pid! })),
  );
}
