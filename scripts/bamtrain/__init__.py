"""The machinery of scripts/finetune.py, one concern per module (torchtitan's split: the model in
python/modeling_bam.py knows nothing of what is here):

    folder.py    BAM model folders: safetensors read/write without dependencies, load into the
                 pure-torch model, save back with the docs/format.md tensor names
    data.py      token sources (.bin/.npy/.txt/.jsonl), packing into fixed-length blocks, the domain
                 mixture with a resumable position, held-out blocks per domain
    parallel.py  process group, devices, FSDP2 (`fully_shard` per block, then the root), collectives
    ckpt.py      checkpoints: model + optimiser through torch.distributed.checkpoint (any world size),
                 trainer state, RNG states; atomic, with pruning
    metrics.py   analytic FLOPs and MFU, per-step statistics, JSONL log, the plot
    trainer.py   optimiser, learning-rate schedule, the training step, held-out evaluation
"""

import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON_DIR = os.path.join(REPO, "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)
