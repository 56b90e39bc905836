#!/usr/bin/env python3
"""docs/reproduction.md's tables and plots from a reproduction.json (scripts/reproduce/pipeline.py's output):

    python3 scripts/reproduce/report.py [--results bench/results/reproduction/reproduction.json] [--doc docs/reproduction.md]

Rewrites the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in the doc (tables), and writes
the PNGs beside it under docs/reproduction/ (matplotlib). Every number comes from the JSON. A model's number
is the mean over its mixing seeds, with the range (min-max) over them; a claim counts as reproduced only where
the two ranges do not overlap (the gap exceeds the spread), as not reproduced where they do not overlap the
other way, and as inconclusive otherwise."""

import argparse
import json
import os
import re

DOMAINS = ("general", "code", "math", "lexicon")
EXPERTS = ("seed", "code", "math", "lexicon")  # expert i of every BAM / BTX mixture comes from this model
LABELS = {
    "dense": "Dense (seed, trained on)",
    "sparse": "Sparse upcycling",
    "btx": "BTX",
    "bam-shared-kv": "BAM, shared KV",
    "bam-kv": "BAM, KV experts",
    "btx-renorm": "BTX, renormalised gate",
    "bam-kv-renorm": "BAM, KV experts, renormalised gate",
}
MAIN = ("dense", "sparse", "btx", "bam-shared-kv", "bam-kv")
REFERENCE = "bam-kv"


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(root, "bench", "results", "reproduction", "reproduction.json"))
    p.add_argument("--doc", default=os.path.join(root, "docs", "reproduction.md"))
    return p.parse_args()


def mean(xs):
    return sum(xs) / len(xs)


class Results:
    def __init__(self, r):
        self.r = r
        self.seeds = r["mix_plan"]["seeds"]

    def run_names(self, model, budget):
        if model == REFERENCE and budget == "cm":
            budget = "dm"  # the reference's data-matched run is its compute-matched one
        return [f"{model}-{budget}-s{s}" for s in range(self.seeds) if f"{model}-{budget}-s{s}" in self.r["heldout"]]

    def ppl(self, name, domain=None):
        t = self.r["heldout"][name]["torch"]
        return t[domain]["ppl"] if domain else mean([t[d]["ppl"] for d in DOMAINS])

    def stat(self, model, budget, domain=None):
        """-> (mean, min, max) over seeds of the held-out perplexity (average over domains when domain is None)."""
        xs = [self.ppl(n, domain) for n in self.run_names(model, budget)]
        return (mean(xs), min(xs), max(xs)) if xs else None

    def run(self, model, budget, seed=0):
        b = "dm" if model == REFERENCE and budget == "cm" else budget
        return self.r["runs"].get(f"{model}-{b}-s{seed}")


def fmt(st):
    return f"{st[0]:.2f} ({st[1]:.2f}-{st[2]:.2f})"


def perplexity_table(R, budget):
    stats = {m: R.stat(m, budget) for m in MAIN}
    best = min(stats, key=lambda m: stats[m][0])
    lines = [
        "| model | " + " | ".join(DOMAINS) + " | average, mean (min-max over seeds) |",
        "|---" * (len(DOMAINS) + 2) + "|",
        "| Seed (before mixing) | "
        + " | ".join(f"{R.ppl('seed', d):.2f}" for d in DOMAINS)
        + f" | {R.ppl('seed'):.2f} |",
    ]
    for m in MAIN:
        cells = [f"{R.stat(m, budget, d)[0]:.2f}" for d in DOMAINS] + [fmt(stats[m])]
        if m == best:
            cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(better, worse):
    """better/worse: (mean, min, max) of the model the claim says is better, and of the other one."""
    if better[2] < worse[1]:
        return "reproduced"
    if worse[2] < better[1]:
        return "not reproduced (reversed)"
    return "inconclusive (ranges overlap)"


