"""Checkpoints: OUT/checkpoints/step_NNNNNNNN/ holds

    .metadata, __*.distcp     model and optimiser, torch.distributed.checkpoint (DCP), written from
                              get_state_dict and read through set_state_dict: the files name every
                              tensor by its full (unsharded) name, so a checkpoint saved by N processes
                              loads into M (FSDP2 shards, or one plain model) and back
    rng_rank{r}.pt            each process's RNG states (python, numpy, torch, CUDA)
    trainer_state.json        step, tokens, schedule, data position, batch geometry; written last

A checkpoint is written to step_N.tmp and renamed when complete, so a crash mid-save leaves the previous
one as the latest. Without DCP (torch < 2.2, one process only) model and optimiser go to model_optim.pt.
"""

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from . import parallel

STEP_DIR = re.compile(r"^step_(\d{8})$")


def dcp_available():
    try:
        import torch.distributed.checkpoint  # noqa: F401
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: F401

        return True
    except Exception:
        return False


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG tuples, arrays
    except TypeError:  # torch without weights_only
        return torch.load(path, map_location="cpu")


def checkpoint_dir(out):
    return os.path.join(out, "checkpoints")


def latest(out):
    """The newest complete checkpoint under OUT/checkpoints, or None."""
    root = checkpoint_dir(out)
    if not os.path.isdir(root):
        return None
    steps = sorted(d for d in os.listdir(root)
                   if STEP_DIR.match(d) and os.path.exists(os.path.join(root, d, "trainer_state.json")))
    return os.path.join(root, steps[-1]) if steps else None


def save(out, step, model, optimizer, trainer_state, ctx, keep=2):
    """Every process calls this. -> the checkpoint's path."""
    final = os.path.join(checkpoint_dir(out), f"step_{step:08d}")
    tmp = final + ".tmp"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier(ctx)
    if dcp_available():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # one process without a group: DCP says it assumes one process
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    else:
        if ctx.world > 1:
            raise RuntimeError("checkpoints of several processes need torch.distributed.checkpoint (torch >= 2.2)")
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, os.path.join(tmp, "model_optim.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{ctx.rank}.pt"))
    parallel.barrier(ctx)
    if ctx.main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(trainer_state, world_size=ctx.world), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(out, keep)
    parallel.barrier(ctx)
    return final


def prune(out, keep):
    if keep <= 0:
        return
    root = checkpoint_dir(out)
    steps = sorted(d for d in os.listdir(root) if STEP_DIR.match(d))
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load(path, model, optimizer, ctx):
    """Every process calls this, after the model is sharded and the optimiser built.
    -> (trainer_state dict, whether this rank's RNG states were restored)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if os.path.exists(os.path.join(path, ".metadata")):
        if not dcp_available():
            raise RuntimeError(f"{path} is a torch.distributed.checkpoint; this torch ({torch.__version__}) cannot read it")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        sd = _torch_load(os.path.join(path, "model_optim.pt"))
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])
    rng = os.path.join(path, f"rng_rank{ctx.rank}.pt")
    restored = os.path.exists(rng)
    if restored:
        set_rng_state(_torch_load(rng))
    return state, restored
