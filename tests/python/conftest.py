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


# DEVICES lives in device_params.py: test modules import it from there, since a module named
# `conftest` is ambiguous once a sub-suite (hf/, train/) has its own conftest.py.
from device_params import DEVICES  # noqa: E402,F401
