"""The machinery of scripts/finetune.py, one concern per module (torchtitan's split: the model in
python/modeling_bam.py knows nothing of what is here):

    folder.py    BAM model folders: validated safetensors read/write (the `safetensors` package where
                 installed), load into the pure-torch model, atomic save with the docs/format.md tensor names
    native.py    native mixtral / qwen3_moe folders: one table of tensor names and config keys, both ways
    data.py      token sources (.bin/.npy/.txt/.jsonl), packing into fixed-length blocks, the domain
                 mixture with a resumable position, held-out blocks per domain
    parallel.py  process group, devices, FSDP2 (`fully_shard` per block, then the root), collectives
    ckpt.py      checkpoints: model + optimiser through torch.distributed.checkpoint (any world size),
                 trainer state, RNG states; atomic, with pruning
    metrics.py   analytic FLOPs and MFU, per-step statistics, JSONL log, the plot
    trainer.py   optimiser, learning-rate schedule, the training step, held-out evaluation

Nothing here imports torch at package level, so scripts/finetune.py parses its arguments (and answers
--help) without it.
"""

import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON_DIR = os.path.join(REPO, "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)


class BamTrainError(ValueError):
    """A problem the user can fix: printed as one line (the file, the problem, what to do instead), exit 1."""
