"""mixsga.hf.convert / to_gqa on tiny Llama, Mistral and Qwen2 models: the METHOD.md identities against
the original transformers model, padding, the aux loss contract, and argument errors."""

import pytest
import torch
from tiny_models import clone, left_padded, tiny_model, transformers

import mixsga.hf

FAMILIES = ["llama", "mistral", "qwen2", "opt"]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_unit_ratios_reproduce_the_original_logits(family):
    base = tiny_model(family)
    model = mixsga.hf.convert(clone(base), group_sizes=(1, 2, 4), ratios=(1, 0, 0))
    ids, mask, positions = left_padded([9, 6, 11], 11)
    for kwargs in ({}, {"attention_mask": mask, "position_ids": positions}):
        want = base(ids, use_cache=False, **kwargs).logits
        got = model(ids, use_cache=False, **kwargs).logits
        real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    # The original projections are kept, not copied (Qwen2: biased q/k/v, unbiased o; OPT: all biased).
    layers = model.model.decoder.layers if family == "opt" else model.model.layers
    attn = layers[0].self_attn
    assert isinstance(attn, mixsga.hf.HFMixSGAAttention) and len(mixsga.hf.mixsga_layers(model)) == 2
    assert (attn.k_proj.bias is not None) == (family in ("qwen2", "opt"))
    assert (attn.o_proj.bias is not None) == (family == "opt")


@torch.no_grad()
def test_scaled_rope_uses_the_models_cos_sin():
    # Llama-3 style rope scaling: the layer's plain RoPE would differ; the model's cos/sin must be used.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    base = tiny_model("llama", rope_parameters=rope)
    model = mixsga.hf.convert(clone(base), group_sizes=(1, 2), ratios=(1, 0))
    ids = torch.randint(3, 64, (2, 40))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_to_gqa_equals_the_pooled_expert():
    base = tiny_model("qwen2")  # biases too
    gqa = mixsga.hf.to_gqa(clone(base), kv_heads=2)
    pooled = mixsga.hf.convert(clone(base), group_sizes=(1, 2), ratios=(0, 1))
    assert gqa.config.num_key_value_heads == 2 and gqa.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)
    ids = torch.randint(3, 64, (2, 12))
    torch.testing.assert_close(gqa(ids).logits, pooled(ids).logits, rtol=1e-10, atol=1e-10)
    # Independent check of the pooling: head pairs averaged.
    w = base.model.layers[0].self_attn.v_proj.weight.view(2, 2, 8, 32).mean(1).reshape(16, 32)
    torch.testing.assert_close(gqa.model.layers[0].self_attn.v_proj.weight, w)
    assert not torch.allclose(gqa(ids).logits, base(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"kv_heads: .*num_key_value_heads \(4\), got 3"):
        mixsga.hf.to_gqa(clone(base), kv_heads=3)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_left_padded_batch_equals_each_sequence_alone(family):
    model = mixsga.hf.convert(tiny_model(family), group_sizes=(1, 2, 4), ratios=(0.25, 0.25, 0.5))
    lengths, total = [10, 4, 7], 10
    ids, mask, positions = left_padded(lengths, total)
    batched = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, total - n :], use_cache=False).logits
        torch.testing.assert_close(batched[b : b + 1, total - n :], alone, rtol=1e-10, atol=1e-10)
    # Padding changes nothing because it takes no capacity: the same batch with padding counted as
    # tokens routes differently.
    unmasked = model(ids, position_ids=positions, use_cache=False).logits
    assert not torch.allclose(unmasked[1, -4:], batched[1, -4:], atol=1e-6)


