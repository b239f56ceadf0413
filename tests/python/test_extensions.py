"""The quality extensions of docs/METHOD.md (E1 key scale, E2 routing by pooling error, E3 warm start) and
the decode-routing rule for zero-capacity experts, against independent references in float64."""

from __future__ import annotations

import math

import pytest
import torch

import mixsga
import reference as ref
from mixsga.nn import MixSGAAttention

D, HQ, HKV, HD = 64, 8, 4, 8
GROUPS = (1, 2, 4)


def layer(dtype=torch.float64, **kwargs) -> MixSGAAttention:
    kwargs.setdefault("bias", True)
    torch.manual_seed(0)
    return MixSGAAttention(D, HQ, HKV, group_sizes=GROUPS, **kwargs).to(dtype)


def params(module) -> dict:
    return {k: v.detach() for k, v in module.state_dict().items()}


def test_learned_key_scale_at_its_initial_value_is_exactly_the_paper():
    paper, learned = layer(), layer(key_scale="learned")
    learned.load_state_dict({**paper.state_dict(), "key_log_scale": torch.zeros(3, dtype=torch.float64)})
    x = torch.randn(2, 12, D, dtype=torch.float64)
    a, b = paper.forward_with_routing(x), learned.forward_with_routing(x)
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.output, b.output)  # exp(0) = 1: bitwise the paper's layer


@pytest.mark.parametrize("mode", ["group", "learned"])
def test_key_scale_matches_the_reference_layer_with_scaled_pooled_keys(mode):
    m = layer(key_scale=mode)
    if mode == "learned":
        with torch.no_grad():
            m.key_log_scale.copy_(torch.tensor([0.1, 0.7, 1.3], dtype=torch.float64))
    logs = torch.tensor([0.1, 0.7, 1.3], dtype=torch.float64)
    scales = torch.tensor(GROUPS, dtype=torch.float64) if mode == "group" else logs.exp()
    torch.testing.assert_close(m.key_scales(), scales.to(torch.float64))
    x = torch.randn(2, 10, D, dtype=torch.float64)
    idx = torch.randint(0, 3, (2, 10))
    want = ref.mixsga_attention(params(m), x, idx, num_heads=HQ, num_kv_heads=HKV, head_dim=HD, group_sizes=GROUPS,
                                key_scales=scales)
    torch.testing.assert_close(m.forward_routed(x, idx), want, rtol=1e-12, atol=1e-12)
    # Values are never scaled: with every token on the finest expert and s_1 = 1 ("group"), it is the paper.
    if mode == "group":
        zero = torch.zeros_like(idx)
        torch.testing.assert_close(m.forward_routed(x, zero), layer().forward_routed(x, zero), rtol=0, atol=0)


def test_learned_key_scale_is_trained_by_the_lm_loss():
    m = layer(key_scale="learned")
    x = torch.randn(2, 10, D, dtype=torch.float64)
    out, _ = m(x)
    out.square().sum().backward()
    assert m.key_log_scale.grad is not None and m.key_log_scale.grad.abs().sum() > 0


def test_pooling_error_matches_a_head_by_head_reference():
    from mixsga.nn.shared_group_kv import pooling_error

    m = layer()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    for g in (2, 4):
        want = ref.pooling_error(x, m.k_proj.weight, m.k_proj.bias, m.v_proj.weight, m.v_proj.bias, g, HD)
        torch.testing.assert_close(pooling_error(x, m.k_proj, m.v_proj, g, HD), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratios", [(0.3, 0.1, 0.6), (0.25, 0.25, 0.5), (0.5, 0.5, 0.0), (0.0, 0.0, 1.0)])
def test_routing_by_pooling_error_respects_capacities_exactly_and_ranks_by_error(ratios):
    m = layer(ratios=ratios, routing_signal="pooling_error")
    B, L = 3, 17
    x = torch.randn(B, L, D, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0
    r = m.forward_with_routing(x, mask)
    valid = mask.bool()
    coarsest_open = max(g for g, p in zip(GROUPS, ratios) if p > 0)
    err = ref.pooling_error(x, m.k_proj.weight, m.k_proj.bias, m.v_proj.weight, m.v_proj.bias, coarsest_open, HD)
    for b in range(B):
        n = int(valid[b].sum())
        idx = r.target_idx[b][valid[b]]
        e_b = err[b][valid[b]]
        counts = torch.bincount(idx, minlength=3).tolist()
        left = n
        for e, p in enumerate(ratios[:-1]):
            want = min(ref.capacity(p, n), left)
            assert counts[e] == want, (b, e, counts, ratios)
            left -= want
        assert counts[-1] == left
        # Finer experts hold the tokens pooling damages most.
        for e in range(2):
            finer, coarser = e_b[idx <= e], e_b[idx > e]
            if finer.numel() and coarser.numel():
                assert finer.min() >= coarser.max()
    assert torch.equal(r.expert_idx, r.target_idx)  # expert-choice prefill uses that assignment


def test_pooling_error_routing_is_the_aux_target_so_the_router_learns_to_predict_it():
    m = layer(routing_signal="pooling_error", aux_alpha=1.0)
    x = torch.randn(4, 32, D, dtype=torch.float64)
    target = m.forward_with_routing(x).target_idx
    opt = torch.optim.Adam(m.router.parameters(), lr=3e-2)
    before = (m.router.argmax_route(m.router.scores(x)) == target).double().mean()
    for _ in range(150):
        opt.zero_grad()
        m(x)[1].backward()
        opt.step()
    after = (m.router.argmax_route(m.router.scores(x)) == target).double().mean()
    assert after > before + 0.1 and after > 0.7, (before, after)


def test_decode_equals_prefill_under_the_same_routing_with_extensions():
    m = layer(key_scale="learned", routing_signal="pooling_error").eval()
    with torch.no_grad():
        m.key_log_scale.copy_(torch.tensor([0.0, 0.5, 1.1], dtype=torch.float64))
    B, P, N = 2, 7, 4
    x = torch.randn(B, P + N, D, dtype=torch.float64)
    cache = mixsga._C.HeteroKVCache(m.cache_options(1))
    with torch.no_grad():
        first = m.forward_with_routing(x[:, :P], cache=cache)
        outs, idx = [first.output], [first.expert_idx]
        for t in range(P, P + N):
            step = m.forward_with_routing(x[:, t : t + 1], cache=cache)
            outs.append(step.output)
            idx.append(step.expert_idx)
        full = m.forward_routed(x, torch.cat(idx, 1))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_argmax_never_chooses_a_zero_capacity_expert_and_ranks_nan_lowest():
    m = layer(ratios=(0.5, 0.0, 0.5))
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.9, 0.95, 0.1], [float("nan"), 0.5, 0.4], [float("nan"), 0.9, float("nan")]],
                          dtype=torch.float64)
    assert m.router.argmax_route(scores).tolist() == [2, 0, 2, 0]
    paper = layer()
    nan = torch.tensor([[float("nan"), 0.2, 0.1]], dtype=torch.float64)
    assert paper.router.argmax_route(nan).tolist() == [1]


