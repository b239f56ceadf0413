"""Loading a converted model saved with ``save_pretrained``.

Its config.json has ``model_type`` "mixsga_<family>" (config.py) and the settings under ``mixsga``.
Importing ``mixsga.hf`` registers, per family, that config class with ``AutoConfig`` and a model class
with ``AutoModelForCausalLM`` that builds the family's model and converts it before transformers loads
the checkpoint, so every saved tensor (backbone, routers, key scales) loads into its place. A plain
``AutoModelForCausalLM.from_pretrained(path)`` thus gives the converted model too. Tools that never
import mixsga load it with ``trust_remote_code=True``: the folder holds an ``auto_map`` and a small shim
module that imports mixsga and re-exports the classes registered here (remote_code.py). Without either,
transformers refuses the folder (unknown model type, or custom code not trusted) instead of loading a
vanilla model.

Folders saved before the mixSGA model types (``model_type`` "llama" etc. with a ``mixsga`` key) load
with ``mixsga.hf.from_pretrained`` only: a plain transformers load cannot tell them from a vanilla model.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .attention import HFMixSGAAttention
from .config import CONFIG_KEY, MIXSGA_CONFIG_CLASSES, MixSGASettings, base_model_type, is_mixsga_config, mark_converted
from .convert import SUPPORTED_MODEL_TYPES, convert

_ROUTER_KEY = ".router."
# Children of a mixSGA layer that hold the original attention's tensors (loaded like a plain model's).
_ORIGINAL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Loads a mixSGA model saved by ``model.save_pretrained(path)`` after ``mixsga.hf.convert``: the
    transformers model (``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, so ``dtype=``,
    ``device_map=`` etc. work as usual), converted with the settings stored in its config
    (``config.mixsga``) before the weights load, so every saved tensor (backbone, routers, key scales)
    loads into its place and transformers' load report lists only real problems. A local directory;
    nothing is downloaded. The result is the model's usual class (e.g. ``LlamaForCausalLM``), converted.

    Also reads folders saved by earlier mixsga versions (``model_type`` "llama" etc. plus the
    ``mixsga`` settings), which a plain transformers load would take for vanilla models.

    Raises:
        ValueError: the config has no mixSGA settings (a plain transformers checkpoint: load it with
            transformers and call ``convert``), or the checkpoint lacks tensors of the mixSGA layers.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: expected a directory written by save_pretrained, got {path!r}")
    config = AutoConfig.from_pretrained(path)
    if getattr(config, CONFIG_KEY, None) is None:
        raise ValueError(
            f"path: the config in {path!r} has no mixSGA settings (config.{CONFIG_KEY}); it is a plain "
            "transformers checkpoint: load it with transformers and call mixsga.hf.convert"
        )
    if not is_mixsga_config(config):  # the earlier format: a family's own config with the settings
        family = base_model_type(config)
        if family not in MIXSGA_CONFIG_CLASSES:
            raise ValueError(
                f"path: the checkpoint in {path!r} has model type {family!r}; mixsga.hf supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        mark_converted(config)
    return MIXSGA_MODEL_CLASSES[base_model_type(config)].from_pretrained(path, config=config, **kwargs)


def _mixsga_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the tensors the conversion added (routers, key scales), which a checkpoint of
    a converted model must hold."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, HFMixSGAAttention):
            keys += [f"{name}.{k}" for k in module.state_dict() if k.split(".")[0] not in _ORIGINAL_PROJECTIONS]
    return keys


class _ConvertingMixin:
    """What the registered model classes add to their family's ``*ForCausalLM``: converting right after
    construction (transformers' ``from_pretrained`` builds the model, on the meta device, and then loads
    the checkpoint into it, so the mixSGA tensors are expected keys like any other, not "UNEXPECTED"
    ones), and handing back a model of the family's own class."""

    _mixsga_family_class: type  # e.g. LlamaForCausalLM

    def __init__(self, config, *args, **kwargs):
        settings = MixSGASettings.from_dict(getattr(config, CONFIG_KEY, None))
        options = {k: v for k, v in asdict(settings).items() if k not in ("group_sizes", "ratios")}
        super().__init__(config, *args, **kwargs)
        convert(self, settings.group_sizes, settings.ratios, **options)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.__class__ = cls._mixsga_family_class  # saves, prints and pickles as the family's model
        new_keys = _mixsga_keys(model)
        missing = sorted(set(info.get("missing_keys", ())) & set(new_keys))
        if missing:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            what = "router" if all(_ROUTER_KEY in k for k in new_keys) else "mixSGA"
            raise ValueError(
                f"path: the checkpoint in {os.fspath(where)!r} lacks {len(missing)} of the {len(new_keys)} "
                f"{what} tensors of a mixSGA model (first missing: {missing[0]}); was it saved after "
                "mixsga.hf.convert?"
            )
        return (model, info) if output_loading_info else model

    @classmethod
    def _from_config(cls, config, **kwargs):
        # AutoModelForCausalLM.from_config(config of a converted model): a converted model, fresh routers.
        model = super()._from_config(config, **kwargs)
        model.__class__ = cls._mixsga_family_class
        return model


def _register() -> dict[str, type]:
    """Registers every family's mixSGA config and model class with transformers' Auto classes; returns
    {family: model class}. Re-registering (a reloaded module) replaces the earlier classes."""
    classes = {}
    for family, config_cls in MIXSGA_CONFIG_CLASSES.items():
        family_cls = AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[family]]  # e.g. LlamaForCausalLM
        name = f"MixSGA{family_cls.__name__}"
        classes[family] = type(name, (_ConvertingMixin, family_cls), {
            "config_class": config_cls,
            "_mixsga_family_class": family_cls,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{family_cls.__name__} converted to mixSGA on construction (``{config_cls.model_type}``).",
        })
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, classes[family], exist_ok=True)
    return classes


#: Family model_type -> its registered model class.
MIXSGA_MODEL_CLASSES = _register()
# Module-level names, so the shim of a saved model (remote_code.py) can import them and they pickle.
MixSGALlamaForCausalLM = MIXSGA_MODEL_CLASSES["llama"]
MixSGAMistralForCausalLM = MIXSGA_MODEL_CLASSES["mistral"]
MixSGAQwen2ForCausalLM = MIXSGA_MODEL_CLASSES["qwen2"]
MixSGAOPTForCausalLM = MIXSGA_MODEL_CLASSES["opt"]
