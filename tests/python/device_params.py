"""Device parametrisation shared by the test modules (``from device_params import DEVICES``)."""

from __future__ import annotations

import pytest
import torch

import mixsga  # noqa: F401  (registers the ops whose CUDA kernels are looked up below)


def _cuda_param():
    if not torch.cuda.is_available():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device"))
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mixsga::grouped_kv_pool", "CUDA"):
        return pytest.param("cuda", marks=pytest.mark.skip(reason="libmixsga was built without CUDA kernels"))
    return "cuda"


#: Every device test runs on CPU, and on CUDA when a GPU and the CUDA kernels are both present.
DEVICES = ["cpu", _cuda_param()]
