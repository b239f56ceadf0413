"""Loading a saved converted model in tools that never ``import mixsga`` (lm-eval's and TRL's command
lines, a plain transformers script), through transformers' custom-code convention.

A converted model's config.json has ``model_type`` "mixsga_<family>", which transformers knows only after
``import mixsga.hf`` registered it. So ``save_pretrained`` also writes

- ``auto_map`` in config.json: {"AutoConfig": "modeling_mixsga.MixSGALlamaConfig",
  "AutoModelForCausalLM": "modeling_mixsga.MixSGALlamaForCausalLM"} (per family), and
- ``modeling_mixsga.py`` beside it (the *shim*): a few lines that import mixsga and re-export its classes,

so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` in a fresh interpreter imports the
shim, which imports the installed mixsga, which registers the model types; the model then loads exactly as
after ``import mixsga.hf``. Where mixsga is already imported, transformers prefers the registered classes
and never reads the shim (the auto_map is then inert).

Why not transformers' own ``register_for_auto_class``: at save time it copies the *source file* of the
class (mixsga/hf/config.py) and the files it imports relatively into the folder; that file imports
``.._checks`` (outside the folder, so the copy fails) and a copied module would be a second, diverging
definition of classes the installed mixsga already provides. The shim keeps the model code in one place.
"""

from __future__ import annotations

import os

from .config import MIXSGA_CONFIG_CLASSES, is_mixsga_config
from .pretrained import MIXSGA_MODEL_CLASSES

#: Module name of the shim; the auto_map entries are "<SHIM_MODULE>.<class name>".
SHIM_MODULE = "modeling_mixsga"
SHIM_FILENAME = f"{SHIM_MODULE}.py"
#: The transformers Auto classes the auto_map of a converted model names.
AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM")

_SHIM_TEMPLATE = '''\
"""Loads this mixSGA checkpoint through transformers' custom code (``trust_remote_code=True``) where
mixsga was not imported. Written by mixsga's save_pretrained; no model code here: the classes are those
of the installed mixsga package, re-exported."""

# Inside try: transformers skips the imports of try blocks when it checks a module's requirements, so a
# missing mixsga reaches the message below instead of a generic one.
try:
    import mixsga.hf  # registers the mixsga_* model types with transformers' Auto classes
    from mixsga.hf.config import {configs}
    from mixsga.hf.pretrained import {models}
except ImportError as error:
    raise ImportError(
        "This checkpoint is a model converted to mixSGA attention; loading it needs the mixsga package, "
        f"which could not be imported ({{error}}). Install it with `pip install mixsga`."
    ) from error

__all__ = [{names}]
'''


def shim_source() -> str:
    """The text of the shim module: the same for every family (so one file serves any converted model)
    and for every save (so transformers' module cache, keyed by the file's hash, is reused)."""
    configs = sorted(cls.__name__ for cls in MIXSGA_CONFIG_CLASSES.values())
    models = sorted(cls.__name__ for cls in MIXSGA_MODEL_CLASSES.values())
    return _SHIM_TEMPLATE.format(
        configs=", ".join(configs),
        models=", ".join(models),
        names=", ".join(f'"{name}"' for name in configs + models),
    )


def auto_map_entries(config) -> dict[str, str]:
    """The ``auto_map`` entries naming the shim's classes for ``config`` (a MixSGA*Config)."""
    if not is_mixsga_config(config):
        raise TypeError(f"config: expected the config of a converted model (a MixSGA*Config), got {type(config).__name__}")
    model_class = MIXSGA_MODEL_CLASSES[type(config).mixsga_base_model_type]
    return {
        "AutoConfig": f"{SHIM_MODULE}.{type(config).__name__}",
        "AutoModelForCausalLM": f"{SHIM_MODULE}.{model_class.__name__}",
    }


def write_shim(directory: str | os.PathLike) -> str:
    """Writes the shim into ``directory`` (an existing folder); returns its path. Leaves an identical
    file untouched, so re-saving into a folder changes nothing there."""
    if not os.path.isdir(directory):
        raise ValueError(f"directory: expected an existing folder to write {SHIM_FILENAME} into, got {os.fspath(directory)!r}")
    path = os.path.join(directory, SHIM_FILENAME)
    text = shim_source()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as existing:
            if existing.read() == text:
                return path
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)
    return path
