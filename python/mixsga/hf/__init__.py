"""Hugging Face transformers integration: mixSGA for Llama-family causal LMs (Llama, Mistral, Qwen2, OPT).

- ``convert(model, group_sizes=..., ratios=..., **options)``: mixSGA attention in every layer, keeping the
  model's weights; ``to_gqa(model, kv_heads=...)``: the mean-pooled static GQA baseline.
- ``MixSGACache``: the compact heterogeneous KV cache as a transformers ``Cache`` (``generate`` uses it).
- Training: any loop trains the routers (the aux loss reaches them through backward; ``outputs.aux_loss``
  reports it); ``set_aux_loss_scale(model, 1 / steps)`` for loops that never backpropagate
  ``outputs.loss`` and accumulate gradients (TRL). ``aux_loss(model)``, ``mixsga_layers(model)``,
  ``kv_fraction(model)``: for logging and analysis; ``AuxLossCallback``: the aux loss in a ``Trainer``'s logs.
- ``from_pretrained(path)``: reloads a converted model saved with ``save_pretrained``. Importing this
  subpackage also registers the saved model types ("mixsga_llama", ...) with transformers, so
  ``AutoModelForCausalLM.from_pretrained(path)`` gives the same converted model; without the import
  transformers refuses the unknown model type (it never loads such a folder as a vanilla model).
- ``prepare(model, blocks)``: calibrates pooled-key scales and warm-starts the routers on a few batches
  (``calibrate_key_scale``, ``warm_start_routers``); ``RECOMMENDED``: the quality extensions to convert
  with (docs/METHOD.md).

Needs ``transformers`` (imported by this subpackage only).
"""

from .attention import PADDING_MASK_KWARG, HFMixSGAAttention
from .cache import MixSGACache
from .config import MixSGASettings
from .convert import SUPPORTED_MODEL_TYPES, convert, is_converted, to_gqa
from .hooks import set_aux_loss_scale
from .layers import aux_loss, kv_fraction, mixsga_layers
from .prepare import RECOMMENDED, calibrate_key_scale, prepare, warm_start_routers
from .pretrained import from_pretrained
from .trainer import AuxLossCallback

__all__ = [
    "AuxLossCallback",
    "PADDING_MASK_KWARG",
    "RECOMMENDED",
    "SUPPORTED_MODEL_TYPES",
    "HFMixSGAAttention",
    "MixSGACache",
    "MixSGASettings",
    "aux_loss",
    "calibrate_key_scale",
    "convert",
    "from_pretrained",
    "is_converted",
    "kv_fraction",
    "mixsga_layers",
    "prepare",
    "set_aux_loss_scale",
    "to_gqa",
    "warm_start_routers",
]
