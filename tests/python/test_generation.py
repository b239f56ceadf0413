"""The Python module's generation path over the compact cache: prefill then decode equals one full
forward with the same routing, chunked continuation, left padding, and parity with the C++ module."""

import pytest
import torch

import mixsga
from mixsga import _C


def make_layer(prefill="expert_choice", dtype=torch.float64):
    torch.manual_seed(0)
    layer = mixsga.nn.MixSGAAttention(32, 8, 4, ratios=(0.3, 0.1, 0.6), prefill_routing=prefill).to(dtype)
    return layer.eval()


def prefill_then_decode(layer, cache, x, prompt, mask=None):
    outs, idx = [], []
    r = layer.forward_with_routing(x[:, :prompt], mask, None, cache, 0)
    outs.append(r.output)
    idx.append(r.expert_idx)
    for t in range(prompt, x.shape[1]):
        r = layer.forward_with_routing(x[:, t : t + 1], None, None, cache, 0)
        outs.append(r.output)
        idx.append(r.expert_idx)
    return torch.cat(outs, 1), torch.cat(idx, 1)


@torch.no_grad()
@pytest.mark.parametrize("prefill", ["expert_choice", "argmax"])
def test_prefill_then_decode_equals_full_forward_with_same_routing(prefill):
    layer = make_layer(prefill)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    cache = _C.HeteroKVCache(layer.cache_options())
    out, idx = prefill_then_decode(layer, cache, x, 12)
    torch.testing.assert_close(out, layer.forward_routed(x, idx), rtol=1e-10, atol=1e-12)
    if prefill == "argmax":
        torch.testing.assert_close(out, layer(x)[0], rtol=1e-10, atol=1e-12)
    assert cache.max_seq_length() == 20
    # Compact storage: expert e keeps 4 / g_e heads.
    assert [k.shape[1] for k in cache.keys(0)] == [4, 2, 1]


@torch.no_grad()
def test_chunked_continuation_and_left_padding():
    layer = make_layer("argmax")
    x = torch.randn(1, 18, 32, dtype=torch.float64)
    cache = _C.HeteroKVCache(layer.cache_options())
    outs = [layer(x[:, a : a + n], cache=cache)[0] for a, n in ((0, 7), (7, 5), (12, 1), (13, 5))]
    torch.testing.assert_close(torch.cat(outs, 1), layer(x)[0], rtol=1e-10, atol=1e-12)

    # A 6-token prompt left-padded to 10 decodes like the same prompt alone; padding is not stored.
    b = torch.randn(1, 11, 32, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 4, 32, dtype=torch.float64) * 100, b], 1)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :4] = 0
    c1, c2 = _C.HeteroKVCache(layer.cache_options()), _C.HeteroKVCache(layer.cache_options())
    out_padded, _ = prefill_then_decode(layer, c1, padded, 10, mask)
    out_alone, _ = prefill_then_decode(layer, c2, b, 6)
    torch.testing.assert_close(out_padded[:, 4:], out_alone, rtol=1e-10, atol=1e-12)
    assert c1.seq_lengths().tolist() == [11]


@torch.no_grad()
def test_python_and_cpp_modules_decode_alike():
    layer = make_layer("expert_choice", torch.float32)
    cpp = _C.MixSGAAttention(32, 8, 4, ratios=[0.3, 0.1, 0.6])
    cpp.load_state_dict(layer.state_dict())
    cpp.eval()
    x = torch.randn(2, 16, 32)
    cp, cc = _C.HeteroKVCache(layer.cache_options()), _C.HeteroKVCache(layer.cache_options())
    out_py, idx_py = prefill_then_decode(layer, cp, x, 10)
    outs = [cpp.forward(x[:, :10], None, None, cc, 0)[0]]
    outs += [cpp.forward(x[:, t : t + 1], None, None, cc, 0)[0] for t in range(10, 16)]
    torch.testing.assert_close(out_py, torch.cat(outs, 1), rtol=1e-5, atol=1e-6)
    assert torch.equal(cp.lengths(0), cc.lengths(0))


