"""save_pretrained then mixsga.hf.from_pretrained: same logits, settings from the config, router weights
checked; the to_gqa baseline round-trips as a plain transformers model."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, transformers

import mixsga.hf


def converted(family="qwen2", **options):
    model = mixsga.hf.convert(tiny_model(family), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5), **options)
    with torch.no_grad():  # routers unlike a fresh init, so loading them is what makes logits equal
        for layer in mixsga.hf.mixsga_layers(model):
            layer.router.proj.bias.copy_(torch.randn(3, dtype=torch.float64))
    return model


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_save_and_reload_gives_the_same_logits(tmp_path, family):
    model = converted(family, aux_alpha=0.25, prefill_routing="argmax")
    keys = set(model.state_dict())
    assert any(".router.proj.weight" in k for k in keys)
    if family == "opt":  # OPT's own parameter name, so the backbone loads as a plain OPT checkpoint
        assert "model.decoder.layers.0.self_attn.out_proj.weight" in keys and not any("o_proj" in k for k in keys)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["mixsga"]
    assert stored["group_sizes"] == [1, 2, 4] and stored["ratios"] == [0.25, 0.25, 0.5]
    assert stored["aux_alpha"] == 0.25 and stored["prefill_routing"] == "argmax"

    loaded = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64).eval()
    layer = mixsga.hf.mixsga_layers(loaded)[1]
    assert layer.group_sizes == (1, 2, 4) and layer.aux_alpha == 0.25 and layer.prefill_routing == "argmax"
    ids = torch.randint(3, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=1e-10, atol=1e-10)
    # A fresh conversion of the same backbone (new routers) does not: the routers were restored.
    fresh = mixsga.hf.convert(tiny_model(family), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5),
                              prefill_routing="argmax")
    assert not torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-6)
    # Generation works after reload.
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)


def test_missing_router_weights_are_a_clear_error(tmp_path):
    converted().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if ".router." not in k}
    os.remove(weights)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 4 of the 4 router tensors .*model\.layers\.0\.self_attn\.router"):
        mixsga.hf.from_pretrained(tmp_path)


def test_plain_checkpoints_and_bad_paths_are_clear_errors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no mixSGA settings"):
        mixsga.hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path: expected a directory"):
        mixsga.hf.from_pretrained(tmp_path / "nowhere")


@torch.no_grad()
def test_the_gqa_baseline_round_trips_as_a_plain_model(tmp_path):
    gqa = mixsga.hf.to_gqa(tiny_model(), kv_heads=1)
    gqa.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.num_key_value_heads == 1
    ids = torch.randint(3, 64, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, gqa(ids).logits, rtol=1e-10, atol=1e-10)
