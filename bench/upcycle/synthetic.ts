/**
 * Synthetic llama-like seeds at a real size for the benchmarks: the
 * reliability tests' generator (deterministic bf16 values with realistic
 * exponents), at benchmark shapes.
 */
import { writeSeed, type LlamaSeed } from "../../test/reliability/synth.js";

export type LlamaShape = Pick<LlamaSeed, "layers" | "hidden" | "intermediate" | "heads" | "kvHeads" | "vocab">;

/** About 1B parameters: 16 layers, hidden 2048, FFN 5632, vocab 32000. */
export const ONE_BILLION: LlamaShape = {
  layers: 16,
  hidden: 2048,
  intermediate: 5632,
  heads: 16,
  kvHeads: 16,
  vocab: 32000,
};

/** Writes a llama seed folder; `valueSeed` makes seeds of one shape distinct models. */
export async function writeLlamaSeed(dir: string, shape: LlamaShape, valueSeed = 1): Promise<void> {
  await writeSeed(dir, { ...shape, valueSeed, maxShardBytes: 1e9 });
}
