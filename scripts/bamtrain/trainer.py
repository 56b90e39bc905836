"""Optimiser, learning-rate schedule, the training step and the held-out evaluation."""

import contextlib
import math

import torch

from . import metrics, parallel


def param_groups(model, weight_decay):
    """Weight decay on matrices only (projections, routers, embeddings); none on norms and biases."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device=None):
    """AdamW; the fused CUDA kernel where torch has it, else the foreach one."""
    groups = param_groups(model, weight_decay)
    if device is not None and torch.device(device).type == "cuda":
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (TypeError, RuntimeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step, peak, warmup, total, min_ratio=0.1):
    """Step 1..total: linear warm-up to peak over `warmup` steps, then cosine down to min_ratio * peak at
    `total` (BAM / BTX: warm-up, then cosine to 10% of the peak)."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def autocast(device, dtype):
    """bf16/fp16 autocast (the model keeps its routers and norms statistics in float32); nothing for fp32."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Trainer:
    """One optimiser step (skipped when the gradient norm is not finite) over `accum` micro-batches of this rank; statistics averaged over micro-batches
    and ranks. The micro-batch losses are divided by accum and FSDP averages over ranks, so the gradient is
    the mean over every micro-batch of the global batch, whatever the world size."""

    STATS = ("loss", "nll", "lb_loss", "z_loss")

    def __init__(self, model, optimizer, ctx, amp_dtype=None, grad_clip=1.0, fused_loss=True):
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.amp_dtype, self.grad_clip = amp_dtype, grad_clip
        self.fused_loss = fused_loss  # the loss by chunks, without the [tokens, vocab] logits (skip_logits)
        c = model.config
        self.L, self.E = c.num_hidden_layers, c.num_experts
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def forward(self, x):
        with autocast(self.ctx.device, self.amp_dtype):
            return self.model(
                input_ids=x, labels=x, use_cache=False, output_router_logits=True, skip_logits=self.fused_loss
            )

    def step(self, micro_batches, lr):
        """micro_batches: this rank's [B, T] LongTensors. -> dict of floats and per-layer lists."""
        model, ctx = self.model, self.ctx
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n = len(micro_batches)
        acc = None
        for i, x in enumerate(micro_batches):
            if ctx.fsdp:
                model.set_requires_gradient_sync(i == n - 1)  # reduce-scatter once, after the last micro-batch
            out = self.forward(x.to(ctx.device, non_blocking=True))
            (out["loss"] / n).backward()
            with torch.no_grad():
                acc = self._accumulate(acc, out)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # DTensor under FSDP2
            gnorm = gnorm.full_tensor()
        # A NaN or Inf gradient would spread into every weight: that update is skipped (the norm is global,
        # so every rank skips the same steps; finetune.py stops after --max-nonfinite-steps in a row).
        if bool(torch.isfinite(gnorm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        flat = torch.cat([acc / n, gnorm.detach().float().reshape(1).to(acc.device)])
        flat[:-1] = parallel.all_reduce_mean(flat[:-1].clone(), ctx)
        return self._unpack(flat.tolist())

    def _accumulate(self, acc, out):
        zero = torch.zeros((), device=out["loss"].device)
        parts = [(out[k] if out[k] is not None else zero).detach().float().reshape(1) for k in self.STATS]
        st = metrics.router_stats(out)
        for key in ("ffn_load", "attn_weight"):
            if key in st:
                parts.append(st[key].reshape(-1))
        flat = torch.cat(parts)
        return flat if acc is None else acc + flat

    def _unpack(self, v):
        res = dict(zip(self.STATS, v[:4]))
        i = 4
        for key in ("ffn_load", "attn_weight"):
            if self._has(key):
                rows = [v[i + l * self.E : i + (l + 1) * self.E] for l in range(self.L)]
                res[key] = rows
                res[key + "_entropy"] = metrics.entropy(torch.tensor(rows)).tolist()
                i += self.L * self.E
        res["grad_norm"] = v[-1]
        return res

    def _has(self, key):
        c = self.model.config
        if key == "ffn_load":
            return c.num_experts > 1
        return c.num_experts > 1 and c.attention_experts != "merged"

    @torch.no_grad()
    def evaluate(self, mixture, micro_batch):
        """Held-out NLL and perplexity per domain (mean over every predicted token of its held-out blocks).
        Every rank runs the same number of forwards (FSDP's collectives need it): chunks are padded with
        repeats that do not count."""
        model, ctx = self.model, self.ctx
        was_training = model.training
        model.eval()
        res = {}
        for name, refs in mixture.eval_sets():
            chunks = [refs[i : i + micro_batch] for i in range(0, len(refs), micro_batch)]
            real = len(chunks)
            chunks += [chunks[0]] * (-real % ctx.world)
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
            for j in range(ctx.rank, len(chunks), ctx.world):
                x = mixture.batch(chunks[j], eval=True).to(ctx.device)
                with autocast(ctx.device, self.amp_dtype):
                    out = model(input_ids=x, labels=x, use_cache=False, skip_logits=self.fused_loss)
                if j < real:
                    tokens = x.shape[0] * (x.shape[1] - 1)
                    sums += torch.stack(
                        [
                            out["nll"].double() * tokens,
                            torch.tensor(float(tokens), dtype=torch.float64, device=ctx.device),
                        ]
                    )
            sums = parallel.all_reduce_sum(sums, ctx)
            nll = (sums[0] / sums[1]).item()
            res[name] = {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": int(sums[1].item())}
        model.train(was_training)
        return res
