"""mixsga: mixSGA attention (Song et al., EMNLP 2025) for PyTorch.

Tokens are routed, by a learned expert-choice router, to weight-shared grouped-attention KV experts with
different group sizes, so each token keeps as many KV heads as it deserves under a fixed average KV
budget (docs/METHOD.md; the quality extensions E1-E3 are options, the paper's method the default).

``import mixsga`` loads the compiled library (the same libmixsga C++ users link), which registers the
ops ``torch.ops.mixsga.*``, and registers their fake kernels so torch.compile can trace them.

- ``mixsga.nn``: MixSGAAttention, ExpertChoiceRouter, SharedGroupKV (plain torch.nn.Modules);
  ``mixsga.clear_kv_weight_cache``.
- ``mixsga.HeteroKVCache`` / ``mixsga.HeteroKVCacheOptions``: the compact inference cache (the C++ class).
- ``mixsga.ops``: typed entry points of the ops.
- ``mixsga.kv_fraction(group_sizes, ratios)``: the KV budget of a configuration;
  ``ratios_for_budget`` and ``fit_decode_offsets``: another budget at inference (``set_routing`` of a layer).
- ``mixsga.hf`` (``import mixsga.hf``, needs transformers): convert Llama-family models, MixSGACache for
  ``generate``, aux loss, save/reload; ``mixsga.models``: load_gguf_llama (local GGUF files, offline).
- ``mixsga._C``: the C++ modules themselves (pybind11), for parity checks and C++-built models.
"""

import os as _os

from . import _fake_kernels, _library
from ._budget import fit_decode_offsets, ratios_for_budget
from ._kv_fraction import kv_fraction
from ._library import library_path

__version__ = "0.1.0"

#: For C++ code built against an installed (pip) mixsga: add this to CMAKE_PREFIX_PATH, together with
#: torch.utils.cmake_prefix_path, and find_package(mixsga) finds the very library Python loaded. None
#: when running from a build tree (use `make install` there).
cmake_prefix_path: str | None = (
    _os.path.dirname(__file__) if _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "lib", "cmake")) else None
)

_fake_kernels.register()

from . import nn, ops  # noqa: E402  (needs the ops registered)
from .cache import HeteroKVCache, HeteroKVCacheOptions  # noqa: E402
from .nn.shared_group_kv import clear_kv_weight_cache  # noqa: E402

__all__ = [
    "HeteroKVCache",
    "HeteroKVCacheOptions",
    "cmake_prefix_path",
    "clear_kv_weight_cache",
    "fit_decode_offsets",
    "kv_fraction",
    "library_path",
    "nn",
    "ops",
    "ratios_for_budget",
    "__version__",
]
