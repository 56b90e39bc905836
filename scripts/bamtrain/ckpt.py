"""Checkpoints: OUT/checkpoints/step_NNNNNNNN/ holds

    .metadata, __*.distcp     model and optimiser, torch.distributed.checkpoint (DCP), written from
                              get_state_dict and read through set_state_dict: the files name every
                              tensor by its full (unsharded) name, so a checkpoint saved by N processes
                              loads into M (FSDP2 shards, or one plain model) and back
    rng_rank{r}.pt            each process's RNG states (python, numpy, torch, CUDA)
    trainer_state.json        step, tokens, schedule, data position, batch geometry; written last

A checkpoint is written to step_N.tmp and moved into place when complete (folder.replace_folder: a
re-saved step's old folder is moved aside first), so a crash mid-save leaves the previous one as the
latest; recover() at start-up puts back a folder a kill left aside and removes unfinished step_*.tmp.
A disk that fills during a save is one line (BamTrainError), the previous checkpoint intact. On resume,
a newest checkpoint that cannot be read falls back to the one before it, with a one-line warning.
"""

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from . import BamTrainError, folder, parallel

STEP_DIR = re.compile(r"^step_(\d{8})$")
LEFTOVER = re.compile(r"^(step_\d{8})\.(tmp|old)$")


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


def complete(out):
    """The complete checkpoints under OUT/checkpoints, newest first."""
    root = checkpoint_dir(out)
    if not os.path.isdir(root):
        return []
    steps = sorted(
        (
            d
            for d in os.listdir(root)
            if STEP_DIR.match(d) and os.path.exists(os.path.join(root, d, "trainer_state.json"))
        ),
        reverse=True,
    )
    return [os.path.join(root, d) for d in steps]


def latest(out):
    """The newest complete checkpoint under OUT/checkpoints, or None."""
    found = complete(out)
    return found[0] if found else None


def recover(out):
    """Main process, at start-up: what killed saves left under OUT/checkpoints (see the module docstring)."""
    root = checkpoint_dir(out)
    if os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            m = LEFTOVER.match(d)
            if m:
                folder.recover_folder(os.path.join(root, m.group(1)))


def save(out, step, model, optimizer, trainer_state, ctx, keep=2):
    """Every process calls this. -> the checkpoint's path."""
    final = os.path.join(checkpoint_dir(out), f"step_{step:08d}")
    tmp = final + ".tmp"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier(ctx)
    try:
        _write(tmp, model, optimizer, trainer_state, ctx)
    except (Exception, _dcp_error()) as raised:
        e = unwrap(raised)
        if not (isinstance(e, OSError) or folder.is_disk_full(e)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(out)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise BamTrainError(f"{folder.write_error(tmp, e, f'the checkpoint of step {step}')}{kept}") from e
    if ctx.main:
        folder.replace_folder(tmp, final)
        prune(out, keep)
    parallel.barrier(ctx)
    return final


def _dcp_error():
    """DCP wraps every rank's exception in a CheckpointException, a BaseException."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException

        return CheckpointException
    except ImportError:
        return Exception


def unwrap(error):
    """The first rank's own exception inside a DCP CheckpointException; others as they are."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]
    return error


def reason(error):
    """One line saying why a checkpoint did not load."""
    e = unwrap(error)
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:200]


def _write(tmp, model, optimizer, trainer_state, ctx):
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


def prune(out, keep):
    if keep <= 0:
        return
    root = checkpoint_dir(out)
    steps = sorted(d for d in os.listdir(root) if STEP_DIR.match(d))
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load_newest(out, model, optimizer, ctx, warn):
    """--resume without a path: the newest checkpoint that loads; an unreadable one is skipped with
    warn(line). -> (path, trainer_state, rng restored), or (None, None, False) when there is none."""
    found = complete(out)
    for i, path in enumerate(found):
        try:
            return (path,) + load(path, model, optimizer, ctx)
        except (Exception, _dcp_error()) as e:  # a torn or damaged checkpoint: any reader's error
            if i + 1 == len(found):
                raise BamTrainError(
                    f"{path}: cannot be read ({reason(e)}) and no earlier checkpoint is left; "
                    "start over with --overwrite"
                ) from e
            warn(f"warning: {path} cannot be read ({reason(e)}); resuming from {found[i + 1]}")
    return None, None, False


def load(path, model, optimizer, ctx):
    """Every process calls this, after the model is sharded and the optimiser built.
    -> (trainer_state dict, whether this rank's RNG states were restored)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if os.path.exists(os.path.join(path, ".metadata")):
        if not dcp_available():
            raise RuntimeError(
                f"{path} is a torch.distributed.checkpoint; this torch ({torch.__version__}) cannot read it"
            )
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
