#!/usr/bin/env python3
"""Fine-tune a BAM model folder (the mixture training of docs/method.md) on one or several GPUs, or on CPU.

    python scripts/finetune.py --model bam3 --data code=code.bin:0.25 math=math.npy:0.25 \\
        law=law/:0.25 web=web.jsonl:0.25 --out runs/bam3 --steps 2000
    torchrun --nproc-per-node 8 scripts/finetune.py ...          (FSDP2, one process per GPU)

docs/finetune.md describes the run folder, resuming, interrupting and every check; in short:

Data: --data NAME=PATH[,PATH...][:WEIGHT] per domain; .npy / .bin token ids, .txt / .jsonl / .jsonl.gz /
.parquet text (tokenised with the folder's tokenizer.json), or directories of them; weights are relative (omitted: 1;
0: evaluated, never trained on). Every file is checked before the first step (ids inside the vocabulary,
.bin width, .jsonl fields). See scripts/bamtrain/data.py for packing, the mixture order and the held-out split.

Defaults follow the papers (docs/method.md): AdamW with betas (0.9, 0.95), weight decay 0.1 on
matrices only, peak learning rate 1e-4 (BAM 5.1 trains the branches at half the seed's pre-training peak
and the mixture at the full peak: set --lr to your seed's; ST-MoE: sparse models tolerate a higher rate),
linear warm-up then cosine to 10% of the peak, gradient clipping at 1.0, bf16 autocast on CUDA (routers
in float32), load-balance 0.01 and z-loss 1e-3 from the folder's config.

Outputs under --out (a new folder, or a run to continue with --resume, or to start over with --overwrite):
  train_log.jsonl   one record per step (loss, NLL, load-balance and z losses summed over layers, per-layer
                    FFN expert load and attention router weights with their entropies, grad norm, lr,
                    tokens/s, MFU) and one per held-out evaluation (NLL and perplexity per domain; step 0 first;
                    with --eval-data on one process, also per-domain routing and the routers' LM-loss gradient
                    norms: bamtrain/routing.py)
  train_args.json   the arguments, model size and FLOPs per token (formula: scripts/bamtrain/metrics.py)
  checkpoints/      every --save-every steps (DCP: resumes at any world size); --resume continues exactly
  final/            the trained model in the input's format: a BAM folder (docs/format.md tensor names,
                    config.json, modeling_bam.py, tokenizer, a README.md saying what was trained) for
                    from_pretrained(..., trust_remote_code=True), `bam inspect`, `bam eval`; or, from a
                    mixtral / qwen3_moe folder (`bam upcycle --format`), that format, for stock transformers
  tensorboard/      the same numbers for TensorBoard, when torch.utils.tensorboard imports
  train_curves.png  loss and expert load (when matplotlib is installed)

Exit codes: 0 done, 1 error (one line naming the file or step and what to do), 2 bad usage, 130 stopped by
SIGINT or SIGTERM (after the current step and a checkpoint; --resume continues). BAM_DEBUG=1 shows tracebacks.

Several processes: FSDP2 (fully_shard per block, then the root) over NCCL on CUDA, gloo on CPU. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
on the first lines below, before torch loads: see bamtrain/parallel.py).
"""

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation (MoE shapes vary)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

if __name__ == "__main__":  # the script trains the pure-torch core and writes folders itself: leaving
    sys.modules.setdefault("transformers", None)  # transformers unimported saves seconds in every process
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bamtrain import BamTrainError  # noqa: E402  (torch-free: torch loads after the arguments are parsed)

