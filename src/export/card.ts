/**
 * The model card (README.md) written into every output folder: YAML front
 * matter the Hugging Face Hub reads (base_model, base_model_relation, tags,
 * library_name), then what the model is, how to load it and how to fine-tune it.
 */
import YAML from "yaml";
import type { Family } from "../arch/types.js";
import { parseRepoRef } from "../hub/index.js";
import type { FormatMoe } from "./formats.js";

/** What the card says of the model (src/upcycle assembles it from its plan). */
export interface CardModel {
  /** The output folder, as the user named it. */
  output: string;
  /** The card's title, or null for the output folder's name. */
  title: string | null;
  /** The seeds' family. */
  family: Family;
  /** The names of the models read, in order (the seeds, then a --shared-from model that is none of them). */
  seedNames: readonly string[];
  /** Drop-Upcycling's ratio (0: plain copies). */
  dropRatio: number;
  /** The mixture. */
  moe: FormatMoe;
  /** Parameters of the output. */
  totalParameters: number;
  /** Parameters one token runs through. */
  activeParameters: number;
  /** Forward FLOPs per token relative to one seed. */
  flopsPerTokenRatio: number;
  /** The plan's warnings, one line each. */
  warnings: readonly string[];
}

/** What the card needs of a seed besides the CardModel: its name and its own config.json. */
export interface CardSeed {
  /** The repository id for a seed from the Hub, else the folder's name (src/hub). */
  name: string;
  rawConfig: Record<string, unknown>;
}

/**
 * A seed's Hugging Face repository id, or undefined. A seed from the Hub is
 * named by its id; a local folder counts as the id its config's
 * `_name_or_path` names (transformers writes the id a model was loaded
 * from), only when that is an id owner/name with no revision.
 */
export function seedRepoId(seed: CardSeed): string | undefined {
  if (parseRepoRef(seed.name) !== undefined) return seed.name; // a folder's name never holds a "/"
  const named = seed.rawConfig._name_or_path;
  return typeof named === "string" && !named.includes("@") && parseRepoRef(named) !== undefined ? named : undefined;
}

/** The card's front matter, as an object (YAML.stringify writes it, quoting what needs quoting). */
export function cardMetadata(seeds: CardSeed[]): Record<string, unknown> {
  const ids = [...new Set(seeds.map(seedRepoId).filter((id): id is string => id !== undefined))];
  return {
    ...(ids.length > 0 ? { base_model: ids, base_model_relation: "merge" } : {}),
    tags: ["moe", "bam", "merge", "mixture-of-experts"],
    library_name: "transformers",
  };
}

/** Python that loads the output folder `path`: remote code for the BAM folder, stock transformers for the native formats. */
export function loadSnippet(path: string, remoteCode: boolean): string {
  const folder = JSON.stringify(path); // a valid Python string literal for any path JSON can write
  // The tokenizer too: AutoTokenizer reads config.json, whose auto_map names remote code, and would prompt.
  const remote = remoteCode ? ", trust_remote_code=True" : "";
  return `from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(${folder}${remote}, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(${folder}${remote})
`;
}

/** A shell word: as it is when plain, else single-quoted. */
const shellWord = (text: string) => (/^[\w./=-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`);

/** The one-GPU fine-tune command of README.md's "Fine-tuning on GPUs", for this output. */
export function finetuneCommand(path: string): string {
  const out = `runs/${path.split("/").pop()}`;
  return `python node_modules/bam-upcycle/scripts/finetune.py --model ${shellWord(path)} --out ${shellWord(out)} --data web=web.txt code=code.txt --steps 1000 --global-batch 32`;
}

export function modelCard(model: CardModel, recipe: string, remoteCode: boolean, seeds: CardSeed[]): string {
  const { moe } = model;
  const path = model.output.replace(/\/+$/, "") || model.output;
  const title = model.title ?? path.split("/").pop() ?? "model";
  const method =
    model.seedNames.length === 1
      ? model.dropRatio > 0
        ? `Drop-Upcycling (ratio ${model.dropRatio}) of one seed`
        : "sparse upcycling of one seed"
      : moe.attentionExperts === "merged"
        ? "BTX (FFN experts, averaged attention)"
        : `BAM (FFN experts and ${moe.attentionExperts === "moa" ? "soft attention experts" : "attention experts with shared K/V"})`;
  const local = seeds.filter((seed) => seedRepoId(seed) === undefined).map((seed) => `\`${seed.name}\``);
  return `---
${YAML.stringify(cardMetadata(seeds)).trimEnd()}
---

# ${title}

A Mixture-of-Experts model built by [bam-upcycle](https://www.npmjs.com/package/bam-upcycle) by ${method},
from the ${model.family} seeds ${model.seedNames.map((name) => `\`${name}\``).join(", ")}${local.length > 0 ? ` (local folders, with no Hugging Face id: ${[...new Set(local)].join(", ")})` : ""}.

| | |
|---|---|
| experts | ${moe.numExperts} FFN experts, top-${moe.expertsPerToken} routing, ${moe.normTopkProb ? "renormalised gate (norm_topk_prob)" : "each expert weighted by its probability over all experts"} |
| attention | ${moe.attentionExperts} |
| block | ${moe.block} |
| parameters | ${(model.totalParameters / 1e6).toFixed(1)}M total, ${(model.activeParameters / 1e6).toFixed(1)}M active per token |
| forward FLOPs per token | ${model.flopsPerTokenRatio.toFixed(2)}x one seed |

The routers are new: the model needs fine-tuning (Attend-Mix training) before it is useful.
${model.warnings.map((w) => `\n> Note: ${w}.\n`).join("")}
## Load

${remoteCode ? "The model code (`modeling_bam.py`) is in this folder, hence `trust_remote_code=True`." : "Stock transformers loads this folder."}

\`\`\`python
${loadSnippet(path, remoteCode)}\`\`\`

## Fine-tune

With the Python packages of bam-upcycle's \`requirements.txt\`, on one GPU (\`torchrun --nproc-per-node 8\` instead of \`python\` for eight; in a clone of
bam-upcycle the script is \`scripts/finetune.py\`):

\`\`\`bash
${finetuneCommand(path)}
\`\`\`

The training loss adds the load-balance loss (coefficient ${moe.routerAuxLossCoef}) and the router z-loss (${moe.routerZLossCoef}).

## Recipe

\`\`\`yaml
${recipe.trimEnd()}
\`\`\`
`;
}
