"""Loading a converted model saved with ``save_pretrained``: the settings come from its config.json; the
model is converted before transformers loads the checkpoint, so every saved tensor loads into its place."""

from __future__ import annotations

import os
from dataclasses import asdict

from torch import nn

from .config import CONFIG_KEY, MixSGASettings
from .convert import convert

_ROUTER_KEY = ".router."


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Loads a mixSGA model saved by ``model.save_pretrained(path)`` after ``mixsga.hf.convert``: the
    transformers model (``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, so ``dtype=``,
    ``device_map=`` etc. work as usual), converted with the settings stored in its config
    (``config.mixsga``) before the weights load, so every saved tensor (backbone, routers, key scales)
    loads into its place and transformers' load report lists only real problems. A local directory;
    nothing is downloaded. The result is the model's usual class (e.g. ``LlamaForCausalLM``), converted.

    Raises:
        ValueError: the config has no mixSGA settings (a plain transformers checkpoint: load it with
            transformers and call ``convert``), or the checkpoint lacks tensors of the mixSGA layers.
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
    options = {k: v for k, v in asdict(settings).items() if k not in ("group_sizes", "ratios")}
    base_cls = _model_class(AutoModelForCausalLM, config)
    model, info = _converting(base_cls, settings, options).from_pretrained(
        path, config=config, output_loading_info=True, **kwargs)
    new_keys = model.__dict__.pop("_mixsga_new_keys")
    model.__class__ = base_cls  # the model's own class again: it saves, prints and pickles as usual
    missing = sorted(set(info.get("missing_keys", ())) & set(new_keys))
    if missing:
        what = "router" if all(_ROUTER_KEY in k for k in new_keys) else "mixSGA"
        raise ValueError(
            f"path: the checkpoint in {path!r} lacks {len(missing)} of the {len(new_keys)} {what} tensors "
            f"of a mixSGA model (first missing: {missing[0]}); was it saved after mixsga.hf.convert?"
        )
    return model


def _model_class(auto_cls, config) -> type:
    """The class ``auto_cls.from_pretrained`` would build for ``config`` (e.g. LlamaForCausalLM)."""
    mapping = auto_cls._model_mapping
    if type(config) not in mapping:
        raise ValueError(
            f"path: the checkpoint's model type {getattr(config, 'model_type', None)!r} has no "
            f"{auto_cls.__name__} class in transformers"
        )
    cls = mapping[type(config)]
    return cls[0] if isinstance(cls, (list, tuple)) else cls


def _converting(base_cls: type, settings: MixSGASettings, options: dict) -> type:
    """A subclass of ``base_cls`` that converts itself right after construction. transformers'
    ``from_pretrained`` builds the model (on the meta device) and then loads the checkpoint into it, so
    the mixSGA tensors are expected keys like any other (not "UNEXPECTED" ones loaded behind the
    loader's back). It records the keys the conversion added, for the missing-tensor check."""

    def __init__(self, config, *args, **kw):
        base_cls.__init__(self, config, *args, **kw)
        for cfg in (self.config, getattr(self, self.base_model_prefix, self).config):
            if hasattr(cfg, CONFIG_KEY):
                delattr(cfg, CONFIG_KEY)  # convert() writes it back
        before = set(self.state_dict())
        convert(self, settings.group_sizes, settings.ratios, **options)
        self.__dict__["_mixsga_new_keys"] = sorted(set(self.state_dict()) - before)

    return type(base_cls.__name__, (base_cls,),
                {"__init__": __init__, "__module__": base_cls.__module__, "__qualname__": base_cls.__qualname__})