CLAIMS = [  # (claim, budget, the model said to be better, the other)
    ("BAM (KV experts) beats BTX, data-matched", "dm", "bam-kv", "btx"),
    ("BAM (shared KV) beats BTX, data-matched", "dm", "bam-shared-kv", "btx"),
    ("KV experts beat shared KV, data-matched", "dm", "bam-kv", "bam-shared-kv"),
    ("BAM (KV experts) beats BTX, compute-matched", "cm", "bam-kv", "btx"),
    ("BAM (shared KV) beats BTX, compute-matched", "cm", "bam-shared-kv", "btx"),
    ("KV experts beat shared KV, compute-matched", "cm", "bam-kv", "bam-shared-kv"),
    ("BAM (KV experts) beats sparse upcycling, compute-matched", "cm", "bam-kv", "sparse"),
    ("BAM (KV experts) beats the dense model, compute-matched", "cm", "bam-kv", "dense"),
    ("BTX beats the dense model, compute-matched", "cm", "btx", "dense"),
    ("BTX beats sparse upcycling, compute-matched", "cm", "btx", "sparse"),
]


def claims_table(R):
    lines = [
        "| claim (BAM / BTX papers) | better, mean (range) | other, mean (range) | gap | verdict |",
        "|---|---|---|---|---|",
    ]
    for text, budget, a, b in CLAIMS:
        sa, sb = R.stat(a, budget), R.stat(b, budget)
        lines.append(f"| {text} | {fmt(sa)} | {fmt(sb)} | {100 * (sb[0] - sa[0]) / sb[0]:+.1f}% | {verdict(sa, sb)} |")
    return "\n".join(lines)


def gate_table(R):
    lines = [
        "| mixture, data-matched | paper gate (`--no-norm-topk-prob`) | renormalised (`--norm-topk-prob`) | gap | verdict | "
        "FFN-router LM-gradient norm, first / last eval (paper / renormalised) |",
        "|---|---|---|---|---|---|",
    ]
    for m in ("bam-kv", "btx"):
        paper, renorm = R.stat(m, "dm"), R.stat(f"{m}-renorm", "dm")
        if paper[0] <= renorm[0]:
            v = verdict(paper, renorm).replace("reproduced", "paper gate better")
        else:
            v = verdict(renorm, paper).replace("reproduced", "renormalised gate better")
        grads = []
        for name in (m, f"{m}-renorm"):
            norms = [
                [e["router_lm_grad_norm"]["ffn"] for e in R.run(name, "dm", s)["evals"] if "router_lm_grad_norm" in e]
                for s in range(R.seeds)
            ]
            grads.append(f"{mean([n[0] for n in norms]):.2g} / {mean([n[-1] for n in norms]):.2g}")
        lines.append(
            f"| {LABELS[m]} | {fmt(paper)} | {fmt(renorm)} | {100 * (renorm[0] - paper[0]) / renorm[0]:+.1f}% | {v} | "
            f"{grads[0]} ; {grads[1]} |"
        )
    return "\n".join(lines)


def tokens_table(R):
    """BTX at 0.5x, 1x and 2x its data-matched tokens (and compute-matched), against BAM with KV experts."""
    lines = ["| model | mixing tokens | PFLOP | average perplexity, mean (range) |", "|---|---|---|---|"]
    rows = [("btx", "x0.5"), ("btx", "dm"), ("btx", "cm"), ("btx", "x2"), ("bam-kv", "dm")]
    for m, b in sorted(rows, key=lambda mb: R.run(*mb)["tokens"] * R.run(*mb)["flops_per_token"]):
        run = R.run(m, b)
        label = {"x0.5": "0.5x", "dm": "1x (data-matched)", "cm": "compute-matched", "x2": "2x"}[b]
        lines.append(
            f"| {LABELS[m]}, {label} | {run['tokens'] / 1e6:.2f}M | {run['tokens'] * run['flops_per_token'] / 1e15:.3f} | "
            f"{fmt(R.stat(m, b))} |"
        )
    return "\n".join(lines)


