#!/usr/bin/env python3
"""Training throughput and MFU of a BAM model on one GPU, against the same model with its experts run
one by one in a Python loop, against the dense seed, and, in BTX mode, against transformers' own Mixtral
and Qwen3-MoE trained from the very folder our export writes; plus a profile of the top kernels.

    python bench/train/bench_train.py --out OUT --commit "$(git rev-parse HEAD)"     (one H100: all of it)
    python bench/train/bench_train.py --out OUT --rows 'btx,btx-compile,hf-mixtral-*'  (ours against the peer)
    python bench/train/bench_train.py --out /tmp/bench-tiny --tiny                   (CPU smoke test, seconds)

Without --model it first writes (once, cached under --cache-dir) the folders its rows need, mixed in Python
from 4 synthetic llama seeds (bench/train/synthetic.py) of --shape base: 24 layers, hidden 1024, 16 heads,
FFN 2816, vocab 32000 (0.37B parameters each; 1.3B in the BAM model, 0.64B active per token), or --shape
1b: TinyLlama 1.1B's 22 layers, hidden 2048, 32 heads, 4 key/value heads, FFN 5632 (1.10B each). The BAM
folder has soft MoA attention experts, a parallel block, top-1 FFN routing; the dense folder is seed 0
alone; the BTX folder has the seeds' attention averaged, a sequential block and top-1 of 4 FFN experts
renormalised (what `bam upcycle --format mixtral` holds), and its Mixtral folder the same tensors in the
native layout (synthetic.write_native); the same again from qwen3 seeds (q/k norms) for Qwen3-MoE.

Rows (--rows; each loads its folder through scripts/bamtrain and trains with the Trainer of
scripts/finetune.py: bf16 autocast, fused AdamW, grad clipping, the model's own loss with router losses):
  bam            our model: attention experts in one q/k/v matmul, one SDPA over E x heads, one o matmul;
                 FFN experts by torch.nn.functional.grouped_mm
  bam-compile    the same with torch.compile on every block (as finetune.py --compile)
  bam-logits     bam with the head's [tokens, vocab] logits, then cross-entropy (finetune.py --no-fused-loss):
                 the baseline of the fused loss every other row of ours trains with (also btx-logits)
  bam-torch-rope, bam-torch-norm, bam-torch-kernels, bam-torch-gate, bam-torch-swiglu   bam with rope, RMSNorm,
                 both, the attention gate weighting or the experts' SwiGLU as torch ops instead
                 of modeling_bam's Triton kernels (finetune.py --no-fused-kernels: all); eager only
  bam-heads-copied   bam with rope's output in the [B, heads, T, D] layout (rope_layout as before 2cab35c:
                 the heads' copies forward and backward that the projections' layout avoids)
  bam-loop       the same weights, experts run one at a time (bench/train/loop_experts.py: per-expert
                 projections and attention, FFN by torch.where / index_add_, as transformers' eager MoE)
  dense          the dense seed (E = 1, merged attention, sequential block) through the same code
  dense-compile  the same with torch.compile
  btx            our model in BTX mode (merged attention, sequential block), from the BTX folder
  btx-qwen3      the same from qwen3 seeds (the BAM folder the Qwen3-MoE one is written from)
  hf-mixtral-IMPL, hf-qwen3moe-IMPL   transformers' MixtralForCausalLM / Qwen3MoeForCausalLM from the
                 native folder of btx / btx-qwen3 (same weights), experts_implementation IMPL: eager,
                 grouped_mm, batched_mm, deepgemm, sonicmoe (bench/train/peer.py); the same Trainer
  any row + "-compile" (but bam-loop): with torch.compile on every decoder block
  bam-cudagraphs, btx-cudagraphs   compiled with mode="reduce-overhead" (CUDA graphs; finetune.py
                 --compile-mode reduce-overhead)
  bam-fsdp-bf16, btx-fsdp-bf16 (and -compile)   bf16 parameters with float32 master weights: FSDP2's mixed
                 precision in a process group of one (finetune.py --fsdp on --fsdp-param-dtype bf16)
--rows takes names and shell patterns ('hf-mixtral-*'). A row that fails (or runs out of memory at every
micro-batch) is recorded as such and the others still run.
The micro-batch (sequences of --seq-len) is the largest of --batch-candidates that trains without running
out of memory, found per model (compile rows reuse their eager row's); tokens/s is over --steps timed
steps after --warmup. MFU counts the FLOPs of scripts/bamtrain/metrics.py (6 x active matmul parameters
+ attention scores of every attention expert, causal mask not discounted; the discounted figure is
reported too) against --peak-flops (default: the GPU's dense bf16 peak, H100 989e12).

Writes OUT/train_bench.json (rows, ratios: ours over the loop, the dense seed and the best peer row of
each family; profile, environment, --commit) and OUT/profile_<row>.txt, and prints a table. Stays under
--time-budget seconds (rows left are reported as skipped).
"""

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs at large batch

