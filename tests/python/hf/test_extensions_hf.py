"""The quality extensions through mixsga.hf: convert options, prepare (key-scale calibration and router
warm start), save/reload, and generation with zero-capacity experts equal to the original model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import clone, left_padded, tiny_model

import mixsga.hf


def blocks(n=6, length=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (n, length), generator=g)


@torch.no_grad()
def test_generation_with_ratio_zero_experts_is_the_original_model_token_for_token():
    # Without the zero-capacity rule, argmax decode routed about half the tokens to the closed expert.
    base = tiny_model()
    model = mixsga.hf.convert(clone(base), group_sizes=(1, 2), ratios=(1.0, 0.0))
    with torch.no_grad():
        for layer in mixsga.hf.mixsga_layers(model):  # a router that prefers the closed expert
            layer.router.proj.bias.copy_(torch.tensor([-3.0, 3.0], dtype=torch.float64))
    ids, mask, _ = left_padded([9, 6], 9, seed=2)
    gen = dict(max_new_tokens=10, min_new_tokens=10, pad_token_id=0, do_sample=False)
    cache = mixsga.hf.MixSGACache(model.config)
    got = model.generate(ids, attention_mask=mask, past_key_values=cache, **gen)
    assert torch.equal(got, base.generate(ids, attention_mask=mask, **gen))
    assert cache.decode_ratios().tolist() == [1.0, 0.0]


@torch.no_grad()
def test_learned_key_scale_and_pooling_error_routing_keep_the_ratio_one_identity():
    base = tiny_model()
    model = mixsga.hf.convert(clone(base), group_sizes=(1, 2, 4), ratios=(1, 0, 0), **mixsga.hf.RECOMMENDED)
    ids = blocks()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-12, atol=1e-12)


def test_prepare_calibrates_scales_and_warm_starts_routers():
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), **mixsga.hf.RECOMMENDED)
    data = blocks(8, 32)
    before = [layer.key_log_scale.detach().clone() for layer in mixsga.hf.mixsga_layers(model)]
    assert all(torch.equal(b, torch.zeros(3, dtype=torch.float64)) for b in before)
    report = mixsga.hf.prepare(model, data, router_steps=150)
    assert len(report["key_scales"]) == 2 and len(report["router_agreement"]) == 2
    for layer, scales in zip(mixsga.hf.mixsga_layers(model), report["key_scales"]):
        assert scales[0] == 1.0 and all(1 / 16 <= s <= 16 and math.isfinite(s) for s in scales)
        torch.testing.assert_close(layer.key_scales(), torch.tensor(scales, dtype=torch.float64))
    # Chance agreement of a 3-expert argmax is about 1/3; the warm start must do clearly better.
    assert min(report["router_agreement"]) > 0.6, report["router_agreement"]


def test_prepare_rejects_an_unconverted_model_and_bad_arguments():
    with pytest.raises(TypeError, match="has no mixSGA layers; call mixsga.hf.convert first"):
        mixsga.hf.prepare(tiny_model(), blocks())
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match="steps: must be >= 0, got -1"):
        mixsga.hf.warm_start_routers(model, blocks(), steps=-1)
    with pytest.raises(ValueError, match="blocks: expected a non-empty"):
        mixsga.hf.prepare(model, torch.zeros(0, 4, dtype=torch.long))


def test_bad_extension_options_are_rejected_by_convert():
    with pytest.raises(ValueError, match="key_scale: must be one of 'none', 'group', 'learned', got 'norm'"):
        mixsga.hf.convert(tiny_model(), key_scale="norm")
    with pytest.raises(ValueError, match="routing_signal: must be one of 'router', 'pooling_error', got 'x'"):
        mixsga.hf.convert(tiny_model(), routing_signal="x")


def test_save_and_reload_keep_the_extensions(tmp_path):
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), **mixsga.hf.RECOMMENDED)
    mixsga.hf.prepare(model, blocks(), router_steps=20)
    model.save_pretrained(tmp_path)
    again = mixsga.hf.from_pretrained(tmp_path, torch_dtype=torch.float64)
    for a, b in zip(mixsga.hf.mixsga_layers(model), mixsga.hf.mixsga_layers(again)):
        assert (b.key_scale, b.routing_signal) == ("learned", "pooling_error")
        assert torch.equal(a.key_log_scale, b.key_log_scale)
    ids = blocks(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)
