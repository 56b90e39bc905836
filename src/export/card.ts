/** The model card (README.md) written into every output folder. */
import type { UpcyclePlan } from "../upcycle/plan.js";

export function modelCard(plan: UpcyclePlan, recipe: string, remoteCode: boolean): string {
  const { summary, moe } = plan;
  const name = plan.options.output.replace(/\/+$/, "").split("/").pop() ?? "model";
  const loadArgs = remoteCode ? ", trust_remote_code=True" : "";
  const method = plan.seeds.length === 1
    ? plan.options.dropRatio > 0 ? `Drop-Upcycling (ratio ${plan.options.dropRatio}) of one seed` : "sparse upcycling of one seed"
    : moe.attentionExperts === "merged" ? "BTX (FFN experts, averaged attention)" : `BAM (FFN experts and ${moe.attentionExperts === "moa" ? "soft attention experts" : "attention experts with shared K/V"})`;
  return `---
base_model:
${plan.seeds.map((s) => `- ${s.name}`).join("\n")}
tags:
- moe
- bam
- mixture-of-experts
- upcycled
library_name: transformers
---

# ${name}

A Mixture-of-Experts model built by [bam-upcycle](https://www.npmjs.com/package/bam-upcycle) by ${method},
from the ${plan.features.family} seeds ${plan.seeds.map((s) => `\`${s.name}\``).join(", ")}.

| | |
|---|---|
| experts | ${moe.numExperts} FFN experts, top-${moe.expertsPerToken} routing, ${moe.normTopkProb ? "renormalised gate (norm_topk_prob)" : "each expert weighted by its probability over all experts"} |
| attention | ${moe.attentionExperts} |
| block | ${moe.block} |
| parameters | ${(summary.totalParameters / 1e6).toFixed(1)}M total, ${(summary.activeParameters / 1e6).toFixed(1)}M active per token |
| forward FLOPs per token | ${summary.flopsPerTokenRatio.toFixed(2)}x one seed |

The routers are new: the model needs fine-tuning (Attend-Mix training) before it is useful.
${plan.warnings.map((w) => `\n> Note: ${w}.\n`).join("")}
## Load

\`\`\`python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("${name}"${loadArgs}, dtype="bfloat16")
tokenizer = AutoTokenizer.from_pretrained("${name}")
\`\`\`

## Fine-tune

\`\`\`bash
torchrun --nproc-per-node 8 scripts/finetune.py --model ${name} --data code.txt math.txt general.txt --out ${name}-mixed
\`\`\`

The training loss adds the load-balance loss (coefficient ${moe.routerAuxLossCoef}) and the router z-loss (${moe.routerZLossCoef}).

## Recipe

\`\`\`yaml
${recipe.trimEnd()}
\`\`\`
`;
}
