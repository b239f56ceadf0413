"""Loads the compiled library.

mixsga._C (the pybind11 extension) links libmixsga, so importing it loads the one libmixsga that also
serves C++ users, and the ops register themselves with the dispatcher as it loads (torch.ops.mixsga.*).
libmixsga is never opened a second time by path: a second copy would try to register the mixsga op
namespace again and fail.
"""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before libmixsga resolves its symbols)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only by broken installs
    raise ImportError(
        "mixsga: the compiled extension mixsga._C could not be loaded "
        f"({error}). Build it with `make build` and put <build>/python on PYTHONPATH, or install the "
        "package with `pip install --no-build-isolation .` in the environment whose torch it should use."
    ) from error

if not hasattr(torch.ops.mixsga, "route_expert_choice"):  # pragma: no cover
    raise ImportError(f"mixsga: {_C.library_path()} loaded but registered no torch.ops.mixsga ops")


def library_path() -> str:
    """Absolute path of the loaded libmixsga shared library (link C++ code loaded into this process
    against this file, never against a second copy)."""
    return _C.library_path()
