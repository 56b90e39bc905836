"""CPU tests of python/modeling_bam.py that need only torch: python3 -m unittest discover -s test/python

The main check is BAM's identity property (docs/method.md): an E-expert model whose experts
all copy one dense seed computes that seed's function, whatever its routers hold.
"""

import math
import os
import re
import sys
import unittest

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import modeling_bam as mb  # noqa: E402
from configuration_bam import BamConfig  # noqa: E402

torch.set_default_dtype(torch.float32)
ATOL = 1e-5

BASE = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    norm_eps=1e-5,
)

# seed-like feature sets (names after the family they imitate)
SEEDS = {
    "llama": dict(),
    "qwen2_sliding_llama3": dict(
        qkv_bias=True,
        sliding_window=4,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen3": dict(
        qk_norm="shared", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    ),
    "gemma": dict(
        norm_unit_offset=True,
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(32),
        tie_word_embeddings=True,
        num_key_value_heads=1,
        head_dim=16,
    ),
    "gpt_neox": dict(
        norm_type="layer",
        norm_bias=True,
        hidden_act="gelu",
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        rotary_dim=4,
        seed_parallel_block=True,
        num_key_value_heads=4,
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
    "phi": dict(
        norm_type="layer",
        norm_bias=True,
        hidden_act="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        rotary_dim=4,
        second_norm=False,
        seed_parallel_block=True,
        qk_norm="shared",
        num_key_value_heads=4,
    ),
    "cohere": dict(
        norm_type="layer",
        norm_bias=False,
        rope_style="interleaved",
        qk_norm="per_head",
        second_norm=False,
        seed_parallel_block=True,
        tie_word_embeddings=True,
        logit_scale=0.25,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    ),
    "gpt2": dict(
        norm_type="layer",
        norm_bias=True,
        hidden_act="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        rotary_dim=0,
        learned_positions=True,
        tie_word_embeddings=True,
        num_key_value_heads=4,
    ),
    "relu_attnscale": dict(hidden_act="relu", attention_scale=0.2, num_key_value_heads=4),
}


def config(seed, **moe):
    feats = dict(SEEDS[seed])
    block = "parallel" if feats.get("seed_parallel_block") else "sequential"
    d = dict(BASE, **feats)
    d.update(num_experts=1, num_experts_per_tok=1, attention_experts="merged", block=block)
    d.update(moe)
    return BamConfig(**d)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norms near 1, the rest near 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + one)
    return model


def dense_model(seed, rng=0, **over):
    return randomize(mb.BamForCausalLMCore(config(seed, **over)), rng).eval()


def source_name(name):
    """BAM name of an upcycled model -> the dense (E=1, merged) name it copies (None: a router)."""
    if name.endswith("router.weight"):
        return None
    name = re.sub(r"\.attn\.experts\.\d+\.", ".attn.", name)
    return re.sub(r"\.mlp\.experts\.\d+\.", ".mlp.experts.0.", name)


def upcycle(denses, attention, E=3, k=2, block=None, router_seed=1, router_scale=2.0, **over):
    """Build an E-expert model from dense seeds: expert e copies denses[e % len], the rest copies denses[0]."""
    c0 = denses[0].config
    d = {key: v for key, v in vars(c0).items() if not key.startswith("_")}
    d.update(num_experts=E, num_experts_per_tok=k, attention_experts=attention, block=block or c0.block, **over)
    moe = mb.BamForCausalLMCore(BamConfig(**d)).to(denses[0].lm_head.weight.dtype).eval()
    g = torch.Generator().manual_seed(router_seed)
    sds = [m.state_dict() for m in denses]
    with torch.no_grad():
        for name, p in moe.state_dict(keep_vars=True).items():
            src = source_name(name)
            if src is None:
                p.copy_(torch.randn(p.shape, generator=g) * router_scale)
                continue
            m = re.search(r"\.experts\.(\d+)\.", name)
            p.copy_(sds[int(m.group(1)) % len(sds) if m else 0][src])
    return moe


