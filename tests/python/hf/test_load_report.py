"""mixsga.hf.from_pretrained loads into the converted structure (a truthful transformers load report,
every mixSGA tensor restored), and mixsga.hf.aux_loss refuses a model that was not converted."""

import contextlib
import io
import logging

import pytest
import torch
from tiny_models import tiny_model, transformers

import mixsga.hf
from mixsga.hf.config import MixSGASettings


@contextlib.contextmanager
def transformers_log():
    """Everything transformers logs (its load report is a logger warning) into a StringIO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def converted(family: str, **options):
    model = mixsga.hf.convert(tiny_model(family), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5), **options)
    with torch.no_grad():  # tensors unlike a fresh conversion's, so only loading them makes them equal
        for name, p in model.named_parameters():
            if ".router." in name or name.endswith("key_log_scale"):
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reload_report_lists_no_router_keys(tmp_path, family):
    model = converted(family)
    model.save_pretrained(tmp_path)
    with transformers_log() as log:
        loaded = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64)
    text = log.getvalue()
    assert "UNEXPECTED" not in text and "router" not in text, text
    assert type(loaded) is type(model)  # the model's own class, not the loader's subclass
    saved = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
    assert set(loaded.state_dict()) == set(saved)
    assert loaded.config.mixsga == model.config.mixsga


def test_reload_restores_tensors_beyond_the_routers(tmp_path):
    if "key_scale" not in MixSGASettings.__dataclass_fields__:
        pytest.skip("this mixsga has no learned key scale")
    model = converted("llama", key_scale="learned")
    names = [n for n, _ in model.named_parameters() if n.endswith("key_log_scale")]
    assert len(names) == 2
    model.save_pretrained(tmp_path)
    loaded = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64)
    params = dict(loaded.named_parameters())
    for name in names:
        torch.testing.assert_close(params[name], model.get_parameter(name), rtol=0, atol=0, msg=name)


def test_a_report_still_shows_real_problems(tmp_path):
    """A backbone tensor missing from the checkpoint is still reported (the report is not muted)."""
    from safetensors.torch import load_file, save_file

    converted("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if k != "model.norm.weight"}
    save_file(state, weights, metadata={"format": "pt"})
    with transformers_log() as log:
        mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64)
    assert "model.norm.weight" in log.getvalue() and "MISSING" in log.getvalue()


def test_aux_loss_of_an_unconverted_model_is_a_type_error():
    plain = tiny_model()
    with pytest.raises(TypeError, match=r"model: aux_loss needs a model converted to mixSGA, got a "
                                        r"LlamaForCausalLM .*mixsga\.hf\.convert"):
        mixsga.hf.aux_loss(plain)
    gqa = mixsga.hf.to_gqa(tiny_model(), kv_heads=2)  # the static baseline is a plain model too
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        mixsga.hf.aux_loss(gqa)
    # A converted model that has not run yet has a zero aux loss (no error).
    assert float(mixsga.hf.aux_loss(converted("llama"))) == 0.0
