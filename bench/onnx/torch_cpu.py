"""PyTorch on CPU, the row bench/onnx/generate.ts sets beside our engine.

The same model folder through transformers (trust_remote_code for a BAM
folder: its modeling_bam.py; the stock class for a seed), float32 as our
engine runs, torch.set_num_threads as given. Two measurements, as ours:
  - scoring: a forward and the summed NLL over non-overlapping windows of
    --context tokens (what `bam eval` does), tokens per second in the model;
  - generation: `generate` with its KV cache, greedy, after each prompt; the
    time of each new token is the gap between consecutive calls of a logits
    processor (one decode forward each), and the median is reported.
Prints one JSON object on stdout.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


class StepClock(LogitsProcessor):
    """Records when each generation step's logits arrive."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--remote", action="store_true", help="load with trust_remote_code (a BAM folder)")
    parser.add_argument("--tokens", required=True, help="flat uint16 token ids")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of prompts, each a list of token ids")
    parser.add_argument("--new-tokens", type=int, default=21)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.remote, dtype=torch.float32)
    model.eval()
    ids = torch.from_numpy(np.fromfile(args.tokens, dtype=np.uint16).astype(np.int64))

    with torch.inference_mode():
        started = time.perf_counter()
        nll = 0.0
        for start in range(0, len(ids), args.context):
            window = ids[start : start + args.context].unsqueeze(0)
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        seconds = time.perf_counter() - started

        generation = []
        for prompt in json.load(open(args.prompts)):
            clock = StepClock()
            model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                use_cache=True,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
            gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
            generation.append({"promptTokens": len(prompt), "stepSeconds": statistics.median(gaps)})

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "eval": {"tokens": len(ids), "seconds": seconds, "tokensPerSecond": len(ids) / seconds, "nll": nll},
                "generation": generation,
            }
        )
    )


if __name__ == "__main__":
    main()
