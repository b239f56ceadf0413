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


def test_bad_cache_arguments():
    """Every HeteroKVCache entry point: bad options, appends, reorder, crop and layer indices; a rejected
    call leaves the cache usable."""
    opts = lambda **kw: _C.HeteroKVCacheOptions(**{**dict(num_layers=2, num_kv_heads=4, head_dim=8,  # noqa: E731
                                                          group_sizes=[1, 2, 4]), **kw})
    expect(ValueError, lambda: _C.HeteroKVCache(opts(num_layers=0)), "num_layers", "got 0")
    expect(ValueError, lambda: _C.HeteroKVCache(opts(num_layers=2**40)), "num_layers", str(2**40))
    expect(ValueError, lambda: _C.HeteroKVCache(opts(head_dim=-8)), "head_dim", "-8")
    expect(ValueError, lambda: _C.HeteroKVCache(opts(head_dim=2**62)), "head_dim", str(2**62))
    expect(ValueError, lambda: _C.HeteroKVCache(opts(group_sizes=[1, 3])), "group_sizes", r"group_sizes\[1\] = 3")
    expect(ValueError, lambda: _C.HeteroKVCache(opts(growth=float("nan"))), "growth", "nan")
    expect(TypeError, lambda: _C.HeteroKVCache(opts(dtype=torch.long)), "dtype", "Long|int64")
    cache = _C.HeteroKVCache(opts())
    k, idx = torch.randn(2, 3, 4, 8), torch.randint(0, 3, (2, 3))
    cache.append(0, k, k, idx)
    expect(ValueError, lambda: cache.append(0, torch.randn(2, 3, 2, 8), k, idx), "keys", r"\[2, 3, 2, 8\]")
    expect(TypeError, lambda: cache.append(0, k.double(), k.double(), idx), "keys", "Double|float64")
    expect(ValueError, lambda: cache.append(0, k, k, idx + 1), "expert_idx", r"\[0, 3\)")
    expect(ValueError, lambda: cache.append(0, k, k, idx, torch.ones(2, 4)), "valid", r"\[2, 4\]")
    expect(ValueError, lambda: cache.append(0, k[:1], k[:1], idx[:1]), "batch size")
    expect(ValueError, lambda: cache.append(0, k, k.to("meta"), idx), "values", "meta")
    expect(IndexError, lambda: cache.append(2, k, k, idx), "layer", r"\[0, 2\)", "got 2")
    expect(IndexError, lambda: cache.keys(-1), "layer", "got -1")
    expect(IndexError, lambda: cache.reorder(torch.tensor([0, 2])), "beam_idx", r"\[0, 2\]")
    expect(TypeError, lambda: cache.reorder(torch.tensor([0.0, 1.0])), "beam_idx", "integer")
    expect(ValueError, lambda: cache.crop(-1), "length", "got -1")
    assert cache.lengths(0).sum().item() == 6  # nothing of the rejected calls was stored


def test_emptied_cache_takes_a_new_batch():
    """reorder() to zero sequences, then a new batch: regression of a fuzz finding (tests/fuzz/corpus)."""
    cache = _C.HeteroKVCache(_C.HeteroKVCacheOptions(num_layers=1, num_kv_heads=4, head_dim=8, group_sizes=[1, 2]))
    k = torch.randn(2, 3, 4, 8)
    cache.append(0, k, k, torch.randint(0, 2, (2, 3)))
    cache.reorder(torch.empty(0, dtype=torch.long))
    k3 = torch.randn(3, 2, 4, 8)
    cache.append(0, k3, k3, torch.zeros(3, 2, dtype=torch.long))
    assert cache.lengths(0).tolist() == [[2, 0]] * 3
    torch.testing.assert_close(cache.keys(0)[0], k3.transpose(1, 2))


def test_huge_and_overflowing_sizes_are_clear_errors():
    """Sizes that no tensor data can have (found by tests/fuzz) are ValueErrors naming the argument."""
    expect(ValueError, lambda: ops.expert_permutation(torch.zeros(3, dtype=torch.long), 2**62),
           "num_experts", str(2**62))
    empty = torch.empty(2**62, 2, 0, 4, 2)  # a valid empty tensor whose token count overflows int64
    expect(ValueError, lambda: ops.grouped_kv_pool(empty, torch.zeros(2**62, 2, 0, dtype=torch.long), [1, 2]),
           "kv", "too large")
    x = torch.empty(0, 2**62, 1)
    expect(ValueError, lambda: ops.grouped_kv_proj(x, torch.randn(8, 1), None, torch.zeros(0, 2**62, dtype=torch.long),
                                                   [1, 2], 2), "x", "too large")


def test_backward_op_checks_grad_out():
    x, w, idx = torch.randn(2, 5, 8), torch.randn(8, 8), torch.randint(0, 3, (2, 5))
    grad = torch.randn(2, 5, 4, 2)
    expect(TypeError, lambda: ops._grouped_kv_proj_backward(grad.half(), x, w, idx, [1, 2, 4], 2),
           "grad_out", "float|Float", "Half|float16")
    expect(ValueError, lambda: ops._grouped_kv_proj_backward(grad[:, :4], x, w, idx, [1, 2, 4], 2),
           "grad_out", r"\[2, 5, 4, 2\]", r"\[2, 4, 4, 2\]")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_inputs_are_documented_behaviour(impl, bad):
    """NaN/Inf hidden states raise nothing: routing still gives every token one expert with the capacity
    counts (NaN scores rank lowest). The non-finite values reach every output of their own sequence
    (even queries before the token: attention masks by adding -inf to the scores, and NaN + -inf is NaN),
    never another sequence of the batch; grouped_kv_pool keeps them within the token."""
    torch.manual_seed(0)
    layer = IMPLS[impl](32, 4, 4)
    x = torch.randn(2, 10, 32)
    x[0, 9] = bad
    out, aux, expert_idx, target_idx = layer.forward_with_routing(x)
    for b in range(2):
        assert torch.equal(torch.bincount(expert_idx[b], minlength=3), torch.tensor([3, 1, 6]))
    assert torch.isfinite(out[1]).all()
    assert not torch.isfinite(out[0, 9]).all()
    kv = torch.randn(1, 3, 4, 2)
    kv[0, 1, 0, 0] = bad
    pooled = ops.grouped_kv_pool(kv, torch.tensor([[2, 2, 2]]), [1, 2, 4])
    assert torch.isfinite(pooled[0, [0, 2]]).all() and not torch.isfinite(pooled[0, 1]).all()


def test_zero_width_rows_scatter_and_gather():
    """Rows of zero bytes (x [N, 0]) are a no-op, not a memcpy from a null pointer (a fuzz finding)."""
    perm = torch.tensor([2, 0, 1])
    for fn in (ops.expert_scatter, ops.expert_gather):
        assert fn(torch.empty(3, 0), perm).shape == (3, 0)