import argparse  # noqa: E402
import contextlib  # noqa: E402
import fnmatch  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
if __name__ == "__main__":
    sys.modules.setdefault("transformers", None)  # the pure-torch model is what we train; skip the import
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)

import peer  # noqa: E402
import synthetic  # noqa: E402
import torch  # noqa: E402
from loop_experts import loop_experts  # noqa: E402

import modeling_bam  # noqa: E402
from bamtrain import folder, metrics, native, parallel  # noqa: E402
from bamtrain.trainer import Trainer, make_optimizer  # noqa: E402

ROWS = {  # model: the folder (write_folders); impl: how the experts run; family: a peer row's transformers class;
    # fused_loss: the Trainer's loss without the logits (the default, finetune.py --fused-loss)
    "bam": dict(model="bam", impl="fused"),
    "bam-logits": dict(model="bam", impl="fused", fused_loss=False),
    "bam-loop": dict(model="bam", impl="loop"),
    # torch ops instead of modeling_bam's Triton kernels (modeling_bam.FUSED): what each kernel buys
    "bam-torch-rope": dict(model="bam", impl="fused", torch_ops=("rope",)),
    "bam-torch-norm": dict(model="bam", impl="fused", torch_ops=("norm",)),
    "bam-torch-kernels": dict(model="bam", impl="fused", torch_ops=("rope", "norm")),
    "bam-torch-gate": dict(model="bam", impl="fused", torch_ops=("gate",)),
    "bam-torch-swiglu": dict(model="bam", impl="fused", torch_ops=("swiglu",)),
    "bam-torch-loss": dict(model="bam", impl="fused", torch_ops=("loss",)),
    "bam-heads-copied": dict(model="bam", impl="fused", heads_copied=True),
    "dense": dict(model="dense", impl="fused"),
    "btx": dict(model="btx", impl="fused"),
    "btx-logits": dict(model="btx", impl="fused", fused_loss=False),
    "btx-torch-swiglu": dict(model="btx", impl="fused", torch_ops=("swiglu",)),
    "btx-torch-loss": dict(model="btx", impl="fused", torch_ops=("loss",)),
    # bf16 parameters, float32 master weights: FSDP2's mixed precision in a group of one (finetune.py
    # --fsdp on --fsdp-param-dtype bf16) instead of autocast's casts of every weight at every step
    "bam-fsdp-bf16": dict(model="bam", impl="fused", fsdp_param_dtype=torch.bfloat16),
    "btx-fsdp-bf16": dict(model="btx", impl="fused", fsdp_param_dtype=torch.bfloat16),
    "btx-qwen3": dict(model="btx-qwen3", impl="fused"),
    **{
        f"hf-{family}-{impl}": dict(model=spec["fmt"], impl=impl, family=family)
        for family, spec in peer.FAMILIES.items()
        for impl in peer.EXPERTS_IMPLEMENTATIONS
    },
}
# in the order they run: the compile rows last (they take longest, and start from their eager row's micro-batch)
ROWS = {
    **{name: dict(spec, compile=False) for name, spec in ROWS.items()},
    # (no compile rows of loop, heads-copied, rope, norm, gate or swiglu torch-ops rows: compiled, those are
    # inductor's own kernels; the loss runs after the compiled blocks, so its kernel serves compiled rows too)
    **{
        f"{name}-compile": dict(spec, compile=True)
        for name, spec in ROWS.items()
        if spec["impl"] != "loop" and set(spec.get("torch_ops", ())) <= {"loss"} and "heads_copied" not in spec
    },
    # CUDA graphs (finetune.py --compile-mode reduce-overhead): the host launches each block's kernels at once
    **{f"{name}-cudagraphs": dict(ROWS[name], compile=True, compile_mode="reduce-overhead") for name in ("bam", "btx")},
}
# native folder -> the BAM folder it is written from (the same weights)
EXPORTS = {spec["fmt"]: spec["ours"] for spec in peer.FAMILIES.values()}
DEFAULT_ROWS = ["bam", "bam-loop", "dense", "bam-compile"]
MIN_SECONDS = {False: 30, True: 75}  # a row starts only with this much of --time-budget left (rows measured 10-40 s)
CATEGORIES = [  # kernel name fragments (lower case) -> category, first match wins
    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn", "sdpa", "mem_eff")),
    ("grouped GEMM (FFN experts)", ("grouped", "groupmm", "group_mm", "ptr_array")),
    (
        "GEMM",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "wgmma",
            "matmul",
            "sm90_",
            "sm80_",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
        ),
    ),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss / softmax", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("norm / reduce", ("reduce", "norm", "welford")),
    ("copy / cast / cat / index", ("copy", "cat", "index", "scatter", "gather", "transpose", "fill", "arange", "sort")),
    ("fused elementwise (compiled)", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "kernel")),
    ("communication", ("nccl",)),
]


