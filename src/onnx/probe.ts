/**
 * Mean hidden states at every layer's attention and FFN inputs (the normed
 * states the routers read), for prompt-based router init. The model's graph
 * is built with probe outputs into a temporary folder, run once per prompt,
 * and removed.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { OpenedModel } from "../arch/model.js";
import { BamError } from "../errors.js";
import { writeOnnx } from "./export.js";
import { OnnxSession } from "./session.js";
import { MODEL_FILE } from "./write.js";

export interface LayerInputMeans {
  /** Per layer, [hidden] in float64: the mean over prompts of each prompt's mean over its tokens. */
  attention: Float64Array[];
  ffn: Float64Array[];
}

/** Runs every prompt (token ids) through `model`; one LayerInputMeans per prompt list. */
export async function meanLayerInputs(
  model: OpenedModel,
  promptLists: number[][][],
  signal?: AbortSignal,
  onPrompt?: (done: number, total: number) => void,
): Promise<LayerInputMeans[]> {
  const dir = await mkdtemp(join(tmpdir(), "bam-probe-"));
  try {
    await writeOnnx(model, dir, { probes: true, signal });
    const session = await OnnxSession.open(join(dir, MODEL_FILE));
    try {
      const { numLayers: layers, hiddenSize: H } = model.features;
      const names = Array.from({ length: layers }, (_, l) => [`attn_input.${l}`, `ffn_input.${l}`]).flat();
      const results: LayerInputMeans[] = [];
      const total = promptLists.reduce((sum, prompts) => sum + prompts.length, 0);
      let done = 0;
      onPrompt?.(done, total);
      for (const prompts of promptLists) {
        if (prompts.length === 0) throw new BamError("OPTIONS_INVALID", "a prompt list is empty");
        const sums = names.map(() => new Float64Array(H));
        for (const ids of prompts) {
          if (signal?.aborted) throw new BamError("ABORTED", "router init interrupted");
          if (ids.length === 0) throw new BamError("OPTIONS_INVALID", "a prompt has no tokens");
          const outputs = await session.forward(BigInt64Array.from(ids, BigInt), 1, ids.length, names);
          outputs.forEach((states, i) => {
            const sum = sums[i]!;
            for (let t = 0; t < ids.length; t++)
              for (let h = 0; h < H; h++) sum[h] = sum[h]! + states[t * H + h]! / ids.length / prompts.length;
          });
          onPrompt?.(++done, total);
        }
        results.push({ attention: sums.filter((_, i) => i % 2 === 0), ffn: sums.filter((_, i) => i % 2 === 1) });
      }
      return results;
    } finally {
      await session.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
