"""KV memory you can set (mixsga.hf.budget): decode routing calibrated to the configured ratios and budgets
chosen at inference, met on text the model was not calibrated on; stored with the model; clear errors."""

import pytest
import torch
from tiny_models import tiny_model

import mixsga.hf

GROUPS, RATIOS = (1, 2, 4), (0.3, 0.1, 0.6)  # a 50 % budget


def skewed_model():
    """A converted tiny Llama whose routers prefer the finest expert (as untrained or drifted routers do), so
    plain argmax decoding overruns the configured budget."""
    model = mixsga.hf.convert(tiny_model(dtype=torch.float32), group_sizes=GROUPS, ratios=RATIOS)
    for layer in mixsga.hf.mixsga_layers(model):
        with torch.no_grad():
            layer.router.proj.weight.normal_(0, 0.3)
            layer.router.proj.bias.copy_(torch.tensor([0.6, 0.0, -0.3]))
    return model.eval()


def blocks(seed):
    return torch.randint(3, 64, (32, 128), generator=torch.Generator().manual_seed(seed))


CALIBRATION, HELD_OUT = blocks(1), blocks(2)


def decoded_bytes_fraction(model, ids):
    """Stored K/V bytes over the full cache's, from the compact cache after a short prefill and teacher-forced
    decode steps (what serving stores)."""
    cache = mixsga.hf.MixSGACache(num_layers=2)
    with torch.no_grad():
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        for t in range(4, ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    full = cache.full_bytes_per_token()
    return cache.stored_bytes_per_token() / full


def test_calibration_meets_the_configured_budget_on_held_out_text():
    model = skewed_model()
    before = mixsga.hf.realised_kv_budget(model, HELD_OUT)
    assert before > 0.5 + 0.05, before  # plain argmax overruns the budget
    mixsga.hf.calibrate_decode_routing(model, CALIBRATION)
    after = mixsga.hf.realised_kv_budget(model, HELD_OUT)
    assert after == pytest.approx(0.5, abs=0.01)
    # The compact cache of a real decode stores that much (index bits aside).
    assert decoded_bytes_fraction(model, HELD_OUT[:4]) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("budget", [0.35, 0.75])
def test_a_budget_set_at_inference_is_met_on_held_out_text(budget):
    model = skewed_model()
    realised = mixsga.hf.set_kv_budget(model, CALIBRATION, budget)
    assert realised == pytest.approx(budget, abs=0.01)
    assert mixsga.hf.realised_kv_budget(model, HELD_OUT) == pytest.approx(budget, abs=0.01)
    assert mixsga.hf.kv_fraction(model) == pytest.approx(budget, abs=1e-9)  # prefill capacity: exactly
    assert mixsga.hf.trained_ratios(model) == RATIOS
    # Back to the trained budget.
    assert mixsga.hf.set_kv_budget(model, CALIBRATION) == pytest.approx(0.5, abs=0.01)
    assert mixsga.hf.mixsga_layers(model)[0].ratios == RATIOS


def test_the_served_routing_is_saved_with_the_model(tmp_path):
    model = skewed_model()
    mixsga.hf.set_kv_budget(model, CALIBRATION, 0.4)
    model.save_pretrained(tmp_path)
    loaded = mixsga.hf.from_pretrained(tmp_path).eval()
    for a, b in zip(mixsga.hf.mixsga_layers(model), mixsga.hf.mixsga_layers(loaded)):
        assert a.ratios == b.ratios and a.decode_offsets == b.decode_offsets and a.decode_offsets
    assert mixsga.hf.trained_ratios(loaded) == RATIOS
    assert mixsga.hf.realised_kv_budget(loaded, HELD_OUT) == mixsga.hf.realised_kv_budget(model, HELD_OUT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(HELD_OUT[:2]).logits, model(HELD_OUT[:2]).logits)


def test_bad_input_is_a_clear_error():
    model = skewed_model()
    with pytest.raises(ValueError, match=r"budget: must be in \[0.25, 1\] .*got 0.1"):
        mixsga.hf.set_kv_budget(model, CALIBRATION, 0.1)
    with pytest.raises(ValueError, match=r"budget: must be in \[0.25, 1\] .*got 1.5"):
        mixsga.hf.set_kv_budget(model, CALIBRATION, 1.5)
    with pytest.raises(ValueError, match="blocks: 200 calibration tokens are too few .* at least 300"):
        mixsga.hf.set_kv_budget(model, CALIBRATION[:2, :100], 0.5)
    with pytest.raises(TypeError, match="set_kv_budget needs a model converted to mixSGA"):
        mixsga.hf.set_kv_budget(tiny_model(), CALIBRATION, 0.5)
    with pytest.raises(TypeError, match="calibrate_decode_routing needs a model converted"):
        mixsga.hf.calibrate_decode_routing(tiny_model(), CALIBRATION)
    assert mixsga.hf.mixsga_layers(model)[0].decode_offsets == ()  # nothing changed
