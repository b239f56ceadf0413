"""Bad input raises a Python exception (never a crash) whose message names the argument and the value
seen: from the Python modules, from the C++ modules through mixsga._C, from the ops, and from the fake
kernels while torch.compile traces."""

from __future__ import annotations

import re

import pytest
import torch

import mixsga
from mixsga import _C
from mixsga.nn import ExpertChoiceRouter, MixSGAAttention, SharedGroupKV

IMPLS = {"python": MixSGAAttention, "cpp": _C.MixSGAAttention}
ops = torch.ops.mixsga


def expect(exc_type, fn, *fragments):
    """fn() raises exc_type with every fragment (a regex) in its message."""
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"


BAD_OPTIONS = [
    (dict(ratios=(0.5, 0.2, 0.2)), ["ratios", "sum to 1", r"0\.(9|8999)"]),
    (dict(ratios=(-0.1, 0.5, 0.6)), ["ratios", r"ratios\[0\] = -0.1"]),
    (dict(ratios=(0.5, 0.5)), ["ratios", "expected 3 ratios"]),
    (dict(group_sizes=(1, 4, 2)), ["group_sizes", "strictly increasing", r"\[1, 4, 2\]"]),
    (dict(group_sizes=(1, 2, 3)), ["group_sizes", "divide the number of KV heads", r"group_sizes\[2\] = 3"]),
    (dict(group_sizes=()), ["group_sizes", "empty"]),
    (dict(hidden_size=30), ["num_heads", "hidden_size", "30"]),
    (dict(num_kv_heads=3), ["num_kv_heads", "got 3"]),
    (dict(hidden_size=0), ["hidden_size", "got 0"]),
    (dict(head_dim=7), ["head_dim", "even", "7"]),
    (dict(head_dim=0), ["head_dim", "0"]),
    (dict(aux_loss="mse"), ["aux_loss", "mse"]),
    (dict(prefill_routing="greedy"), ["prefill_routing", "greedy"]),
    (dict(aux_alpha=-1.0), ["aux_alpha", "-1"]),
    (dict(rope_theta=0.0), ["rope_theta", "0"]),
    (dict(attention_dropout=1.0), ["attention_dropout", "1"]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options,fragments", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_options(impl, options, fragments):
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=4)
    args.update(options)
    expect(ValueError, lambda: IMPLS[impl](**args), *fragments)


def test_bad_router_and_shared_group_kv_options():
    for make in (ExpertChoiceRouter, _C.ExpertChoiceRouter):
        expect(ValueError, lambda: make(16, (0.7, 0.7)), "ratios", "sum to 1")
        expect(ValueError, lambda: make(0), "hidden_size", "0")
        expect(ValueError, lambda: make(16, (0.5, 0.5), "hinge"), "aux_loss", "hinge")
    for make in (SharedGroupKV, _C.SharedGroupKV):
        expect(ValueError, lambda: make(16, 4, 8, (2, 1)), "group_sizes", "strictly increasing")
        expect(ValueError, lambda: make(16, 6, 8, (1, 4)), "group_sizes", r"group_sizes\[1\] = 4")
        expect(ValueError, lambda: make(16, 4, -8), "head_dim", "-8")


def bad_inputs():
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    all_padding = mask.clone()
    all_padding[1] = 0
    return [
        ("rank", ValueError, (torch.randn(2, 32),), ["hidden_states", r"\[2, 32\]"]),
        ("width", ValueError, (torch.randn(2, 5, 31),), ["hidden_states", r"\[2, 5, 31\]", "32"]),
        ("dtype", TypeError, (x.double(),), ["hidden_states", "(float64|Double)"]),
        ("int", TypeError, (torch.ones(2, 5, 32, dtype=torch.long),), ["hidden_states", "(int64|Long)"]),
        ("device", ValueError, (torch.randn(2, 5, 32, device="meta"),), ["hidden_states", "meta"]),
        ("mask shape", ValueError, (x, torch.ones(2, 4)), ["attention_mask", r"\[2, 4\]"]),
        ("mask rank", ValueError, (x, torch.ones(10)), ["attention_mask", r"\[10\]"]),
        ("mask device", ValueError, (x, torch.ones(2, 5, device="meta")), ["attention_mask", "meta"]),
        ("all padding", ValueError, (x, all_padding), ["attention_mask", "sequence 1 has no valid token"]),
        ("positions", ValueError, (x, None, torch.arange(4)), ["position_ids", r"\[4\]"]),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_forward_inputs(impl, case):
    _, exc, args, fragments = case
    layer = IMPLS[impl](32, 4, 4)
    expect(exc, lambda: layer(*args), *fragments)


def test_bad_op_arguments():
    kv, idx = torch.randn(2, 5, 4, 3), torch.randint(0, 3, (2, 5))
    x, w = torch.randn(2, 5, 8), torch.randn(8, 8)
    cases = [
        (ValueError, lambda: ops.route_expert_choice(torch.rand(5, 3), [0.3, 0.1, 0.6]), ["scores", r"\[5, 3\]"]),
        (ValueError, lambda: ops.route_expert_choice(torch.rand(1, 5, 3), [0.3, 0.1, 0.5]), ["ratios", "sum to 1"]),
        (ValueError, lambda: ops.route_expert_choice(torch.rand(1, 5, 3), [0.5, 0.5]), ["ratios", "expected 3"]),
        (ValueError, lambda: ops.route_expert_choice(torch.rand(2, 5, 3), [0.3, 0.1, 0.6], torch.ones(2, 4)),
         ["valid_mask", r"\[2, 4\]"]),
        (TypeError, lambda: ops.route_expert_choice(torch.ones(1, 5, 3, dtype=torch.long), [0.3, 0.1, 0.6]),
         ["scores", "Long|int64"]),
        (ValueError, lambda: ops.grouped_kv_pool(kv, idx + 1, [1, 2, 4]), ["expert_idx", r"\[0, 3\)", r"\[1, 3\]"]),
        (TypeError, lambda: ops.grouped_kv_pool(kv, idx.float(), [1, 2, 4]), ["expert_idx", "integer"]),
        (ValueError, lambda: ops.grouped_kv_pool(kv, idx[:, :4], [1, 2, 4]), ["expert_idx", r"\[2, 4\]"]),
        (ValueError, lambda: ops.grouped_kv_pool(kv, idx, [1, 3]), ["group_sizes", r"group_sizes\[1\] = 3"]),
        (TypeError, lambda: ops.grouped_kv_pool(kv.long(), idx, [1, 2, 4]), ["kv", "Long|int64"]),
        (ValueError, lambda: ops.grouped_kv_proj(x, torch.randn(8, 7), None, idx, [1, 2, 4], 2),
         ["weight", r"\[8, 7\]"]),
        (ValueError, lambda: ops.grouped_kv_proj(x, w, None, idx, [1, 2, 4], 3), ["head_dim", "got 3"]),
        (ValueError, lambda: ops.grouped_kv_proj(x, w, torch.randn(7), idx, [1, 2, 4], 2), ["bias", r"\[7\]"]),
        (TypeError, lambda: ops.grouped_kv_proj(x, w.double(), None, idx, [1, 2, 4], 2), ["weight", "Double|float64"]),
        (ValueError, lambda: ops.expert_permutation(idx, 0), ["num_experts", "got 0"]),
        (ValueError, lambda: ops.expert_scatter(torch.randn(3, 2), torch.tensor([0, 0, 1])),
         ["permutation", "appears twice"]),
        (ValueError, lambda: ops.expert_gather(torch.randn(3, 2), torch.tensor([0, 1, 5])), ["permutation", "5"]),
        (TypeError, lambda: ops.expert_gather(torch.randn(3, 2), torch.tensor([0, 1, 2], dtype=torch.int32)),
         ["permutation", "int64", "Int|int32"]),
        (ValueError, lambda: mixsga.kv_fraction((1, 2, 4), (0.3, 0.1)), ["ratios", "expected 3"]),
        (ValueError, lambda: _C.kv_fraction((1, 2, 4), (0.3, 0.1)), ["ratios", "expected 3"]),
    ]
    if hasattr(ops, "hetero_decode_attention"):
        q, pool = torch.randn(1, 4, 8), [torch.randn(1, 4, 3, 8)]
        cases.append((ValueError, lambda: ops.hetero_decode_attention(q, pool, pool, torch.tensor([[4]]), 4),
                      ["lengths", r"\[0, 3\]", r"\[4, 4\]"]))
        cases.append((ValueError, lambda: ops.hetero_decode_attention(q, pool, pool, torch.tensor([[1]]), 3),
                      ["num_kv_heads", "got 3"]))
    for exc, fn, fragments in cases:
        expect(exc, fn, *fragments)


def test_fake_kernels_raise_the_same_errors_while_tracing():
    """Under torch.compile the fake kernels check shapes at trace time, with the kernels' messages."""
    kv, idx = torch.randn(2, 5, 4, 3), torch.randint(0, 3, (2, 4))

    @torch.compile(backend="eager", fullgraph=True)
    def pool(kv, idx):
        return ops.grouped_kv_pool(kv, idx, [1, 2, 4])

    expect(Exception, lambda: pool(kv, idx), "expert_idx", r"expected shape \[2, 5\]", r"got \[2, 4\]")
    torch._dynamo.reset()
