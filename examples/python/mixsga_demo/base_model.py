"""A small Llama trained from scratch once and cached on disk: the base model of the demo and the study."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from mixsga.train.data import TokenBlocks
from mixsga.train.evaluate import perplexity
from mixsga.train.loop import TrainConfig, train

from .reports import append_row


def small_llama_config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       block: int, **extra):
    """A transformers LlamaConfig of the given sizes (tied embeddings), positions up to 2 blocks."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(512, 2 * block),
        tie_word_embeddings=True, **extra)


def base_model_path(config, data: TokenBlocks, cache_dir: Path, steps: int, lr: float, batch: int, seed: int) -> Path:
    """Where ``cached_base_model`` keeps this base: a key of everything that shapes it (config, steps, lr,
    batch, block, seed and the training tokens). Its held-out curve, when one was asked for, is the
    ``.curve.jsonl`` file beside it."""
    fields = {"steps": steps, "lr": lr, "batch": batch, "block": data.block_size, "seed": seed}
    key = hashlib.sha256(json.dumps([config.to_dict(), fields], sort_keys=True, default=str).encode()
                         + data.train.numpy().tobytes()).hexdigest()[:16]
    return cache_dir / f"base-{key}.pt"


def read_curve(path: Path) -> list[dict]:
    """The held-out curve rows ({step, tokens, ppl}) recorded beside the base model at ``path``."""
    curve = path.with_suffix(".curve.jsonl")
    return [json.loads(line) for line in curve.read_text().splitlines()] if curve.is_file() else []


def cached_base_model(config, data: TokenBlocks, cache_dir: Path, steps: int, lr: float, batch: int, seed: int,
                      log: Callable[[str], None] = print, curve_blocks: torch.Tensor | None = None,
                      curve_every: int = 0):
    """A LlamaForCausalLM of ``config`` trained from scratch for ``steps`` on ``data`` (warm-up 5 %), or
    the copy cached in ``cache_dir`` (``base_model_path``), written atomically.

    With ``curve_every`` > 0 the training runs in slices of that many steps through a checkpoint beside
    the cache file, so an interrupted run resumes where it stopped (the result is the same model: the
    checkpoint holds the optimizer, schedule, RNG and data order), and after each slice the held-out
    perplexity on ``curve_blocks`` is appended to the ``.curve.jsonl`` file (``read_curve``)."""
    import transformers

    if curve_every < 0:
        raise ValueError(f"curve_every: must be >= 0, got {curve_every}")
    if curve_every and curve_blocks is None:
        raise ValueError("curve_blocks: required when curve_every > 0")
    path = base_model_path(config, data, cache_dir, steps, lr, batch, seed)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if path.is_file():
        log(f"base model: reusing {path}")
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model
    log(f"base model: training from scratch ({steps} steps; cached afterwards)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    train_config = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20), seed=seed,
                               description="base", log_every=100)
    if not curve_every:
        train(model, data, train_config)
    else:
        ckpt, curve = path.with_suffix(".ckpt"), path.with_suffix(".curve.jsonl")
        done = {row["step"] for row in read_curve(path)}
        if 0 not in done:
            append_row(curve, {"step": 0, "tokens": 0, "ppl": perplexity(model, curve_blocks)})
        for stop in list(range(curve_every, steps, curve_every)) + [steps]:
            train_config.checkpoint_path, train_config.stop_after = str(ckpt), stop
            result = train(model, data, train_config)
            if stop not in done:
                ppl = perplexity(model, curve_blocks)
                append_row(curve, {"step": stop, "tokens": stop * batch * data.block_size, "ppl": ppl})
                log(f"base model: step {stop}/{steps}, held-out ppl {ppl:.2f}, last loss {result.losses[-1]:.3f}"
                    if result.losses else f"base model: step {stop}/{steps}, held-out ppl {ppl:.2f}")
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    if curve_every:
        path.with_suffix(".ckpt").unlink(missing_ok=True)
    return model
