/**
 * The TypeScript writer and the Python model agree on config.json's keys: every key `bam upcycle` writes
 * is a parameter of BamConfig (python/configuration_bam.py) or a key transformers itself owns, and every
 * BamConfig parameter is written, except those NOT_WRITTEN lists. A key added on one side only fails
 * here, not in a user's from_pretrained.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { upcycle } from "../../src/upcycle/index.js";
import { fixture, withTempDir } from "../helpers.js";
import { NO_TORCH, runPython } from "./python.js";

/** Keys of config.json that belong to transformers' PretrainedConfig, not to BamConfig's signature. */
const TRANSFORMERS_KEYS = ["architectures", "auto_map", "model_type", "dtype", "torch_dtype", "transformers_version"];
/**
 * BamConfig parameters an upcycle leaves to their defaults: the training-time knobs a fine-tune sets
 * (scripts/finetune.py flags), and initializer_range, used only to initialise a fresh model.
 */
const NOT_WRITTEN = [
  "router_jitter",
  "expert_dropout",
  "hidden_dropout",
  "capacity_factor",
  "use_cache",
  "initializer_range",
];

const BAM_CONFIG_PARAMETERS = `
import inspect, json, sys
sys.path.insert(0, "python")
from configuration_bam import BamConfig
params = inspect.signature(BamConfig.__init__).parameters
print(json.dumps([n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]))
`;

test("config.json's keys are BamConfig's parameters, and BamConfig's are written", { skip: NO_TORCH }, () =>
  withTempDir(async (dir) => {
    const out = join(dir, "bam");
    await upcycle({ seeds: [fixture("qwen3", "base"), fixture("qwen3", "code")], output: out });
    const written = Object.keys(JSON.parse(await readFile(join(out, "config.json"), "utf8")) as object);
    const parameters = JSON.parse(runPython(["-c", BAM_CONFIG_PARAMETERS])) as string[];
    assert.ok(parameters.length > 30, `read BamConfig's signature (${parameters.length} parameters)`);
    const unknown = written.filter((key) => !parameters.includes(key) && !TRANSFORMERS_KEYS.includes(key));
    assert.deepEqual(unknown, [], "written by bam upcycle but not a BamConfig parameter");
    const unwritten = parameters.filter((key) => !written.includes(key) && !NOT_WRITTEN.includes(key));
    assert.deepEqual(unwritten, [], "BamConfig parameters bam upcycle does not write");
  }),
);