def ids(B=2, T=9, V=61, seed=3):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class TestIdentity(unittest.TestCase):
    def test_upcycled_copies_compute_the_seed(self):
        """float32: within 1e-5 of the logits' scale; float64: exact up to float64 rounding."""
        x = ids()
        for dtype, tol in ((torch.float32, ATOL), (torch.float64, 1e-11)):
            for seed in SEEDS:
                dense = dense_model(seed).to(dtype)
                ref = dense(x)["logits"]
                self.assertTrue(torch.isfinite(ref).all(), seed)
                atol = tol * max(1.0, ref.abs().max().item())
                for attention in ("moa", "shared-kv", "merged"):
                    with self.subTest(dtype=dtype, seed=seed, attention=attention):
                        moe = upcycle(
                            [dense], attention, norm_topk_prob=True
                        )  # top-2 of 3: needs the renormalised gate
                        out = moe(x)
                        torch.testing.assert_close(out["logits"], ref, atol=atol, rtol=0)
                        self.assertIsNotNone(out["aux_loss"])

    def test_paper_gate_keeps_the_seed_only_at_k_equal_e(self):
        """The paper's gate weights the chosen experts by their probabilities over all E: they sum to 1
        only where k = E; at k < E the FFN output shrinks and the copies no longer compute the seed."""
        x = ids()
        dense = dense_model("llama")
        ref = dense(x)["logits"]
        atol = ATOL * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(
            upcycle([dense], "moa", k=3, norm_topk_prob=False)(x)["logits"], ref, atol=atol, rtol=0
        )
        differs = (upcycle([dense], "moa", k=2, norm_topk_prob=False)(x)["logits"] - ref).abs().max().item()
        self.assertGreater(differs, 100 * atol)

    def test_dense_e1_moa_layout(self):
        """E = 1 in the expert layout (no routers) is the dense model too."""
        dense = dense_model("llama")
        for attention in ("moa", "shared-kv"):
            moe = upcycle([dense], attention, E=1, k=1)
            self.assertFalse(any("router" in n for n in moe.state_dict()))
            torch.testing.assert_close(moe(ids())["logits"], dense(ids())["logits"], atol=ATOL, rtol=ATOL)

    def test_parallel_seed_needs_parallel_block(self):
        """A sequential block on a parallel seed is a different function (docs/method.md): the test can tell."""
        dense = dense_model("gpt_neox")
        moe = upcycle([dense], "moa", block="sequential")
        self.assertFalse(torch.allclose(moe(ids())["logits"], dense(ids())["logits"], atol=1e-3))


