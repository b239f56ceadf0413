"""Held-out perplexity of a causal LM (Hugging Face style: model(input_ids, labels=...) -> .loss)."""

from __future__ import annotations

import inspect
import math

import torch


def no_cache_kwargs(model: torch.nn.Module) -> dict:
    """``{"use_cache": False}`` when ``model.forward`` takes ``use_cache`` (Hugging Face models), else ``{}``.

    A Hugging Face config defaults to ``use_cache=True``, so a training or evaluation forward would build
    a KV cache (for a converted model a MixSGACache holding the whole batch) only to drop it; models
    whose forward has no such argument (plain nn.Modules) are called as before.
    """
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module  # the wrapper forwards **kwargs; the real signature is the wrapped model's
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an inspectable signature (some C++ modules)
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over blocks [N, T] (every block weighs T - 1 predictions); the
    forward runs with ``use_cache=False`` when the model takes it (no throwaway KV cache)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks: expected a non-empty [N, T] tensor, got shape {list(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    kwargs = no_cache_kwargs(model)
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch, **kwargs).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)
