"""The mixSGA settings of a converted model, as stored in ``model.config.mixsga`` (and so in the
config.json that ``save_pretrained`` writes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .._checks import (
    check_aux_loss_kind,
    check_group_sizes,
    check_key_scale,
    check_prefill_routing,
    check_ratios,
    check_routing_signal,
)

#: Attribute of ``model.config`` holding the settings (a plain dict, so it serialises as JSON).
CONFIG_KEY = "mixsga"
SETTINGS_VERSION = 1


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
        return cls(groups, values, check_aux_loss_kind(aux_loss), alpha, check_prefill_routing(prefill_routing),
                   detach_router_input, check_key_scale(key_scale), check_routing_signal(routing_signal))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group_sizes"], d["ratios"] = list(self.group_sizes), list(self.ratios)
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
