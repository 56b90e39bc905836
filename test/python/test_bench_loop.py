"""bench/train/loop_experts.py (the training benchmark's per-expert-loop baseline) computes the same
function and gradient as modeling_bam.py's fused experts, for soft MoA and shared-KV attention experts,
top-2 FFN routing with both gates, biases and qk-norm: a baseline that computed something else would make
the benchmark's ratio meaningless."""

import os
import sys
import unittest

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
for p in (os.path.join(REPO, "python"), os.path.join(REPO, "bench", "train")):
    if p not in sys.path:
        sys.path.insert(0, p)

from loop_experts import loop_experts  # noqa: E402

import modeling_bam as mb  # noqa: E402


class TestLoopExperts(unittest.TestCase):
    def test_loop_experts_compute_the_fused_model(self):
        c = dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=3,
            num_experts_per_tok=2,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            qk_norm="shared",
        )
        x = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
        for attention in ("moa", "shared-kv"):
            for norm_topk_prob in (True, False):
                torch.manual_seed(0)
                model = mb.BamForCausalLMCore(dict(c, attention_experts=attention, norm_topk_prob=norm_topk_prob))
                model.train()
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.1)

                def loss_and_grads():
                    model.zero_grad()  # noqa: B023
                    out = model(input_ids=x, labels=x, use_cache=False)  # noqa: B023
                    out["loss"].backward()
                    return out["loss"].detach(), [p.grad.clone() for p in model.parameters()]  # noqa: B023

                fused = loss_and_grads()
                with loop_experts():
                    looped = loss_and_grads()
                again = loss_and_grads()  # the context restored the fused code
                torch.testing.assert_close(looped[0], fused[0], atol=1e-5, rtol=1e-5)
                for a, b in zip(looped[1], fused[1]):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(again[0], fused[0], atol=0, rtol=0)


if __name__ == "__main__":
    unittest.main()
