"""hetero_cache_attention: L new queries against the compact per-expert pools, causal by stored positions.

Against an independent float64 reference written here (pools expanded to Hq heads, masked softmax), L = 1
against hetero_decode_attention, causality by positions (not by slot order), padding slots and unequal
lengths, empty pools, queries that see nothing, bad input, opcheck, the refused backward; and the two
attention layers: a chunk after cached tokens runs through the op without forming expanded K/V and still
equals the full forward under the same routing.
"""

import pytest
import torch

import mixsga
from mixsga import _C, ops

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.mixsga, "hetero_cache_attention"), reason="library built without hetero_cache_attention"
)


def reference(q, query_positions, k_pools, v_pools, key_positions, lengths, num_kv_heads, scale=None):
    """Every pool repeated out to Hq heads (query head h reads KV head h // (Hq // Hkv), which is compact
    head (h // (Hq // Hkv)) // g_e), then one softmax over the visible slots, in float64."""
    B, L, Hq, d = q.shape
    rep = Hq // num_kv_heads
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(B, L, Hq, d, dtype=torch.float64)
    for b in range(B):
        keys, values, positions = [], [], []
        for K, V, P, n in zip(k_pools, v_pools, key_positions, lengths[b].tolist()):
            g = num_kv_heads // K.shape[1]
            keys.append(K[b, :, :n].double().repeat_interleave(g, 0).repeat_interleave(rep, 0))  # [Hq, n, d]
            values.append(V[b, :, :n].double().repeat_interleave(g, 0).repeat_interleave(rep, 0))
            positions.append(P[b, :n].long())
        keys, values, positions = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(positions)
        for t in range(L):
            visible = positions <= int(query_positions[b, t])
            if not bool(visible.any()):
                continue  # defined as zeros
            s = torch.einsum("hnd,hd->hn", keys[:, visible], q[b, t].double()) * scale
            out[b, t] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), values[:, visible])
    return out


