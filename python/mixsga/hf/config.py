"""The mixSGA settings of a converted model, as stored in ``model.config.mixsga`` (and so in the
config.json that ``save_pretrained`` writes), and the config classes of converted models.

A converted model's config is a subclass of its family's config whose ``model_type`` is
``"mixsga_<family>"`` (e.g. ``MixSGALlamaConfig``, "mixsga_llama"): the config.json it saves is then not
mistaken for a plain Llama's, which transformers would load as a vanilla model, silently dropping the
routers. ``import mixsga.hf`` registers these types with transformers' Auto classes (pretrained.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from .._checks import (
    check_aux_loss_kind,
    check_decode_offsets,
    check_group_sizes,
    check_key_scale,
    check_kv_cap,
    check_prefill_routing,
    check_ratios,
    check_routing_signal,
)

#: Attribute of ``model.config`` holding the settings (a plain dict, so it serialises as JSON).
CONFIG_KEY = "mixsga"
SETTINGS_VERSION = 1
#: config.json key recording the family a converted model was made from (for people and other tools;
#: mixsga reads the family from the config class).
BASE_TYPE_KEY = "mixsga_base_model_type"


@dataclass(frozen=True)
class MixSGASettings:
    """Everything ``convert`` needs to rebuild the mixSGA layers of a model (see MixSGAAttention)."""

    group_sizes: tuple[int, ...]
    ratios: tuple[float, ...]
    aux_loss: str = "sigmoid_ce"
    aux_alpha: float = 0.1
    prefill_routing: str = "expert_choice"
    detach_router_input: bool = False
    key_scale: str = "none"
    routing_signal: str = "router"
    aux_in_backward: bool = True
    #: The routing served now, when it is not the trained one (mixsga.hf.set_kv_budget,
    #: calibrate_decode_routing): capacity ratios (None: ``ratios``) and per-layer decode offsets (None: none).
    decode_ratios: tuple[float, ...] | None = None
    decode_offsets: tuple[tuple[float, ...], ...] | None = None
    #: Hard per-sequence KV cap the caches of this model enforce (mixsga.hf.set_kv_cap; None: none).
    kv_cap: float | None = None

    @classmethod
    def create(
        cls,
        group_sizes: Sequence[int],
        ratios: Sequence[float],
        aux_loss: str = "sigmoid_ce",
        aux_alpha: float = 0.1,
        prefill_routing: str = "expert_choice",
        detach_router_input: bool = False,
        key_scale: str = "none",
        routing_signal: str = "router",
        aux_in_backward: bool = True,
        decode_ratios: Sequence[float] | None = None,
        decode_offsets: Sequence[Sequence[float]] | None = None,
        kv_cap: float | None = None,
    ) -> MixSGASettings:
        """Validated settings (group sizes strictly increasing, one ratio per expert summing to 1, ...)."""
        groups = check_group_sizes(group_sizes)
        values = check_ratios(ratios, len(groups))
        try:
            alpha = float(aux_alpha)
        except (TypeError, ValueError):
            raise TypeError(f"aux_alpha: expected a float, got {aux_alpha!r}") from None
        if not isinstance(detach_router_input, bool):
            raise TypeError(f"detach_router_input: expected a bool, got {detach_router_input!r}")
        if not isinstance(aux_in_backward, bool):
            raise TypeError(f"aux_in_backward: expected a bool, got {aux_in_backward!r}")
        serving = None if decode_ratios is None else check_ratios(decode_ratios, len(groups), "decode_ratios")
        offsets = None
        if decode_offsets is not None:
            offsets = tuple(check_decode_offsets(o, len(groups)) for o in decode_offsets)
        return cls(groups, values, check_aux_loss_kind(aux_loss), alpha, check_prefill_routing(prefill_routing),
                   detach_router_input, check_key_scale(key_scale), check_routing_signal(routing_signal),
                   aux_in_backward, serving, offsets, check_kv_cap(kv_cap, groups))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group_sizes"], d["ratios"] = list(self.group_sizes), list(self.ratios)
        for key in ("decode_ratios", "decode_offsets", "kv_cap"):  # written only when set: older readers know no such keys
            if d[key] is None:
                del d[key]
        if self.decode_ratios is not None:
            d["decode_ratios"] = list(self.decode_ratios)
        if self.decode_offsets is not None:
            d["decode_offsets"] = [list(o) for o in self.decode_offsets]
        d["version"] = SETTINGS_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MixSGASettings:
        if not isinstance(d, dict):
            raise TypeError(f"config.{CONFIG_KEY}: expected a dict of mixSGA settings, got {type(d).__name__}")
        version = d.get("version", SETTINGS_VERSION)
        if version != SETTINGS_VERSION:
            raise ValueError(f"config.{CONFIG_KEY}: unknown settings version {version!r} (this mixsga reads {SETTINGS_VERSION})")
        known = {k: v for k, v in d.items() if k != "version"}
        unknown = set(known) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config.{CONFIG_KEY}: unknown settings {sorted(unknown)}")
        return cls.create(**known)


class _MixSGAConfigMixin:
    """What the config classes of converted models add to their family's config."""

    #: The family's own model_type (e.g. "llama").
    mixsga_base_model_type = ""

    def to_dict(self) -> dict:
        d = super().to_dict()
        d[BASE_TYPE_KEY] = type(self).mixsga_base_model_type
        # The auto_map that lets tools which never import mixsga load the saved model (remote_code.py).
        # Our entries replace any earlier ones (a loaded config keeps the auto_map of its file), so
        # repeated load/save round trips write the same map; entries for other Auto classes are kept.
        from .remote_code import auto_map_entries

        d["auto_map"] = {**(d.get("auto_map") or {}), **auto_map_entries(self)}
        return d

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Saves the config (transformers' ``save_pretrained``) and writes the shim module its
        ``auto_map`` names beside config.json, so the folder also loads with
        ``trust_remote_code=True`` where mixsga was never imported (remote_code.py). Runs for
        ``model.save_pretrained`` and ``push_to_hub()`` too (both save the config through here; the
        latter uploads the whole folder). ``config.save_pretrained(path, push_to_hub=True)`` alone
        uploads only the files its own save changed, so there the shim goes up with the first save."""
        import os  # here, not at the top: this mixin's code stays apart from the settings above

        from .remote_code import write_shim

        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: expected a folder, got the file {os.fspath(save_directory)!r}")
        os.makedirs(save_directory, exist_ok=True)
        # Before the config: a folder whose config.json names the shim then always has it.
        write_shim(save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Does nothing: the auto_map of a converted model is written by ``to_dict`` and names the shim.

        transformers calls this on a config class it loaded as custom code (a fresh interpreter's
        ``AutoConfig.from_pretrained(path, trust_remote_code=True)``); the default would make every
        later save copy this module's source file into the folder, which fails (it imports
        ``.._checks``, outside the folder) and would duplicate mixsga's code."""


def _converted_config_class(family_config: type, family: str) -> type:
    """MixSGA<Family>Config: ``family_config`` plus the mixin, with model_type "mixsga_<family>". Its name
    is the module-level name it is bound to below, so configs pickle."""
    return type(f"MixSGA{family_config.__name__}", (_MixSGAConfigMixin, family_config), {
        "__module__": __name__,
        "__doc__": f"The config of a {family_config.__name__[:-len('Config')]} model converted to mixSGA.",
        "model_type": f"mixsga_{family}",
        "mixsga_base_model_type": family,
    })


# One class per family mixsga.hf.convert supports (SUPPORTED_MODEL_TYPES).
MixSGALlamaConfig = _converted_config_class(LlamaConfig, "llama")
MixSGAMistralConfig = _converted_config_class(MistralConfig, "mistral")
MixSGAQwen2Config = _converted_config_class(Qwen2Config, "qwen2")
MixSGAOPTConfig = _converted_config_class(OPTConfig, "opt")


#: Family model_type -> the config class of its converted models.
MIXSGA_CONFIG_CLASSES = {
    cls.mixsga_base_model_type: cls
    for cls in (MixSGALlamaConfig, MixSGAMistralConfig, MixSGAQwen2Config, MixSGAOPTConfig)
}


def base_model_type(config) -> str | None:
    """The family of ``config`` ("llama" for both a LlamaConfig and a MixSGALlamaConfig); None if it
    has no model_type."""
    return getattr(type(config), "mixsga_base_model_type", None) or getattr(config, "model_type", None)


def is_mixsga_config(config) -> bool:
    """Whether ``config`` is the config of a converted model (one of the MixSGA*Config classes)."""
    return isinstance(config, _MixSGAConfigMixin)


def mark_converted(config) -> None:
    """Makes ``config`` (of a family in MIXSGA_CONFIG_CLASSES) the config of a converted model, in place:
    its class becomes the family's MixSGA*Config (a subclass adding no fields, so nothing else changes)."""
    family = base_model_type(config)
    if family not in MIXSGA_CONFIG_CLASSES:
        raise TypeError(f"config: no mixSGA config class for model_type {family!r}")
    config.__class__ = MIXSGA_CONFIG_CLASSES[family]
    if "model_type" in vars(config):  # a loaded config keeps the model_type of its file, shadowing the class's
        config.model_type = config.__class__.model_type
