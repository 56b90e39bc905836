#!/usr/bin/env python3
"""Fine-tune a BAM model folder (the mixture training of docs/method.md) on one or several GPUs, or on CPU.

    python scripts/finetune.py --model bam3 --data code=code.bin:0.25 math=math.npy:0.25 \\
        law=law/:0.25 web=web.jsonl:0.25 --out runs/bam3 --steps 2000
    torchrun --nproc-per-node 8 scripts/finetune.py ...          (FSDP2, one process per GPU)

Data: --data NAME=PATH[,PATH...][:WEIGHT] per domain; .npy / .bin token ids, .txt / .jsonl text
(tokenised with the folder's tokenizer.json), or directories of them; weights are relative (omitted: 1).
See scripts/bamtrain/data.py for packing, the mixture order and the held-out split.

Defaults follow the papers (docs/method.md): AdamW with betas (0.9, 0.95), weight decay 0.1 on
matrices only, peak learning rate 1e-4 (BAM/BTX fine-tune at half the seed's pre-training peak, which was
2e-4 at their 2B scale; ST-MoE: sparse models tolerate a higher rate, so raise it for small seeds),
linear warm-up then cosine to 10% of the peak, gradient clipping at 1.0, bf16 autocast on CUDA (routers
in float32), load-balance 0.01 and z-loss 1e-3 from the folder's config.

Outputs under --out:
  train_log.jsonl   one record per step (loss, NLL, load-balance and z losses, per-layer FFN expert load
                    and attention router weights with their entropies, grad norm, lr, tokens/s, MFU) and
                    one per held-out evaluation (NLL and perplexity per domain; with --eval-data on one process,
                    also per-domain routing and the routers' LM-loss gradient norms: bamtrain/routing.py)
  train_args.json   the arguments, model size and FLOPs per token (formula: scripts/bamtrain/metrics.py)
  checkpoints/      every --save-every steps (DCP: resumes at any world size); --resume continues exactly
  final/            the trained model: a BAM folder (docs/format.md tensor names, config.json, modeling_bam.py,
                    tokenizer) for from_pretrained(..., trust_remote_code=True), `bam inspect`, `bam eval`
  train_curves.png  loss and expert load (when matplotlib is installed)

Several processes: FSDP2 (fully_shard per block, then the root) over NCCL on CUDA, gloo on CPU. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
on the first lines below, before torch loads: see bamtrain/parallel.py).
"""

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation (MoE shapes vary)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

