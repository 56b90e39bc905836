"""scripts/bamtrain/routing.py on small random BAM models (torch only):
python3 -m unittest test/python/test_routing.py"""

import os
import sys
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
sys.path.insert(0, HERE)
from test_modeling import BASE, mb, randomize  # noqa: E402

from bamtrain import routing  # noqa: E402
from configuration_bam import BamConfig  # noqa: E402


def model(norm_topk_prob=False, **over):
    c = BamConfig(
        **dict(
            BASE,
            **dict(
                dict(
                    num_experts=4,
                    num_experts_per_tok=1,
                    attention_experts="moa",
                    block="parallel",
                    norm_topk_prob=norm_topk_prob,
                ),
                **over,
            ),
        )
    )
    return randomize(mb.BamForCausalLMCore(c), 3).eval()


def tokens(seed, shape=(2, 12)):
    return torch.randint(0, BASE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


class TestDomainRouting(unittest.TestCase):
    def test_shares_per_layer_sum_to_one_and_weight_batches_by_tokens(self):
        m = model()
        big, small = tokens(1, (3, 12)), tokens(2, (1, 12))
        both = routing.domain_routing(m, {"d": [big, small]})["d"]
        alone = [routing.domain_routing(m, {"d": [x]})["d"] for x in (big, small)]
        self.assertEqual(both["tokens"], 48)
        for key in ("ffn_share", "attn_weight"):
            self.assertEqual(len(both[key]), BASE["num_hidden_layers"])
            for l, row in enumerate(both[key]):
                self.assertAlmostEqual(sum(row), 1.0, places=5)
                for e, v in enumerate(row):  # 36 tokens of one batch, 12 of the other
                    self.assertAlmostEqual(v, (36 * alone[0][key][l][e] + 12 * alone[1][key][l][e]) / 48, places=6)

    def test_merged_attention_and_dense_models(self):
        x = tokens(3)
        self.assertNotIn("attn_weight", routing.domain_routing(model(attention_experts="merged"), {"d": [x]})["d"])
        dense = randomize(
            mb.BamForCausalLMCore(BamConfig(**dict(BASE, num_experts=1, attention_experts="merged"))), 3
        ).eval()
        self.assertEqual(routing.domain_routing(dense, {"d": [x]}), {})
        self.assertEqual(routing.lm_grad_norms(dense, x), {"ffn": None, "attn": None})


class TestLmGradNorms(unittest.TestCase):
    def test_the_lm_loss_reaches_the_top1_ffn_router_only_through_the_papers_gate(self):
        x = tokens(4)
        paper, renorm = model(False), model(True)
        g_paper, g_renorm = routing.lm_grad_norms(paper, x), routing.lm_grad_norms(renorm, x)
        self.assertGreater(g_paper["ffn"], 1e-3)
        self.assertLess(g_renorm["ffn"], 1e-6 * g_paper["ffn"])
        self.assertGreater(g_paper["attn"], 1e-3)  # the soft attention router learns under either gate
        self.assertGreater(g_renorm["attn"], 1e-3)
        self.assertTrue(all(p.grad is None for p in paper.parameters()), "the optimiser's .grad is left alone")

    def test_matches_a_direct_backward_of_the_nll(self):
        m, x = model(), tokens(5)
        got = routing.lm_grad_norms(m, x)
        m.zero_grad()
        m(input_ids=x, labels=x, use_cache=False)["nll"].backward()
        ffn = torch.cat([layer.mlp.router.weight.grad.flatten() for layer in m.model.layers])
        self.assertAlmostEqual(got["ffn"], ffn.norm().item(), places=5)


if __name__ == "__main__":
    unittest.main()
