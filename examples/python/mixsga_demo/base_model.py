"""A small Llama trained from scratch once and cached on disk: the base model of the demo and the study."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from mixsga.train.data import TokenBlocks
from mixsga.train.loop import TrainConfig, train


def small_llama_config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       block: int, **extra):
    """A transformers LlamaConfig of the given sizes (tied embeddings), positions up to 2 blocks."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(512, 2 * block),
        tie_word_embeddings=True, **extra)


def cached_base_model(config, data: TokenBlocks, cache_dir: Path, steps: int, lr: float, batch: int, seed: int,
                      log: Callable[[str], None] = print):
    """A LlamaForCausalLM of ``config`` trained from scratch for ``steps`` on ``data`` (warm-up 5 %), or
    the copy cached in ``cache_dir`` under a key of everything that shapes it (config, steps, lr, batch,
    block, seed and the training tokens), written atomically."""
    import transformers

    fields = {"steps": steps, "lr": lr, "batch": batch, "block": data.block_size, "seed": seed}
    key = hashlib.sha256(json.dumps([config.to_dict(), fields], sort_keys=True, default=str).encode()
                         + data.train.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir / f"base-{key}.pt"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if path.is_file():
        log(f"base model: reusing {path}")
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model
    log(f"base model: training from scratch ({steps} steps; cached afterwards)")
    train(model, data, TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20), seed=seed,
                                   description="base"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model
