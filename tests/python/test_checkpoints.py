"""Checkpoints from Python: state_dict / torch.save round trips of the modules keep every parameter bit
for bit (Python module, C++ module through mixsga._C, and between the two), and a state dict with
missing or extra router weights is a clear error naming the keys (strict loading, the default)."""

from __future__ import annotations

import pytest
import torch

import mixsga  # noqa: F401
from mixsga import _C
from mixsga.nn import MixSGAAttention

IMPLS = {"python": MixSGAAttention, "cpp": _C.MixSGAAttention}
OPTIONS = dict(group_sizes=(1, 4), ratios=(0.7, 0.3), bias=True, rope_theta=500000.0, aux_loss="bce",
               aux_alpha=0.25, prefill_routing="argmax")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_bits(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), f"{k} differs"


def make(impl: str, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = IMPLS[impl](32, 8, 4, **OPTIONS)
    if impl == "python":
        layer = layer.to(dtype)
    state = layer.state_dict()  # shares storage with the parameters, for both module kinds
    with torch.no_grad():  # bit patterns that value comparisons would not tell apart
        state["q_proj.weight"][0, 0] = -0.0
        state["router.proj.bias"][1] = float("nan")
    return layer


@pytest.mark.parametrize("src", IMPLS)
@pytest.mark.parametrize("dst", IMPLS)
def test_state_dict_round_trip_through_a_file_is_bit_for_bit(tmp_path, src, dst):
    saved = make(src, seed=1)
    torch.save(saved.state_dict(), tmp_path / "layer.pt")
    loaded = make(dst, seed=2)
    state = torch.load(tmp_path / "layer.pt", weights_only=True)
    loaded.load_state_dict(state)
    assert_same_bits(saved.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_state_dict_round_trip_keeps_the_dtype(tmp_path, dtype):
    saved = make("python", seed=3, dtype=dtype)
    torch.save(saved.state_dict(), tmp_path / "layer.pt")
    loaded = make("python", seed=4, dtype=dtype)
    loaded.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    assert_same_bits(saved.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("impl", IMPLS)
def test_missing_router_weights_are_named(impl):
    layer = make(impl, seed=5)
    state = {k: v for k, v in make(impl, seed=6).state_dict().items() if not k.startswith("router.")}
    exc = RuntimeError if impl == "python" else ValueError  # torch's strict load / the C++ module's
    with pytest.raises(exc, match=r"(?s)[Mm]issing.*router\.proj\.weight"):
        layer.load_state_dict(state)
    # (Both torch's strict load and the C++ binding copy the keys they have before reporting the
    # missing ones, so the layer is not checked for being unchanged.)


@pytest.mark.parametrize("impl", IMPLS)
def test_extra_router_weights_are_named(impl):
    layer = make(impl, seed=7)
    state = dict(make(impl, seed=8).state_dict())
    state["router.temperature"] = torch.ones(1)
    exc = RuntimeError if impl == "python" else ValueError
    with pytest.raises(exc, match=r"(?s)[Uu]nexpected.*router\.temperature"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("impl", IMPLS)
def test_router_weights_of_another_expert_count_are_named(impl):
    layer = make(impl, seed=9)
    state = dict(layer.state_dict())
    state["router.proj.weight"] = torch.zeros(3, 32)  # a 3-expert router into a 2-expert layer
    with pytest.raises((RuntimeError, ValueError), match=r"router\.proj\.weight"):
        layer.load_state_dict(state)
