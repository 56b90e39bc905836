"""Mean router inputs of seeds' averaged models, by python/modeling_bam.py, for router-init.test.ts.

    python3 test/onnx/hidden_means.py JOBS.json
JOBS.json: a list of {"block": "parallel"|"sequential", "folders": [...], "prompts": [[[ids]]]}. The
folders are dense-layout BAM folders (`bam upcycle SEED -o FOLDER`), averaged uniformly into one model
with the job's block; prompts is a list of prompt lists (token ids). Prints, per job, per prompt list,
per layer, the mean over prompts of each prompt's mean over tokens of the attention's input ("attn")
and of the FFN's input ("ffn"): [{"attn": [[[H floats] per layer] per list], "ffn": ...} per job].
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from bam_folder import load_folder  # noqa: E402

from modeling_bam import BamForCausalLMCore  # noqa: E402


def averaged(folders, block):
    with open(os.path.join(folders[0], "config.json")) as f:
        config = {**json.load(f), "block": block}
    model = BamForCausalLMCore(config).float().eval()
    states = [load_folder(folder).state_dict() for folder in folders]
    model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return model, config["hidden_size"]


def router_inputs(model, hidden, prompt_lists):
    seen = {}
    layers = model.model.layers
    for l, layer in enumerate(layers):
        layer.attn.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(("attn", l), args[0]))
        layer.mlp.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(("ffn", l), args[0]))
    out = {"attn": [], "ffn": []}
    for prompts in prompt_lists:
        sums = {site: [torch.zeros(hidden, dtype=torch.float64) for _ in layers] for site in out}
        for ids in prompts:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]), use_cache=False)
            for (site, l), x in seen.items():
                sums[site][l] = sums[site][l] + x[0].double().mean(0) / len(prompts)
        for site in out:
            out[site].append([v.tolist() for v in sums[site]])
    return out


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        model, hidden = averaged(job["folders"], job["block"])
        results.append(router_inputs(model, hidden, job["prompts"]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