def test_cache_mismatch_is_a_clear_error():
    layer = make_layer()
    other = mixsga.nn.MixSGAAttention(32, 8, 4, group_sizes=(1, 4), ratios=(0.5, 0.5)).double()
    cache = _C.HeteroKVCache(other.cache_options())
    with pytest.raises(ValueError, match="group_sizes"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64), cache=cache)
    with pytest.raises(IndexError, match="layer_idx"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64), cache=_C.HeteroKVCache(layer.cache_options()), layer_idx=2)


# ---- cache accounting names, error messages, public names ----------------------------------------------


@torch.no_grad()
def test_stored_and_allocated_bytes_per_token_are_two_names():
    layer = make_layer("argmax")
    cache = _C.HeteroKVCache(layer.cache_options())
    assert cache.stored_bytes_per_token() == cache.allocated_bytes_per_token() == cache.bytes_per_token() == 0.0
    layer(torch.randn(2, 5, 32, dtype=torch.float64), cache=cache)  # 10 tokens in pools of capacity >= 16
    tokens = 10
    assert cache.stored_bytes_per_token() == pytest.approx(cache.bytes_stored() / tokens)
    assert cache.allocated_bytes_per_token() == pytest.approx(cache.bytes_allocated() / tokens)
    assert cache.bytes_allocated() == cache.bytes_used()
    # bytes_per_token() means stored (it used to divide the allocated bytes): below the full cache.
    assert cache.bytes_per_token() == cache.stored_bytes_per_token()
    assert cache.bytes_per_token() < cache.full_bytes_per_token() < cache.allocated_bytes_per_token()
    cache.shrink_to_fit()
    assert cache.allocated_bytes_per_token() < cache.full_bytes_per_token()


@torch.no_grad()
def test_mixsga_cache_has_the_same_two_names():
    hf = pytest.importorskip("mixsga.hf", reason="needs transformers")
    from mixsga.hf.attention import HFMixSGAAttention

    torch.manual_seed(0)
    layer = HFMixSGAAttention(32, 8, 4, ratios=(0.3, 0.1, 0.6), layer_idx=0).double().eval()
    cache = hf.MixSGACache(1)
    layer(torch.randn(1, 6, 32, dtype=torch.float64), past_key_values=cache)
    assert cache.tokens_stored() == 6
    assert cache.stored_bytes_per_token() == pytest.approx(cache.bytes_stored() / 6)
    assert cache.allocated_bytes_per_token() == pytest.approx(cache.bytes_allocated() / 6)
    assert cache.bytes_per_token() == cache.stored_bytes_per_token() == cache.hetero.stored_bytes_per_token()
    assert cache.allocated_bytes_per_token() == pytest.approx(cache.hetero.allocated_bytes_per_token())
    assert cache.allocated_bytes_per_token() > cache.stored_bytes_per_token()


def test_cache_dtype_mismatch_says_what_the_cache_was_built_for():
    layer = make_layer()  # float64
    opts = layer.cache_options()
    opts.dtype = torch.float32
    cache = _C.HeteroKVCache(opts)
    with pytest.raises(TypeError, match=r"cache: built for dtype float32, but the layer's K/V \(keys\) are float64"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64), cache=cache)
    assert cache.batch_size == 0  # nothing stored


def test_mixsga_cache_with_too_few_layers_says_so():
    hf = pytest.importorskip("mixsga.hf", reason="needs transformers")
    from mixsga.hf.attention import HFMixSGAAttention

    second = HFMixSGAAttention(32, 8, 4, ratios=(0.3, 0.1, 0.6), layer_idx=1).double()
    with pytest.raises(IndexError, match=r"MixSGACache: built for 1 layer, but the model has more \(attention layer_idx = 1\)"):
        second(torch.randn(1, 4, 32, dtype=torch.float64), past_key_values=hf.MixSGACache(1))
    with pytest.raises(IndexError, match="layer: must be in \\[0, 1\\), got 1: the cache was built for 1 layer"):
        _C.HeteroKVCache(second.cache_options(num_layers=1)).lengths(1)


def test_cache_classes_have_a_public_home():
    from mixsga import cache

    assert cache.HeteroKVCache is _C.HeteroKVCache
    assert cache.HeteroKVCacheOptions is _C.HeteroKVCacheOptions
    assert "stored_bytes_per_token" in cache.HeteroKVCache.__doc__
