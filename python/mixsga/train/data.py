"""Fixed-length token blocks from one token stream, with a deterministic train / held-out split."""

from __future__ import annotations

import torch


class TokenBlocks:
    """A 1-D token stream cut into non-overlapping blocks of ``block_size`` tokens.

    The last ``held_out_fraction`` of the blocks (at least one) is the held-out split: contiguous text
    the training blocks never contain.

    Args:
        tokens: [N] integer token ids.
        block_size: tokens per block (>= 2).
        held_out_fraction: in (0, 1). Default 0.1.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, held_out_fraction: float = 0.1) -> None:
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens: expected a 1-D integer tensor, got {tokens.dtype} of shape {list(tokens.shape)}")
        if block_size < 2:
            raise ValueError(f"block_size: must be >= 2, got {block_size}")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction: must be in (0, 1), got {held_out_fraction}")
        n_blocks = tokens.numel() // block_size
        if n_blocks < 2:
            raise ValueError(f"tokens: {tokens.numel()} tokens make fewer than 2 blocks of block_size {block_size}")
        blocks = tokens[: n_blocks * block_size].long().view(n_blocks, block_size)
        n_held = max(1, int(round(n_blocks * held_out_fraction)))
        self.block_size = block_size
        self.train = blocks[: n_blocks - n_held]  #: [N_train, block_size]
        self.held_out = blocks[n_blocks - n_held :]  #: [N_held, block_size]

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """Endless training batches [batch_size, block_size]: each epoch a fresh permutation (seeded by
        ``seed`` and the epoch, the same on every rank); rank r takes every world_size-th batch, so the
        ranks of a DDP run see disjoint data."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        n = self.train.shape[0]
        per_epoch = n // batch_size
        if per_epoch < world_size:
            raise ValueError(f"batch_size: {batch_size} leaves fewer batches ({per_epoch}) than ranks ({world_size})")
        epoch = 0
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for i in range(rank, per_epoch - per_epoch % world_size, world_size):
                yield self.train[order[i * batch_size : (i + 1) * batch_size]]
            epoch += 1