if __name__ == "__main__":  # the script trains the pure-torch core and writes folders itself: leaving
    sys.modules.setdefault("transformers", None)  # transformers unimported saves seconds in every process
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bamtrain import ckpt, data, folder, metrics, parallel, routing  # noqa: E402
from bamtrain.trainer import Trainer, lr_at, make_optimizer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CONFIG_FLAGS = {  # flag -> config.json field (set only when the flag is given)
    "router_jitter": "router_jitter", "expert_dropout": "expert_dropout", "hidden_dropout": "hidden_dropout",
    "capacity_factor": "capacity_factor", "aux_loss_coef": "router_aux_loss_coef", "z_loss_coef": "router_z_loss_coef",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (scripts/finetune.py) for outputs and defaults.")
    a = p.add_argument_group("model and data")
    a.add_argument("--model", required=True, help="BAM folder (bam upcycle's output, or a final/ of this script)")
    a.add_argument("--data", required=True, nargs="+", metavar="NAME=PATH[,PATH][:W]", help="training domains")
    a.add_argument("--eval-data", nargs="*", default=[], metavar="NAME=PATH",
                   help="held-out data of a --data domain (default: the last blocks of its own stream)")
    a.add_argument("--out", required=True, help="run folder: log, checkpoints, final model")
    a.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(2048, max positions))")
    a.add_argument("--eval-blocks", type=int, default=16, help="held-out sequences per domain (at most a tenth)")
    a.add_argument("--bin-dtype", choices=["uint16", "uint32"], default=None, help=".bin token width (default by vocab)")
    a.add_argument("--eos-id", type=int, default=None, help="document separator (default: the config's eos_token_id)")
    a.add_argument("--text-key", default="text", help="field of .jsonl documents")
    a = p.add_argument_group("batch and schedule")
    a.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    a.add_argument("--micro-batch", type=int, default=4, help="sequences per forward, per process")
    a.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimiser step over all processes (default micro-batch x processes); "
                        "gradient accumulation makes up the rest, so runs at any world size see the same batches")
    a.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    a.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps, at most 1000")
    a.add_argument("--weight-decay", type=float, default=0.1)
    a.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a.add_argument("--eps", type=float, default=1e-8)
    a.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: no clipping)")
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
    a.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="autocast dtype (default bf16 on CUDA, fp32 on CPU; fp16 is not offered: it needs loss scaling)")
    a.add_argument("--compile", action="store_true", help="torch.compile every block")
    a.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    a.add_argument("--fsdp", choices=["auto", "on", "off"], default="auto", help="FSDP2 (auto: with several processes)")
    a.add_argument("--fsdp-param-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype FSDP all-gathers parameters in (bf16: half the traffic, bf16-rounded routers)")
    a.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak for MFU (default: by GPU, H100 989e12)")
    a = p.add_argument_group("logging, evaluation, checkpoints, output")
    a.add_argument("--log-every", type=int, default=1, help="console line every N steps (the JSONL gets every step)")
    a.add_argument("--eval-every", type=int, default=200, help="held-out perplexity every N steps (0: at the end only)")
    a.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: never)")
    a.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    a.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUT's newest checkpoint, or from the one given")
    a.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this step (the schedule still spans --steps)")
    a.add_argument("--save-dtype", choices=["keep", "bf16", "fp32"], default="keep",
                   help="dtype of the final folder's weights (keep: the input folder's)")
    a.add_argument("--max-shard-size", default="5GB")
    a.add_argument("--no-final", action="store_true", help="do not write OUT/final")
    a.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for key in ("steps", "micro_batch"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def seed_everything(seed, rank):
    """Per-rank streams (router jitter, dropout); data order does not depend on these (see data.py)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def log(ctx, *a):
    if ctx.main:
        print(*a, flush=True)


def fmt_line(step, steps, r, ms):
    bits = [f"step {step}/{steps}", f"loss {r['loss']:.4f}", f"nll {r['nll']:.4f}"]
    if "ffn_load" in r:
        bits.append(f"lb {r['lb_loss']:.3f} z {r['z_loss']:.3f}")
    bits.append(f"gnorm {r['grad_norm']:.3f} lr {r['lr']:.2e}")
    bits.append(f"{r['tokens_per_s'] / 1e3:.1f}k tok/s" + (f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""))
    for key, name in (("ffn_load", "ffn"), ("attn_weight", "attn")):
        if key in r:
            E = len(r[key][0])
            h = sum(r[key + "_entropy"]) / len(r[key + "_entropy"]) / math.log(E)
            bits.append(f"{name} H/lnE {h:.3f} max {max(max(row) for row in r[key]):.2f}")
    bits.append(f"{ms:.0f} ms")
    return " | ".join(bits)


def main(argv=None):
    args = parse_args(argv)
    ctx = parallel.init(args.device, args.fsdp)
    try:
        return run(args, ctx)
    finally:
        parallel.shutdown(ctx)


def run(args, ctx):
    seed_everything(args.seed, ctx.rank)
    amp = DTYPES[args.dtype or ("bf16" if ctx.device.type == "cuda" else "fp32")]
    overrides = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    model, config, stored = folder.load_model(args.model, ctx.device, overrides)
    seq_len = args.seq_len or min(2048, config["max_position_embeddings"])
    if seq_len > config["max_position_embeddings"]:
        log(ctx, f"warning: --seq-len {seq_len} exceeds the model's max_position_embeddings {config['max_position_embeddings']}")
    mixture = data.build_mixture(args.data, args.eval_data, args.model, config, seq_len, args.eval_blocks, args.seed,
                                 args.bin_dtype, args.eos_id, args.text_key)
    global_batch = args.global_batch or args.micro_batch * ctx.world
    if global_batch % (args.micro_batch * ctx.world):
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of micro-batch {args.micro_batch} x "
                         f"{ctx.world} processes")
    accum = global_batch // (args.micro_batch * ctx.world)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, max(1, round(0.05 * args.steps)))

    model.train()
    if args.activation_checkpointing:
        model.model.gradient_checkpointing = True
    if args.compile:
        for block in model.model.layers:
            block.compile()
    if ctx.fsdp:
        parallel.apply_fsdp(model, ctx, torch.bfloat16 if args.fsdp_param_dtype == "bf16" else None)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, tuple(args.betas), args.eps, ctx.device)
    trainer = Trainer(model, optimizer, ctx, amp, args.grad_clip)

    start, tokens_seen = 0, 0
    resume = ckpt.latest(args.out) if args.resume == "auto" else args.resume
    if args.resume and resume is None:
        log(ctx, f"--resume: no checkpoint under {args.out}/checkpoints; starting from {args.model}")
    if resume:
        state, rng_restored = ckpt.load(resume, model, optimizer, ctx)
        mixture.load_state_dict(state["data"])
        start, tokens_seen = state["step"], state["tokens"]
        log(ctx, f"resumed from {resume} at step {start} (saved by {state['world_size']} process(es)"
                 f"{'' if rng_restored else '; this rank had no RNG state there: fresh streams'})")
        if state["global_batch"] != global_batch or state["seq_len"] != seq_len:
            log(ctx, f"warning: the checkpoint trained with global batch {state['global_batch']} x {state['seq_len']}, "
                     f"this run uses {global_batch} x {seq_len}")

    n_params = metrics.count_params(model)
    fl = metrics.model_flops(config, seq_len)
    peak = metrics.peak_flops(ctx.device, args.peak_flops)
    tokens_per_step = global_batch * seq_len
    if ctx.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_args.json"), "w") as f:
            json.dump(dict(vars(args), world_size=ctx.world, fsdp=ctx.fsdp, accum=accum, global_batch=global_batch, seq_len=seq_len,
                           warmup_steps=warmup, amp_dtype=str(amp), params=n_params, peak_flops=peak,
                           torch=torch.__version__, **fl), f, indent=2)
    logger = metrics.JsonlLog(os.path.join(args.out, "train_log.jsonl"), start if resume else None) if ctx.main else None
    log(ctx, f"model {args.model}: {n_params / 1e6:.1f}M parameters, {fl['active_matmul_params'] / 1e6:.1f}M active "
             f"in matmuls, {fl['flops_per_token'] / 1e9:.2f} GFLOP/token ({fl['attention_experts_per_token']} attention "
             f"expert(s) per token); {ctx.world} process(es) on {ctx.device.type}"
             f"{' with FSDP2' if ctx.fsdp else ''}, {str(amp).replace('torch.', '')}; batch {global_batch} x {seq_len} "
             f"= {tokens_per_step} tokens/step (micro {args.micro_batch}, accumulation {accum}); "
             f"domains {', '.join(f'{d.name} {mixture.weights.get(i, 0):.2f}' for i, d in enumerate(mixture.domains))}")

    stop = min(args.steps, args.stop_after or args.steps)
    last = {}
    for step in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        refs = mixture.next_refs(global_batch)
        mine = [refs[j * args.micro_batch : (j + 1) * args.micro_batch]
                for j in range(ctx.rank, global_batch // args.micro_batch, ctx.world)]
        batches = [mixture.batch(r, config["vocab_size"]) for r in mine]
        if ctx.device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        lr = lr_at(step, args.lr, warmup, args.steps, args.min_lr_ratio)
        r = trainer.step(batches, lr)  # its .tolist() waits for the GPU
        dt = time.perf_counter() - t0
        tokens_seen += tokens_per_step
        r.update(step=step, lr=lr, tokens=tokens_seen, step_time=dt, tokens_per_s=tokens_per_step / dt,
                 mfu=tokens_per_step / dt * fl["flops_per_token"] / (peak * ctx.world) if peak else None,
                 domains={d.name: sum(1 for i, _ in refs if i == k) for k, d in enumerate(mixture.domains)})
        last = r
        if ctx.main:
            logger.write(r)
            if step % args.log_every == 0 or step in (start + 1, stop):
                print(fmt_line(step, args.steps, r, 1000 * dt), flush=True)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            ev = trainer.evaluate(mixture, args.micro_batch)
            # per-domain routing and the routers' LM-loss gradient norms (bamtrain/routing.py); one process only
            routed = routing.at_eval(model, mixture, args.micro_batch, ctx.device, amp) if args.eval_data and not ctx.fsdp else {}
            if ctx.main:
                logger.write({"step": step, "tokens": tokens_seen, "eval": ev, **routed})
                print(f"step {step} held-out: " + ", ".join(f"{k} nll {v['nll']:.4f} ppl {v['ppl']:.2f}" for k, v in ev.items()),
                      flush=True)
        if (args.save_every and step % args.save_every == 0) or step == args.stop_after:
            state = dict(step=step, tokens=tokens_seen, data=mixture.state_dict(), global_batch=global_batch,
                         seq_len=seq_len, schedule=dict(peak=args.lr, warmup=warmup, total=args.steps,
                                                        min_ratio=args.min_lr_ratio))
            path = ckpt.save(args.out, step, model, optimizer, state, ctx, args.keep_checkpoints)
            log(ctx, f"checkpoint {path}")

    if stop == args.steps and not args.no_final:
        final = os.path.join(args.out, "final")
        sd = full_state_dict(model, ctx)
        if ctx.main:
            dtype = stored if args.save_dtype == "keep" else DTYPES[args.save_dtype]
            saved_config = dict(config)
            training = dict(source=os.path.abspath(args.model), steps=args.steps, tokens=tokens_seen, seq_len=seq_len,
                            global_batch=global_batch, lr=args.lr, data=args.data, final=last and {
                                k: last[k] for k in ("loss", "nll", "lb_loss", "z_loss")})
            folder.save_folder(final, sd, saved_config, args.model, dtype, folder.parse_size(args.max_shard_size),
                               extra={"training.json": json.dumps(training, indent=2) + "\n"})
            print(f"wrote {final}", flush=True)
        parallel.barrier(ctx)
    if ctx.main and not args.no_plot and os.path.exists(os.path.join(args.out, "train_log.jsonl")):
        note = metrics.plot(os.path.join(args.out, "train_log.jsonl"), os.path.join(args.out, "train_curves.png"))
        print(note if not str(note).endswith(".png") else f"wrote {note}", flush=True)
    return last


def full_state_dict(model, ctx):
    """The unsharded state dict on CPU (on rank 0 only under FSDP; other ranks get {})."""
    if ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