def rope_ref(x, pos, dim, theta):
    """Reference half-style rope on x [T, D] with explicit angles."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    ang = pos[:, None].float() * inv  # [T, dim/2]
    x1, x2 = x[:, : dim // 2], x[:, dim // 2 : dim]
    out = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    return torch.cat([out, x[:, dim:]], -1)


def mha_ref(h, p, c):
    """Plain multi-head causal attention of one seed on h [T, H]; p: its tensors by short name."""
    T = h.shape[0]
    nh, nkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out = torch.zeros(T, nh * D)
    for i in range(nh):
        j = i // (nh // nkv)
        q = h @ p["q_proj.weight"][i * D : (i + 1) * D].T + p["q_proj.bias"][i * D : (i + 1) * D]
        k = h @ p["k_proj.weight"][j * D : (j + 1) * D].T + p["k_proj.bias"][j * D : (j + 1) * D]
        v = h @ p["v_proj.weight"][j * D : (j + 1) * D].T + p["v_proj.bias"][j * D : (j + 1) * D]
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + c.norm_eps) * p["q_norm.weight"]
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + c.norm_eps) * p["k_norm.weight"]
        pos = torch.arange(T)
        q, k = rope_ref(q, pos, c.rotary_dim, c.rope_theta), rope_ref(k, pos, c.rotary_dim, c.rope_theta)
        att = (q @ k.T) / math.sqrt(D) + torch.full((T, T), float("-inf")).triu(1)
        out[:, i * D : (i + 1) * D] = att.softmax(-1) @ v
    return out @ p["o_proj.weight"].T + p["o_proj.bias"]


class TestMixtureOfAttention(unittest.TestCase):
    def test_moa_is_gated_sum_of_expert_attentions(self):
        over = dict(qkv_bias=True, attn_out_bias=True, qk_norm="shared")
        denses = [dense_model("llama", rng=10 + e, **over) for e in range(3)]
        h = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
        for attention in ("moa", "shared-kv"):
            with self.subTest(attention=attention):
                moe = upcycle(denses, attention)
                attn = moe.model.layers[0].attn
                c = moe.config
                rope = mb.rope_cos_sin(c, torch.arange(7)[None])
                out, logits = attn(h[None], rope, mb.MaskFn(None, 7, 7, None, None), None)
                g = (h @ attn.router.weight.T).softmax(-1)  # [T, E]
                ref = 0
                for e in range(3):
                    dsd = denses[e].state_dict()
                    p = {k.split("attn.")[1]: v for k, v in dsd.items() if k.startswith("model.layers.0.attn.")}
                    if attention == "shared-kv":  # shared k, v, k_norm: those of the upcycled model
                        for n in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight"):
                            p[n] = attn.state_dict()[n]
                    ref = ref + g[:, e : e + 1] * mha_ref(h, p, c)
                torch.testing.assert_close(out[0], ref, atol=ATOL, rtol=ATOL)
                torch.testing.assert_close(logits[0], h @ attn.router.weight.T, atol=ATOL, rtol=ATOL)

    def test_heads_keep_the_projections_layout(self):
        """Rope writes q and k in the projections' [B, T, heads, D] layout (rope_layout), so attention's
        output merges its heads by a view and the gradients reach the projections through views: no
        activation is copied, forward or backward (each such copy showed as 3 to 5% of the eager step)."""
        from torch.profiler import profile

        for attention in ("moa", "merged"):
            with self.subTest(attention=attention):
                attn = upcycle([dense_model("llama", rng=e) for e in range(2)], attention).model.layers[0].attn
                c = attn.c
                h = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
                rope = mb.rope_cos_sin(c, torch.arange(7)[None])
                with profile(record_shapes=True) as prof:
                    out, _ = attn(h, rope, mb.MaskFn(None, 7, 7, None, None), None)
                    out.square().sum().backward()
                copies = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_"]
                self.assertGreater(h.grad.abs().max().item(), 0)
                self.assertEqual([s for s in copies if len(s) >= 4], [])  # heads-shaped: [B, T, (E,) heads, D]

    def test_kv_cache_heads(self):
        dense = dense_model("llama")
        for attention, heads in (("moa", 3 * 2), ("shared-kv", 2), ("merged", 2)):
            cache = upcycle([dense], attention)(ids(), use_cache=True)["past_key_values"]
            self.assertEqual(cache.keys[0].shape[1], heads, attention)


class TestMoE(unittest.TestCase):
    def moe_layer(self, E=4, k=2, **over):
        c = BamConfig(**dict(BASE, num_experts=E, num_experts_per_tok=k, **over))
        layer = mb.MoE(c)
        randomize(layer, 7)
        return layer

    def test_topk_gates(self):
        """norm_topk_prob true: the chosen probabilities renormalised (Mixtral); false: each chosen expert
        weighted by its probability over all E (BAM 3.3, Switch)."""
        for norm in (True, False):
            with self.subTest(norm_topk_prob=norm):
                layer = self.moe_layer(norm_topk_prob=norm)
                x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
                y, logits, idx = layer(x)
                xf = x.reshape(-1, 32)
                probs = (xf @ layer.router.weight.T).softmax(-1)
                w, i = probs.topk(2, -1)
                if norm:
                    w = w / w.sum(-1, keepdim=True)
                ref = torch.stack(
                    [sum(w[n, j] * layer.experts[int(i[n, j])](xf[n]) for j in range(2)) for n in range(10)]
                )
                torch.testing.assert_close(y.reshape(-1, 32), ref, atol=ATOL, rtol=ATOL)
                self.assertTrue(torch.equal(idx, i))

    def test_capacity_factor_drops_overflow(self):
        layer = self.moe_layer(E=4, k=1, capacity_factor=0.5)
        x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
        y, logits, idx = layer(x)
        cap = math.ceil(0.5 * 16 / 4)
        keep = layer.capacity_keep(idx)
        for e in range(4):  # at most `cap` tokens per expert, the first ones in token order
            chosen = (idx[:, 0] == e).nonzero().flatten()
            self.assertEqual(
                keep[chosen, 0].tolist(), [1.0] * min(cap, len(chosen)) + [0.0] * max(0, len(chosen) - cap)
            )
        dropped = keep[:, 0] == 0
        self.assertTrue(dropped.any())
        self.assertTrue(torch.equal(y.reshape(16, 32)[dropped], torch.zeros(int(dropped.sum()), 32)))
        layer.capacity_factor = None
        y_free, _, _ = layer(x)
        torch.testing.assert_close(y_free.reshape(16, 32)[~dropped], y.reshape(16, 32)[~dropped])

    def test_capacity_factor_model_runs(self):
        dense = dense_model("llama")
        moe = upcycle([dense], "moa", capacity_factor=1.0)
        moe.train()
        out = moe(ids(), labels=ids())
        out["loss"].backward()
        self.assertTrue(torch.isfinite(out["loss"]))

    def test_grouped_path_matches_loop(self):
        """The grouped_mm bookkeeping (sorting, padded groups, offsets, per-row biases), run on CPU with a
        reference grouped_mm when torch has none (the real kernel is CUDA bf16: see test_hf.py)."""

        def ref_grouped_mm(a, b, offs=None):  # a [rows, K], b [E, K, N], offs int32 group ends
            out, start = [], 0
            for e, end in enumerate(offs.tolist()):
                out.append(a[start:end].float() @ b[e].float())
                start = end
            return torch.cat(out).to(a.dtype)

        saved = getattr(F, "grouped_mm", None)
        F.grouped_mm = saved or ref_grouped_mm
        try:
            for k, over in ((2, dict()), (1, dict()), (2, dict(gated_mlp=False, mlp_bias=True, hidden_act="gelu"))):
                layer = self.moe_layer(E=4, k=k, **over)
                x0 = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(4))
                dy = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(5))
                res = []
                for mode in (False, True):
                    layer.grouped_mm = mode
                    layer.zero_grad()
                    x = x0.clone().requires_grad_()
                    y = layer(x)[0]
                    y.backward(dy)
                    res.append([y.detach(), x.grad] + [p.grad.clone() for p in layer.experts.parameters()])
                for i, (loop, grouped) in enumerate(zip(*res)):  # output, the tokens' and the experts' gradients
                    with self.subTest(k=k, over=over, tensor=i):
                        self.assertGreater(loop.abs().max().item(), 0)
                        rel = ((grouped - loop).norm() / loop.norm()).item()
                        self.assertLess(rel, 0.02)  # bf16 rounding of the grouped path
        finally:
            if saved is None:
                del F.grouped_mm


class TestLosses(unittest.TestCase):
    def test_aux_losses_match_direct_computation(self):
        denses = [dense_model("llama", rng=20 + e) for e in range(3)]
        moe = upcycle(denses, "moa")
        x = ids(B=2, T=9)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0  # left padding: pad tokens are left out of the router statistics
        out = moe(x, attention_mask=mask, labels=x, output_router_logits=True)
        valid = mask.reshape(-1).bool()
        lb = z = 0
        for al, fl in zip(out["attn_router_logits"], out["router_logits"]):
            al = al.reshape(-1, 3)[valid]
            fl = fl[valid]
            z = z + torch.logsumexp(al, -1).pow(2).mean() + torch.logsumexp(fl, -1).pow(2).mean()
            probs = fl.softmax(-1)
            top = probs.topk(2, -1)[1]
            f = torch.stack([(top == e).float().sum() for e in range(3)]) / (top.numel())
            lb = lb + 3 * (f * probs.mean(0)).sum()
        torch.testing.assert_close(out["lb_loss"], lb)
        torch.testing.assert_close(out["z_loss"], z)
        logits = out["logits"]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, 61), x[:, 1:].reshape(-1))
        torch.testing.assert_close(out["nll"], nll)
        torch.testing.assert_close(out["loss"], nll + 0.01 * lb + 0.001 * z)
        self.assertEqual(out["expert_load"].shape, (2, 3))
        torch.testing.assert_close(out["expert_load"].sum(-1), torch.ones(2))

    def test_gradients_reach_every_parameter(self):
        over = dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, qk_norm="shared")
        denses = [dense_model("llama", rng=30 + e, **over) for e in range(3)]
        for attention in ("moa", "shared-kv", "merged"):
            with self.subTest(attention=attention):
                moe = upcycle(denses, attention, router_scale=0.3).train()
                x = ids(B=4, T=16, seed=8)
                out = moe(x, labels=x)
                out["loss"].backward()
                for n, p in moe.named_parameters():
                    self.assertIsNotNone(p.grad, n)
                    self.assertGreater(p.grad.abs().sum().item(), 0, n)
                self.assertEqual(attention != "merged", any("attn.router" in n for n, _ in moe.named_parameters()))

    def test_ffn_router_learns_from_the_lm_loss(self):
        """With the auxiliary losses off, the FFN router's gradient comes from the LM loss alone. It is of the
        attention router's order at k = 1 and 2 with the paper's gate and at k = 2 renormalised; at k = 1
        renormalised the chosen weight is p / p = 1 whatever the router says, so it is zero up to rounding:
        why `bam upcycle` warns about that combination (docs/method.md, "FFN gating")."""
        denses = [dense_model("llama", rng=60 + e) for e in range(3)]
        switch_init = math.sqrt(0.1 / BASE["hidden_size"])  # bam upcycle's router init (Switch's 0.1 scale)
        ratios = {}
        for k, norm in ((1, False), (2, False), (2, True), (1, True)):
            moe = upcycle(
                denses,
                "moa",
                k=k,
                router_scale=switch_init,
                norm_topk_prob=norm,
                router_aux_loss_coef=0.0,
                router_z_loss_coef=0.0,
            ).train()
            x = ids(B=4, T=16, seed=9)
            out = moe(x, labels=x)
            torch.testing.assert_close(out["loss"], out["nll"])  # nothing but the LM loss
            out["loss"].backward()
            norm_of = lambda part: (
                torch.stack(
                    [
                        p.grad.norm()
                        for n, p in moe.named_parameters()  # noqa: B023
                        if n.endswith(f".{part}.router.weight")
                    ]
                )
                .norm()
                .item()
            )
            self.assertGreater(norm_of("attn"), 0, (k, norm))
            ratios[k, norm] = norm_of("mlp") / norm_of("attn")
        learning = [ratios[1, False], ratios[2, False], ratios[2, True]]
        for ratio in learning:
            self.assertGreater(ratio, 0.05, ratios)  # the same order as the attention router's
        self.assertLess(ratios[1, True], 1e-5 * min(learning), ratios)  # float rounding, not a signal


class TestFusedLoss(unittest.TestCase):
    """skip_logits=True (what finetune.py trains with): the loss from linear_cross_entropy, chunk by chunk,
    without the [N, V] logits, equals the head + F.cross_entropy's, and so do its gradients."""

    def losses_and_grads(self, moe, x, labels, **kw):
        res = []
        for skip in (False, True):
            moe.zero_grad(set_to_none=True)
            out = moe(x, labels=labels, skip_logits=skip, **kw)
            self.assertEqual(out["logits"] is None, skip)
            out["loss"].backward()
            res.append((out["nll"].detach(), {n: p.grad.clone() for n, p in moe.named_parameters()}))
        return res

    def test_equals_the_unfused_loss_and_gradients(self):
        # lm_head bias (phi), logit scale and tied embeddings (cohere), a float64 model: exact up to rounding
        for seed, dtype in (("llama", torch.float32), ("phi", torch.float32), ("cohere", torch.float64)):
            with self.subTest(seed=seed):
                denses = [dense_model(seed, rng=70 + e).to(dtype) for e in range(2)]
                moe = upcycle(denses, "moa", E=2, k=1, router_scale=0.3).train()
                x = ids(B=3, T=11, seed=4)
                labels = x.clone()
                labels[1, 4:7] = -100  # ignored positions count nowhere
                (nll, grads), (fused_nll, fused_grads) = self.losses_and_grads(moe, x, labels)
                torch.testing.assert_close(fused_nll, nll, atol=1e-6, rtol=1e-6)
                for n, g in grads.items():
                    torch.testing.assert_close(fused_grads[n], g, atol=1e-6, rtol=1e-5, msg=n)
                    self.assertGreater(fused_grads[n].abs().sum().item(), 0, n)

    def test_chunks_and_autocast(self):
        """More rows than one chunk, under CPU bf16 autocast: the loss of the bf16 logits, as unfused, and
        gradients as far from float32's as the unfused head's (bf16 rounds both, in different places)."""
        denses = [dense_model("llama", rng=80 + e) for e in range(2)]
        moe = upcycle(denses, "merged", E=2, k=1, router_scale=0.3).train()
        x = ids(B=2, T=40, seed=5)
        chunk_logits, mb.CHUNK_LOGITS = mb.CHUNK_LOGITS, 30 * BASE["vocab_size"]  # 78 rows: 3 chunks of 30
        try:
            _, (_, exact) = self.losses_and_grads(moe, x, x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                (nll, grads), (fused_nll, fused_grads) = self.losses_and_grads(moe, x, x)
        finally:
            mb.CHUNK_LOGITS = chunk_logits
        torch.testing.assert_close(fused_nll, nll, atol=2e-3, rtol=1e-3)
        learning = [n for n, g in exact.items() if g.norm() > 0 and ".router." not in n]  # routers: aux loss only
        self.assertGreater(len(learning), 10)
        error = lambda got: torch.tensor([((got[n] - exact[n]).norm() / exact[n].norm()).item() for n in learning])
        unfused, fused = error(grads), error(fused_grads)
        self.assertGreater(unfused.mean().item(), 1e-3)  # bf16 did round
        self.assertLess(fused.mean().item(), 1.1 * unfused.mean().item())
        self.assertLess(fused.max().item(), 1.25 * unfused.max().item())

    def test_evaluation_needs_no_gradients(self):
        moe = dense_model("cohere", rng=90)
        x = ids(B=2, T=9, seed=6)
        chunk_logits, mb.CHUNK_LOGITS = mb.CHUNK_LOGITS, 5 * BASE["vocab_size"]
        try:
            with torch.no_grad():
                nll = moe(x, labels=x)["nll"]
                out = moe(x, labels=x, skip_logits=True)
        finally:
            mb.CHUNK_LOGITS = chunk_logits
        self.assertIsNone(out["logits"])
        torch.testing.assert_close(out["nll"], nll)


class TestCache(unittest.TestCase):
    def check_incremental(self, moe, T=10, prefix=5):
        x = ids(B=2, T=T, seed=11)
        full = moe(x)["logits"]
        out = moe(x[:, :prefix], use_cache=True)
        cache, steps = out["past_key_values"], [out["logits"]]
        t = prefix
        while t < T:
            n = 2 if t == prefix + 1 else 1  # one 2-token chunk to exercise the explicit mask
            out = moe(x[:, t : t + n], past_key_values=cache, use_cache=True)
            steps.append(out["logits"])
            t += n
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL * max(1.0, full.abs().max().item()), rtol=0)
        self.assertEqual(cache.get_seq_length(), T)

    def test_incremental_equals_full(self):
        for seed in ("llama", "qwen2_sliding_llama3", "gpt2", "cohere"):
            dense = dense_model(seed)
            for attention in ("moa", "shared-kv", "merged"):
                with self.subTest(seed=seed, attention=attention):
                    self.check_incremental(upcycle([dense], attention, router_scale=1.0))
        denses = [dense_model("llama", rng=40 + e) for e in range(3)]
        for attention in ("moa", "shared-kv"):
            with self.subTest(distinct_experts=attention):
                self.check_incremental(upcycle(denses, attention))

    def test_left_padding(self):
        moe = upcycle([dense_model("llama", rng=50 + e) for e in range(3)], "moa")
        x = ids(B=1, T=6, seed=12)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
        ref = moe(x)["logits"]
        out = moe(padded, attention_mask=mask)["logits"][:, 3:]
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


