"""PEFT LoRA on converted models. A mixSGA layer never calls k_proj / v_proj: it projects K/V with their
effective weight (``effective_linear``), so LoRA on them must act through W + scaling * B @ A: trained,
visible in the output, and the same model after merge_and_unload(). Every check compares with an
explicit float64 computation (the effective weight built by hand, or the merged model)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import mixsga.hf  # noqa: E402
from mixsga.hf.peft import lora_config, peft_modules_to_save, train_key_scales  # noqa: E402
from mixsga.nn.shared_group_kv import (  # noqa: E402
    SharedGroupKV,
    clear_kv_weight_cache,
    compact_kv,
    effective_linear,
    pooling_error,
)
from tiny_models import tiny_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUPS, RATIOS = (1, 2, 4), (0.3, 0.1, 0.6)
TIGHT = dict(rtol=1e-12, atol=1e-12)


def converted(**options):
    model = tiny_model(seed=0)
    torch.manual_seed(3)  # the routers' initialisation: the same in every copy
    return mixsga.hf.convert(model, group_sizes=GROUPS, ratios=RATIOS, **options)


def with_lora(model, seed=1, **overrides):
    """LoRA r=4 on every projection; init_lora_weights=False gives random A and non-zero B, so the adapters
    change the output from the start."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def token_ids(batch=2, length=12, seed=11):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def merged_copy(peft_model):
    return copy.deepcopy(peft_model).merge_and_unload()


def kv_adapters(model):
    """[(layer index, "k_proj"/"v_proj", the LoRA layer)] of a PeftModel over a converted model."""
    return [(i, name, getattr(layer, name)) for i, layer in enumerate(mixsga.hf.mixsga_layers(model))
            for name in ("k_proj", "v_proj")]


# --- The layer: the effective weight against an explicit computation --------------------------------------


