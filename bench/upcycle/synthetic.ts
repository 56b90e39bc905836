/**
 * Synthetic llama-like seed checkpoints at a real size, written with our own
 * writer: random bf16 values with small exponents (never Inf or NaN).
 */
import { randomFillSync } from "node:crypto";
import { copyFile, mkdir, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { writeShardedSafetensors, type TensorToWrite } from "../../src/safetensors/index.js";

export interface LlamaShape {
  layers: number;
  hidden: number;
  intermediate: number;
  heads: number;
  kvHeads: number;
  vocab: number;
}

/** About 1B parameters: 16 layers, hidden 2048, FFN 5632, vocab 32000. */
export const ONE_BILLION: LlamaShape = { layers: 16, hidden: 2048, intermediate: 5632, heads: 16, kvHeads: 16, vocab: 32000 };

function randomBf16(elements: number): Uint8Array {
  const bytes = new Uint8Array(elements * 2);
  randomFillSync(bytes);
  // High byte = sign and the top 7 exponent bits: exponents 120..123, so |x| is about 0.008 to 0.1,
  // like trained weights (no Inf, NaN or subnormals, which would make float arithmetic unrealistically slow).
  for (let i = 1; i < bytes.length; i += 2) bytes[i] = (bytes[i]! & 0x81) | 0x3c;
  return bytes;
}

function llamaTensors(s: LlamaShape): TensorToWrite[] {
  const headDim = s.hidden / s.heads;
  const tensor = (name: string, shape: number[]): TensorToWrite => ({
    name, dtype: "BF16", shape, data: () => randomBf16(shape.reduce((a, b) => a * b, 1)),
  });
  const tensors = [tensor("model.embed_tokens.weight", [s.vocab, s.hidden])];
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}`;
    tensors.push(
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
  tensors.push(tensor("model.norm.weight", [s.hidden]), tensor("lm_head.weight", [s.vocab, s.hidden]));
  return tensors;
}

/** Writes a llama seed folder (config.json, sharded bf16 safetensors, the fixtures' tokenizer). */
export async function writeLlamaSeed(dir: string, shape: LlamaShape): Promise<void> {
  await mkdir(dir, { recursive: true });
  const config = {
    model_type: "llama", architectures: ["LlamaForCausalLM"], vocab_size: shape.vocab, hidden_size: shape.hidden,
    intermediate_size: shape.intermediate, num_hidden_layers: shape.layers, num_attention_heads: shape.heads,
    num_key_value_heads: shape.kvHeads, max_position_embeddings: 4096, rms_norm_eps: 1e-5, hidden_act: "silu",
    rope_theta: 10000, tie_word_embeddings: false, dtype: "bfloat16",
  };
  await writeFile(join(dir, "config.json"), JSON.stringify(config, null, 2));
  await copyFile(resolve("fixtures/tokenizer/tokenizer.json"), join(dir, "tokenizer.json"));
  await writeShardedSafetensors(dir, llamaTensors(shape), { maxShardBytes: 1e9 });
}
