#!/usr/bin/env python3
"""docs/reproduction.md's tables and plots from a reproduction.json (scripts/reproduce/pipeline.py's output):

    python3 scripts/reproduce/report.py [--results bench/results/reproduction/reproduction.json] [--doc docs/reproduction.md]
        [--repeats bench/results/reproduction/run1-*.json]

Rewrites the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in the doc (tables), and writes
the PNGs beside it under docs/reproduction/ (matplotlib). Every number comes from the JSON."""

import argparse
import glob
import json
import os
import re

DOMAINS = ("general", "code", "math", "lexicon")
MIXES = (("dense", "Dense (seed, trained on)"), ("sparse", "Sparse upcycling"), ("btx", "BTX"),
         ("bam-shared-kv", "BAM, shared KV"), ("bam-kv", "BAM, KV experts"))
REFERENCE = "bam-kv"


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(root, "bench", "results", "reproduction", "reproduction.json"))
    p.add_argument("--doc", default=os.path.join(root, "docs", "reproduction.md"))
    p.add_argument("--repeats", nargs="*", default=sorted(glob.glob(os.path.join(root, "bench", "results", "reproduction", "run*.json"))),
                   help="earlier runs of the same settings, for the run-to-run table")
    return p.parse_args()


def mean(xs):
    return sum(xs) / len(xs)


def row(label, ppl, best=None):
    cells = [f"{ppl[d]:.2f}" for d in DOMAINS] + [f"{mean([ppl[d] for d in DOMAINS]):.2f}"]
    if best is not None:
        cells = [f"**{c}**" if b else c for c, b in zip(cells, best)]
    return f"| {label} | " + " | ".join(cells) + " |"


def table(r, suffix):
    """Per-domain and average held-out perplexity of the mixed models (the PyTorch engine's table)."""
    ppl = {}
    for name, _ in MIXES:
        run = f"{name}-{'dm' if suffix == 'dm' or name == REFERENCE else 'cm'}"
        ppl[name] = {d: r["heldout"][run]["torch"][d]["ppl"] for d in DOMAINS}
    columns = [[ppl[n][d] for n, _ in MIXES] for d in DOMAINS] + [[mean([ppl[n][d] for d in DOMAINS]) for n, _ in MIXES]]
    best = {n: [col[i] == min(col) for col in columns] for i, (n, _) in enumerate(MIXES)}
    seed = {d: r["heldout"]["seed"]["torch"][d]["ppl"] for d in DOMAINS}
    lines = ["| model | " + " | ".join(DOMAINS) + " | average |", "|---" * (len(DOMAINS) + 2) + "|", row("Seed (before mixing)", seed)]
    lines += [row(label, ppl[n], best[n]) for n, label in MIXES]
    return "\n".join(lines)


def budget_table(r):
    plan = r["mix_plan"]
    lines = ["| model | parameters | GFLOP/token | data-matched tokens | compute-matched tokens | GPU seconds (dm / cm) |",
             "|---|---|---|---|---|---|"]
    for name, label in MIXES:
        m = plan["models"][name]
        dm = r["runs"][f"{name}-dm"]
        cm = r["runs"].get(f"{name}-cm", dm)
        lines.append(f"| {label} | {dm['params'] / 1e6:.1f}M | {m['flops_per_token'] / 1e9:.3f} | {dm['tokens'] / 1e6:.2f}M | "
                     f"{cm['tokens'] / 1e6:.2f}M | {dm['wall_s']:.0f} / {cm['wall_s']:.0f} |")
    return "\n".join(lines)


def branch_table(r):
    lines = ["| model | " + " | ".join(DOMAINS) + " | average |", "|---" * (len(DOMAINS) + 2) + "|"]
    for name, label in (("seed", "Seed (general)"), ("code", "Branch: code"), ("math", "Branch: math"), ("lexicon", "Branch: lexicon"),
                        ("bam-kv-upcycled", "BAM KV experts, upcycled, before mixing"),
                        ("bam-shared-kv-upcycled", "BAM shared KV, upcycled, before mixing"),
                        ("btx-upcycled", "BTX, upcycled, before mixing"), ("sparse-upcycled", "Sparse upcycling, before mixing")):
        lines.append(row(label, {d: r["heldout"][name]["torch"][d]["ppl"] for d in DOMAINS}))
    return "\n".join(lines)