DTYPE_CHOICES = ("bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CONFIG_FLAGS = {  # flag -> config.json field (set only when the flag is given)
    "router_jitter": "router_jitter",
    "expert_dropout": "expert_dropout",
    "hidden_dropout": "hidden_dropout",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef",
}
RUN_FILES = ("train_log.jsonl", "train_args.json", "checkpoints", "final", "tensorboard", "train_curves.png")
INTERRUPTED = 130  # the exit code for SIGINT and SIGTERM alike (the shell's code for Ctrl-C)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (unless None/False, where the help text says what happens)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=HelpFormatter,
        epilog="docs/finetune.md: the run folder, resuming, and what each check refuses.",
    )
    a = p.add_argument_group("model and data")
    a.add_argument(
        "--model",
        required=True,
        help="BAM, mixtral or qwen3_moe folder (bam upcycle's output, or a "
        "final/ of this script); final/ keeps its format",
    )
    a.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="NAME=PATH[,PATH][:W]",
        help="training domains (weight 0: held-out evaluation only)",
    )
    a.add_argument(
        "--eval-data",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="held-out data of a --data domain (default: the last blocks of its own stream)",
    )
    a.add_argument("--out", required=True, help="run folder: log, checkpoints, final model (not inside the model)")
    a.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(2048, max positions))")
    a.add_argument("--eval-blocks", type=int, default=16, help="held-out sequences per domain (at most a tenth)")
    a.add_argument(
        "--bin-dtype",
        choices=["uint16", "uint32"],
        default=None,
        help=".bin token width (default: a meta.json beside the file, else uint16 when the vocabulary fits)",
    )
    a.add_argument("--eos-id", type=int, default=None, help="document separator (default: the config's eos_token_id)")
    a.add_argument("--text-key", default="text", help="field of .jsonl / .jsonl.gz documents, column of .parquet")
    a = p.add_argument_group("batch and schedule")
    a.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    a.add_argument("--micro-batch", type=int, default=4, help="sequences per forward, per process")
    a.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per optimiser step over all processes (default micro-batch x processes); "
        "gradient accumulation makes up the rest, so runs at any world size see the same batches",
    )
    a.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    a.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps, at most 1000")
    a.add_argument("--weight-decay", type=float, default=0.1)
    a.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a.add_argument("--eps", type=float, default=1e-8)
    a.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: no clipping)")
    a.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=3,
        help="stop (exit 1, nothing saved) after this many steps in a row with a NaN/Inf loss or "
        "gradient norm; their updates are skipped",
    )
    a.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("MoE regularisation (config.json fields; unset: the folder's values)")
    a.add_argument("--router-jitter", type=float, default=None, help="multiplicative router-input noise (Switch: 1e-2)")
    a.add_argument("--expert-dropout", type=float, default=None, help="dropout inside FFN experts (Switch: 0.4)")
    a.add_argument("--hidden-dropout", type=float, default=None, help="dropout on attention/FFN outputs (Switch: 0.1)")
    a.add_argument("--capacity-factor", type=float, default=None, help="Switch capacity (default: dropless)")
    a.add_argument("--aux-loss-coef", type=float, default=None, help="load-balance weight alpha (default 0.01)")
    a.add_argument("--z-loss-coef", type=float, default=None, help="router z-loss weight beta (default 1e-3)")
    a = p.add_argument_group("performance and parallelism")
    a.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    a.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="autocast dtype (default bf16 on CUDA, fp32 on CPU; fp16 is not offered: it needs loss scaling)",
    )
    a.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile every block (default: on with CUDA, where bench/train measures 1.6x the "
        "tokens/s of eager; off on CPU); --no-compile: eager",
    )
    a.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile's mode for the blocks (reduce-overhead: CUDA graphs, fewer kernel launches from "
        "the host, more memory; max-autotune: kernels tuned at start-up)",
    )
    a.add_argument(
        "--fused-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cross-entropy chunk by chunk from the last hidden states, never holding the [tokens, vocab] "
        "logits (same loss and gradients; far less memory for large vocabularies); --no-fused-loss: the head's "
        "logits, then cross-entropy",
    )
    a.add_argument(
        "--fused-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, rope, RMSNorm, the attention experts' gate weighting and the experts' SwiGLU as one Triton "
        "kernel each way in eager blocks (compiled blocks use inductor's kernels), and the fused loss's "
        "cross-entropy as one kernel that writes its gradient over the logits (bench/train measures what each "
        "buys); --no-fused-kernels: the torch ops",
    )
    a.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    a.add_argument("--fsdp", choices=["auto", "on", "off"], default="auto", help="FSDP2 (auto: with several processes)")
    a.add_argument(
        "--fsdp-param-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype FSDP all-gathers parameters in (bf16: half the traffic, bf16-rounded routers)",
    )
    a.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak for MFU (default: by GPU, H100 989e12)")
    a = p.add_argument_group("logging, evaluation, checkpoints, output")
    a.add_argument("--log-every", type=int, default=10, help="console line every N steps (the JSONL gets every step)")
    a.add_argument(
        "--eval-every",
        type=int,
        default=200,
        help="held-out perplexity every N steps, and at step 0 and the last (0: at those two only)",
    )
    a.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="checkpoint every N steps (default: a tenth of --steps, at most 500; 0: never)",
    )
    a.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    a.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue OUT's run from its newest readable checkpoint, or from the one given; the "
        "checkpoint's learning-rate schedule is kept",
    )
    a.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an OUT that holds a run: its log, checkpoints and final/ are deleted",
    )
    a.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="checkpoint and stop after this step (the schedule still spans --steps)",
    )
    a.add_argument(
        "--save-dtype",
        choices=["keep", "bf16", "fp32"],
        default="keep",
        help="dtype of the final folder's weights (keep: the input folder's)",
    )
    a.add_argument("--max-shard-size", default="5GB")
    a.add_argument("--no-final", action="store_true", help="do not write OUT/final")
    a.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for key, low in (
        ("steps", 1),
        ("micro_batch", 1),
        ("global_batch", 1),
        ("seq_len", 2),
        ("log_every", 1),
        ("eval_every", 0),
        ("save_every", 0),
        ("keep_checkpoints", 0),
        ("eval_blocks", 0),
        ("stop_after", 1),
        ("warmup_steps", 0),
        ("max_nonfinite_steps", 1),
    ):
        value = getattr(args, key)
        if value is not None and value < low:
            p.error(f"--{key.replace('_', '-')} must be at least {low}, not {value}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, not {args.lr}")
    if args.resume and args.overwrite:
        p.error("--resume continues OUT's run and --overwrite deletes it: give one")
    if args.compile is False and args.compile_mode != "default":
        p.error(f"--compile-mode {args.compile_mode} is torch.compile's mode, and --no-compile turns it off: give one")
    return args