def parse_args(argv=None):
    # no abbreviations: --isolate's children get this run's arguments with --rows, --out, --time-budget and
    # --isolate taken out by their full names (an abbreviated --isolate would make each child isolate again)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for train_bench.json and the profiles")
    p.add_argument("--model", help="a BAM folder to measure instead of the synthetic one")
    p.add_argument("--dense", help="its dense seed as a BAM folder (E = 1); default: none when --model is given")
    p.add_argument("--commit", default=None, help="the commit measured (git rev-parse HEAD)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument(
        "--rows",
        default=None,
        help=f"comma list of row names or shell patterns of {', '.join(ROWS)} "
        f"(default: {','.join(DEFAULT_ROWS)}; --tiny: without the compile rows)",
    )
    p.add_argument(
        "--shape",
        choices=list(synthetic.SHAPES),
        default="base",
        help="the synthetic seeds: base (24 layers, hidden 1024: 0.37B) or 1b (22 layers, hidden 2048: 1.10B)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (--tiny 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="fix the micro-batch instead of searching")
    p.add_argument("--batch-candidates", default="16,12,10,8,6,4,3,2,1", help="micro-batches tried, largest first")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, --tiny 1)")
    p.add_argument(
        "--kv-heads", type=int, default=None, help="key/value heads of the synthetic seeds (default: the shape's)"
    )
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--attention", choices=["moa", "shared-kv", "merged"], default="moa", help="the bam rows'")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument(
        "--sdpa",
        choices=["auto", "flash", "cudnn", "efficient"],
        default="auto",
        help="restrict scaled_dot_product_attention to one backend (auto: torch's choice)",
    )
    p.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak FLOP/s (default by GPU name)")
    p.add_argument("--profile", default="bam,bam-compile", help="rows to profile (comma list; '' for none)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--cache-dir", default=None, help="where the synthetic folders go (default /tmp/bam-bench[-tiny])")
    p.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help=f"seconds; a row starts only with {MIN_SECONDS[False]} s (compile rows: {MIN_SECONDS[True]} s) of it left",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run each row in a fresh Python process: a row can measure slower after other rows in one process "
        "(bench/train/README.md)",
    )
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e):
    msg = str(e).lower()
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in msg or "alloc_failed" in msg


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sdpa_context(choice):
    if choice == "auto":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[choice]
    )


