"""HeteroKVCache's positions and index from Python: the caller's positions are stored (one start per
sequence plus packed expert ids, rebuilt by ``positions``), positions that do not continue are refused
without changing the cache, ``append_compact`` stores what ``append`` of the expanded K/V stores, the
index costs ceil(log2 E) bits per token and layer, and both layers store at prefill, decode and chunk
exactly the compact K/V an independent float64 computation gives."""

import pytest
import torch

import mixsga
from mixsga.nn.functional import apply_rope
from mixsga.nn.shared_group_kv import pool_kv_weight


def layer(key_scale="none", seed=0):
    torch.manual_seed(seed)
    m = mixsga.nn.MixSGAAttention(32, 8, 4, ratios=(0.3, 0.1, 0.6), key_scale=key_scale, aux_alpha=0.0)
    if key_scale == "learned":
        with torch.no_grad():
            m.key_log_scale.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m.double().eval()


def expected_pools(m, x, idx, positions, valid=None):
    """Each valid token's compact K (pooled weights, key scale, RoPE at its position) and V, per expert,
    batch-major, computed here from the parameters alone."""
    B, L, _ = x.shape
    valid = torch.ones(B, L, dtype=torch.bool) if valid is None else valid
    positions = positions.expand(B, L)
    scales = m.key_scales()
    out = []
    for e, g in enumerate(m.group_sizes):
        mine = (idx == e) & valid
        xs, pos = x[mine], positions[mine]
        wk, wv = (pool_kv_weight(p.weight, g, m.head_dim) for p in (m.k_proj, m.v_proj))
        k = (xs @ wk.T).view(1, -1, 4 // g, m.head_dim)
        if scales is not None:
            k = k * scales[e]
        k = apply_rope(k, pos[None], m.rope_theta)[0]
        out.append((k, (xs @ wv.T).view(-1, 4 // g, m.head_dim), pos))
    return out


def stored(cache, layer_idx=0):
    """The cache's tokens per expert, batch-major: (keys [N_e, h, d], values, positions [N_e])."""
    lengths = cache.lengths(layer_idx)
    out = []
    for e, (K, V, P) in enumerate(zip(cache.keys(layer_idx), cache.values(layer_idx), cache.positions(layer_idx))):
        n = lengths[:, e].tolist()
        out.append((torch.cat([K[b, :, : n[b]].transpose(0, 1) for b in range(len(n))]),
                    torch.cat([V[b, :, : n[b]].transpose(0, 1) for b in range(len(n))]),
                    torch.cat([P[b, : n[b]].long() for b in range(len(n))])))
    return out


@torch.no_grad()
@pytest.mark.parametrize("which", ["python", "cpp"])
@pytest.mark.parametrize("key_scale", ["none", "learned"])
def test_prefill_chunk_and_decode_store_the_independently_computed_compact_kv(which, key_scale):
    m = layer(key_scale)
    if which == "cpp":
        cpp = mixsga._C.MixSGAAttention(32, 8, 4, ratios=[0.3, 0.1, 0.6], key_scale=key_scale, aux_alpha=0.0)
        cpp.load_state_dict(m.state_dict())
        cpp.to(torch.float64)
        cpp.eval()
        run = lambda x, mask, cache: cpp.forward_with_routing(x, mask, None, cache, 0)[2]  # noqa: E731
    else:
        run = lambda x, mask, cache: m.forward_with_routing(x, mask, cache=cache).expert_idx  # noqa: E731
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding: sequence 1's first real token is at position 0
    cache = mixsga.HeteroKVCache(m.cache_options())
    idx = [run(x[:, :6], mask, cache), run(x[:, 6:9], None, cache)]
    idx += [run(x[:, 9:10], None, cache), run(x[:, 10:11], None, cache)]
    idx = torch.cat(idx, 1)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :2] = False
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    for e, ((k, v, p), (k_ref, v_ref, p_ref)) in enumerate(zip(stored(cache), expected_pools(m, x, idx, positions, valid))):
        torch.testing.assert_close(k, k_ref, rtol=1e-12, atol=1e-12, msg=f"keys of expert {e}")
        torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12, msg=f"values of expert {e}")
        assert p.tolist() == p_ref.tolist()


@torch.no_grad()
def test_the_callers_positions_are_stored_and_positions_that_do_not_continue_are_refused():
    m = layer()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    cache = mixsga.HeteroKVCache(m.cache_options())
    m(x[:, :4], position_ids=torch.arange(100, 104), cache=cache)
    assert cache.next_positions(0).tolist() == [104]
    assert sorted(torch.cat([p[0] for p in cache.positions(0)]).tolist()) == [100, 101, 102, 103]
    before = [t.clone() for t in cache.keys(0)]
    with pytest.raises(ValueError, match=r"positions: sequence 0's tokens must continue its stored positions one by "
                                         r"one .*expected 104 at \[0, 0\], got 110"):
        m(x[:, 4:5], position_ids=torch.tensor([110]), cache=cache)
    assert cache.seq_lengths(0).tolist() == [4]
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys(0)))
    m(x[:, 4:5], cache=cache)  # the default continues at 104
    m(x[:, 5:6], position_ids=torch.tensor([[105]]), cache=cache)
    assert sorted(torch.cat([p[0] for p in cache.positions(0)]).tolist()) == list(range(100, 106))
    # Cropping is by position: keep the tokens before 102.
    cache.crop(102)
    assert cache.seq_lengths(0).tolist() == [2] and cache.next_positions(0).tolist() == [102]


