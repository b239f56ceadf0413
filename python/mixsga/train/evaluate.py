"""Held-out perplexity of a causal LM (Hugging Face style: model(input_ids, labels=...) -> .loss)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over blocks [N, T] (every block weighs T - 1 predictions)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks: expected a non-empty [N, T] tensor, got shape {list(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)
