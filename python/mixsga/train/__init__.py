"""Continued pretraining with the mixSGA aux loss (METHOD.md; the paper's recipe at any scale).

- ``TrainConfig`` and ``train(model, data, config, ...)``: AdamW(0.9, 0.95), cosine schedule with linear
  warmup, gradient clipping, gradient accumulation, fp32 or bf16 autocast, the aux loss of every mixSGA
  layer (alpha / N_layers summed over layers, in a converted model's ``outputs.loss``), tqdm progress,
  checkpoints written atomically and resumed exactly, and DDP or FSDP2 (``TrainConfig.parallel``) when launched by ``torchrun``
  (gloo on CPU, nccl on GPU); ``shard_fsdp2`` shards a model per decoder layer for loops of one's own.
- ``cosine_with_warmup``: the learning-rate multiplier.
- ``TokenBlocks``: a token stream cut into fixed-length training blocks, split into train / held-out.
- ``perplexity``: held-out perplexity of a causal LM.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .data import TokenBlocks
from .distributed import DistributedContext, full_state, init_distributed, load_full_state, shard_fsdp2
from .evaluate import perplexity
from .loop import TrainConfig, TrainResult, train
from .schedule import cosine_with_warmup

__all__ = [
    "DistributedContext",
    "TokenBlocks",
    "TrainConfig",
    "TrainResult",
    "cosine_with_warmup",
    "full_state",
    "init_distributed",
    "load_checkpoint",
    "load_full_state",
    "perplexity",
    "save_checkpoint",
    "shard_fsdp2",
    "train",
]
