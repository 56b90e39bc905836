"""Analytic FLOPs and MFU, expert-load statistics, the JSONL log, TensorBoard and the end-of-run plot.

FLOPs per trained token (forward + backward = 3 x forward, the PaLM appendix B convention):

    flops_per_token = 6 * N_active + 12 * L * A * n_heads * head_dim * T

  N_active  weights in the matmuls one token goes through: per layer the attention projections of EVERY
            attention expert (soft MoA runs all E: moa E*(q,k,v,o), shared-kv E*(q,o) + one (k,v), merged
            one (q,k,v,o)), both routers (E*H each), the FFN of the k chosen experts (gated: 3*H*I, plain:
            2*H*I; a dense model: its one FFN); plus lm_head (V*H). Embedding lookups, norms, biases and
            elementwise work are not counted.
  A         attention experts a token goes through: E for moa and shared-kv, 1 for merged.
  12*...*T  attention scores and the weighted sum of values: 2 matmuls of 2*T*head_dim FLOPs per head
            forward, times 3, with T the sequence length. As PaLM (and nanoGPT, torchtitan), the causal
            mask is not discounted; `flops_per_token_causal` halves this term (the work flash attention
            actually does), reported beside it.

MFU = tokens/s * flops_per_token / (peak FLOP/s * number of GPUs); the peak defaults to the dense bf16
figure of the GPU (H100/H200 SXM: 989e12), overridable with --peak-flops.
"""

import json
import math
import os

import torch

PEAK_BF16 = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


def model_flops(c, seq_len):
    """c: the model's config dict. -> dict of the counts above."""
    g = lambda k, d=None: c.get(k, d) if isinstance(c, dict) else getattr(c, k, d)
    H, I, V, L = g("hidden_size"), g("intermediate_size"), g("vocab_size"), g("num_hidden_layers")
    nh = g("num_attention_heads")
    nkv = g("num_key_value_heads") or nh
    D = g("head_dim") or H // nh
    E, k, mode = g("num_experts", 1), g("num_experts_per_tok", 1), g("attention_experts", "merged")
    q, kv, o = H * nh * D, 2 * H * nkv * D, nh * D * H
    if E == 1 or mode == "merged":
        attn, A, attn_router = q + kv + o, 1, 0
    elif mode == "moa":
        attn, A, attn_router = E * (q + kv + o), E, E * H
    else:  # shared-kv
        attn, A, attn_router = E * (q + o) + kv, E, E * H
    ffn_one = (3 if g("gated_mlp", True) else 2) * H * I
    ffn, ffn_router = (ffn_one, 0) if E == 1 else (k * ffn_one, E * H)
    active = L * (attn + attn_router + ffn + ffn_router) + V * H
    attn_scores = 12 * L * A * nh * D * seq_len
    return dict(
        active_matmul_params=active,
        attention_experts_per_token=A,
        flops_per_token=6 * active + attn_scores,
        flops_per_token_causal=6 * active + attn_scores // 2,
        attention_score_flops_per_token=attn_scores,
    )


def mfu(tokens_per_s, flops_per_token, peak, world=1):
    """Model FLOPs utilisation: the one formula of finetune.py's log and bench/train (None without a peak)."""
    return tokens_per_s * flops_per_token / (peak * world) if peak else None


def count_params(model):
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def peak_flops(device, override=None):
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def entropy(p):
    """Entropy in nats of each row of p [..., E] (0 log 0 = 0)."""
    p = p.clamp(min=0)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def router_stats(out):
    """Per-layer routing statistics of one forward (detached, float32):
    ffn_load [L, E]   fraction of the top-k assignments each FFN expert got (the model's expert_load)
    attn_weight [L, E] mean soft weight of each attention expert (BAM's soft MoA router)."""
    res = {}
    if out.get("expert_load") is not None:
        res["ffn_load"] = out["expert_load"].detach().float()
    attn = [a for a in (out.get("attn_router_logits") or ()) if a is not None]
    if attn:
        res["attn_weight"] = torch.stack(
            [a.detach().float().softmax(-1).reshape(-1, a.shape[-1]).mean(0) for a in attn]
        )
    return res