class Console:
    """Lines on the main process's stdout; a closed pipe (`| head`) silences it and training goes on."""

    def __init__(self, main):
        self.main, self.closed = main, False

    def __call__(self, *parts):
        if not self.main or self.closed:
            return
        try:
            print(*parts, flush=True)
        except BrokenPipeError:
            self.closed = True
            try:  # the interpreter's flush at exit would fail on the same pipe
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass

    def warn(self, line):
        if self.main:
            print(line, file=sys.stderr, flush=True)


class StopRequest:
    """SIGINT / SIGTERM handler: the step in progress finishes, then a checkpoint; a second signal stops at once."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


def seed_everything(seed, rank):
    """Per-rank streams (router jitter, dropout); data order does not depend on these (see data.py)."""
    import numpy as np
    import torch

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def rate(tokens_per_s):
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.3g}{unit} tok/s"
    return f"{tokens_per_s:.3g} tok/s"


def shares(rows):
    from bamtrain.metrics import expert_means

    return " ".join(f"{x:.2f}" for x in expert_means(rows))


def fmt_line(step, steps, r, layers):
    """The console line of a step: the JSONL's lb_loss and z_loss are sums over layers; shown per layer."""
    parts = [f"step {step}/{steps}", f"loss {r['loss']:.4f}", f"nll {r['nll']:.4f}"]
    if "ffn_load" in r:
        parts.append(f"per layer: load-balance {r['lb_loss'] / layers:.3f} z {r['z_loss'] / layers:.3f}")
    parts.append(f"grad norm {r['grad_norm']:.3f}")
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(
        f"{rate(r['tokens_per_s'])}, {1000 * r['step_time']:.0f} ms/step"
        + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "")
    )
    if "ffn_load" in r:  # mean over layers of each expert's share: 1/E each when balanced
        parts.append(f"FFN expert load {shares(r['ffn_load'])}")
    if "attn_weight" in r:
        parts.append(f"attention expert weight {shares(r['attn_weight'])}")
    return " | ".join(parts)


