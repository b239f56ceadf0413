"""The hard per-sequence KV cap through Hugging Face (mixsga.hf.set_kv_cap, MixSGACache(kv_cap, max_length)):
every sequence of a held-out set stays within it in every layer and at every step (read from the cache's
per-sequence lengths), generate reserves the pools for its max_length so the allocated bytes meet the cap
too, the cap is saved with the model, and bad input is a clear error."""

import pytest
import torch
from test_kv_budget import CALIBRATION, GROUPS, HELD_OUT, skewed_model
from tiny_models import left_padded, tiny_model

import mixsga.hf


def shares(cache) -> torch.Tensor:
    """[layers, B] share of the full K/V each sequence stores in each layer, from the per-sequence lengths."""
    hetero = cache.hetero
    inverse = torch.tensor([1.0 / g for g in GROUPS], dtype=torch.float64)
    rows = []
    for layer in range(len(cache.layers)):
        lengths = hetero.lengths(layer).to(torch.float64)  # [B, E]
        rows.append((lengths * inverse).sum(1) / lengths.sum(1).clamp_min(1))
    return torch.stack(rows)


def decode_shares(model, ids, cache, prompt=8, mask=None):
    """Prefill ``prompt`` tokens, then teacher-forced decode steps; the largest share any sequence of any
    layer held after any step, and the shares at the end."""
    worst = 0.0
    with torch.no_grad():
        model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt], past_key_values=cache,
              use_cache=True)
        worst = max(worst, float(shares(cache).max()))
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t : t + 1], attention_mask=None if mask is None else mask[:, : t + 1], past_key_values=cache,
                  use_cache=True)
            worst = max(worst, float(shares(cache).max()))
    return worst, shares(cache)


@pytest.mark.parametrize("cap", [0.3, 0.5])
def test_the_cap_holds_on_every_sequence_of_the_held_out_set(cap):
    model = skewed_model()
    mixsga.hf.calibrate_decode_routing(model, CALIBRATION)  # calibrated: the budget on average...
    ids = HELD_OUT[:, :48]
    uncapped, _ = decode_shares(model, ids, mixsga.hf.MixSGACache(model.config))
    assert uncapped > cap + 0.02, uncapped  # ...but some sequence (or its prompt) goes over: a cap has work to do
    mixsga.hf.set_kv_cap(model, cap)
    worst, final = decode_shares(model, ids, mixsga.hf.MixSGACache(model.config))
    assert worst <= cap + 1e-12
    assert float(final.mean()) > cap - 0.1  # the cap holds the budget back, it does not collapse it


def test_left_padding_is_not_counted():
    model = skewed_model()
    mixsga.hf.set_kv_cap(model, 0.5)
    ids, mask, _ = left_padded([20, 13, 7], 20, seed=3)
    ids = torch.cat([ids, HELD_OUT[:3, :12]], 1)
    mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    cache = mixsga.hf.MixSGACache(model.config)
    worst, _ = decode_shares(model, ids, cache, prompt=20, mask=mask)
    assert worst <= 0.5 + 1e-12
    assert cache.hetero.seq_lengths(0).tolist() == [32, 25, 19]  # padding is not stored


def test_generate_reserves_the_pools_for_its_max_length():
    model = skewed_model()
    mixsga.hf.set_kv_cap(model, 0.5)
    prompt = HELD_OUT[:2, :10]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, mixsga.hf.MixSGACache)
    hetero = cache.hetero
    assert hetero.reserved_length == 10 + 12 - 1  # the last new token is never cached
    assert float(shares(cache).max()) <= 0.5 + 1e-12
    # Allocated: within the cap's worst case plus the fixed per-sequence bookkeeping (index object, lengths).
    worst = cache.worst_case_bytes(21, 2)
    assert worst == hetero.worst_case_bytes(21, 2)
    assert hetero.bytes_allocated() <= worst + 2 * 2 * (64 + 3 * 8)
    assert hetero.bytes_stored() <= worst
    # The same sequences through a growing (unreserved) capped cache also stay within the cap.
    grown = mixsga.hf.MixSGACache(model.config)
    assert grown.kv_cap == 0.5 and grown.max_length is None
    model.generate(prompt, max_new_tokens=12, do_sample=False, past_key_values=grown)
    assert float(shares(grown).max()) <= 0.5 + 1e-12


def test_the_cap_is_saved_with_the_model(tmp_path):
    model = skewed_model()
    mixsga.hf.set_kv_cap(model, 0.4)
    model.save_pretrained(tmp_path)
    loaded = mixsga.hf.from_pretrained(tmp_path).eval()
    assert loaded.config.mixsga["kv_cap"] == 0.4
    assert mixsga.hf.MixSGACache(loaded.config).kv_cap == 0.4
    mixsga.hf.set_kv_cap(loaded, None)
    assert "kv_cap" not in loaded.config.mixsga
    assert mixsga.hf.MixSGACache(loaded.config).kv_cap is None


def test_bad_input_is_a_clear_error():
    model = skewed_model()
    with pytest.raises(ValueError, match=r"kv_cap: must be in \[1/4, 1\] = \[0.25, 1\].*got 0.2"):
        mixsga.hf.set_kv_cap(model, 0.2)
    with pytest.raises(ValueError, match=r"kv_cap: must be in \[1/4, 1\].*got 1.2"):
        mixsga.hf.set_kv_cap(model, 1.2)
    with pytest.raises(TypeError, match="kv_cap: expected a float or None"):
        mixsga.hf.set_kv_cap(model, "half")
    assert "kv_cap" not in model.config.mixsga  # nothing changed
    with pytest.raises(TypeError, match="set_kv_cap needs a model converted to mixSGA"):
        mixsga.hf.set_kv_cap(tiny_model(), 0.5)
    with pytest.raises(ValueError, match="max_length: reserving the pools .* needs a kv_cap"):
        mixsga.hf.MixSGACache(model.config, max_length=16)
    with pytest.raises(ValueError, match="max_length: must be an int >= 1"):
        mixsga.hf.MixSGACache(model.config, kv_cap=0.5, max_length=0)
    # A cap the model's group sizes cannot reach: named when the cache meets the model.
    cache = mixsga.hf.MixSGACache(model.config, kv_cap=0.1)
    with pytest.raises(ValueError, match=r"kv_cap: must be in \[1/4, 1\].*got 0.1"), torch.no_grad():
        model(HELD_OUT[:1, :4], past_key_values=cache, use_cache=True)
