"""mixsga: mixSGA attention (Song et al., EMNLP 2025) for PyTorch.

Tokens are routed, by a learned expert-choice router, to weight-shared grouped-attention KV experts with
different group sizes, so each token keeps as many KV heads as it deserves under a fixed average KV
budget.

``import mixsga`` loads the compiled library (the same libmixsga C++ users link), which registers the
ops ``torch.ops.mixsga.*``, and registers their fake kernels so torch.compile can trace them.

- ``mixsga.nn``: MixSGAAttention, ExpertChoiceRouter, SharedGroupKV (plain torch.nn.Modules).
- ``mixsga.ops``: typed entry points of the ops.
- ``mixsga.kv_fraction(group_sizes, ratios)``: the KV budget of a configuration.
- ``mixsga.hf`` (``import mixsga.hf``, needs transformers): convert Llama-family models, MixSGACache for
  ``generate``, aux loss, save/reload; ``mixsga.models``: load_gguf_llama (local GGUF files, offline).
- ``mixsga._C``: the C++ modules themselves (pybind11), for parity checks and C++-built models, and
  the compact inference cache ``HeteroKVCache``.
"""

import os as _os

from . import _fake_kernels, _library
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

__all__ = ["cmake_prefix_path", "kv_fraction", "library_path", "nn", "ops", "__version__"]
