"""MixSGA attention behind the call signature of a Hugging Face Llama-family attention layer."""

from __future__ import annotations

import torch

from ..nn.attention import MixSGAAttention
from .cache import MixSGACache

#: Keyword under which the model-level forward pre-hook (installed by ``convert``) hands every attention
#: layer the model's [B, T] 0/1 padding mask. Transformers itself only passes a processed 4D mask (or
#: None), from which padding cannot be read back reliably; a keyword argument, unlike state on the
#: module, survives gradient checkpointing's recomputation.
PADDING_MASK_KWARG = "mixsga_padding_mask"
#: Keyword under which the same hook hands every layer of a training forward the forward's shared
#: ``AuxScale`` (mixsga.nn.aux_gradient): how much aux gradient the layers send in backward.
AUX_SCALE_KWARG = "mixsga_aux_scale"


class HFMixSGAAttention(MixSGAAttention):
    """``mixsga.nn.MixSGAAttention`` called the way transformers decoder layers call their attention:
    ``forward(hidden_states, position_embeddings=(cos, sin), attention_mask=..., past_key_values=...,
    position_ids=..., **kwargs) -> (output [B, L, D], None)``.

    - RoPE uses the (cos, sin) the model computed, so every RoPE variant of the model (scaled, YaRN, ...)
      works; the layer's own ``rope_theta`` is used only when they are absent.
    - Routing sees the padding mask the model-level hook passes (``PADDING_MASK_KWARG``); a [B, L] 2D
      ``attention_mask`` is used when there is none. Padded tokens take no expert capacity and are
      neither attended to nor cached.
    - ``past_key_values`` must be a ``MixSGACache`` (or None): tokens are stored at their compact size.
    - With ``aux_in_backward`` (the default of converted models) the aux gradient is attached to the output
      with the forward's ``AuxScale`` (``AUX_SCALE_KWARG``, see mixsga.hf.hooks), so any loss trains the routers.
    - The aux loss of the latest call is kept in ``last_aux_loss`` (0-dim; 0 after a decode step) for
      ``mixsga.hf.aux_loss(model)`` and ``outputs.aux_loss``; nothing else is kept between calls.

    Constructor: ``layer_idx`` (the layer's index in the cache) plus MixSGAAttention's arguments.
    """

    #: False for models without rotary embeddings (OPT: learned absolute positions added to the input).
    uses_rope = True

    def __init__(self, *args, layer_idx: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layer_idx = layer_idx
        self.is_causal = True  # read by some transformers utilities
        self.last_aux_loss: torch.Tensor | None = None
        self.last_call_was_prefill = False  # a call on an empty (or no) cache: the one that has an aux loss
        self._call_aux_scale = None  # the AuxScale of the running call (from the model-level hook)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        B, L = hidden_states.shape[0], hidden_states.shape[1]
        padding = kwargs.get(PADDING_MASK_KWARG)
        if padding is None and attention_mask is not None and attention_mask.dim() == 2:
            padding = attention_mask
        mask = None
        if padding is not None:
            if padding.dim() != 2 or padding.shape[0] != B or padding.shape[1] < L:
                raise ValueError(
                    f"attention_mask: expected a [B, T] 0/1 padding mask with B = {B} and T >= {L} (the new "
                    f"tokens are its last columns), got shape {list(padding.shape)}"
                )
            mask = padding[:, padding.shape[1] - L :]
        cache = None
        if past_key_values is not None:
            if not isinstance(past_key_values, MixSGACache):
                raise TypeError(
                    f"past_key_values: a mixSGA model stores its KV cache in mixsga.hf.MixSGACache, got "
                    f"{type(past_key_values).__name__}"
                )
            cache = past_key_values.hetero_for(self, B)
        positions = position_ids
        if positions is not None and positions.dim() == 2 and positions.shape[0] != B:
            positions = positions.expand(B, -1)
        self.last_call_was_prefill = cache is None or cache.batch_size == 0 or cache.max_seq_length(self.layer_idx) == 0
        rope = position_embeddings if self.uses_rope else _identity_rope(hidden_states, self.head_dim)
        # Passed as a keyword, so gradient checkpointing's recomputation sees the same scale.
        self._call_aux_scale = kwargs.get(AUX_SCALE_KWARG)
        try:
            result = self.forward_with_routing(hidden_states, mask, positions, cache, self.layer_idx, rope)
        finally:
            self._call_aux_scale = None
        if past_key_values is not None:
            past_key_values.advance(self.layer_idx, L)
        self.last_aux_loss = result.aux_loss
        return result.output, None


    def _aux_scale(self):
        # The forward's shared scale when the model-level hook gave one (a layer called on its own: its own).
        return self._call_aux_scale if self._call_aux_scale is not None else super()._aux_scale()


class HFMixSGAOPTAttention(HFMixSGAAttention):
    """HFMixSGAAttention for OPT: no RoPE, and the output projection is named ``out_proj`` as in OPT's
    checkpoints (``o_proj`` stays readable as an alias)."""

    uses_rope = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out_proj = self._modules.pop("o_proj")

    @property
    def o_proj(self) -> torch.nn.Linear:
        return self.out_proj


def _identity_rope(x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) = (1, 0): a rotation by zero, exact, for layers without RoPE."""
    shape = (1, x.shape[1], head_dim)
    return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)
