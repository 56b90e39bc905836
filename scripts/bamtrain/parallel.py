"""Processes, devices and FSDP2. The model knows nothing of this module (torchtitan's split).

NVLink multicast stays off: `disable_multicast()` sets NCCL_NVLS_ENABLE=0 (NCCL's NVLS algorithms),
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (torch's symmetric memory) and NVSHMEM_DISABLE_NVLS=1 in os.environ.
scripts/finetune.py calls it on its first lines, before torch is imported, so the process group and any
child process (they inherit os.environ) see them. On the shared multi-GPU hosts we train on, a program
that creates multicast objects can put the host's GPUs out of service for others for a long time; FSDP's
all-gather and reduce-scatter on one node lose little without NVLS.
"""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast():
    os.environ.update(MULTICAST_OFF)


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group is up
    fsdp: bool = False  # the model is sharded with fully_shard

    @property
    def main(self):
        return self.rank == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device="auto", fsdp="auto"):
    """One process per device. Under torchrun (WORLD_SIZE > 1) or with fsdp="on", a process group is
    started: NCCL on CUDA, gloo on CPU. device: "auto" | "cuda" | "cpu"."""
    disable_multicast()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    want_fsdp = fsdp == "on" or (fsdp == "auto" and world > 1)
    if world > 1 and fsdp == "off":
        raise ValueError("several processes need --fsdp auto|on (plain data parallelism is not offered)")
    ctx = Context()
    if want_fsdp:
        if not fsdp_available():
            raise RuntimeError(
                f"FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6; this is {torch.__version__}"
            )
        if "RANK" not in os.environ:  # plain `python finetune.py --fsdp on`: a group of one
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        ctx.rank, ctx.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        ctx.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        ctx.distributed = ctx.fsdp = True
    ctx.device = torch.device("cuda", ctx.local_rank) if cuda else torch.device("cpu")
    return ctx


def fsdp_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)

        return True
    except Exception:  # ImportError, or older torch failing inside the import
        return False


def apply_fsdp(model, ctx, param_dtype=None, reshard_after_forward=True):
    """FSDP2: fully_shard on every block, then on the root (embeddings, final norm, lm_head). Parameters stay
    float32 (the optimiser's master weights); compute runs under autocast. param_dtype=torch.bfloat16
    all-gathers bf16 copies instead (half the traffic; routers and norms then see bf16-rounded weights)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    kw = dict(mesh=mesh)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    for i, block in enumerate(layers):  # the last block's backward comes right after its forward: keep it gathered
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kw)
    fully_shard(model, **kw)
    return model


def all_reduce_mean(t, ctx):
    if ctx.distributed and ctx.world > 1:
        dist.all_reduce(t)
        t /= ctx.world
    return t


def all_reduce_sum(t, ctx):
    if ctx.distributed and ctx.world > 1:
        dist.all_reduce(t)
    return t


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_flag(flag, ctx):
    """True on every rank when any rank's flag is (a signal reaches the processes at different steps)."""
    if ctx.distributed and ctx.world > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
        dist.all_reduce(t)
        return t.item() > 0
    return bool(flag)