def test_aux_loss_contract():
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), aux_alpha=0.5)
    model.train()
    layers = mixsga.hf.mixsga_layers(model)
    assert len(layers) == 2 and mixsga.hf.kv_fraction(model) == pytest.approx(0.5)
    # Reference: each layer's aux recomputed from its captured input, with the router's own loss.
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: inputs.append(k["hidden_states"]), with_kwargs=True)
             for m in layers]
    ids = torch.randint(3, 64, (2, 16))
    out = model(ids, labels=ids, use_cache=False)
    for h in hooks:
        h.remove()
    aux = mixsga.hf.aux_loss(model)
    assert aux.dim() == 0 and aux.dtype == torch.float64 and out.loss is not None
    want = []
    for layer, x in zip(layers, inputs):
        logits = layer.router(x.detach())
        target = layer.router.route(torch.sigmoid(logits))
        want.append(0.5 * layer.router.aux_loss(logits, target))
    torch.testing.assert_close(aux, torch.stack(want).mean())
    # Converted layers send the aux gradient through backward: outputs.loss (LM + aux) trains the routers,
    # and the value aux_loss returns is detached (adding it cannot count it twice).
    assert not aux.requires_grad and float(out.aux_loss) == pytest.approx(float(aux))
    out.loss.backward()
    assert all(m.router.proj.weight.grad.abs().sum() > 0 for m in layers)
    # Layers that return it instead (aux_in_backward=False): only that aux loss trains the routers.
    model.zero_grad()
    for m in layers:
        m.aux_in_backward = False
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward(retain_graph=True)
    assert all(m.router.proj.weight.grad is None or not m.router.proj.weight.grad.any() for m in layers)
    mixsga.hf.aux_loss(model).backward()
    assert all(m.router.proj.weight.grad.abs().sum() > 0 for m in layers)
    # A decode step (non-empty cache) has no aux loss; an unconverted model has none.
    model.eval()
    with torch.no_grad():
        cache = mixsga.hf.MixSGACache(model.config)
        model(ids, past_key_values=cache)
        assert mixsga.hf.aux_loss(model) > 0
        model(ids[:, :1], past_key_values=cache)
    assert float(mixsga.hf.aux_loss(model)) == 0.0
    plain = tiny_model()
    assert mixsga.hf.mixsga_layers(plain) == []
    with pytest.raises(TypeError, match="mixsga.hf.convert"):
        mixsga.hf.aux_loss(plain)
    assert mixsga.hf.kv_fraction(plain) == 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"group_sizes: 3 does not divide the model's num_key_value_heads \(4\)"):
        mixsga.hf.convert(tiny_model(), group_sizes=(1, 3), ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match="ratios: ratios must sum to 1"):
        mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.6))
    with pytest.raises(ValueError, match="ratios: expected 2 ratios"):
        mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(1.0,))
    with pytest.raises(ValueError, match="prefill_routing"):
        mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5), prefill_routing="topk")
    with pytest.raises(TypeError, match="convert: unexpected option 'alpha'"):
        mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5), alpha=0.1)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(TypeError, match=r"model: convert supports .* got GPT2LMHeadModel \(model_type 'gpt2'\)"):
        mixsga.hf.convert(gpt2)
    with pytest.raises(TypeError, match="to_gqa needs grouped KV heads"):
        mixsga.hf.to_gqa(tiny_model("opt"), kv_heads=2)
    with pytest.raises(TypeError, match="model: .*got Linear"):
        mixsga.hf.convert(torch.nn.Linear(2, 2))
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5))
    with pytest.raises(TypeError, match="already converted"):
        mixsga.hf.convert(model, group_sizes=(1, 2), ratios=(0.5, 0.5))
    with pytest.raises(TypeError, match="already converted"):
        mixsga.hf.to_gqa(model, kv_heads=2)
    with pytest.raises(ValueError, match=r"attention_mask: a mixSGA model needs the \[B, T\]"):
        model(torch.randint(3, 64, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(TypeError, match="past_key_values: .*MixSGACache, got DynamicCache"):
        model(torch.randint(3, 64, (1, 4)), past_key_values=transformers.DynamicCache(config=model.config))


def test_a_sliding_window_is_warned_about():
    with pytest.warns(UserWarning, match="sliding_window=4"):
        mixsga.hf.convert(tiny_model("mistral", sliding_window=4), group_sizes=(1, 2), ratios=(0.5, 0.5))
