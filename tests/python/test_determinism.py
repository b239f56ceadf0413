"""Determinism on CPU: with the same seed and inputs, routing, outputs, the aux loss and every gradient
are bitwise identical across runs and across intra-op thread counts (README, "Determinism")."""

from __future__ import annotations

import pytest
import torch

import mixsga  # noqa: F401  (loads the ops)
from mixsga import _C
from mixsga.nn import MixSGAAttention

IMPLS = {"python": MixSGAAttention, "cpp": _C.MixSGAAttention}


def run_once(impl: str, threads: int, dtype=torch.float32):
    """Builds a layer from a fixed seed, runs forward + backward; returns every result as bytes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1234)
        layer = IMPLS[impl](64, 8, 4, group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), bias=True)
        layer.to(dtype)  # (in place; the C++ module's to() returns None)
        # Long enough that the CPU kernels split work across threads (at::parallel_for grains).
        x = torch.randn(3, 96, 64, dtype=dtype, requires_grad=True)
        mask = torch.ones(3, 96, dtype=torch.long)
        mask[1, :17] = 0
        routed = layer.forward_with_routing(x, attention_mask=mask)
        out, aux, expert_idx = routed[0], routed[1], routed[2]
        (out.square().sum() + aux).backward()
        results = {"expert_idx": expert_idx, "output": out, "aux_loss": aux, "grad_x": x.grad}
        results.update({f"grad_{n}": p.grad for n, p in layer.named_parameters()})
        return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).clone() for k, v in results.items()}
    finally:
        torch.set_num_threads(previous)


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("impl", IMPLS)
def test_two_runs_are_bitwise_identical(impl):
    assert_bitwise_equal(run_once(impl, threads=1), run_once(impl, threads=1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_any_bit(impl, dtype):
    assert_bitwise_equal(run_once(impl, threads=1, dtype=dtype), run_once(impl, threads=2, dtype=dtype))


def test_decode_with_the_cache_is_bitwise_identical_across_thread_counts():
    def decode(threads: int):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(7)
            layer = MixSGAAttention(64, 8, 4)
            cache = _C.HeteroKVCache(layer.cache_options(num_layers=1))
            prompt = torch.randn(2, 40, 64)
            outs = [layer(prompt, cache=cache, layer_idx=0)[0]]
            for _ in range(4):
                outs.append(layer(torch.randn(2, 1, 64), cache=cache, layer_idx=0)[0])
            return [o.detach().view(torch.uint8).clone() for o in outs]
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(decode(1), decode(2)):
        assert torch.equal(a, b)