def category(name):
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(step, device, steps):
    """Runs `step` under torch.profiler. -> (top kernels, per-category totals, busy fraction, table text)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    kernels = []
    for e in events:
        if getattr(e, "is_user_annotation", False):  # ranges such as "## Call CompiledFxGraph ##": not kernels
            continue
        if cuda:
            if "cuda" not in str(getattr(e, "device_type", "")).lower():
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            kernels.append(dict(name=e.key, time_us=float(t), calls=int(e.count)))
    kernels.sort(key=lambda k: -k["time_us"])
    total = sum(k["time_us"] for k in kernels) or 1.0
    cats = {}
    for k in kernels:
        k["share"] = k["time_us"] / total
        k["category"] = category(k["name"])
        c = cats.setdefault(k["category"], dict(time_us=0.0, calls=0))
        c["time_us"] += k["time_us"]
        c["calls"] += k["calls"]
    for c in cats.values():
        c["share"] = c["time_us"] / total
    lines = [f"{'share':>6} {'ms/step':>8} {'calls/step':>10}  kernel ({'device' if cuda else 'CPU op'} self time)"]
    for k in kernels[:25]:
        lines.append(
            f"{100 * k['share']:5.1f}% {k['time_us'] / 1e3 / steps:8.2f} {k['calls'] / steps:10.1f}  "
            f"[{k['category']}] {k['name'][:140]}"
        )
    lines.append("")
    lines.append("by category:")
    for name, c in sorted(cats.items(), key=lambda kv: -kv[1]["time_us"]):
        lines.append(f"{100 * c['share']:5.1f}% {c['time_us'] / 1e3 / steps:8.2f} ms/step  {name}")
    ops = launching_ops(prof) if cuda else []
    if ops:
        lines += ["", "by op (the op that launched the kernels, its input shapes, their device time):"]
        for o in ops[:25]:
            lines.append(
                f"{100 * o['time_us'] / total:5.1f}% {o['time_us'] / 1e3 / steps:8.2f} {o['calls'] / steps:10.1f}  "
                f"{o['name']} {o['shapes'][:110]}"
            )
    busy = total / wall_us if cuda else None
    if cuda:
        lines.append(
            f"GPU busy {100 * busy:.1f}% of the wall time ({total / 1e3 / steps:.1f} of {wall_us / 1e3 / steps:.1f} ms/step)"
        )
    names = " ".join(k["name"].lower() for k in kernels)
    backend = (
        "flash"
        if "flash" in names
        else "cudnn"
        if "cudnn" in names
        else "efficient"
        if ("fmha" in names or "mem_eff" in names or "efficient" in names)
        else "math/none seen"
    )
    return dict(
        top=kernels[:40],
        top_ops=ops[:40],
        categories=cats,
        gpu_busy=busy,
        attention_backend=backend,
        wall_ms_per_step=wall_us / 1e3 / steps,
    ), "\n".join(lines)


def launching_ops(prof):
    """The host ops (aten ops, autograd nodes, Triton launches) by the device time of the kernels they
    launched themselves, grouped by input shapes: which tensor an elementwise or copy kernel served."""
    ops = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if "cuda" in str(getattr(e, "device_type", "")).lower() or t <= 0:
            continue
        ops.append(dict(name=e.key, shapes=str(e.input_shapes), time_us=float(t), calls=int(e.count)))
    return sorted(ops, key=lambda o: -o["time_us"])


def load(path, device, shared):
    """folder.load_model, with the folder's tensors read from disk once per run. -> (model, its blocks, config)"""
    if path not in shared["weights"]:
        shared["weights"][path] = folder.read_weights(path)
    config = folder.read_config(path)
    model = folder.build_model(config, device)
    state = dict(shared["weights"][path])
    if config.get("tie_word_embeddings"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model, model.model.layers, config


def load_peer(path, spec, device):
    """A peer row's transformers model. -> (PeerModel, its decoder layers, the BAM config of the folder: the
    FLOPs of metrics.model_flops are counted from it, as for ours)"""
    fmt = spec["model"]
    config = native.to_bam_config(fmt, folder.read_config(path), path)
    model = peer.load(path, spec["family"], spec["impl"], device)
    return model, peer.blocks(model), config


@contextlib.contextmanager
def torch_ops(kernels):
    """The torch ops instead of modeling_bam's Triton kernels `kernels` (keys of modeling_bam.FUSED), for one row."""
    for k in kernels:
        modeling_bam.FUSED[k] = False
    try:
        yield
    finally:
        for k in kernels:
            modeling_bam.FUSED[k] = True


@contextlib.contextmanager
def heads_copied():
    """Rope's output contiguous in [B, heads, T, D] (modeling_bam.rope_layout's alternative), for one row."""
    layout = modeling_bam.rope_layout
    modeling_bam.rope_layout = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        modeling_bam.rope_layout = layout


def run_row(name, spec, path, args, ctx, amp, shared):
    """Runs one row with its expert implementation (bench/train/loop_experts.py for "loop") and kernels."""
    with contextlib.ExitStack() as stack:
        if spec["impl"] == "loop":
            stack.enter_context(loop_experts())
        stack.enter_context(torch_ops(spec.get("torch_ops", ())))
        if spec.get("heads_copied"):
            stack.enter_context(heads_copied())
        return run_row_impl(name, spec, path, args, ctx, amp, shared)


def run_row_impl(name, spec, path, args, ctx, amp, shared):
    """Loads, finds the micro-batch, warms up, times. -> row dict (and profiles it when asked)."""
    device = ctx.device
    fused_loss, fsdp = spec.get("fused_loss", True), "fsdp_param_dtype" in spec
    eager_row = (
        spec["model"],
        spec["impl"],
        fused_loss,
        fsdp,
        spec.get("torch_ops", ()),
        spec.get("heads_copied", False),
    )  # a compile row starts from its eager row's micro-batch
    if spec["compile"] and shared["micro_batch"].get(eager_row, 0) is None:
        return dict(row=name, skipped="its eager row ran out of memory at every micro-batch")
    model, blocks, config = load_peer(path, spec, device) if "family" in spec else load(path, device, shared)
    model.train()
    if spec["compile"]:
        for block in blocks:
            block.compile(mode=spec.get("compile_mode"))
    if fsdp:  # as finetune.py: compile, then shard, then the optimiser over the sharded (master) parameters
        if "fsdp_ctx" not in shared:
            shared["fsdp_ctx"] = parallel.init(device.type, fsdp="on")
        ctx = shared["fsdp_ctx"]
        parallel.apply_fsdp(model, ctx, spec["fsdp_param_dtype"])
    optimizer = make_optimizer(model, 1e-5, device=device)
    trainer = Trainer(model, optimizer, ctx, amp, grad_clip=1.0, fused_loss=fused_loss)
    T, V = args.seq_len, config["vocab_size"]
    fl = metrics.model_flops(config, T)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(b):
        x = torch.randint(0, V, (b, T), generator=gen, device=device)
        with sdpa_context(args.sdpa):
            return trainer.step([x], 1e-5)

    if args.micro_batch:
        candidates = [args.micro_batch]
    elif spec["compile"] and eager_row in shared["micro_batch"]:
        start = shared["micro_batch"][eager_row]
        candidates = [c for c in map(int, args.batch_candidates.split(",")) if c <= start]
    else:
        candidates = list(map(int, args.batch_candidates.split(",")))
    chosen, t_first = None, time.perf_counter()
    for b in candidates:  # the largest micro-batch whose warm-up and timed steps all fit
        oom = False
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first = step(b)
            t_first = time.perf_counter() - t_first
            for _ in range(args.warmup - 1):
                step(b)
            sync(device)
            t0 = time.perf_counter()
            losses = [step(b)["loss"] for _ in range(args.steps)]
            sync(device)
            dt = (time.perf_counter() - t0) / args.steps
            chosen = b
            break
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            oom = True
        if oom:  # outside the except block, so the failed step's tensors are released first
            optimizer.zero_grad(set_to_none=True)
            free(device)
            t_first = time.perf_counter()
    if not spec["compile"]:
        shared["micro_batch"][eager_row] = chosen
    if chosen is None:
        if spec["compile"]:
            torch._dynamo.reset()
        return dict(
            row=name, error=f"out of memory at every micro-batch ({','.join(map(str, candidates))})", oom=candidates
        )
    tokens = chosen * T
    peak = metrics.peak_flops(device, args.peak_flops)
    row = dict(
        row=name,
        process=os.getpid(),
        model=spec["model"],
        expert_impl=spec["impl"],
        compiled=spec["compile"],
        compile_mode=spec.get("compile_mode", "default") if spec["compile"] else None,
        fused_loss=fused_loss and "family" not in spec,
        # which of modeling_bam's Triton kernels the row ran (a peer row runs none; the loss's needs the fused loss)
        **{
            ("loss_kernel" if k == "loss" else f"fused_{k}"): k not in spec.get("torch_ops", ())
            and "family" not in spec
            and (fused_loss or k != "loss")
            for k in modeling_bam.FUSED
        },
        heads_layout="copied" if spec.get("heads_copied") else "projections",
        fsdp_param_dtype=str(spec["fsdp_param_dtype"]) if fsdp else None,
        family=spec.get("family", "ours"),
        micro_batch=chosen,
        seq_len=T,
        tokens_per_step=tokens,
        step_ms=1e3 * dt,
        tokens_per_s=tokens / dt,
        mfu=metrics.mfu(tokens / dt, fl["flops_per_token"], peak),
        mfu_causal=metrics.mfu(tokens / dt, fl["flops_per_token_causal"], peak),
        flops_per_token=fl["flops_per_token"],
        active_matmul_params=fl["active_matmul_params"],
        params=metrics.count_params(model),
        first_step_s=t_first,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        loss_first=first["loss"],
        nll_first=first["nll"],  # the cross-entropy alone: equal for ours and a peer on the same weights and batch
        loss_last=losses[-1],
    )
    if name in shared["profile_rows"]:
        prof, text = profile_steps(lambda: step(chosen), device, args.profile_steps)
        row["profile"] = prof
        with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
            f.write(f"{name}: micro-batch {chosen} x {T}, {args.profile_steps} steps\n\n{text}\n")
        print(f"\n--- profile of {name} ---\n{text}\n", flush=True)
    if spec["compile"]:
        torch._dynamo.reset()
    return row


def fmt(v, spec, unit=""):
    return "-" if v is None else format(v, spec) + unit


def table(rows):
    head = (
        "| row | micro-batch | tokens/step | step ms | tokens/s | MFU | MFU (causal) | peak GiB | loss first -> last |"
    )
    out = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r or "skipped" in r:
            out.append(f"| {r['row']} | {r.get('error') or r.get('skipped')} |" + " |" * 7)
            continue
        out.append(
            f"| {r['row']} | {r['micro_batch']} | {r['tokens_per_step']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} | "
            f"{fmt(r['mfu_causal'] and 100 * r['mfu_causal'], '.1f', '%')} | {fmt(r['peak_memory_gb'], '.1f')} | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(out)


def git_commit():
    try:
        return (
            subprocess.run(
                ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        return None


def without_options(argv, valued, flags=()):
    """argv without the options `valued`, each with its value ("--out DIR" or "--out=DIR"), and the `flags`."""
    kept, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name in valued:
            skip = "=" not in arg
        elif arg not in flags:
            kept.append(arg)
    return kept


def run_isolated(name, argv, args, budget):
    """Runs row `name` in a fresh Python process (--isolate) with this run's arguments but --rows, --out and
    --time-budget; its profile lands in --out as an in-process row's does. -> the row's dict"""
    child_out = os.path.join(args.out, "rows", name)
    rest = without_options(argv, {"--rows", "--out", "--time-budget"}, {"--isolate"})  # the child runs its row itself
    cmd = [sys.executable, os.path.abspath(__file__), *rest]
    cmd += ["--rows", name, "--out", child_out, "--time-budget", str(budget)]
    try:  # the child keeps to the budget itself; this bounds a child that hangs
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=budget + 60)
    except subprocess.TimeoutExpired:
        return dict(row=name, error=f"its process ran past the {budget:.0f} s left of --time-budget and was stopped")
    print(proc.stdout, end="", flush=True)
    try:
        with open(os.path.join(child_out, "train_bench.json")) as f:
            (row,) = json.load(f)["rows"]
    except (OSError, ValueError) as e:
        last = (proc.stdout.strip().splitlines() or [""])[-1][:300]
        return dict(row=name, error=f"its process exited {proc.returncode} without a result ({e}): {last}")
    profile = os.path.join(child_out, f"profile_{name}.txt")
    if os.path.exists(profile):
        os.replace(profile, os.path.join(args.out, f"profile_{name}.txt"))
    return row


def select_rows(text):
    """--rows: names and shell patterns, in the order given (a pattern's rows in ROWS order), each once."""
    rows = []
    for item in filter(None, text.split(",")):
        matched = [item] if item in ROWS else [r for r in ROWS if fnmatch.fnmatchcase(r, item)]
        if not matched:
            raise SystemExit(f"--rows: {item!r} names no row; choose from {', '.join(ROWS)}")
        rows += [r for r in matched if r not in rows]
    return rows


def write_folders(needed, args, device):
    """The synthetic folders the rows need (bench/train/synthetic.py), cached under --cache-dir. -> {key: path}"""
    cache = args.cache_dir or ("/tmp/bam-bench-tiny" if args.tiny else "/tmp/bam-bench")
    shape = dict(synthetic.TINY_SHAPE if args.tiny else synthetic.SHAPES[args.shape])
    if args.kv_heads and not args.tiny:
        shape["num_key_value_heads"] = args.kv_heads
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], args.seq_len)
    E, k = args.experts, args.top_k
    tag = f"L{shape['num_hidden_layers']}-H{shape['hidden_size']}-kv{shape['num_key_value_heads']}"
    btx = dict(synthetic.BTX, num_experts=E, num_experts_per_tok=k)
    recipes = {  # key -> (folder name, seed shape, mixture)
        "bam": (
            f"bam-{E}x-{args.attention}-k{k}-{tag}",
            shape,
            dict(synthetic.MOE, num_experts=E, num_experts_per_tok=k, attention_experts=args.attention),
        ),
        "dense": (f"seed0-{tag}", shape, synthetic.DENSE),
        "btx": (f"btx-{E}x-k{k}-{tag}", shape, btx),
        "btx-qwen3": (f"btx-qwen3-{E}x-k{k}-{tag}", dict(shape, **synthetic.QWEN3_SEEDS), btx),
    }
    paths = {}
    for key in sorted(needed | {EXPORTS[n] for n in needed if n in EXPORTS}, key=lambda n: n in EXPORTS):
        if key in EXPORTS:  # the same weights as the BAM folder of our row, in the native layout
            paths[key] = synthetic.write_native(paths[EXPORTS[key]], key, f"{paths[EXPORTS[key]]}-{key}")
        else:
            name, seed_shape, moe = recipes[key]
            paths[key] = synthetic.write_folder(os.path.join(cache, name), seed_shape, moe, device=device)
    return paths


def describe(path, seq_len):
    """A folder's shape and FLOPs (the BAM config of a native folder) for the result JSON."""
    config = folder.read_config(path)
    if config.get("model_type") in native.FORMATS:
        config = native.to_bam_config(config["model_type"], config, path)
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "num_experts",
        "num_experts_per_tok",
        "attention_experts",
        "block",
        "qk_norm",
    )
    return dict(path=path, **{k: config.get(k) for k in keys}, **metrics.model_flops(config, seq_len))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and args.device != "cpu" and not args.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctx = parallel.Context(device=device)
    amp = torch.bfloat16 if cuda else torch.float32
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = max(1, args.warmup or (1 if args.tiny else 3))
    if args.tiny and args.micro_batch is None:
        args.micro_batch = 2
    rows = select_rows(args.rows) if args.rows else [r for r in DEFAULT_ROWS if not (args.tiny and ROWS[r]["compile"])]
    os.makedirs(args.out, exist_ok=True)

    notes = []
    if args.model:
        paths = {"bam": args.model, **({"dense": args.dense} if args.dense else {})}
    else:
        t = time.perf_counter()
        paths = write_folders({ROWS[r]["model"] for r in rows}, args, "cuda" if cuda else "cpu")
        notes.append(f"synthetic folders ready in {time.perf_counter() - t:.1f} s: {', '.join(paths.values())}")
        print(notes[-1], flush=True)

    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        cuda=torch.version.cuda if cuda else None,
        grouped_mm=hasattr(torch.nn.functional, "grouped_mm"),
        peak_flops=metrics.peak_flops(device, args.peak_flops),
        sdpa=args.sdpa,
        amp=str(amp),
    )
    result = dict(
        commit=args.commit or git_commit(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        env=env,
        args=vars(args),
        models={key: describe(path, args.seq_len) for key, path in paths.items()},
        rows=[],
        notes=notes,
    )
    print(f"{env['device']}, torch {env['torch']}, peak {env['peak_flops']}; rows {rows}", flush=True)
    shared = dict(micro_batch={}, weights={}, profile_rows=set(filter(None, args.profile.split(","))))
    out_json = os.path.join(args.out, "train_bench.json")
    for name in rows:
        spec = ROWS[name]
        elapsed = time.perf_counter() - started
        if spec["model"] not in paths:
            result["rows"].append(dict(row=name, skipped="no folder for this model (--model: bam; --dense: dense)"))
            continue
        if args.time_budget - elapsed < (0 if args.tiny else MIN_SECONDS[spec["compile"]]):
            result["rows"].append(dict(row=name, skipped=f"not enough of the {args.time_budget:.0f} s budget left"))
            continue
        print(f"{name}: ...", flush=True)
        try:
            if args.isolate:
                r = run_isolated(name, argv, args, args.time_budget - elapsed)
            else:
                r = run_row(name, spec, paths[spec["model"]], args, ctx, amp, shared)
        except Exception as e:  # noqa: BLE001  (a row that fails is reported, the others still run)
            r = dict(row=name, error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")  # one line
        free(device)  # after run_row returned: its model, optimiser and activations are gone
        result["rows"].append(r)
        print(
            f"{name}: "
            + (
                r.get("error")
                or r.get("skipped")
                or f"{r['tokens_per_s']:,.0f} tokens/s, MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')}, "
                f"micro-batch {r['micro_batch']}"
            ),
            flush=True,
        )
        with open(out_json, "w") as f:  # after every row: a timeout still leaves the rows done
            json.dump(result, f, indent=2)
    if "fsdp_ctx" in shared:  # the process group of the fsdp rows
        parallel.shutdown(shared["fsdp_ctx"])
    got = {r["row"]: r for r in result["rows"] if "tokens_per_s" in r}
    ratios = {}
    pairs = [("bam", "bam-loop"), ("bam-compile", "bam-loop"), ("bam", "dense"), ("bam-compile", "dense-compile")]
    # the Triton kernels: eager only, but for the loss's
    pairs += [("bam", f"bam-torch-{k}") for k in ("rope", "norm", "kernels", "gate")]
    pairs += [(m, f"{m}-torch-swiglu") for m in ("bam", "btx")]
    pairs += [(f"{m}{c}", f"{m}-torch-loss{c}") for m in ("bam", "btx") for c in ("", "-compile")]
    pairs += [("bam", "bam-heads-copied")]  # rope_layout
    pairs += [(f"{m}{c}", f"{m}-logits{c}") for m in ("bam", "btx") for c in ("", "-compile")]  # the fused loss
    pairs += [(f"{m}-cudagraphs", f"{m}-compile") for m in ("bam", "btx")]
    pairs += [(f"{m}-fsdp-bf16{c}", f"{m}{c}") for m in ("bam", "btx") for c in ("", "-compile")]
    for a, b in pairs:
        if a in got and b in got:
            ratios[f"{a} / {b} tokens/s"] = got[a]["tokens_per_s"] / got[b]["tokens_per_s"]
    best_peer = {}  # family -> its fastest row: our rows on the same weights over it
    for family, spec in peer.FAMILIES.items():
        peers = [r for r in got.values() if r["family"] == family]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["tokens_per_s"])["row"]
        best_peer[family] = best
        for ours in (spec["ours"], spec["ours"] + "-compile"):
            if ours in got:
                ratios[f"{ours} / {best} tokens/s"] = got[ours]["tokens_per_s"] / got[best]["tokens_per_s"]
    result["best_peer"] = best_peer
    result["ratios"] = ratios
    result["seconds"] = time.perf_counter() - started
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print()
    print(table(result["rows"]))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    for key, m in result["models"].items():
        print(
            f"{key}: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts "
            f"({m['attention_experts']}, top-{m['num_experts_per_tok']}), {m['active_matmul_params'] / 1e9:.3f}B "
            f"active matmul params, {m['flops_per_token'] / 1e9:.2f} GFLOP/token at seq {args.seq_len}"
        )
    print(f"wrote {out_json} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
