"""The compact inference KV cache of mixSGA: ``HeteroKVCache`` and ``HeteroKVCacheOptions``.

These are the C++ classes themselves (``mixsga::HeteroKVCache``, include/mixsga/cache.h), bound with
pybind11; this module is their public Python home (``mixsga.HeteroKVCache``), instead of the private
``mixsga._C``.

A token routed to expert e is stored with only Hkv / g_e KV heads, in per-layer, per-expert pools
``[B, Hkv/g_e, T_e, d]``; padding is never stored. Positions belong to the caller and are kept compactly:
a sequence's stored tokens have consecutive positions, so the index is one start per sequence plus each
token's expert id in ceil(log2 E) bits (``index_bits_per_token()``); ``positions(layer)`` rebuilds them.
``append`` takes K/V at the full Hkv heads (a prefill, stored as group means), ``append_compact`` takes
them at the compact size (decode steps and chunks: never expanded). Typical use with the
Python or C++ attention layer::

    cache = mixsga.HeteroKVCache(layer.cache_options(num_layers=1))   # dtype / device of the layer
    out, _ = layer(prompt, cache=cache)                                # prefill (expert-choice routing)
    out, _ = layer(next_token, cache=cache)                            # decode (argmax routing)
    cache.stored_bytes_per_token(), cache.full_bytes_per_token()       # compact vs uncompressed

Memory figures: ``bytes_stored()`` / ``stored_bytes_per_token()`` (= ``bytes_per_token()``) count what the
stored tokens need; ``bytes_allocated()`` / ``allocated_bytes_per_token()`` count what the pools hold,
growth slack and batch padding included (``shrink_to_fit()`` drops the slack).

For ``model.generate()`` on a converted Hugging Face model use ``mixsga.hf.MixSGACache``, which wraps one
of these.
"""

from __future__ import annotations

from ._C import HeteroKVCache, HeteroKVCacheOptions

__all__ = ["HeteroKVCache", "HeteroKVCacheOptions"]
