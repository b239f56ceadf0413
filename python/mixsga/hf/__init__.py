"""Hugging Face transformers integration: mixSGA for Llama-family causal LMs (Llama, Mistral, Qwen2, OPT).

- ``convert(model, group_sizes=..., ratios=..., **options)``: mixSGA attention in every layer, keeping the
  model's weights; ``to_gqa(model, kv_heads=...)``: the mean-pooled static GQA baseline.
- ``MixSGACache``: the compact heterogeneous KV cache as a transformers ``Cache`` (``generate`` uses it).
- Training: any loop trains the routers (the aux loss reaches them through backward; ``outputs.aux_loss``
  reports it); ``set_aux_loss_scale(model, 1 / steps)`` for loops that never backpropagate
  ``outputs.loss`` and accumulate gradients (TRL). ``aux_loss(model)``, ``mixsga_layers(model)``,
  ``kv_fraction(model)``: for logging and analysis; ``causal_routing(model)``: a context in which a forward
  over whole sequences routes as decoding does (causal argmax) instead of by expert choice; ``AuxLossCallback``: the aux loss in a ``Trainer``'s logs.
- ``from_pretrained(path)``: reloads a converted model saved with ``save_pretrained``. Importing this
  subpackage also registers the saved model types ("mixsga_llama", ...) with transformers, so
  ``AutoModelForCausalLM.from_pretrained(path)`` gives the same converted model. The folder also holds a
  small custom-code module (``auto_map``), so tools that never import mixsga (lm-eval, TRL's command line)
  load it with ``trust_remote_code=True``; without either, transformers refuses it (it never loads such a
  folder as a vanilla model).
- PEFT: ``lora_config(...)`` (a LoraConfig whose ``modules_to_save`` holds the routers,
  ``peft_modules_to_save``); ``train_key_scales(peft_model)`` unfreezes learned key scales. LoRA on k_proj /
  v_proj acts through the effective weight W + scaling * B @ A.
- KV memory you can set: ``calibrate_decode_routing(model, blocks)`` fits decode offsets so decoding realises
  the configured ratios; ``set_kv_budget(model, blocks, budget)`` serves another budget without retraining;
  ``realised_kv_budget(model, blocks)`` measures it; ``set_kv_cap(model, cap)`` bounds every sequence's KV.
- ``prepare(model, blocks)``: calibrates pooled-key scales and warm-starts the routers on a few batches
  (``calibrate_key_scale``, ``warm_start_routers``); ``RECOMMENDED``: the quality extensions to convert
  with (docs/METHOD.md).

Needs ``transformers`` (imported by this subpackage only).
"""

from .attention import PADDING_MASK_KWARG, HFMixSGAAttention
from .budget import calibrate_decode_routing, realised_kv_budget, set_kv_budget, set_kv_cap, trained_ratios
from .cache import MixSGACache
from .config import MixSGASettings
from .convert import SUPPORTED_MODEL_TYPES, convert, is_converted, to_gqa
from .hooks import set_aux_loss_scale
from .layers import aux_loss, causal_routing, kv_fraction, mixsga_layers
from .peft import lora_config, peft_modules_to_save, train_key_scales
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
    "calibrate_decode_routing",
    "calibrate_key_scale",
    "causal_routing",
    "convert",
    "from_pretrained",
    "is_converted",
    "kv_fraction",
    "lora_config",
    "mixsga_layers",
    "peft_modules_to_save",
    "prepare",
    "realised_kv_budget",
    "set_aux_loss_scale",
    "set_kv_budget",
    "set_kv_cap",
    "to_gqa",
    "trained_ratios",
    "train_key_scales",
    "warm_start_routers",
]