class TestLayout(unittest.TestCase):
    def test_bam_tensor_names(self):
        c = dict(
            BASE,
            num_hidden_layers=1,
            num_experts=2,
            num_experts_per_tok=1,
            qk_norm="shared",
            qkv_bias=True,
            gated_mlp=False,
            block="parallel",
            second_norm=False,
        )
        names = lambda attention: set(mb.BamForCausalLMCore(dict(c, attention_experts=attention)).state_dict())
        L, common = (
            "model.layers.0.",
            {
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.mlp.router.weight",
            },
        )
        for e in range(2):
            common |= {f"{L}mlp.experts.{e}.{p}_proj.weight" for p in ("up", "down")}
        qkv = lambda pre, ps: {f"{pre}{p}_proj.{t}" for p in ps for t in ("weight", "bias")} - {f"{pre}o_proj.bias"}
        moa = set(common) | {f"{L}attn.router.weight"}
        sh = set(moa)
        for e in range(2):
            pre = f"{L}attn.experts.{e}."
            moa |= qkv(pre, "qkv") | {pre + "o_proj.weight", pre + "q_norm.weight", pre + "k_norm.weight"}
            sh |= qkv(pre, "q") | {pre + "o_proj.weight", pre + "q_norm.weight"}
        sh |= qkv(L + "attn.", "kv") | {L + "attn.k_norm.weight"}
        merged = (
            set(common)
            | qkv(L + "attn.", "qkv")
            | {L + "attn.o_proj.weight", L + "attn.q_norm.weight", L + "attn.k_norm.weight"}
        )
        self.assertEqual(names("moa"), moa)
        self.assertEqual(names("shared-kv"), sh)
        self.assertEqual(names("merged"), merged)
        learned = mb.BamForCausalLMCore(dict(BASE, learned_positions=True, rotary_dim=0, second_norm=True))
        self.assertIn("model.embed_positions.weight", learned.state_dict())
        self.assertIn("model.layers.0.post_attention_layernorm.weight", learned.state_dict())

    def test_weights_are_out_in(self):
        m = mb.BamForCausalLMCore(dict(BASE, num_experts=2))
        sd = m.state_dict()
        self.assertEqual(tuple(sd["model.layers.0.attn.experts.1.q_proj.weight"].shape), (4 * 8, 32))
        self.assertEqual(tuple(sd["model.layers.0.attn.experts.1.k_proj.weight"].shape), (2 * 8, 32))
        self.assertEqual(tuple(sd["model.layers.0.mlp.experts.0.down_proj.weight"].shape), (32, 48))
        self.assertEqual(tuple(sd["model.layers.0.mlp.router.weight"].shape), (2, 32))
        self.assertEqual(tuple(sd["model.layers.0.attn.router.weight"].shape), (2, 32))

    def test_config_checks(self):
        with self.assertRaises(ValueError):
            BamConfig(**dict(BASE, attention_experts="soft"))
        with self.assertRaises(ValueError):
            BamConfig(**dict(BASE, num_experts=2, num_experts_per_tok=3))


if __name__ == "__main__":
    unittest.main()