def test_append_compact_equals_append_of_the_expanded_kv_and_checks_its_rows():
    torch.manual_seed(0)
    opts = mixsga.HeteroKVCacheOptions(num_layers=1, num_kv_heads=4, head_dim=8, group_sizes=[1, 2, 4],
                                       dtype=torch.float64)
    idx = torch.tensor([[0, 2, 1, 2], [2, 1, 1, 0]])
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    compact = [torch.randn(int(((idx == e) & valid).sum()), 4 // g, 8, dtype=torch.float64)
               for e, g in enumerate((1, 2, 4))]
    values = [c * 2 for c in compact]

    def expand(rows):  # the compact rows back to [B, L, 4, 8], each head repeated g times
        out = torch.zeros(2, 4, 4, 8, dtype=torch.float64)
        for e, g in enumerate((1, 2, 4)):
            out[(idx == e) & valid] = rows[e].repeat_interleave(g, 1)
        return out

    a, b = mixsga.HeteroKVCache(opts), mixsga.HeteroKVCache(opts)
    a.append(0, expand(compact), expand(values), idx, valid)
    b.append_compact(0, compact, values, idx, valid)
    for e in range(3):
        assert torch.equal(a.keys(0)[e], b.keys(0)[e]) and torch.equal(a.values(0)[e], b.values(0)[e])
        assert torch.equal(a.positions(0)[e], b.positions(0)[e])
    with pytest.raises(ValueError, match=r"keys\[0\]: expected shape \[2, 4, 8\], got \[1, 4, 8\]"):
        b.append_compact(0, [compact[0][:1]] + compact[1:], values, idx, valid)
    assert b.seq_lengths(0).tolist() == [4, 3]


@pytest.mark.parametrize("groups,bits", [((1,), 0), ((1, 4), 1), ((1, 2, 4), 2), ((1, 2, 4, 8), 2), ((1, 2, 4, 8, 16), 3)])
def test_the_index_costs_ceil_log2_experts_bits_per_token_and_layer(groups, bits):
    opts = mixsga.HeteroKVCacheOptions(num_layers=16, num_kv_heads=16, head_dim=8, group_sizes=list(groups))
    cache = mixsga.HeteroKVCache(opts)
    assert cache.index_bits_per_token() == 16 * bits
    idx = torch.arange(8).remainder(len(groups)).view(1, 8)  # 8 tokens: the ids fill whole bytes
    kv = torch.zeros(1, 8, 16, 8)
    for layer_idx in range(16):
        cache.append(layer_idx, kv, kv, idx)
    kv_bytes = sum(16 * 2 * (16 // groups[e]) * 8 * 4 for e in idx[0].tolist())
    assert cache.bytes_stored() == kv_bytes + 16 * 8 * bits // 8
