"""Hardening of the Hugging Face path: save_pretrained / from_pretrained keeps every tensor bit for bit,
and a checkpoint whose config was edited to invalid mixSGA settings is a clear error naming them."""

import json
import re

import pytest
import torch
from tiny_models import tiny_model

import mixsga.hf


def converted():
    model = mixsga.hf.convert(tiny_model("qwen2"), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5), aux_alpha=0.3)
    with torch.no_grad():  # routers unlike a fresh init, with bit patterns value comparisons miss
        for layer in mixsga.hf.mixsga_layers(model):
            layer.router.proj.bias.copy_(torch.randn(3, dtype=torch.float64))
            layer.router.proj.weight[0, 0] = -0.0
    return model


def test_save_pretrained_round_trip_is_bit_for_bit(tmp_path):
    model = converted()
    model.save_pretrained(tmp_path)
    loaded = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    for name, t in saved.items():
        r = restored[name]
        assert r.dtype == t.dtype and r.shape == t.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8)), f"{name} differs"
    for a, b in zip(mixsga.hf.mixsga_layers(model), mixsga.hf.mixsga_layers(loaded)):
        assert (a.group_sizes, a.ratios, a.aux_alpha) == (b.group_sizes, b.ratios, b.aux_alpha)


def edit_config(path, **changes):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["mixsga"].update(changes)
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,fragments",
    [
        (dict(group_sizes=[1, 3, 4]), ["group_sizes", "3 does not divide", r"num_key_value_heads \(4\)"]),
        (dict(group_sizes=[1, 4, 2]), ["group_sizes", "strictly increasing"]),
        (dict(group_sizes=[1, 2]), ["ratios", "expected 2"]),
        (dict(ratios=[0.5, 0.5, 0.5]), ["ratios", "sum to 1"]),
    ],
    ids=["not dividing", "unsorted", "count", "ratios"],
)
def test_edited_config_with_invalid_settings_is_a_clear_error(tmp_path, changes, fragments):
    converted().save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError) as info:
        mixsga.hf.from_pretrained(tmp_path)
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), f"{fragment!r} not in {info.value}"
