"""PEFT (LoRA) on a converted model: the mixSGA parameters an adapter trains besides LoRA's own.

LoRA may target every projection of a converted model, k_proj and v_proj included: a mixSGA layer never
calls k_proj / v_proj but projects K/V with their effective weight, W + scaling * B @ A for a LoRA layer
(``mixsga.nn.shared_group_kv.effective_linear``), so the adapters train, change the output, and
``merge_and_unload()`` gives the same model. That weight exists only without LoRA dropout on k_proj /
v_proj (dropout acts on the input) and for plain LoRA (not DoRA); the layers raise otherwise.

What PEFT does not know about (it freezes every parameter that is not an adapter's):

- The routers, new in a converted model. Listed in ``modules_to_save`` ("router": each attention layer's
  ``router``), PEFT trains a copy of every router and saves it in the adapter folder; the layer reaches the
  copy's ``route`` / ``argmax_route`` / ``aux_loss`` through PEFT's ModulesToSaveWrapper, which forwards
  attribute reads to the active copy (the original router with adapters disabled), and
  ``merge_and_unload()`` puts the trained copy in the router's place.
- The learned key scales (``key_scale="learned"``): one bare Parameter per attention layer,
  ``key_log_scale``, which ``modules_to_save`` cannot hold (it wraps modules). ``train_key_scales``
  unfreezes them after ``peft.get_peft_model``. They are then trained in place, in the base model: an
  adapter folder does not hold them; ``merge_and_unload()`` then ``save_pretrained`` keeps them.

Routers made by converting a model that PEFT had already wrapped are new modules, trainable but not part
of the adapter either: save such a model merged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .layers import mixsga_layers

#: What ``modules_to_save`` must hold for PEFT to train and save a converted model's routers.
ROUTER_MODULES = ("router",)
#: PEFT's default LoRA targets for the supported families, used when ``target_modules`` is not given.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
#: Example module key, to test a regex ``target_modules`` against (PEFT full-matches regexes on keys).
_KV_KEYS = ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")


def peft_modules_to_save(modules_to_save: Iterable[str] | None = None) -> list[str]:
    """``modules_to_save`` for a ``peft.LoraConfig`` on a converted model: the given names (default none)
    followed by "router", once. Other names are kept as they are."""
    if isinstance(modules_to_save, str):
        raise TypeError(f"modules_to_save: expected a list of module names, got the string {modules_to_save!r}")
    names = [] if modules_to_save is None else list(modules_to_save)
    return names + [n for n in ROUTER_MODULES if n not in names]


def lora_config(**kwargs):
    """``peft.LoraConfig(**kwargs)`` for a converted model, with "router" added to ``modules_to_save``
    (``peft_modules_to_save``) and, without ``target_modules``, PEFT's default targets for the family
    (q_proj, v_proj), which PEFT itself cannot find for a converted model's ``model_type``. Call
    ``train_key_scales(peft_model)`` after ``get_peft_model`` to train learned key scales too.

    Raises:
        ValueError: ``lora_dropout`` > 0 or ``use_dora=True`` while ``target_modules`` names k_proj or
            v_proj ("all-linear" and regexes included): mixSGA projects K/V with the effective weight of
            those modules, which neither has (the layer would raise at the first training forward).
    """
    import peft  # the top-level package (absolute import): only this function needs it

    kwargs["modules_to_save"] = peft_modules_to_save(kwargs.get("modules_to_save"))
    if kwargs.get("target_modules") is None and kwargs.get("target_parameters") is None:
        # PEFT looks its default up by model_type, which a converted model changes ("mixsga_llama"): give the
        # default of every supported family (Llama, Mistral, Qwen2, OPT) explicitly.
        kwargs["target_modules"] = list(DEFAULT_TARGET_MODULES)
    kv = _targeted_kv(kwargs["target_modules"])
    dropout = kwargs.get("lora_dropout", 0.0)
    if kv and dropout:
        raise ValueError(
            f"lora_dropout: must be 0 when target_modules includes {kv} (mixSGA projects K/V with the effective "
            f"weight W + scaling * B @ A of those modules, and dropout acts on the input), got {dropout}; leave "
            f"k_proj/v_proj out of target_modules to keep dropout on the others"
        )
    if kv and kwargs.get("use_dora", False):
        raise ValueError(
            f"use_dora: DoRA has no effective weight of the form W + scaling * B @ A, which mixSGA projects K/V "
            f"with; got use_dora=True with target_modules including {kv}"
        )
    return peft.LoraConfig(**kwargs)


def _targeted_kv(target_modules) -> str | None:
    """Which of k_proj / v_proj ``target_modules`` (PEFT's forms: list of suffixes, regex, "all-linear")
    reaches, as "k_proj" / "v_proj" / "k_proj and v_proj", or None."""
    if isinstance(target_modules, str):
        hit = [k for k in _KV_KEYS if target_modules == "all-linear" or re.fullmatch(target_modules, k)]
    else:
        names = list(target_modules)
        hit = [k for k in _KV_KEYS if any(k == n or k.endswith("." + n) for n in names)]
    return " and ".join(k.rsplit(".", 1)[1] for k in hit) or None


def train_key_scales(model: nn.Module) -> list[nn.Parameter]:
    """Unfreezes every mixSGA layer's learned key scales (``key_log_scale``, ``key_scale="learned"``) of
    ``model`` (a PeftModel, or any module holding converted layers), which ``peft.get_peft_model`` froze,
    and returns them in layer order (e.g. to give them their own learning rate). They are trained in the
    base model: the adapter folder does not hold them.

    Raises:
        TypeError: ``model`` has no mixSGA layers.
        ValueError: no layer has learned key scales (converted without ``key_scale="learned"``).
    """
    layers = mixsga_layers(model)
    if not layers:
        raise TypeError(f"model: train_key_scales needs a model converted to mixSGA, got a {type(model).__name__} "
                        "without mixSGA layers")
    scales = [layer.key_log_scale for layer in layers if layer.key_log_scale is not None]
    if not scales:
        kinds = sorted({layer.key_scale for layer in layers})
        raise ValueError(f"model: train_key_scales needs layers converted with key_scale='learned', got key_scale "
                         f"{', '.join(map(repr, kinds))}")
    for scale in scales:
        scale.requires_grad_(True)
    return scales