def make_inputs(B=3, L=5, Hq=8, Hkv=4, d=16, groups=(1, 2, 4), capacity=(7, 70, 3), dtype=torch.float64, seed=0,
                shuffle=True):
    """Pools with spare capacity past each sequence's length (filled with NaN: never read) and stored
    positions that are a shuffled 0..n-1 over all pools, so slot order and position order differ. The L
    queries sit at the last L positions of each sequence (a chunk already appended to the cache)."""
    gen = torch.Generator().manual_seed(seed)
    E = len(groups)
    lengths = torch.stack([torch.randint(0, c + 1, (B,), generator=gen) for c in capacity], 1)  # [B, E]
    k_pools, v_pools, key_positions = [], [], []
    for c, g in zip(capacity, groups):
        k_pools.append(torch.full((B, Hkv // g, c, d), float("nan"), dtype=torch.float64))
        v_pools.append(torch.full((B, Hkv // g, c, d), float("nan"), dtype=torch.float64))
        key_positions.append(torch.full((B, c), 10**6, dtype=torch.int32))
    query_positions = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(lengths[b].sum())
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        start = 0
        for e in range(E):
            m = int(lengths[b, e])
            k_pools[e][b, :, :m] = torch.randn(Hkv // groups[e], m, d, generator=gen, dtype=torch.float64)
            v_pools[e][b, :, :m] = torch.randn(Hkv // groups[e], m, d, generator=gen, dtype=torch.float64)
            key_positions[e][b, :m] = order[start : start + m].int()
            start += m
        query_positions[b] = torch.arange(n - L, n)
    q = torch.randn(B, L, Hq, d, generator=gen, dtype=torch.float64)
    cast = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    return q.to(dtype), query_positions, cast(k_pools), cast(v_pools), key_positions, lengths, Hkv


@pytest.mark.parametrize(
    "shape",
    [
        dict(),  # GQA, three pools, a pool longer than one 64-slot key block
        dict(L=13, Hq=4, Hkv=4),  # MHA, more queries than one 8-query block
        dict(B=2, L=1, Hq=16, Hkv=4, d=8, groups=(1, 4), capacity=(5, 130)),
        dict(B=1, L=9, Hq=6, Hkv=2, d=5, groups=(1, 2), capacity=(40, 40)),  # odd d: no 16-lane body
    ],
)
def test_matches_float64_reference(shape):
    args = make_inputs(**shape)
    got = ops.hetero_cache_attention(*args)
    assert got.shape == args[0].shape and got.dtype == torch.float64 and got.is_contiguous()
    torch.testing.assert_close(got, reference(*args), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.hetero_cache_attention(*args, 0.37), reference(*args, 0.37), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_matches_reference(dtype, tol):
    args = make_inputs(dtype=dtype)
    # The reference sees the same rounded inputs; only the kernel's accumulation and output rounding differ.
    want = reference(*args)
    got = ops.hetero_cache_attention(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_one_query_equals_hetero_decode_attention():
    q, _, k, v, pos, lengths, Hkv = make_inputs(B=4, L=1, capacity=(9, 80, 6))
    # The decode step's query sees every stored token: its position is past all of them.
    after_all = torch.full((4, 1), 10**5, dtype=torch.long)
    got = ops.hetero_cache_attention(q, after_all, k, v, pos, lengths, Hkv)
    want = ops.hetero_decode_attention(q[:, 0], k, v, lengths, Hkv)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-12, atol=1e-12)
    f32 = [t.float() for t in k], [t.float() for t in v]
    got32 = ops.hetero_cache_attention(q.float(), after_all, *f32, pos, lengths, Hkv)
    torch.testing.assert_close(got32[:, 0], ops.hetero_decode_attention(q[:, 0].float(), *f32, lengths, Hkv),
                               rtol=1e-5, atol=1e-6)


def test_causal_by_stored_positions_not_slots():
    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=2, L=4, seed=3)
    out = ops.hetero_cache_attention(q, qpos, k, v, pos, lengths, Hkv)
    # Rewriting every stored token at a position after query t leaves outputs 0..t unchanged, and
    # changes the later ones.
    for t in range(4):
        k2, v2 = [x.clone() for x in k], [x.clone() for x in v]
        for e in range(len(k)):
            later = pos[e].long() > qpos[:, t : t + 1]  # [B, T_e]
            k2[e].masked_fill_(later[:, None, :, None], 3.0)
            v2[e].masked_fill_(later[:, None, :, None], 100.0)
        out2 = ops.hetero_cache_attention(q, qpos, k2, v2, pos, lengths, Hkv)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=0)
        if t < 3:
            assert not torch.allclose(out2[:, t + 1 :], out[:, t + 1 :])


def test_padding_slots_and_unequal_lengths_are_ignored():
    # make_inputs fills every slot past a sequence's length with NaN and position 10**6.
    args = make_inputs(B=4, L=3, seed=5)
    lengths = args[5]
    assert len(set(lengths.sum(1).tolist())) > 1, "want sequences of different lengths"
    got = ops.hetero_cache_attention(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(*args), rtol=1e-12, atol=1e-12)
    # Each sequence alone gives its own rows of the batched result.
    q, qpos, k, v, pos, lengths, Hkv = args
    for b in range(4):
        one = ops.hetero_cache_attention(q[b : b + 1], qpos[b : b + 1], [x[b : b + 1] for x in k],
                                         [x[b : b + 1] for x in v], [p[b : b + 1] for p in pos], lengths[b : b + 1], Hkv)
        torch.testing.assert_close(one, got[b : b + 1], rtol=0, atol=0)


def test_empty_pools_and_queries_that_see_nothing_give_zeros():
    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=2, L=3, capacity=(0, 6, 0))
    out = ops.hetero_cache_attention(q, qpos, k, v, pos, lengths, Hkv)
    torch.testing.assert_close(out, reference(q, qpos, k, v, pos, lengths, Hkv), rtol=1e-12, atol=1e-12)
    # Every length 0: nothing to attend to.
    zero = ops.hetero_cache_attention(q, qpos, k, v, pos, torch.zeros_like(lengths), Hkv)
    assert torch.equal(zero, torch.zeros_like(q))
    # A query before every stored position sees nothing: zeros, not NaN; the others are unaffected.
    early = qpos.clone()
    early[:, 0] = -1
    out = ops.hetero_cache_attention(q, early, k, v, pos, lengths, Hkv)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    torch.testing.assert_close(out, reference(q, early, k, v, pos, lengths, Hkv), rtol=1e-12, atol=1e-12)
    # Empty batch, no queries.
    e = ops.hetero_cache_attention(torch.randn(0, 2, 8, 4), torch.zeros(0, 2, dtype=torch.long),
                                   [torch.randn(0, 4, 3, 4)], [torch.randn(0, 4, 3, 4)],
                                   [torch.zeros(0, 3, dtype=torch.int32)], torch.zeros(0, 1, dtype=torch.long), 4)
    assert e.shape == (0, 2, 8, 4)
    e = ops.hetero_cache_attention(q[:, :0], qpos[:, :0], k, v, pos, lengths, Hkv)
    assert e.shape == (2, 0, 8, 16)


def test_results_do_not_depend_on_the_thread_count():
    args = make_inputs(B=2, L=11, Hq=8, Hkv=2, groups=(1, 2), capacity=(150, 90), dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hetero_cache_attention(*args)
        torch.set_num_threads(max(2, threads))
        many = ops.hetero_cache_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_bad_input_names_the_argument_and_the_value():
    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=2, L=3)
    cases = [
        (ValueError, "q: expected shape \\[B, L, Hq, d\\], got \\[2, 8, 16\\]", (q[:, 0], qpos, k, v, pos, lengths, Hkv)),
        (TypeError, "query_positions: expected an integer dtype, got Float", (q, qpos.float(), k, v, pos, lengths, Hkv)),
        (ValueError, "query_positions: expected shape \\[2, 3\\] .* got \\[3\\]", (q, qpos[0], k, v, pos, lengths, Hkv)),
        (ValueError, "num_kv_heads: .* divide the query heads \\(8\\), got 3", (q, qpos, k, v, pos, lengths, 3)),
        (ValueError, "k_pools / v_pools / key_positions: .* got 3, 3 and 2", (q, qpos, k, v, pos[:2], lengths, Hkv)),
        (ValueError, "lengths: expected shape \\[2, 3\\] .* got \\[2, 2\\]", (q, qpos, k, v, pos, lengths[:, :2], Hkv)),
        (ValueError, "lengths: column 0 must be in \\[0, 7\\] .* got values in \\[0, 8\\]",
         (q, qpos, k, v, pos, torch.tensor([[8, 0, 0], [0, 0, 0]]), Hkv)),
        (TypeError, "v_pools\\[1\\]: expected the dtype of q", (q, qpos, k, [v[0], v[1].float(), v[2]], pos, lengths, Hkv)),
        (ValueError, "k_pools\\[2\\]: expected shape \\[2, Hkv/g, T, 16\\] .* got \\[2, 3, 3, 16\\]",
         (q, qpos, k[:2] + [torch.randn(2, 3, 3, 16, dtype=torch.float64)], v, pos, lengths, Hkv)),
        (ValueError, "key_positions\\[1\\]: expected shape \\[2, 70\\] .* got \\[2, 69\\]",
         (q, qpos, k, v, [pos[0], pos[1][:, :69], pos[2]], lengths, Hkv)),
        (TypeError, "key_positions\\[0\\]: expected an integer dtype, got Float",
         (q, qpos, k, v, [pos[0].float(), pos[1], pos[2]], lengths, Hkv)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            ops.hetero_cache_attention(*args)


def opcheck_samples():
    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=2, L=3, d=8, capacity=(5, 9, 2))
    bf = [t.bfloat16() for t in k], [t.bfloat16() for t in v]
    narrowed = make_inputs(B=2, L=2, d=8, capacity=(12, 12, 12), dtype=torch.float32)  # views of a larger pool
    nq, nqpos, nk, nv, npos, nlen, _ = narrowed
    nlen = nlen.clamp(max=6)
    return [
        (q, qpos, k, v, pos, lengths, Hkv, None),
        (q.bfloat16(), qpos, *bf, pos, lengths, Hkv, 0.5),
        (nq, nqpos, [t[:, :, :6] for t in nk], [t[:, :, :6] for t in nv], [p[:, :6] for p in npos], nlen, Hkv, None),
        (torch.randn(0, 2, 8, 4), torch.zeros(0, 2, dtype=torch.long), [torch.randn(0, 4, 3, 4)],
         [torch.randn(0, 4, 3, 4)], [torch.zeros(0, 3, dtype=torch.int32)], torch.zeros(0, 1, dtype=torch.long), 4, None),
    ]


def test_opcheck():
    for i, args in enumerate(opcheck_samples()):
        result = torch.library.opcheck(torch.ops.mixsga.hetero_cache_attention.default, args)
        failed = {test: str(err) for test, err in result.items() if err != "SUCCESS"}
        assert not failed, f"sample {i}: {failed}"


def test_fake_kernel_repeats_the_shape_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=2, L=3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.mixsga.hetero_cache_attention(q, qpos, k, v, pos, lengths, Hkv)
        assert out.shape == q.shape and out.dtype == q.dtype
        with pytest.raises(ValueError, match="key_positions\\[1\\]: expected shape \\[2, 70\\]"):
            torch.ops.mixsga.hetero_cache_attention(q, qpos, k, v, [pos[0], pos[1][:, :3], pos[2]], lengths, Hkv)


def test_not_differentiable_backward_is_refused():
    q, qpos, k, v, pos, lengths, Hkv = make_inputs(B=1, L=2)
    q.requires_grad_()
    out = ops.hetero_cache_attention(q, qpos, k, v, pos, lengths, Hkv)  # the forward itself runs
    with pytest.raises(RuntimeError, match="hetero_cache_attention"):
        out.sum().backward()


# ---- the attention layers ----------------------------------------------------------------------------------


def python_and_cpp_layers(dtype=torch.float64):
    torch.manual_seed(0)
    py = mixsga.nn.MixSGAAttention(32, 8, 4, ratios=(0.3, 0.1, 0.6), prefill_routing="argmax").to(dtype).eval()
    cpp = _C.MixSGAAttention(32, 8, 4, ratios=[0.3, 0.1, 0.6], prefill_routing="argmax")
    cpp.load_state_dict(py.state_dict())
    cpp.to(dtype)
    cpp.eval()
    return py, cpp


def profiled_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.key for e in prof.key_averages()}


@torch.no_grad()
@pytest.mark.parametrize("which", ["python", "cpp"])
def test_decode_and_continuation_use_the_ops_and_never_expand_kv(which):
    py, cpp = python_and_cpp_layers()
    layer = py if which == "python" else cpp
    call = (lambda x, cache: layer(x, cache=cache)[0]) if which == "python" else (
        lambda x, cache: layer.forward(x, None, None, cache, 0)[0])
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    cache = _C.HeteroKVCache(py.cache_options())
    outs = [call(x[:, :8], cache)]
    chunk, names = profiled_ops(lambda: call(x[:, 8:14], cache))
    outs.append(chunk)
    assert "mixsga::hetero_cache_attention" in names, sorted(names)
    assert "aten::scaled_dot_product_attention" not in names
    step, step_names = profiled_ops(lambda: call(x[:, 14:15], cache))
    assert "mixsga::hetero_decode_attention" in step_names, sorted(step_names)
    for ops_seen in (names, step_names):
        # Neither the pools nor the new tokens' K/V are expanded to Hkv heads: K/V are projected with
        # each expert's pooled weights (expert_permutation + linear) and appended at the compact size.
        assert "mixsga::expert_permutation" in ops_seen, sorted(ops_seen)
        for expanding in ("aten::repeat_interleave", "mixsga::grouped_kv_proj", "mixsga::grouped_kv_pool"):
            assert expanding not in ops_seen, f"{expanding} ran in a decode step or continuation"
    outs += [step, call(x[:, 15:19], cache)]
    # Argmax prefill routing = the continuation's routing, so the full forward is the reference.
    torch.testing.assert_close(torch.cat(outs, 1), call(x, None), rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_chunk_continuation_with_left_padding_matches_per_sequence_runs():
    py, _ = python_and_cpp_layers()
    torch.manual_seed(1)
    # Sequence 0: 5 real prompt tokens after 3 of padding; sequence 1: 8 real prompt tokens.
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    cache = _C.HeteroKVCache(py.cache_options())
    py(x[:, :8], mask, cache=cache)
    chunk = py(x[:, 8:12], cache=cache)[0]
    for s, start in ((0, 3), (1, 0)):
        alone = _C.HeteroKVCache(py.cache_options())
        py(x[s : s + 1, start:8], cache=alone)
        torch.testing.assert_close(chunk[s : s + 1], py(x[s : s + 1, 8:12], cache=alone)[0], rtol=1e-10, atol=1e-12)
