"""Shared fixtures of the pytest suite. Tests run against the package on sys.path (ctest puts
<build>/python first on PYTHONPATH; an installed wheel works the same)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their references as plain modules

import mixsga  # noqa: E402


def pytest_report_header(config):
    return f"mixsga from {os.path.dirname(mixsga.__file__)}, library {mixsga.library_path()}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _cuda_param():
    if not torch.cuda.is_available():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device"))
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mixsga::grouped_kv_pool", "CUDA"):
        return pytest.param("cuda", marks=pytest.mark.skip(reason="libmixsga was built without CUDA kernels"))
    return "cuda"


#: Every device test runs on CPU, and on CUDA when a GPU and the CUDA kernels are both present.
DEVICES = ["cpu", _cuda_param()]
