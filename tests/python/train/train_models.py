"""Tiny randomly initialised Llama models and token data for the training-recipe tests (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import mixsga.hf  # noqa: E402
from mixsga.train import TokenBlocks  # noqa: E402


def tiny_llama(seed: int = 0, dtype=torch.float64, mixsga_layers: bool = True):
    """2 layers, width 32, 4 query / 4 KV heads; converted to mixSGA (1, 2, 4) at 3:1:6 by default."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    if mixsga_layers:
        mixsga.hf.convert(model, group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), aux_alpha=0.1)
    return model


def tiny_data(block_size: int = 12, seed: int = 0) -> TokenBlocks:
    """A learnable stream: mostly the rule next = (7 * t + 3) mod 50, with 10 % random tokens."""
    g = torch.Generator().manual_seed(seed)
    n = block_size * 40
    noise = torch.randint(0, 50, (n,), generator=g)
    keep_rule = torch.rand(n, generator=g) > 0.1
    tokens = [int(noise[0])]
    for i in range(1, n):
        tokens.append((7 * tokens[-1] + 3) % 50 if keep_rule[i] else int(noise[i]))
    return TokenBlocks(torch.tensor(tokens), block_size, held_out_fraction=0.1)
