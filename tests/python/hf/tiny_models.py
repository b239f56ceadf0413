"""Helpers of the Hugging Face integration tests: tiny randomly initialised Llama-family models (no download)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")


def tiny_config(model_type: str = "llama", **overrides):
    """2 layers, width 32, 4 query heads of dim 8, 4 KV heads (so group sizes 1, 2, 4 all divide)."""
    if model_type == "opt":  # MHA, learned positions, biases everywhere
        kwargs = dict(vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, dropout=0.0)
        kwargs.update(overrides)
        return transformers.OPTConfig(**kwargs)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[model_type]
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(model_type: str = "llama", dtype=torch.float64, seed: int = 0, **overrides):
    """A tiny *ForCausalLM in eval mode, float64 so comparisons can be tight."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.to(dtype).eval()


def clone(model):
    return copy.deepcopy(model)


def left_padded(lengths, total: int, vocab: int = 64, seed: int = 1):
    """(input_ids [B, total], attention_mask [B, total], position_ids [B, total]) with sequence b's
    lengths[b] real tokens at the right end, pad id 0 on the left; positions as generate gives them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, positions


def force_expert(model, expert: int = 0) -> None:
    """Makes every router's argmax (decode routing) pick `expert`, so decoding matches a static model."""
    import mixsga.hf

    with torch.no_grad():
        for layer in mixsga.hf.mixsga_layers(model):
            layer.router.proj.weight.zero_()
            layer.router.proj.bias.fill_(-10.0)
            layer.router.proj.bias[expert] = 10.0
