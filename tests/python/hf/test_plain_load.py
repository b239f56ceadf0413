"""A converted model saved with save_pretrained loads with a plain transformers
AutoModelForCausalLM.from_pretrained (after ``import mixsga.hf``) as the converted model, never as a
vanilla one; folders of the earlier format (model_type of the family plus config.mixsga) still load with
mixsga.hf.from_pretrained."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, transformers

import mixsga.hf

FAMILY_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
}


def converted(family: str):
    """A converted tiny model whose routers differ from a fresh conversion's, so only loading them makes
    logits equal."""
    model = mixsga.hf.convert(tiny_model(family), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5),
                              prefill_routing="argmax")
    with torch.no_grad():
        for layer in mixsga.hf.mixsga_layers(model):
            layer.router.proj.bias.copy_(torch.randn(3, dtype=torch.float64))
    return model


def inputs():
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def plain_load(path, **kwargs):
    """A plain transformers load (transformers returns models in eval mode)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **kwargs)


def test_every_supported_family_has_a_mixsga_model_type():
    from mixsga.hf.config import MIXSGA_CONFIG_CLASSES

    assert set(MIXSGA_CONFIG_CLASSES) == set(mixsga.hf.SUPPORTED_MODEL_TYPES) == set(FAMILY_CLASSES)


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
def test_plain_auto_load_gives_the_converted_model(tmp_path, family):
    model = converted(family)
    assert model.config.model_type == f"mixsga_{family}"
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == f"mixsga_{family}" and stored["mixsga_base_model_type"] == family
    assert stored["mixsga"]["group_sizes"] == [1, 2, 4]

    loaded, info = plain_load(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded).__name__ == FAMILY_CLASSES[family] and type(loaded) is type(model)
    assert mixsga.hf.is_converted(loaded) and len(mixsga.hf.mixsga_layers(loaded)) == 2
    assert loaded.config.mixsga == model.config.mixsga
    assert mixsga.hf.mixsga_layers(loaded)[0].prefill_routing == "argmax"

    ids, mask = inputs()
    expected = model(ids, attention_mask=mask).logits
    logits = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    via_mixsga = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(logits, via_mixsga(ids, attention_mask=mask).logits, rtol=0, atol=0)
    # Not the vanilla backbone: mixSGA routing changes the logits.
    vanilla = tiny_model(family)
    assert not torch.allclose(vanilla(ids, attention_mask=mask).logits, expected, atol=1e-6)


@torch.no_grad()
def test_a_converted_loaded_checkpoint_saves_as_a_mixsga_model(tmp_path):
    """The usual workflow: a plain checkpoint loaded with transformers, converted, saved."""
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    model = mixsga.hf.convert(plain_load(tmp_path / "plain"), group_sizes=(1, 2), ratios=(0.5, 0.5))
    assert model.config.model_type == "mixsga_llama"
    model.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "mixsga_llama"
    assert mixsga.hf.is_converted(plain_load(tmp_path / "converted"))


@torch.no_grad()
def test_generate_after_a_plain_load(tmp_path):
    model = converted("llama")
    model.save_pretrained(tmp_path)
    loaded = plain_load(tmp_path)
    ids, mask = inputs()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = loaded.generate(ids, **kwargs)
    assert out.shape == (2, 14)
    assert torch.equal(out, model.generate(ids, **kwargs))
    # generate stores the compact cache, as on the converted model.
    result = loaded.generate(ids, return_dict_in_generate=True, **kwargs)
    assert isinstance(result.past_key_values, mixsga.hf.MixSGACache)


@torch.no_grad()
def test_a_plain_load_saves_again_as_a_mixsga_model(tmp_path):
    converted("qwen2").save_pretrained(tmp_path / "a")
    first = plain_load(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "mixsga_qwen2"
    second = plain_load(tmp_path / "b")
    ids, mask = inputs()
    torch.testing.assert_close(second(ids, attention_mask=mask).logits, first(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)


def test_auto_from_config_builds_a_converted_model():
    config = converted("mistral").config
    fresh = transformers.AutoModelForCausalLM.from_config(config)
    assert type(fresh).__name__ == "MistralForCausalLM" and mixsga.hf.is_converted(fresh)
    assert fresh.config.mixsga == config.mixsga


def test_a_plain_load_without_router_weights_is_a_clear_error(tmp_path):
    converted("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if ".router." not in k}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 4 of the 4 router tensors"):
        plain_load(tmp_path)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_earlier_format_still_loads_with_mixsga_from_pretrained(tmp_path, family):
    """Folders saved before the mixSGA model types: the family's model_type plus config.mixsga."""
    model = converted(family)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    stored["model_type"] = family
    del stored["mixsga_base_model_type"]
    path.write_text(json.dumps(stored))

    loaded = mixsga.hf.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is type(model) and loaded.config.model_type == f"mixsga_{family}"
    ids, mask = inputs()
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=1e-12, atol=1e-12)
    # Saved again, it is in the new format.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == f"mixsga_{family}"


def test_without_mixsga_transformers_refuses_instead_of_loading_a_vanilla_model(tmp_path):
    # Without trust_remote_code transformers refuses the folder's custom code (its auto_map), and never
    # falls back to a vanilla model; tests/python/ecosystem/test_remote_code.py loads it with it.
    converted("llama").save_pretrained(tmp_path)
    script = ("import sys, transformers\n"
              "try:\n"
              "    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "except ValueError as e:\n"
              "    print('refused:', e)\n"
              "else:\n"
              "    print('loaded')\n"
              "assert 'mixsga' not in sys.modules\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # stdin closed: transformers may ask whether to trust the code, which must read as "no" at once.
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert "refused:" in run.stdout and "trust_remote_code" in run.stdout, run.stdout