class JsonlLog:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped first, and so is a
    line a kill cut off (`torn` counts them)."""

    def __init__(self, path, resume_step=None):
        self.path, self.torn = path, 0
        if resume_step is not None and os.path.exists(path):
            records = read_jsonl(path)
            self.torn = records.torn
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Records(list):
    torn = 0


def read_jsonl(path):
    """The log's records; lines that are not JSON objects (a write cut off by a kill) are skipped and counted."""
    out = Records()
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append(record)
            else:
                out.torn += 1
    return out


class TensorBoard:
    """The JSONL's numbers also as TensorBoard scalars under OUT/tensorboard, when torch.utils.tensorboard
    imports (it needs the `tensorboard` package); `note` says why not otherwise."""

    def __init__(self, logdir, purge_step=None):
        self.writer, self.note = None, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # ImportError, or a tensorboard that fails inside the import
            self.note = f"TensorBoard off: torch.utils.tensorboard does not import ({e}); pip install tensorboard"
            return
        self.writer = SummaryWriter(logdir, purge_step=purge_step)

    def write(self, record):
        if self.writer is None:
            return
        step = record["step"]
        for key in ("loss", "nll", "lb_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for key in ("ffn_load", "attn_weight"):
            if record.get(key):
                for e, share in enumerate(expert_means(record[key])):
                    self.writer.add_scalar(f"{key}/expert_{e}", share, step)
        for name, ev in record.get("eval", {}).items():
            self.writer.add_scalar(f"eval/{name}/nll", ev["nll"], step)
            self.writer.add_scalar(f"eval/{name}/ppl", ev["ppl"], step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def expert_means(rows):
    """[L][E] per-layer shares -> [E], the mean over layers."""
    return [sum(col) / len(rows) for col in zip(*rows)]


def plot(jsonl, png):
    """Loss (train NLL, total, held-out NLL per domain) and expert load over steps, and the last step's
    FFN load per layer. -> png path, or a note saying why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    recs = read_jsonl(jsonl)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    if not train:
        return "no plot: no training steps logged"
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = [r["step"] for r in train]
    ax[0].plot(steps, [r["loss"] for r in train], label="loss (NLL + aux)", lw=1)
    ax[0].plot(steps, [r["nll"] for r in train], label="train NLL", lw=1)
    for name in evals[0]["eval"] if evals else {}:
        ax[0].plot(
            [r["step"] for r in evals], [r["eval"][name]["nll"] for r in evals], "o-", ms=3, label=f"held-out {name}"
        )
    ax[0].set(xlabel="step", ylabel="nats/token", title="loss")
    ax[0].legend(fontsize=7)
    for key, label in (("ffn_load_entropy", "FFN load"), ("attn_weight_entropy", "attention weights")):
        if train[0].get(key):
            E = len(train[0][key.replace("_entropy", "")][0])
            mean = [sum(r[key]) / len(r[key]) / math.log(E) for r in train]
            low = [min(r[key]) / math.log(E) for r in train]
            ax[1].plot(steps, mean, label=f"{label}: mean over layers", lw=1)
            ax[1].plot(steps, low, "--", label=f"{label}: lowest layer", lw=1)
    ax[1].set(xlabel="step", ylabel="entropy / ln E (1 = uniform)", title="router balance", ylim=(0, 1.05))
    ax[1].legend(fontsize=7)
    if train[-1].get("ffn_load"):
        load = train[-1]["ffn_load"]
        im = ax[2].imshow(load, aspect="auto", cmap="viridis", vmin=0)
        ax[2].set(xlabel="FFN expert", ylabel="layer", title=f"FFN load fractions, step {train[-1]['step']}")
        ax[2].set_xticks(range(len(load[0])))
        ax[2].set_yticks(range(0, len(load), max(1, len(load) // 12)))
        fig.colorbar(im, ax=ax[2])
    else:
        ax[2].axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
