"""MixSGACache: a transformers ``Cache`` over the compact ``mixsga._C.HeteroKVCache``.

``model.generate()`` on a converted model stores its KV cache here (see ``convert``): every token keeps
only the KV heads of its expert, padding is never stored, and decode steps attend through the compact
``hetero_decode_attention`` kernel.

Transformers counts cache length in *columns* of its [B, T] attention mask (padding included), while
HeteroKVCache stores per sequence only the real tokens, at the positions Hugging Face gives them
(cumsum(mask) - 1 with left padding). This class keeps the column count per layer, so mask sizes and
``get_seq_length`` mean what transformers expects, and maps batch edits (beam reorder, select, repeat,
crop) onto the compact pools.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _C
from .._checks import check_kv_cap
from .config import CONFIG_KEY


def saved_kv_cap(config) -> float | None:
    """The hard KV cap stored in a converted model's config (``mixsga.hf.set_kv_cap``), or None."""
    return (getattr(config, CONFIG_KEY, None) or {}).get("kv_cap")


class MixSGACacheLayer(CacheLayerMixin):
    """One layer's view of a MixSGACache: its column count (the K/V live in the shared HeteroKVCache).
    Only MixSGA attention layers can store into it; ``update`` (the call of HF attention) is an error."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.columns = 0  # mask columns seen so far (padding included), what transformers calls seq length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError(
            f"MixSGACache: layer {self.layer_idx} is not a mixSGA attention layer (it called Cache.update); "
            "convert every attention layer with mixsga.hf.convert, or use a transformers DynamicCache"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = 0

    # Batch edits act on the shared HeteroKVCache once, in MixSGACache; a layer only keeps its count.
    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class MixSGACache(Cache):
    """The compact heterogeneous KV cache of a converted model, as a transformers ``Cache``.

    ``model.generate()`` creates one automatically on a converted model; create one yourself to keep it
    across calls or to read its memory figures: ``MixSGACache(model.config)``, then pass it as
    ``past_key_values=``. The underlying ``mixsga._C.HeteroKVCache`` (``.hetero``) is created by the
    first forward that uses the cache, with the dtype and device of the model.

    Args:
        config: the model's config (its ``num_hidden_layers``, and the ``kv_cap`` of its mixSGA settings), or
            the number of layers.
        kv_cap: hard per-sequence cap on the stored K/V, a share of the full K/V in [1/g_max, 1]: every
            prefix of every sequence stays within it in every layer; tokens the cap does not allow are routed
            to coarser experts, nothing is refused (``HeteroKVCacheOptions.kv_cap``). None (default): the
            model's saved cap (``mixsga.hf.set_kv_cap``), else none.
        max_length: with a cap, the most tokens a sequence will hold (prompt included; ``generate`` passes its
            own): the pools are then reserved once at their exact size (``HeteroKVCache.reserve``), so the
            allocated bytes meet the cap too; a sequence cannot grow past it. None (default): pools grow.

    Memory, two quantities with two names (the same names as on ``HeteroKVCache``):

    * *stored*: ``bytes_stored()`` is the compact size, sum over stored tokens and layers of
      ``2 * (Hkv / g_e) * d * elem_size`` (K and V), plus each token's expert id in ceil(log2 E) bits
      (the index positions are rebuilt from; whole bytes per sequence and layer);
      ``stored_bytes_per_token()`` divides it by the tokens stored per layer. ``bytes_per_token()`` is
      the same figure. Compare it with ``full_bytes_per_token()``, what an uncompressed cache of the
      same model needs (``2 * Hkv * d * elem_size`` per layer).
    * *allocated*: ``bytes_allocated()`` adds the growth slack and the rectangular padding of batched
      pools; ``allocated_bytes_per_token()`` divides it by the same token count (it can exceed the
      full figure right after a short prompt grew the pools).
    """

    def __init__(self, config=None, num_layers: int | None = None, kv_cap: float | None = None,
                 max_length: int | None = None) -> None:
        if kv_cap is None and config is not None and not isinstance(config, int):
            kv_cap = saved_kv_cap(config)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length: must be an int >= 1 or None, got {max_length!r}")
            if kv_cap is None:
                raise ValueError(f"max_length: reserving the pools (max_length = {max_length}) needs a kv_cap; without "
                                 "one any token may be stored at the finest expert")
        if num_layers is None:
            if config is None:
                raise TypeError("MixSGACache: give the model config or num_layers")
            num_layers = config if isinstance(config, int) else config.get_text_config(decoder=True).num_hidden_layers
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers!r}")
        super().__init__(layers=[MixSGACacheLayer(i) for i in range(num_layers)])
        self.hetero: _C.HeteroKVCache | None = None
        self.kv_cap = kv_cap  # checked against the group sizes when the first layer creates the HeteroKVCache
        self.max_length = max_length

    # --- used by the mixSGA attention layers -------------------------------------------------------------
    def hetero_for(self, attention, batch_size: int = 1) -> _C.HeteroKVCache:
        """The HeteroKVCache, created on first use from a mixSGA attention layer's ``cache_options`` (and, with
        ``max_length``, reserved for ``batch_size`` sequences at the layer's serving ratios, moved to the cap's
        budget with ``ratios_for_budget`` when they exceed it)."""
        layer_idx = getattr(attention, "layer_idx", None)
        if isinstance(layer_idx, int) and not 0 <= layer_idx < len(self.layers):
            raise IndexError(
                f"MixSGACache: built for {len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}, but the "
                f"model has more (attention layer_idx = {layer_idx}); create it with the model's config, "
                "MixSGACache(model.config), or with num_layers >= the number of attention layers"
            )
        if self.hetero is None:
            options = attention.cache_options(num_layers=len(self.layers))
            cap = check_kv_cap(self.kv_cap, attention.group_sizes)
            options.kv_cap = 0.0 if cap is None else cap
            hetero = _C.HeteroKVCache(options)
            if self.max_length is not None:
                groups, ratios = list(attention.group_sizes), list(attention.ratios)
                if sum(r / g for r, g in zip(ratios, groups)) > cap:
                    ratios = _C.ratios_for_budget(groups, ratios, cap)
                hetero.reserve(batch_size, self.max_length, ratios)
            self.hetero = hetero
        return self.hetero

    def advance(self, layer_idx: int, columns: int) -> None:
        """Counts ``columns`` new mask columns as seen by ``layer_idx`` (after the layer stored them)."""
        self.layers[layer_idx].columns += columns

    # --- transformers Cache API --------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return -1 if self.hetero is None or self.hetero.batch_size == 0 else self.hetero.batch_size

    def reset(self) -> None:
        super().reset()
        # A reserved cache is rebuilt (and reserved again) by the next forward; otherwise the pools are emptied.
        if self.hetero is not None and self.max_length is not None:
            self.hetero = None
        elif self.hetero is not None:
            self.hetero.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence beam_idx[i] becomes sequence i."""
        if self._stored():
            self.hetero.reorder(beam_idx.to(device="cpu", dtype=torch.long))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._stored():
            self.hetero.reorder(indices.to(device="cpu", dtype=torch.long))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._stored():
            self.hetero.reorder(torch.arange(self.hetero.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` columns (transformers >= 5 convention); a positive value is
        the older convention, the number of columns to keep. Every sequence must hold the same number of
        real tokens (the case transformers crops in: assisted decoding, batch 1), since the compact pools
        store real tokens only and their positions, not mask columns."""
        columns = self.get_seq_length()
        keep = columns + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, columns)
        if keep < 0:
            raise ValueError(f"tokens_to_remove: the cache holds {columns} columns, got {tokens_to_remove}")
        removed = columns - keep
        if removed == 0:
            return
        if self._stored():
            lengths = self.hetero.seq_lengths(0)
            if not bool((lengths == lengths[0]).all()):
                raise NotImplementedError(
                    "MixSGACache.crop: the sequences hold different numbers of real tokens "
                    f"({lengths.tolist()}, left padding); crop needs equal ones"
                )
            self.hetero.crop(max(0, int(lengths[0]) - removed))
        for layer in self.layers:
            layer.columns = max(0, layer.columns - removed)

    # --- memory ---------------------------------------------------------------------------------------------
    def bytes_stored(self) -> int:
        """Compact size of the stored tokens: 2 * (Hkv/g_e) * d * elem per token and layer, plus each token's
        expert id (ceil(log2 E) bits per layer, rounded up to bytes per sequence and layer)."""
        return 0 if self.hetero is None else int(self.hetero.bytes_stored())

    def bytes_allocated(self) -> int:
        """Bytes allocated by the pools (compact size plus growth slack and batch padding)."""
        return 0 if self.hetero is None else int(self.hetero.bytes_used())

    def stored_bytes_per_token(self) -> float:
        """``bytes_stored()`` per stored token, over all layers (0 when empty): the compact cost of a token."""
        tokens = self.tokens_stored()
        return 0.0 if tokens == 0 else self.bytes_stored() / tokens

    def allocated_bytes_per_token(self) -> float:
        """``bytes_allocated()`` per stored token, over all layers (0 when empty): growth slack included."""
        tokens = self.tokens_stored()
        return 0.0 if tokens == 0 else self.bytes_allocated() / tokens

    def bytes_per_token(self) -> float:
        """The same as ``stored_bytes_per_token()`` (compact bytes per stored token)."""
        return self.stored_bytes_per_token()

    def worst_case_bytes(self, max_length: int | None = None, batch_size: int = 1) -> int:
        """The most ``bytes_stored()`` can reach with ``batch_size`` sequences of ``max_length`` tokens (None: the
        cache's own ``max_length``), for planning memory: the cap (1 without one) times the full K/V, plus the
        index bits. Needs the HeteroKVCache (created by the first forward)."""
        if self.hetero is None:
            raise RuntimeError("MixSGACache: worst_case_bytes needs the model's cache options; run a forward first")
        length = self.max_length if max_length is None else max_length
        if length is None:
            raise ValueError("max_length: give it (the cache was not created with one)")
        return int(self.hetero.worst_case_bytes(length, batch_size))

    def full_bytes_per_token(self) -> int:
        """Bytes per token of an uncompressed cache of the same model (all layers)."""
        return 0 if self.hetero is None else int(self.hetero.full_bytes_per_token())

    def tokens_stored(self) -> int:
        """Real (non-padding) tokens stored per layer, summed over the batch."""
        return 0 if not self._stored() else int(self.hetero.seq_lengths(0).sum())

    def token_counts(self, layer_idx: int = 0) -> torch.Tensor:
        """[E] int64 tokens stored per expert in one layer."""
        if self.hetero is None:
            raise RuntimeError("MixSGACache: nothing stored yet")
        return self.hetero.token_counts(layer_idx)

    def decode_ratios(self) -> torch.Tensor:
        """[E] float64 realised expert ratios of the decode steps, over all layers."""
        if self.hetero is None:
            raise RuntimeError("MixSGACache: nothing stored yet")
        return self.hetero.decode_ratios(-1)

    def _stored(self) -> bool:
        return self.hetero is not None and self.hetero.batch_size > 0

    def __repr__(self) -> str:
        return (
            f"MixSGACache(layers={len(self.layers)}, columns={self.get_seq_length()}, "
            f"tokens={self.tokens_stored()}, bytes_stored={self.bytes_stored()})"
        )