def budget_table(R):
    plan, timing = R.r["mix_plan"], R.r.get("timing", {})
    lines = [
        "| model | parameters | GFLOP/token | data-matched tokens | compute-matched tokens (branch credit) | "
        "ms per step alone | GPU seconds alone (dm / cm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in MAIN:
        p, dm, cm = plan["models"][m], R.run(m, "dm"), R.run(m, "cm")
        t = timing.get(m)
        gpu = f"{dm['steps'] * t['step_s']:.1f} / {cm['steps'] * t['step_s']:.1f}" if t else "-"
        credit = f" ({p['branch_flops_credited'] / 1e15:.3f} PFLOP)" if p["branch_flops_credited"] else ""
        lines.append(
            f"| {LABELS[m]} | {dm['params'] / 1e6:.2f}M | {p['flops_per_token'] / 1e9:.4f} | {dm['tokens'] / 1e6:.2f}M | "
            f"{cm['tokens'] / 1e6:.2f}M{credit} | {1000 * t['step_s']:.1f} | {gpu} |"
            if t
            else f"| {LABELS[m]} | {dm['params'] / 1e6:.2f}M | {p['flops_per_token'] / 1e9:.4f} | {dm['tokens'] / 1e6:.2f}M | "
            f"{cm['tokens'] / 1e6:.2f}M{credit} | - | - |"
        )
    return "\n".join(lines)


def seed_table(R):
    r = R.r
    b, seed = r["seed_budget"], r["runs"]["seed"]
    general = b["general_train_tokens"]
    # passes over the general train split along the longest line: seed, a branch (10% general), the longest mix (25%)
    longest = max(v["tokens"] for k, v in r["runs"].items() if re.search(r"-s\d+$", k))
    branch = max(r["runs"][d]["tokens"] for d in ("code", "math", "lexicon"))
    passes = (b["tokens"] + 0.1 * branch + 0.25 * longest) / general
    lines = [
        "| | |",
        "|---|---|",
        f"| parameters (all, tied embedding once) | {b['params']:,} |",
        f"| seed training tokens | {seed['tokens']:,} ({seed['tokens'] / b['params']:.1f} per parameter) |",
        f"| general train split | {general:,} tokens; the seed makes {seed['tokens'] / general:.2f} passes |",
        f"| most passes over any general text along seed -> branch -> longest mix | {passes:.2f} |",
        f"| peak learning rate: seed / branches / mixtures | {seed['lr']:g} / {r['runs']['code']['lr']:g} / {r['mix_plan']['lr']:g} |",
        f"| mixing seeds per run | {R.seeds} |",
    ]
    return "\n".join(lines)


def stages_table(R):
    lines = ["| model | " + " | ".join(DOMAINS) + " | average |", "|---" * (len(DOMAINS) + 2) + "|"]
    rows = [
        ("seed", "Seed (general)"),
        ("code", "Branch: code"),
        ("math", "Branch: math"),
        ("lexicon", "Branch: lexicon"),
    ]
    rows += [
        (f"{m}-s0-upcycled", f"{LABELS[m]}, upcycled, before mixing (seed 0)")
        for m in ("bam-kv", "bam-shared-kv", "btx", "sparse")
    ]
    for name, label in rows:
        lines.append(f"| {label} | " + " | ".join(f"{R.ppl(name, d):.2f}" for d in DOMAINS) + f" | {R.ppl(name):.2f} |")
    return "\n".join(lines)


def routing_matrix(R, model, key, budget="dm"):
    """-> {domain: [L][E]} averaged over seeds (expert i is the same source model in every seed)."""
    names = R.run_names(model, budget)
    out = {}
    for d in DOMAINS:
        mats = [R.r["heldout"][n]["routing"][d][key] for n in names]
        out[d] = [[mean([m[l][e] for m in mats]) for e in range(len(mats[0][0]))] for l in range(len(mats[0]))]
    return out


def routing_table(R):
    """Per held-out domain: the share of FFN assignments (and attention-router weight) its own expert gets,
    averaged over layers and seeds; uniform is 25%."""
    lines = [
        "| mixture (data-matched) | what | " + " | ".join(f"{d} tokens" for d in DOMAINS) + " |",
        "|---|---|" + "---|" * len(DOMAINS),
    ]
    for m in ("bam-kv", "bam-kv-renorm", "bam-shared-kv", "btx", "btx-renorm"):
        for key, what in (("ffn_share", "FFN share"), ("attn_weight", "attention weight")):
            try:
                mat = routing_matrix(R, m, key)
            except KeyError:
                continue
            cells = []
            for d in DOMAINS:
                per_expert = [mean([row[e] for row in mat[d]]) for e in range(len(EXPERTS))]
                top = max(range(len(EXPERTS)), key=lambda e: per_expert[e])
                cells.append(
                    f"own {100 * per_expert[EXPERTS.index(d) if d in EXPERTS else 0]:.0f}%, top {EXPERTS[top]} {100 * per_expert[top]:.0f}%"
                )
            lines.append(f"| {LABELS[m]} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(R):
    checked = {n: e for n, e in R.r["heldout"].items() if "agreement" in e}
    worst = max(checked, key=lambda n: max(checked[n]["agreement"].values()))
    diffs = sorted(max(e["agreement"].values()) for e in checked.values())
    return "\n".join(
        [
            "| models checked | median largest relative difference | largest (model) |",
            "|---|---|---|",
            f"| {len(checked)} | {diffs[len(diffs) // 2]:.1e} | {diffs[-1]:.1e} ({worst}) |",
        ]
    )


def plots(R, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    r = R.r
    colors = dict(zip(LABELS, ["tab:gray", "tab:olive", "tab:blue", "tab:orange", "tab:red", "tab:cyan", "tab:pink"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in LABELS:
        for budget, style in (("dm", "-"), ("cm", "--"), ("x2", ":")):
            names = R.run_names(m, budget) if not (m == REFERENCE and budget == "cm") else []
            if not names:
                continue
            runs = [r["runs"][n] for n in names]
            fpt = runs[0]["flops_per_token"]
            evals = list(zip(*[run["evals"] for run in runs]))
            xs = [e[0]["tokens"] * fpt / 1e15 for e in evals]
            ys = [mean([mean([x["eval"][d]["ppl"] for d in DOMAINS]) for x in e]) for e in evals]
            ax.plot(xs, ys, style, color=colors[m], label=f"{LABELS[m]} ({budget})")
    ax.set(
        xlabel="mixing PFLOP (dense and sparse: branch credit not drawn)",
        ylabel="held-out perplexity, mean of 4 domains",
        title=f"Mix stage, mean of {R.seeds} seeds (evaluated on --eval-blocks)",
        yscale="log",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)

    panels = [
        ("bam-kv", "ffn_share", "BAM KV experts: FFN share"),
        ("bam-kv", "attn_weight", "BAM KV experts: attention weight"),
        ("bam-shared-kv", "ffn_share", "BAM shared KV: FFN share"),
        ("bam-shared-kv", "attn_weight", "BAM shared KV: attention weight"),
        ("btx", "ffn_share", "BTX: FFN share"),
        ("bam-kv-renorm", "ffn_share", "BAM KV, renormalised gate: FFN share"),
        ("btx-renorm", "ffn_share", "BTX, renormalised gate: FFN share"),
    ]
    fig, axes = plt.subplots(len(panels), len(DOMAINS), figsize=(11, 2.8 * len(panels)), squeeze=False)
    for row, (m, key, title) in zip(axes, panels):
        mat = routing_matrix(R, m, key)
        for ax, d in zip(row, DOMAINS):
            im = ax.imshow(mat[d], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for l, vals in enumerate(mat[d]):
                for e, v in enumerate(vals):
                    ax.text(
                        e,
                        l,
                        f"{100 * v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v < 0.6 else "black",
                    )
            ax.set_xticks(range(len(EXPERTS)), EXPERTS, fontsize=7)
            ax.set_yticks(range(len(mat[d])), [f"L{l}" for l in range(len(mat[d]))], fontsize=7)
            ax.set_title(f"{title}\n{d} held-out tokens", fontsize=8)
    fig.subplots_adjust(hspace=0.6)
    fig.colorbar(im, ax=axes, shrink=0.3, label="share of tokens (FFN) or mean weight (attention)")
    fig.savefig(os.path.join(out_dir, "routing.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def main():
    args = parse_args()
    with open(args.results) as f:
        R = Results(json.load(f))
    sections = {
        "setup": seed_table(R),
        "claims": claims_table(R),
        "data-matched": perplexity_table(R, "dm"),
        "compute-matched": perplexity_table(R, "cm"),
        "tokens": tokens_table(R),
        "gate": gate_table(R),
        "budgets": budget_table(R),
        "routing": routing_table(R),
        "stages": stages_table(R),
        "agreement": agreement_table(R),
    }
    with open(args.doc) as f:
        doc = f.read()
    for name, text in sections.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n)(?:.*?\n)?(<!-- /report:{name} -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{args.doc}: no <!-- report:{name} --> ... <!-- /report:{name} --> block")
        doc = pattern.sub(lambda m: m[1] + text + "\n" + m[2], doc)  # noqa: B023
    with open(args.doc, "w") as f:
        f.write(doc)
    plots(R, os.path.join(os.path.dirname(args.doc), "reproduction"))
    print(f"updated {args.doc} and its plots")


if __name__ == "__main__":
    main()