def agreement_table(r):
    lines = ["| model | PyTorch average ppl | `bam eval` average ppl | largest relative difference (any domain) |", "|---|---|---|---|"]
    for name, entry in r["heldout"].items():
        if "agreement" not in entry:
            continue
        lines.append(f"| {name} | {mean([entry['torch_check'][d]['ppl'] for d in DOMAINS]):.4f} | "
                     f"{mean([entry['bam_eval'][d]['ppl'] for d in DOMAINS]):.4f} | {max(entry['agreement'].values()):.1e} |")
    return "\n".join(lines)


def repeat_table(runs):
    """Average held-out perplexity of every mixed model in each run: how much a rerun moves the numbers."""
    lines = ["| model | " + " | ".join(f"run {i + 1} ({r['env']['commit'][:7]})" for i, r in enumerate(runs)) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for name, label in MIXES:
        for kind in ("dm", "cm"):
            run = f"{name}-{kind}"
            if run not in runs[0]["runs"]:
                continue
            cells = [f"{mean([r['heldout'][run]['torch'][d]['ppl'] for d in DOMAINS]):.2f}" for r in runs]
            lines.append(f"| {label}, {'data' if kind == 'dm' else 'compute'}-matched | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(r, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    colors = dict(zip([n for n, _ in MIXES], ["tab:gray", "tab:olive", "tab:blue", "tab:orange", "tab:red"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, label in MIXES:
        for kind, style in (("dm", "-"), ("cm", "--")):
            run = r["runs"].get(f"{name}-{kind}")
            if run is None:
                continue
            fpt = run["flops_per_token"]
            ev = run["evals"]
            ax1.plot([e["tokens"] * fpt / 1e15 for e in ev], [mean([e["eval"][d]["ppl"] for d in DOMAINS]) for e in ev],
                     style, color=colors[name], label=f"{label} ({kind})")
            log = run["log"]
            ax2.plot([e["tokens"] / 1e6 for e in log], [e["nll"] for e in log], style, color=colors[name], label=f"{label} ({kind})")
    ax1.set(xlabel="training PFLOP", ylabel="held-out perplexity, mean of 4 domains", title="Mix stage: held-out perplexity",
            yscale="log")
    ax1.legend(fontsize=7)
    ax2.set(xlabel="training tokens (M)", ylabel="training NLL (nats/token)", title="Mix stage: training loss")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)

    panels = [("bam-kv-dm", "ffn_load", "BAM KV experts: FFN load"), ("bam-kv-dm", "attn_weight", "BAM KV experts: attention router weight"),
              ("btx-dm", "ffn_load", "BTX: FFN load"), ("sparse-dm", "ffn_load", "Sparse upcycling: FFN load")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6), sharey=True)
    experts = ["seed", "code", "math", "lexicon"]
    for ax, (run, key, title) in zip(axes, panels):
        loads = [e for e in r["runs"][run]["loads"] if key in e]
        steps = [e["step"] for e in loads]
        for i in range(len(loads[0][key][0])):
            ax.plot(steps, [mean([layer[i] for layer in e[key]]) for e in loads],
                    label=experts[i] if run != "sparse-dm" else f"copy {i}")
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of tokens / weight (mean over layers)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    with open(args.results) as f:
        r = json.load(f)
    sections = {"data-matched": table(r, "dm"), "compute-matched": table(r, "cm"), "budgets": budget_table(r),
                "stages": branch_table(r), "agreement": agreement_table(r)}
    if args.repeats:
        repeats = []
        for path in args.repeats:
            with open(path) as f:
                repeats.append(json.load(f))
        sections["repeats"] = repeat_table([*repeats, r])
    with open(args.doc) as f:
        doc = f.read()
    for name, text in sections.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n)(?:.*?\n)?(<!-- /report:{name} -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{args.doc}: no <!-- report:{name} --> ... <!-- /report:{name} --> block")
        doc = pattern.sub(lambda m: m[1] + text + "\n" + m[2], doc)
    with open(args.doc, "w") as f:
        f.write(doc)
    plots(r, os.path.join(os.path.dirname(args.doc), "reproduction"))
    print(f"updated {args.doc} and its plots")


if __name__ == "__main__":
    main()
