"""Loading a converted model saved with ``save_pretrained``: the settings come from its config.json, the
router weights from its safetensors files."""

from __future__ import annotations

import json
import os

from torch import nn

from .config import CONFIG_KEY, MixSGASettings
from .convert import convert

_ROUTER_KEY = ".router."


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Loads a mixSGA model saved by ``model.save_pretrained(path)`` after ``mixsga.hf.convert``: the
    transformers model (``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, so ``dtype=``,
    ``device_map=`` etc. work as usual), converted with the settings stored in its config
    (``config.mixsga``), with the saved router weights. A local directory; nothing is downloaded.

    Raises:
        ValueError: the config has no mixSGA settings (a plain transformers checkpoint: load it with
            transformers and call ``convert``), or the checkpoint lacks router weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: expected a directory written by save_pretrained, got {path!r}")
    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, CONFIG_KEY, None)
    if stored is None:
        raise ValueError(
            f"path: the config in {path!r} has no mixSGA settings (config.{CONFIG_KEY}); it is a plain "
            "transformers checkpoint: load it with transformers and call mixsga.hf.convert"
        )
    settings = MixSGASettings.from_dict(stored)
    # The backbone's loader reports the router tensors as unexpected keys; they are loaded below.
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    for cfg in (model.config, getattr(model, model.base_model_prefix, model).config):
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)  # convert() writes it back
    convert(
        model,
        settings.group_sizes,
        settings.ratios,
        aux_loss=settings.aux_loss,
        aux_alpha=settings.aux_alpha,
        prefill_routing=settings.prefill_routing,
        detach_router_input=settings.detach_router_input,
    )
    expected = [k for k in model.state_dict() if _ROUTER_KEY in k]
    saved = _read_router_tensors(path)
    missing = [k for k in expected if k not in saved]
    if missing:
        raise ValueError(
            f"path: the checkpoint in {path!r} lacks {len(missing)} of the {len(expected)} router tensors "
            f"of a mixSGA model (first missing: {missing[0]}); was it saved after mixsga.hf.convert?"
        )
    model.load_state_dict({k: saved[k] for k in expected}, strict=False)
    return model


def _read_router_tensors(path: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"path: no model.safetensors (or its index) in {path!r}")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if _ROUTER_KEY in key:
                    tensors[key] = f.get_tensor(key)
    return tensors
