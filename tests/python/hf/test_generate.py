"""model.generate() on converted tiny models: the compact MixSGACache (batch > 1, left padding, greedy,
sampling, beam search), its memory figures against the METHOD.md formula, and crop."""

import pytest
import torch
from tiny_models import clone, force_expert, left_padded, tiny_model

import mixsga.hf

GEN = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0)


def batch():
    ids, mask, _ = left_padded([9, 5, 7], 9, seed=3)
    return ids, mask


@torch.no_grad()
def test_greedy_with_the_compact_cache_equals_generation_without_cache():
    # argmax prefill routing is causal, so recomputing everything (use_cache=False) routes alike.
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), prefill_routing="argmax")
    ids, mask = batch()
    cache = mixsga.hf.MixSGACache(model.config)
    with_cache = model.generate(ids, attention_mask=mask, do_sample=False, past_key_values=cache, **GEN)
    without = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **GEN)
    assert torch.equal(with_cache, without)
    # Decode routing used several experts, and padding was never stored.
    assert (cache.decode_ratios() > 0).sum() >= 2
    # The last generated token is never fed back; transformers counts mask columns, padding included.
    assert cache.hetero.seq_lengths(0).tolist() == [9 + 7, 5 + 7, 7 + 7]
    assert cache.get_seq_length() == 9 + 7


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_static_routing_generates_like_the_original_model(family, mode):
    # Every token on expert 1 (prefill by ratios, decode by a router forced to it) is the original model,
    # so transformers' own generation (DynamicCache) is the reference for the cache mechanics.
    base = tiny_model(family)
    model = mixsga.hf.convert(clone(base), group_sizes=(1, 2, 4), ratios=(1, 0, 0))
    force_expert(model, 0)
    ids, mask = batch()
    kwargs = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=0),
              "beam": dict(do_sample=False, num_beams=3)}[mode]
    torch.manual_seed(7)
    want = base.generate(ids, attention_mask=mask, **kwargs, **GEN)
    torch.manual_seed(7)
    got = model.generate(ids, attention_mask=mask, **kwargs, **GEN)
    assert torch.equal(got, want)


@torch.no_grad()
def test_generate_creates_a_mixsga_cache_and_reports_compact_memory():
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6))
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True, **GEN)
    cache = out.past_key_values
    assert isinstance(cache, mixsga.hf.MixSGACache)
    # docs/METHOD.md: sum_e count_e * 2 * (Hkv / g_e) * d * elem per layer, plus the index: each token's
    # expert id in 2 bits (3 experts), whole bytes per sequence and layer.
    Hkv, d, elem, groups = 4, 8, 8, (1, 2, 4)
    want = 0
    for layer in range(2):
        counts = cache.token_counts(layer).tolist()
        assert sum(counts) == int(mask.sum()) + 3 * 8 - 3  # real tokens only, the last token not fed back
        want += sum(c * 2 * (Hkv // g) * d * elem for c, g in zip(counts, groups))
        want += sum((2 * n + 7) // 8 for n in cache.hetero.seq_lengths(layer).tolist())
    assert cache.bytes_stored() == want
    tokens = cache.tokens_stored()
    assert cache.bytes_per_token() == pytest.approx(want / tokens)
    assert cache.full_bytes_per_token() == 2 * 2 * Hkv * d * elem
    assert cache.bytes_per_token() < cache.full_bytes_per_token()
    assert cache.bytes_allocated() >= cache.bytes_stored()


@torch.no_grad()
def test_crop_drops_the_last_columns():
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5), prefill_routing="argmax")
    ids = torch.randint(3, 64, (2, 12))
    cache = mixsga.hf.MixSGACache(model.config)
    model(ids, past_key_values=cache)
    cache.crop(-3)
    assert cache.get_seq_length() == 9 and cache.hetero.seq_lengths(0).tolist() == [9, 9]
    cache.crop(0)
    assert cache.get_seq_length() == 9
    step = model(ids[:, 9:10], past_key_values=cache).logits
    fresh = mixsga.hf.MixSGACache(model.config)
    model(ids[:, :9], past_key_values=fresh)
    torch.testing.assert_close(step, model(ids[:, 9:10], past_key_values=fresh).logits, rtol=1e-10, atol=1e-10)
    # Sequences with different numbers of real tokens cannot be cropped by columns.
    ids, mask = batch()
    ragged = mixsga.hf.MixSGACache(model.config)
    model(ids, attention_mask=mask, past_key_values=ragged)
    with pytest.raises(NotImplementedError, match="different numbers of real tokens"):
        ragged.crop(-1)


@torch.no_grad()
def test_a_plain_forward_with_use_cache_returns_a_mixsga_cache():
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5))
    out = model(torch.randint(3, 64, (1, 5)))
    assert isinstance(out.past_key_values, mixsga.hf.MixSGACache) and out.past_key_values.get_seq_length() == 5
    assert model(torch.randint(3, 64, (1, 5)), use_cache=False).past_key_values is None