def fmt_eval(step, ev):
    return f"step {step} held-out: " + ", ".join(f"{k} nll {v['nll']:.4f} ppl {v['ppl']:.2f}" for k, v in ev.items())


def main(argv=None):
    """-> the exit code (0, 1, 2 from argparse's SystemExit, 130)."""
    args = parse_args(argv)
    console = None
    try:
        from bamtrain import parallel

        ctx = parallel.init(args.device, args.fsdp)
        console = Console(ctx.main)
        try:
            run(args, ctx, console)
            return 0
        finally:
            parallel.shutdown(ctx)
    except Interrupted as e:
        (console or Console(True)).warn(str(e))
        return INTERRUPTED
    except KeyboardInterrupt:
        print(
            "interrupted (no checkpoint of the step in progress); --resume continues from the last one",
            file=sys.stderr,
            flush=True,
        )
        return INTERRUPTED
    except BamTrainError as e:
        if os.environ.get("BAM_DEBUG"):
            raise
        print(f"finetune.py: error: {e}", file=sys.stderr, flush=True)
        return 1


class Interrupted(Exception):
    """SIGINT/SIGTERM handled: the checkpoint is written; the message says where."""


def check_out(args, console, main):
    """--out: never the model folder, inside it or around it; an existing run only with --resume (continue)
    or --overwrite (its run files deleted, nothing else)."""
    out, model = os.path.realpath(args.out), os.path.realpath(args.model)
    if out == model or out.startswith(model + os.sep) or model.startswith(out + os.sep):
        where = "is" if out == model else "is inside" if out.startswith(model + os.sep) else "contains"
        raise BamTrainError(
            f"--out {args.out} {where} the model folder {args.model}; run files would mix with the "
            "model: choose another --out"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise BamTrainError(f"--out {args.out}: exists and is not a folder; choose another --out")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if found and not args.resume and not args.overwrite:
        raise BamTrainError(
            f"{args.out}: holds a run ({', '.join(found)}); continue it with --resume, start over with "
            "--overwrite (deletes its log, checkpoints and final/), or choose another --out"
        )
    if main:
        from bamtrain import ckpt, folder

        if args.overwrite:
            for f in found:
                path = os.path.join(out, f)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            if found:
                console(f"--overwrite: deleted {', '.join(found)} of the run in {args.out}")
        os.makedirs(out, exist_ok=True)
        folder.recover_folder(os.path.join(out, "final"))
        ckpt.recover(args.out)


def use_compile(flag, torch, device, warn):
    """--compile / --no-compile, or by default on CUDA only (bench/train: 1.6x the eager tokens/s, same
    losses). An explicit --compile that cannot run is an error; the default falls back to eager with a warning."""
    wanted = flag if flag is not None else device.type == "cuda"
    problem = wanted and compile_problem(torch, device)
    if problem and flag:
        raise BamTrainError(f"--compile: {problem}; run without --compile")
    if problem:
        warn(f"warning: {problem}; training without torch.compile (--no-compile silences this)")
    return wanted and not problem


def compile_problem(torch, device):
    """Why torch.compile cannot run here, or None."""
    if not callable(getattr(torch, "compile", None)) or not hasattr(torch.nn.Module, "compile"):
        return f"torch {torch.__version__} has no torch.compile (torch >= 2.2 has)"
    if device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "torch.compile on CPU needs a C++ compiler (c++ / g++ on PATH, or CXX)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton (the CUDA builds of torch install it; pip install triton)"
    return None


def non_finite_weight(model, ctx):
    """The name of a parameter holding NaN/Inf (any rank's shard), or None."""
    import torch

    from bamtrain import parallel

    bad = None
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            bad = name
            break
    flag = parallel.all_reduce_sum(torch.tensor([0.0 if bad is None else 1.0], device=ctx.device), ctx)
    return (bad or "a tensor of another process's shard") if flag.item() > 0 else None


def refuse_non_finite(model, ctx, step, what):
    name = non_finite_weight(model, ctx)
    if name:
        raise BamTrainError(
            f"step {step}: parameter {name!r} holds NaN or Inf; {what} not written (the previous "
            "checkpoint stays the newest); lower --lr or check the data"
        )


def run(args, ctx, say):
    import torch

    import modeling_bam  # python/ (bamtrain puts it on sys.path): the model folder.load_model builds
    from bamtrain import ckpt, data, folder, metrics, parallel, routing
    from bamtrain.trainer import Trainer, lr_at, make_optimizer

    check_out(args, say, ctx.main)
    parallel.barrier(ctx)
    try:
        shard_bytes = folder.parse_size(args.max_shard_size)
    except ValueError as e:
        raise BamTrainError(f"--max-shard-size: {e}") from e
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    seed_everything(args.seed, ctx.rank)
    amp = dtypes[args.dtype or ("bf16" if ctx.device.type == "cuda" else "fp32")]
    overrides = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    model, config, stored = folder.load_model(args.model, ctx.device, overrides)
    positions = config["max_position_embeddings"]
    seq_len = args.seq_len or min(2048, positions)
    if seq_len > positions:
        raise BamTrainError(
            f"--seq-len {seq_len} exceeds max_position_embeddings {positions} of "
            f"{os.path.join(args.model, 'config.json')}; give --seq-len {positions} or less"
        )
    compiled = use_compile(args.compile, torch, ctx.device, say.warn)
    for kernel in modeling_bam.FUSED:
        modeling_bam.FUSED[kernel] = args.fused_kernels
    if args.compile_mode != "default" and not compiled:
        raise BamTrainError(f"--compile-mode {args.compile_mode}: the blocks are not compiled here; add --compile")
    mixture = data.build_mixture(
        args.data,
        args.eval_data,
        args.model,
        config,
        seq_len,
        args.eval_blocks,
        args.seed,
        args.bin_dtype,
        args.eos_id,
        args.text_key,
    )
    global_batch = args.global_batch or args.micro_batch * ctx.world
    if global_batch % (args.micro_batch * ctx.world):
        raise BamTrainError(
            f"--global-batch {global_batch} is not a multiple of micro-batch {args.micro_batch} x {ctx.world} processes"
        )
    accum = global_batch // (args.micro_batch * ctx.world)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, max(1, round(0.05 * args.steps)))
    save_every = args.save_every if args.save_every is not None else min(500, max(1, math.ceil(args.steps / 10)))
    layers = config["num_hidden_layers"]

    model.train()
    if args.activation_checkpointing:
        model.model.gradient_checkpointing = True
    if compiled:
        for block in model.model.layers:
            block.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
    if ctx.fsdp:
        parallel.apply_fsdp(model, ctx, torch.bfloat16 if args.fsdp_param_dtype == "bf16" else None)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, tuple(args.betas), args.eps, ctx.device)
    trainer = Trainer(model, optimizer, ctx, amp, args.grad_clip, fused_loss=args.fused_loss)

    start, tokens_seen, state, resume = 0, 0, None, None
    schedule = dict(peak=args.lr, warmup=warmup, total=args.steps, min_ratio=args.min_lr_ratio)
    if args.resume == "auto":
        resume, state, rng_restored = ckpt.load_newest(args.out, model, optimizer, ctx, say.warn)
        if resume is None:
            say(f"--resume: no checkpoint under {args.out}/checkpoints; starting from {args.model}")
    elif args.resume:
        try:
            state, rng_restored = ckpt.load(args.resume, model, optimizer, ctx)
        except (Exception, ckpt._dcp_error()) as e:
            raise BamTrainError(f"--resume {args.resume}: cannot be read ({ckpt.reason(e)})") from e
        resume = args.resume
    if state is not None:
        mixture.load_state_dict(state["data"])
        start, tokens_seen = state["step"], state["tokens"]
        say(
            f"resumed from {resume} at step {start} (saved by {state['world_size']} process(es)"
            f"{'' if rng_restored else '; this rank had no RNG state there: fresh streams'})"
        )
        if state["global_batch"] != global_batch or state["seq_len"] != seq_len:
            say.warn(
                f"warning: the checkpoint trained with global batch {state['global_batch']} x {state['seq_len']}, "
                f"this run uses {global_batch} x {seq_len}"
            )
        saved = state.get("schedule", schedule)
        if saved != schedule:  # the saved schedule is kept: a changed --steps would re-spread the cosine
            say.warn(
                f"warning: keeping the checkpoint's learning-rate schedule (peak {saved['peak']:g}, warm-up "
                f"{saved['warmup']}, cosine to {saved['min_ratio']:g} of the peak at step {saved['total']}), not "
                f"this run's (peak {args.lr:g}, warm-up {warmup}, step {args.steps})"
                + (f"; steps after {saved['total']} run at the floor" if args.steps > saved["total"] else "")
            )
            schedule = saved
        if start >= args.steps:
            raise BamTrainError(
                f"{resume}: the checkpoint is at step {start}, --steps is {args.steps}; give a larger "
                "--steps to train on"
            )

    n_params = metrics.count_params(model)
    fl = metrics.model_flops(config, seq_len)
    peak = metrics.peak_flops(ctx.device, args.peak_flops)
    tokens_per_step = global_batch * seq_len
    logger = board = None
    if ctx.main:
        with open(os.path.join(args.out, "train_args.json"), "w") as f:
            json.dump(
                dict(
                    vars(args),
                    compile=compiled,
                    world_size=ctx.world,
                    fsdp=ctx.fsdp,
                    accum=accum,
                    global_batch=global_batch,
                    seq_len=seq_len,
                    warmup_steps=warmup,
                    save_every=save_every,
                    schedule=schedule,
                    amp_dtype=str(amp),
                    params=n_params,
                    peak_flops=peak,
                    torch=torch.__version__,
                    **fl,
                ),
                f,
                indent=2,
            )
        logger = metrics.JsonlLog(os.path.join(args.out, "train_log.jsonl"), start if state else None)
        if logger.torn:
            say.warn(f"warning: {args.out}/train_log.jsonl: dropped {logger.torn} line(s) cut off by an interruption")
        board = metrics.TensorBoard(os.path.join(args.out, "tensorboard"), purge_step=start + 1 if state else None)
        if board.note:
            say(board.note)
    say(
        f"model {args.model}: {n_params / 1e6:.1f}M parameters, {fl['active_matmul_params'] / 1e6:.1f}M active "
        f"in matmuls, {fl['flops_per_token'] / 1e9:.2f} GFLOP/token ({fl['attention_experts_per_token']} attention "
        f"expert(s) per token); {ctx.world} process(es) on {ctx.device.type}"
        f"{' with FSDP2' if ctx.fsdp else ''}, {str(amp).replace('torch.', '')}"
        f"{', torch.compile' if compiled else ''}; batch {global_batch} x {seq_len} "
        f"= {tokens_per_step} tokens/step (micro {args.micro_batch}, accumulation {accum}); "
        f"domains {', '.join(f'{d.name} {mixture.weights.get(i, 0):.2f}' for i, d in enumerate(mixture.domains))}; "
        f"console every {args.log_every} steps, checkpoints every {save_every or 'never'}"
    )

    def record(r):
        if ctx.main:
            logger.write(r)
            board.write(r)

    def evaluate(step):
        ev = trainer.evaluate(mixture, args.micro_batch)
        # per-domain routing and the routers' LM-loss gradient norms (bamtrain/routing.py); one process only
        routed = (
            routing.at_eval(model, mixture, args.micro_batch, ctx.device, amp)
            if args.eval_data and not ctx.fsdp
            else {}
        )
        record({"step": step, "tokens": tokens_seen, "eval": ev, **routed})
        say(fmt_eval(step, ev))
        return ev

    def save(step):
        refuse_non_finite(model, ctx, step, "checkpoint")
        ckpt_state = dict(
            step=step,
            tokens=tokens_seen,
            data=mixture.state_dict(),
            global_batch=global_batch,
            seq_len=seq_len,
            schedule=schedule,
        )
        return ckpt.save(args.out, step, model, optimizer, ckpt_state, ctx, args.keep_checkpoints)

    stop = min(args.steps, args.stop_after or args.steps)
    last, last_eval, bad = {}, None, 0
    if state is None and mixture.eval_sets():
        last_eval = evaluate(0)  # the baseline: the model as given
    try:
        with StopRequest() as request:
            for step in range(start + 1, stop + 1):
                t0 = time.perf_counter()
                refs = mixture.next_refs(global_batch)
                mine = [
                    refs[j * args.micro_batch : (j + 1) * args.micro_batch]
                    for j in range(ctx.rank, global_batch // args.micro_batch, ctx.world)
                ]
                batches = [mixture.batch(r, config["vocab_size"]) for r in mine]
                if ctx.device.type == "cuda":
                    batches = [b.pin_memory() for b in batches]
                lr = lr_at(step, schedule["peak"], schedule["warmup"], schedule["total"], schedule["min_ratio"])
                r = trainer.step(batches, lr)  # its .tolist() waits for the GPU
                dt = time.perf_counter() - t0
                tokens_seen += tokens_per_step
                r.update(
                    step=step,
                    lr=lr,
                    tokens=tokens_seen,
                    step_time=dt,
                    tokens_per_s=tokens_per_step / dt,
                    mfu=metrics.mfu(tokens_per_step / dt, fl["flops_per_token"], peak, ctx.world),
                    mfu_causal=metrics.mfu(tokens_per_step / dt, fl["flops_per_token_causal"], peak, ctx.world),
                    domains={d.name: sum(1 for i, _ in refs if i == k) for k, d in enumerate(mixture.domains)},
                )
                last = r
                record(r)
                finite = math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
                bad = 0 if finite else bad + 1
                if not finite:
                    what = f"step {step}: loss {r['loss']}, grad norm {r['grad_norm']}"
                    if bad >= args.max_nonfinite_steps:
                        latest = ckpt.latest(args.out)
                        raise BamTrainError(
                            f"{what}: not finite for {bad} step(s) in a row (updates skipped); stopped "
                            "without saving"
                            + (f"; the last checkpoint is {latest}" if latest else "")
                            + ". Lower --lr, check the data, or the model with `bam inspect --scan`"
                        )
                    say.warn(
                        f"warning: {what}: not finite, update skipped ({bad} in a row; --max-nonfinite-steps "
                        f"{args.max_nonfinite_steps} stops the run)"
                    )
                if step % args.log_every == 0 or step in (start + 1, stop):
                    say(fmt_line(step, args.steps, r, layers))
                if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                    last_eval = evaluate(step)
                stopping = parallel.any_flag(request.signal is not None, ctx)
                if bad == 0 and ((save_every and step % save_every == 0) or step == args.stop_after or stopping):
                    say(f"checkpoint {save(step)}")
                if stopping:
                    name = signal.Signals(request.signal).name if request.signal else "a signal on another process"
                    raise Interrupted(f"stopped by {name} after step {step}; continue with --resume")
    finally:
        if board is not None:
            board.close()

    if stop == args.steps and not args.no_final:
        refuse_non_finite(model, ctx, stop, "final/")
        final = os.path.join(args.out, "final")
        sd = full_state_dict(model, ctx)
        if ctx.main:
            dtype = stored if args.save_dtype == "keep" else dtypes[args.save_dtype]
            training = dict(
                source=os.path.abspath(args.model),
                steps=args.steps,
                tokens=tokens_seen,
                seq_len=seq_len,
                global_batch=global_batch,
                lr=args.lr,
                data=args.data,
                eval_data=args.eval_data,
                final=last and {k: last[k] for k in ("loss", "nll", "lb_loss", "z_loss")},
                held_out=last_eval,
            )
            card = model_card(args, config, training, schedule, layers)
            folder.save_folder(
                final,
                sd,
                dict(config),
                args.model,
                dtype,
                shard_bytes,
                extra={"training.json": json.dumps(training, indent=2) + "\n", "README.md": card},
            )
            say(f"wrote {final}")
        parallel.barrier(ctx)
    if ctx.main and not args.no_plot and os.path.exists(os.path.join(args.out, "train_log.jsonl")):
        note = metrics.plot(os.path.join(args.out, "train_log.jsonl"), os.path.join(args.out, "train_curves.png"))
        say(note if not str(note).endswith(".png") else f"wrote {note}")
    return last


def model_card(args, config, t, schedule, layers):
    """final/README.md: what was trained, on what, and where it ended."""
    lines = [
        f"# {os.path.basename(os.path.abspath(args.model))}, fine-tuned",
        "",
        f"A BAM mixture-of-experts model ({config.get('num_experts')} experts, attention experts "
        f"`{config.get('attention_experts')}`), fine-tuned by bam-upcycle's `scripts/finetune.py` from "
        f"`{t['source']}`: {t['steps']} steps, {t['tokens']:,} tokens, "
        f"batch {t['global_batch']} x {t['seq_len']}, "
        f"AdamW, learning rate warm-up over {schedule['warmup']} step(s) to {schedule['peak']:g}, then cosine to "
        f"{schedule['min_ratio']:g} of it at step {schedule['total']}.",
        "",
        "## Data",
        "",
        "| domain | files | weight |",
        "|---|---|---|",
    ]
    from bamtrain import folder
    from bamtrain.data import parse_spec

    for spec in t["data"]:
        name, paths, weight = parse_spec(spec)
        lines.append(f"| {name} | {', '.join(paths)} | {1.0 if weight is None else weight:g} |")
    if t["final"]:
        f = t["final"]
        lines += [
            "",
            "## Last step",
            "",
            f"Loss {f['loss']:.4f}: next-token NLL {f['nll']:.4f} nats, load-balance {f['lb_loss']:.4f} and "
            f"z-loss {f['z_loss']:.4f} (each summed over the {layers} layers).",
        ]
    if t["held_out"]:
        lines += ["", "## Held-out", "", "| domain | NLL | perplexity |", "|---|---|---|"]
        lines += [f"| {k} | {v['nll']:.4f} | {v['ppl']:.2f} |" for k, v in t["held_out"].items()]
    load = (
        "`AutoModelForCausalLM.from_pretrained(folder)` (stock transformers, no remote code)"
        if folder.native_format(args.model)
        else "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`"
    )
    lines += [
        "",
        f"Load it with {load};",
        "`training.json` holds these numbers, and the run folder's `train_log.jsonl` every step.",
        "",
    ]
    return "\n".join(lines)


def full_state_dict(model, ctx):
    """The unsharded state dict on CPU (on rank 0 only under FSDP; other ranks get {})."""
    if ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    sys.exit(main())