def explicit_grouped(x, weight, bias, expert_idx, head_dim):
    """Every token's K (or V) under its expert, by hand: project, mean over groups of g heads, repeat."""
    B, L = x.shape[:2]
    full = x @ weight.T + (0.0 if bias is None else bias)
    heads = full.shape[-1] // head_dim
    full = full.view(B, L, heads, head_dim)
    out = torch.zeros_like(full)
    for e, g in enumerate(GROUPS):
        pooled = full.view(B, L, heads // g, g, head_dim).mean(3, keepdim=True).expand(B, L, heads // g, g, head_dim)
        out = torch.where((expert_idx == e)[..., None, None], pooled.reshape(B, L, heads, head_dim), out)
    return out


def test_a_plain_linear_is_its_own_effective_weight():
    linear = nn.Linear(4, 8)
    weight, bias = effective_linear(linear, "k_proj")
    assert weight is linear.weight and bias is linear.bias  # the same tensors: plain layers are unchanged


@pytest.mark.parametrize("bias", [False, True])
def test_lora_kv_projections_use_the_explicit_effective_weight_and_train_a_and_b(bias):
    torch.manual_seed(0)
    layer = SharedGroupKV(16, 4, 4, GROUPS, bias=bias).double()
    # lora_bias adds scaling * b_B to the bias (with a base bias only: PEFT cannot merge it otherwise).
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj"], init_lora_weights=False,
                             lora_bias=bias)
    peft.inject_adapter_in_model(config, layer)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 1, 2, 0], [2, 2, 1, 0, 1]])
    k, v = layer(x, idx)

    leaves, expected, by_hand = [], [], []
    for name, out in (("k_proj", k), ("v_proj", v)):
        lora = getattr(layer, name)
        a = lora.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b = lora.lora_B["default"].weight.detach().clone().requires_grad_(True)
        scale = lora.scaling["default"]
        assert scale == 2.0 and b.abs().sum() > 0
        weight = lora.base_layer.weight.detach() + scale * (b @ a)  # by hand
        bias_eff = None if not bias else lora.base_layer.bias.detach() + scale * lora.lora_B["default"].bias.detach()
        torch.testing.assert_close(effective_linear(lora, name)[0], weight, **TIGHT)
        by_hand.append((weight.detach(), bias_eff))
        expected.append(explicit_grouped(x, weight, bias_eff, idx, 4))
        leaves += [a, b]
        torch.testing.assert_close(out, expected[-1], **TIGHT)
    assert not torch.allclose(k, explicit_grouped(x, layer.k_proj.base_layer.weight, layer.k_proj.base_layer.bias,
                                                  idx, 4))

    # The gradient of A and B through the mixSGA op equals the one through the explicit computation.
    cot_k, cot_v = torch.randn_like(k), torch.randn_like(v)
    ((k * cot_k).sum() + (v * cot_v).sum()).backward()
    ((expected[0] * cot_k).sum() + (expected[1] * cot_v).sum()).backward()
    got = [layer.k_proj.lora_A["default"].weight.grad, layer.k_proj.lora_B["default"].weight.grad,
           layer.v_proj.lora_A["default"].weight.grad, layer.v_proj.lora_B["default"].weight.grad]
    for g, ref in zip(got, leaves):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, ref.grad, **TIGHT)

    # The decode path (compact K/V, pooled weights cached without autograd), the pooled weights and the
    # pooling error all read the same effective weight.
    with torch.no_grad():
        compact = compact_kv(x, layer.k_proj, layer.v_proj, idx, None, GROUPS, 4)
        pooled_w, pooled_b = layer.expert_weights(1, key=True)
        torch.testing.assert_close(pooled_w, by_hand[0][0].view(2, 2, 4, 16).mean(1).reshape(8, 16), **TIGHT)
        assert (pooled_b is None) == (not bias)
        for e, g in enumerate(GROUPS):
            mine = idx == e
            for got, ref in ((compact.keys[e], expected[0]), (compact.values[e], expected[1])):
                torch.testing.assert_close(got, ref[mine].view(-1, 4 // g, g, 4)[:, :, 0], **TIGHT)
        full = torch.cat([x @ w.T + (0.0 if b is None else b) for w, b in by_hand], -1).view(2, 5, 2, 4, 4)
        want = (full - full.mean(3, keepdim=True)).square().sum((2, 3, 4))
        torch.testing.assert_close(pooling_error(x, layer.k_proj, layer.v_proj, 4, 4), want, **TIGHT)


def test_cached_pooled_weights_follow_adapter_updates_merges_and_disabling():
    torch.manual_seed(0)
    layer = SharedGroupKV(16, 4, 4, GROUPS).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2, 2, 1, 0]])
    with torch.no_grad():
        compact_kv(x, layer.k_proj, layer.v_proj, idx, None, GROUPS, 4)  # a cache entry from before wrapping
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False), layer)

    def check():
        with torch.no_grad():
            got = compact_kv(x, layer.k_proj, layer.v_proj, idx, None, GROUPS, 4)
            k = explicit_grouped(x, effective_linear(layer.k_proj)[0], None, idx, 4)
            for e, g in enumerate(GROUPS):
                torch.testing.assert_close(got.keys[e], k[idx == e].view(-1, 4 // g, g, 4)[:, :, 0], **TIGHT)
            return got.keys[0].clone()

    base_keys = explicit_grouped(x, layer.k_proj.base_layer.weight, None, idx, 4)[idx == 0]
    first = check()
    assert not torch.allclose(first, base_keys)  # the adapter acts (not the stale entry of the base layer)
    with torch.no_grad():
        layer.k_proj.lora_B["default"].weight.mul_(3.0)  # an optimizer step's in-place update of B
    assert not torch.allclose(check(), first)
    layer.k_proj.merge()  # into the base weight through .data, which no version counter sees
    merged = check()
    layer.k_proj.unmerge()
    torch.testing.assert_close(check(), merged, **TIGHT)
    layer.k_proj.enable_adapters(False)
    torch.testing.assert_close(check(), base_keys, **TIGHT)
    layer.k_proj.enable_adapters(True)
    layer.k_proj.merge()
    layer.k_proj.enable_adapters(False)  # merged and disabled: unmerged first, as the layer's forward does
    torch.testing.assert_close(check(), base_keys, **TIGHT)
    assert not layer.k_proj.merged
    layer.k_proj.enable_adapters(True)
    clear_kv_weight_cache(layer.v_proj)  # accepts the wrapper: drops its base layer's entries too
    assert "_mixsga_kv_stack" not in layer.v_proj.base_layer.__dict__
    torch.testing.assert_close(check(), merged, **TIGHT)


# --- A converted model under get_peft_model ----------------------------------------------------------------


def test_lora_on_a_converted_model_trains_kv_adapters_and_merges_to_the_same_model():
    model = with_lora(converted())
    ids = token_ids()
    lora = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    assert (lora - base).abs().max() > 1e-3  # the adapters (k/v included) change the output
    merged = merged_copy(model)
    torch.testing.assert_close(logits(merged, ids), lora, **TIGHT)

    # Gradients of the k/v adapters against the merged model with k_proj/v_proj.weight = W + scale * B @ A
    # built from leaves by hand (the same loss: logits against a fixed cotangent).
    cotangent = torch.randn(lora.shape, dtype=lora.dtype, generator=torch.Generator().manual_seed(2))
    (model(ids, use_cache=False).logits * cotangent).sum().backward()
    overrides, leaves = {}, []
    for i, name, proj in kv_adapters(model):
        a = proj.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b = proj.lora_B["default"].weight.detach().clone().requires_grad_(True)
        overrides[f"model.layers.{i}.self_attn.{name}.weight"] = (
            proj.base_layer.weight.detach() + (b @ a) * proj.scaling["default"])
        leaves.append((proj, a, b))
    out = torch.func.functional_call(merged, overrides, (ids,), {"use_cache": False})
    (out.logits * cotangent).sum().backward()
    for proj, a, b in leaves:
        for mine, ref in ((proj.lora_A["default"].weight.grad, a.grad), (proj.lora_B["default"].weight.grad, b.grad)):
            assert mine is not None and mine.abs().sum() > 0
            torch.testing.assert_close(mine, ref, **TIGHT)


def test_decode_and_chunks_through_the_compact_cache_use_the_adapters():
    model = converted()
    ids = token_ids(length=14)
    plain = logits(model, ids)  # no autograd: fills the pooled-weight caches of the plain layers
    model = with_lora(model)
    merged = merged_copy(model)
    for m in (model, merged):
        m.eval()
    steps = []
    for m in (model, merged):
        cache = mixsga.hf.MixSGACache(merged.config)
        with torch.no_grad():
            outs = [m(ids[:, :8], past_key_values=cache, use_cache=True).logits,  # prefill
                    m(ids[:, 8:11], past_key_values=cache, use_cache=True).logits,  # a chunk
                    m(ids[:, 11:12], past_key_values=cache, use_cache=True).logits]  # one decode step
        steps.append(outs)
    for got, want in zip(*steps):
        torch.testing.assert_close(got, want, **TIGHT)
    assert (steps[0][2][:, -1] - plain[:, 11]).abs().max() > 1e-3


@pytest.mark.parametrize("frozen_then_trained", [False, True])
def test_merge_and_unload_never_reuses_a_pooled_weight_cached_before_wrapping(frozen_then_trained):
    """PEFT merges through .data, which no version counter sees: an entry cached on the plain layers before
    wrapping must not be found again after merge_and_unload()."""
    model = converted()
    ids = token_ids()
    if frozen_then_trained:
        model.requires_grad_(False)  # frozen before wrapping: wrapping then changes no requires_grad flag
    with torch.no_grad():
        model(ids[:, :1])  # a decode-sized call without autograd: caches the plain layers' weights
    reference = logits(merged_copy(with_lora(copy.deepcopy(model))), ids)
    peft_model = with_lora(model)
    if frozen_then_trained:
        peft_model.train()
        peft_model(ids, use_cache=False)  # a training forward (autograd on), then the merge
    # Otherwise adapters loaded and merged at once, no forward in between.
    merged = peft_model.merge_and_unload().eval()
    torch.testing.assert_close(logits(merged, ids), reference, **TIGHT)
    cache = mixsga.hf.MixSGACache(merged.config)
    with torch.no_grad():
        merged(ids[:, :11], past_key_values=cache, use_cache=True)
        step = merged(ids[:, 11:12], past_key_values=cache, use_cache=True).logits
    ref_cache = mixsga.hf.MixSGACache(merged.config)
    ref_model = merged_copy(with_lora(copy.deepcopy(converted())))
    with torch.no_grad():
        ref_model(ids[:, :11], past_key_values=ref_cache, use_cache=True)
        torch.testing.assert_close(step, ref_model(ids[:, 11:12], past_key_values=ref_cache, use_cache=True).logits,
                                   **TIGHT)


def test_routers_and_key_scales_train_under_peft():
    ids = token_ids()
    frozen = with_lora(converted(key_scale="learned"))  # plain LoraConfig: PEFT freezes routers and scales
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".router." in n or "key_log_scale" in n)

    torch.manual_seed(1)
    config = lora_config(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    assert config.modules_to_save == ["router"] and peft_modules_to_save(["lm_head"]) == ["lm_head", "router"]
    model = peft.get_peft_model(converted(key_scale="learned"), config)
    scales = train_key_scales(model)
    routers = [p for n, p in model.named_parameters() if ".router." in n and p.requires_grad]
    assert len(scales) == 2 and all(s.requires_grad for s in scales)
    assert len(routers) == 4  # weight and bias of each layer's router (PEFT's trainable copy)
    model.train()
    out = model(ids, labels=ids)
    (out.loss + mixsga.hf.aux_loss(model)).backward()
    for p in routers + scales + [proj.lora_A["default"].weight for _, _, proj in kv_adapters(model)]:
        assert p.grad is not None and p.grad.abs().sum() > 0

    with pytest.raises(TypeError, match="model: train_key_scales needs a model converted"):
        train_key_scales(tiny_model())
    with pytest.raises(ValueError, match="key_scale='learned', got key_scale 'none'"):
        train_key_scales(converted())
    with pytest.raises(ValueError, match=r"lora_dropout: must be 0 when target_modules includes k_proj and v_proj"):
        lora_config(r=4, target_modules=TARGETS, lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout: .*includes k_proj and v_proj"):
        lora_config(r=4, target_modules="all-linear", lora_dropout=0.1)
    with pytest.raises(ValueError, match="use_dora"):
        lora_config(r=4, target_modules=r".*\.v_proj", use_dora=True)
    with pytest.raises(ValueError, match="lora_dropout: .*includes v_proj"):
        lora_config(r=4, lora_dropout=0.1)  # the default targets (PEFT's for Llama-family models): q_proj, v_proj
    assert sorted(lora_config(r=4).target_modules) == ["q_proj", "v_proj"]  # PEFT finds none for "mixsga_llama"
    assert lora_config(r=4, target_modules=["q_proj", "o_proj"], lora_dropout=0.1).lora_dropout == 0.1


def trained_routers(model):
    """Moves every router copy PEFT trains away from its initialisation (what training would do)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router.modules_to_save." in name:
                p.add_(0.5 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(len(name))))


def test_adapter_saves_and_loads_onto_a_fresh_conversion(tmp_path):
    ids = token_ids()
    model = with_lora(converted(), modules_to_save=peft_modules_to_save())
    trained_routers(model)
    want = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(converted(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), want, **TIGHT)
    without_routers = with_lora(converted())  # the same adapters without the trained routers
    assert (logits(without_routers, ids) - want).abs().max() > 1e-6  # so the routers were saved and loaded


def test_merged_model_saves_and_reloads_as_a_converted_model(tmp_path):
    ids = token_ids()
    model = with_lora(converted(), modules_to_save=peft_modules_to_save())
    trained_routers(model)
    want = logits(model, ids)
    merged = model.merge_and_unload()
    assert mixsga.hf.is_converted(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), want, **TIGHT)
    merged.save_pretrained(tmp_path)
    reloaded = mixsga.hf.from_pretrained(tmp_path).to(torch.float64).eval()
    torch.testing.assert_close(logits(reloaded, ids), want, **TIGHT)


def test_converting_the_peft_wrapper_itself_is_a_clear_error():
    model = with_lora(tiny_model(seed=0))
    with pytest.raises(TypeError, match="convert needs the transformers model, got a PEFT PeftModel"):
        mixsga.hf.convert(model, group_sizes=GROUPS, ratios=RATIOS)
    assert not mixsga.hf.is_converted(model)


def test_lora_applied_before_convert_acts_through_the_effective_weight():
    ids = token_ids()
    model = with_lora(tiny_model(seed=0))
    torch.manual_seed(3)
    mixsga.hf.convert(model.get_base_model(), group_sizes=GROUPS, ratios=RATIOS)  # keeps the LoRA modules
    assert mixsga.hf.is_converted(model)
    want = logits(model, ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(proj.lora_B["default"].weight.grad.abs().sum() > 0 for _, _, proj in kv_adapters(model))
    model.eval()
    with model.disable_adapter():
        assert (logits(model, ids) - want).abs().max() > 1e-3
    torch.testing.assert_close(logits(model.merge_and_unload(), ids), want, **TIGHT)


# --- What has no effective weight raises, naming the module ----------------------------------------------


def test_lora_dropout_on_kv_in_training_raises_and_is_inert_in_eval():
    ids = token_ids()
    model = with_lora(converted(), lora_dropout=0.1)
    model.train()
    with pytest.raises(ValueError, match=r"k_proj: mixSGA projects K/V with the effective weight of the module "
                                         r"at k_proj; peft\.tuners\.lora\.layer\.Linear with lora_dropout=0\.1 "
                                         r"in training has none"):
        model(ids, labels=ids)
    model.eval()  # dropout is the identity: the effective weight exists
    torch.testing.assert_close(logits(model, ids), logits(merged_copy(model), ids), **TIGHT)


def test_dora_ia3_mixed_adapter_batches_and_unknown_wrappers_raise():
    ids = token_ids()
    dora = with_lora(converted(), target_modules=["k_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"k_proj: .*adapter 'default' using DoRA \(use_dora=True\) has none"):
        logits(dora, ids)

    ia3 = peft.get_peft_model(converted(), peft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with pytest.raises(TypeError, match=r"v_proj: .* must be an nn\.Linear or a PEFT LoRA Linear wrapping one; "
                                        r"got peft\.tuners\.ia3\.layer\.Linear"):
        logits(ia3, ids)

    mixed = with_lora(converted()).eval()  # PEFT takes adapter_names in eval mode only
    with pytest.raises(ValueError, match=r"k_proj: .*forward hooks \(PEFT's mixed-adapter batches"):
        logits(mixed, ids, adapter_names=["default", "__base__"])

    model = converted()
    layer = mixsga.hf.mixsga_layers(model)[0]
    layer.k_proj = nn.Sequential(layer.k_proj)
    with pytest.raises(TypeError, match=r"k_proj: .*got torch\.nn\.modules\.container\.Sequential"):
        logits(model, ids)