def test_decode_routing_with_ratio_zero_experts_never_uses_them():
    m = layer(ratios=(1.0, 0.0, 0.0)).eval()
    with torch.no_grad():  # a router that prefers the closed experts
        m.router.proj.bias.copy_(torch.tensor([-5.0, 5.0, 5.0]))
    x = torch.randn(1, 9, D, dtype=torch.float64)
    cache = mixsga._C.HeteroKVCache(m.cache_options(1))
    with torch.no_grad():
        m(x[:, :5], cache=cache)
        for t in range(5, 9):
            assert m.forward_with_routing(x[:, t : t + 1], cache=cache).expert_idx.item() == 0
    # Ratios (1, 0, 0): every token keeps all heads, so decode equals the base layer.
    full = m.forward_routed(x, torch.zeros(1, 9, dtype=torch.long))
    torch.testing.assert_close(m.forward_routed(x, torch.zeros(1, 9, dtype=torch.long)), full)


@pytest.mark.parametrize(("name", "value"), [("key_scale", "norm"), ("key_scale", None), ("routing_signal", "oracle")])
def test_bad_extension_options_are_rejected_by_name(name, value):
    with pytest.raises(ValueError, match=f"{name}: must be one of .*got {value!r}"):
        MixSGAAttention(D, HQ, HKV, **{name: value})


def test_bad_masks_and_positions_are_rejected_by_name():
    m = layer()
    x = torch.randn(1, 4, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attention_mask: must hold only 0 and 1, got 2 at \[0, 1\]"):
        m(x, torch.tensor([[1, 2, 1, 1]]))
    with pytest.raises(TypeError, match="attention_mask: expected a bool or integer 0/1 mask, got torch.float32"):
        m(x, torch.ones(1, 4))
    with pytest.raises(TypeError, match="position_ids: expected an integer dtype, got torch.float64"):
        m(x, position_ids=torch.arange(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rope_theta: must be finite and > 0, got inf"):
        MixSGAAttention(D, HQ, HKV, rope_theta=math.inf)


def test_fit_key_scales_is_the_least_squares_logit_match():
    from mixsga.hf.prepare import LayerInputs, fit_key_scales

    m = layer()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    s = fit_key_scales(m, LayerInputs(x, None))
    assert s[0] == 1.0
    q = m.q_proj(x).view(2, 8, HQ, HD).detach()
    k = m.k_proj(x).view(2, 8, HKV, HD).detach()
    for e, g in enumerate(GROUPS[1:], start=1):
        # Explicit sums, batch by batch (no einsum): sum(a*b) / sum(b*b).
        num = den = 0.0
        for bb in range(2):
            for t in range(8):
                for u in range(t + 1):
                    for h in range(HQ):
                        kv = h // (HQ // HKV)
                        pooled = k[bb, u, (kv // g) * g : (kv // g + 1) * g].mean(0)
                        full_logit = float(q[bb, t, h] @ k[bb, u, kv])
                        pooled_logit = float(q[bb, t, h] @ pooled)
                        num += full_logit * pooled_logit
                        den += pooled_logit**2
        assert math.isclose(float(s[e]), min(max(num / den, 1 / 16), 16), rel_tol=1e-9)


def test_fit_key_scales_is_one_when_pooling_loses_nothing():
    from mixsga.hf.prepare import LayerInputs, fit_key_scales

    m = layer()
    with torch.no_grad():  # every KV head identical: mean pooling changes no key
        w = m.k_proj.weight.view(HKV, HD, D)
        w.copy_(w[:1].expand_as(w))
        m.k_proj.bias.view(HKV, HD).copy_(m.k_proj.bias.view(HKV, HD)[:1].expand(HKV, HD))
    s = fit_key_scales(m, LayerInputs(torch.randn(2, 6, D, dtype=torch.float64), None))
    torch.testing.assert_close(s, torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
