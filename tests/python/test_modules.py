"""mixsga.nn modules against the references and the identities of METHOD.md, from Python."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixsga
import reference as ref
from mixsga.nn import ExpertChoiceRouter, MixSGAAttention, SharedGroupKV

D, HQ, HKV, HD = 64, 8, 4, 8  # hidden, query heads, KV heads, head dim (groups 1, 2, 4 divide HKV)


def layer(dtype=torch.float64, **kwargs) -> MixSGAAttention:
    kwargs.setdefault("bias", True)
    return MixSGAAttention(D, HQ, HKV, **kwargs).to(dtype)


def params(module) -> dict:
    return {k: v.detach() for k, v in module.state_dict().items()}


def padding(B, L):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :5] = 0
    if B > 2:
        mask[2, :1] = 0
    return mask


def test_public_api_names_defaults_and_shapes():
    m = MixSGAAttention(64, 8, 4)
    assert (m.head_dim, m.group_sizes, m.ratios) == (8, (1, 2, 4), (0.3, 0.1, 0.6))
    assert (m.rope_theta, m.aux_alpha) == (10000.0, 0.1)
    assert (m.aux_loss_kind, m.prefill_routing, m.detach_router_input) == ("sigmoid_ce", "expert_choice", False)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (64, 64),
        "k_proj.weight": (32, 64),
        "v_proj.weight": (32, 64),
        "o_proj.weight": (64, 64),
        "router.proj.weight": (3, 64),
        "router.proj.bias": (3,),
    }
    assert isinstance(m.router.proj, torch.nn.Linear) and (m.router.proj.bias == 0).all()
    assert m.kv_fraction() == pytest.approx(0.5)
    assert mixsga.kv_fraction((1, 2, 4), (0.25, 0.25, 0.5)) == pytest.approx(0.25 + 0.125 + 0.125)
    assert mixsga.kv_fraction((1, 2, 4), (0, 1, 0)) == pytest.approx(0.5)


def test_router_init_is_kaiming_normal():
    r = ExpertChoiceRouter(4096, (0.3, 0.1, 0.6))
    std = r.proj.weight.std().item()
    assert abs(std - (2.0 / 4096) ** 0.5) < 0.05 * (2.0 / 4096) ** 0.5


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("prefill_routing", ["expert_choice", "argmax"])
def test_attention_matches_reference(masked, prefill_routing):
    m = layer(prefill_routing=prefill_routing)
    x = torch.randn(3, 11, D, dtype=torch.float64)
    mask = padding(3, 11) if masked else None
    r = m.forward_with_routing(x, mask)
    valid = None if mask is None else mask.bool()
    want = ref.mixsga_attention(params(m), x, r.expert_idx, num_heads=HQ, num_kv_heads=HKV, head_dim=HD,
                                group_sizes=(1, 2, 4), valid=valid)
    real = torch.ones(3, 11, dtype=torch.bool) if valid is None else valid
    torch.testing.assert_close(r.output[real], want[real])
    # Routing: expert choice is the target; the layer used it (or argmax of the same scores).
    scores = m.router.scores(x)
    torch.testing.assert_close(r.target_idx, ref.route_expert_choice(scores, m.ratios, valid), rtol=0, atol=0)
    used = scores.argmax(-1) if prefill_routing == "argmax" else r.target_idx
    assert torch.equal(r.expert_idx, used)


@pytest.mark.parametrize("kind", ["sigmoid_ce", "logit_ce", "bce"])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_kinds_match_reference(kind, masked):
    m = layer(aux_loss=kind, aux_alpha=0.25)
    x = torch.randn(3, 9, D, dtype=torch.float64)
    mask = padding(3, 9) if masked else None
    r = m.forward_with_routing(x, mask)
    want = ref.aux_loss(m.router(x), r.target_idx, kind, None if mask is None else mask.bool())
    torch.testing.assert_close(r.aux_loss, 0.25 * want)
    assert m.forward_with_routing(x.float().double(), mask).aux_loss.dtype == torch.float64
    m32 = layer(torch.float32, aux_loss=kind)
    assert m32(x.float(), mask)[1].dtype == torch.float32


@pytest.mark.parametrize("ratios,group", [((1.0, 0.0, 0.0), 1), ((0.0, 1.0, 0.0), 2), ((0.0, 0.0, 1.0), 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_single_expert_ratios_are_mean_pooled_gqa(ratios, group, masked):
    """METHOD.md: (1,0,0) is the original layer, (0,1,0) GQA with mean-pooled pairs, (0,0,1) GQA with
    group 4."""
    m = layer(ratios=ratios)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    mask = padding(2, 10) if masked else None
    out, _ = m(x, mask)
    valid = None if mask is None else mask.bool()
    want = ref.gqa_attention(params(m), x, num_heads=HQ, num_kv_heads=HKV, head_dim=HD, group=group, valid=valid)
    real = torch.ones(2, 10, dtype=torch.bool) if valid is None else valid
    torch.testing.assert_close(out[real], want[real])


def test_original_layer_identity_with_plain_sdpa():
    """rho = (1, 0, 0): exactly a standard Llama GQA attention written with F.scaled_dot_product_attention."""
    m = layer(torch.float32, ratios=(1.0, 0.0, 0.0), bias=False)
    x = torch.randn(2, 12, D)
    q = mixsga.nn.apply_rope(m.q_proj(x).view(2, 12, HQ, HD), torch.arange(12))
    k = mixsga.nn.apply_rope(m.k_proj(x).view(2, 12, HKV, HD), torch.arange(12))
    v = m.v_proj(x).view(2, 12, HKV, HD)
    rep = HQ // HKV
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                       v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True)
    want = m.o_proj(o.transpose(1, 2).reshape(2, 12, HQ * HD))
    torch.testing.assert_close(m(x)[0], want, rtol=1e-5, atol=1e-6)


def test_pooling_commutes_with_rope():
    """METHOD.md: pooling before RoPE == pooling after RoPE (RoPE rotates every head of a position alike)."""
    k = torch.randn(2, 7, HKV, HD, dtype=torch.float64)
    idx = torch.randint(0, 3, (2, 7))
    pos = torch.randint(0, 100, (2, 7))
    before = mixsga.nn.apply_rope(mixsga.ops.grouped_kv_pool(k, idx, [1, 2, 4]), pos)
    after = mixsga.ops.grouped_kv_pool(mixsga.nn.apply_rope(k, pos), idx, [1, 2, 4])
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_matches_reference(dtype):
    x = torch.randn(2, 9, 3, 16, dtype=torch.float64).to(dtype)
    for pos in (torch.arange(9), torch.randint(0, 5000, (2, 9)), torch.randint(0, 50, (1, 9))):
        got = mixsga.nn.apply_rope(x, pos, 500000.0)
        want = ref.rope(x.double(), pos, 500000.0)
        tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_shared_group_kv_module():
    kv = SharedGroupKV(D, HKV, HD, bias=True).double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    idx = torch.randint(0, 3, (2, 6))
    k, v = kv(x, idx)
    torch.testing.assert_close(k, ref.grouped_kv_proj(x, kv.k_proj.weight, kv.k_proj.bias, idx, (1, 2, 4), HD))
    torch.testing.assert_close(v, ref.grouped_kv_proj(x, kv.v_proj.weight, kv.v_proj.bias, idx, (1, 2, 4), HD))
    w, b = kv.expert_weights(2, key=False)
    assert w.shape == (HD, D) and b.shape == (HD,)
    coarsest = idx == 2  # g = 4 = Hkv: one compact head, repeated to every head
    for h in range(HKV):
        torch.testing.assert_close(v[..., h, :][coarsest], F.linear(x, w, b)[coarsest])


def test_padding_invariance():
    """Left padding changes nothing for the real tokens: routing, outputs and the aux loss of a padded
    batch equal those of the unpadded sequence."""
    m = layer()
    x = torch.randn(1, 10, D, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 4, D, dtype=torch.float64), x], 1)
    mask = torch.tensor([[0] * 4 + [1] * 10])
    a, b = m.forward_with_routing(x), m.forward_with_routing(padded, mask)
    torch.testing.assert_close(b.output[:, 4:], a.output)
    assert torch.equal(b.target_idx[:, 4:], a.target_idx) and (b.target_idx[:, :4] == 2).all()
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    assert torch.isfinite(b.output).all()


def test_argmax_prefill_is_causal():
    """With prefill_routing='argmax', changing future tokens never changes earlier outputs."""
    m = layer(prefill_routing="argmax")
    x = torch.randn(2, 12, D, dtype=torch.float64)
    y = x.clone()
    y[:, 7:] = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0][:, :7], m(y)[0][:, :7])


def test_router_gets_gradient_only_from_aux_loss():
    """Hard 0/1 routing: the LM loss sends no gradient to the router; the aux loss does. With
    detach_router_input the aux loss reaches only the router."""
    m = layer()
    x = torch.randn(2, 8, D, dtype=torch.float64, requires_grad=True)
    out, aux = m(x)
    out.pow(2).sum().backward(retain_graph=True)
    assert m.router.proj.weight.grad is None or (m.router.proj.weight.grad == 0).all()
    aux.backward()
    assert m.router.proj.weight.grad.abs().sum() > 0

    for detach in (False, True):
        m = layer(detach_router_input=detach)
        x = torch.randn(2, 8, D, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(m(x)[1], x, allow_unused=True)
        assert (grad is None) == detach and (detach or grad.abs().sum() > 0)


def test_aux_alpha_zero_gives_zero_and_no_graph():
    m = layer(aux_alpha=0.0)
    aux = m(torch.randn(1, 5, D, dtype=torch.float64))[1]
    assert aux.item() == 0.0 and not aux.requires_grad


def test_empty_batch_and_sequence():
    m = layer()
    for shape in ((0, 5, D), (2, 0, D)):
        r = m.forward_with_routing(torch.randn(*shape, dtype=torch.float64))
        assert r.output.shape == shape and r.expert_idx.shape == shape[:2] and r.aux_loss.item() == 0.0


def test_position_ids_and_forward_routed():
    m = layer()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    r = m.forward_with_routing(x)
    torch.testing.assert_close(m(x, position_ids=torch.arange(6))[0], r.output)
    torch.testing.assert_close(m(x, position_ids=torch.arange(6).expand(2, 6))[0], r.output)
    # RoPE sees only position differences: a uniform shift changes nothing, spreading them out does.
    torch.testing.assert_close(m(x, position_ids=torch.arange(6) + 3)[0], r.output)
    assert not torch.allclose(m(x, position_ids=torch.arange(6) * 2)[0], r.output)
    torch.testing.assert_close(m.forward_routed(x, r.expert_idx), r.output)
    forced = torch.zeros(2, 6, dtype=torch.int32)
    want = ref.mixsga_attention(params(m), x, forced.long(), num_heads=HQ, num_kv_heads=HKV, head_dim=HD,
                                group_sizes=(1, 2, 4))
    torch.testing.assert_close(m.forward_routed(x, forced), want)


def test_module_gradcheck_float64():
    m = layer()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 5, [0, 1, 1, 1, 1]])
    idx = m.forward_with_routing(x, mask).expert_idx
    # Routing is piecewise constant; gradcheck the layer with that routing held fixed, plus the aux loss.
    assert torch.autograd.gradcheck(lambda t: m.forward_routed(t, idx, mask), (x,))
    assert torch.autograd.gradcheck(lambda t: m(t, mask)[1], (x,))


def test_bf16_layer_within_2x_of_pytorch_bf16():
    m = layer(torch.float64)
    x = torch.randn(2, 16, D, dtype=torch.float64)
    idx = m.forward_with_routing(x).expert_idx
    exact = ref.mixsga_attention(params(m), x, idx, num_heads=HQ, num_kv_heads=HKV, head_dim=HD, group_sizes=(1, 2, 4))
    mb = layer(torch.float64).bfloat16()
    mb.load_state_dict(m.state_dict())
    got = mb.forward_routed(x.bfloat16(), idx)
    pytorch_bf16 = ref.mixsga_attention({k: v.bfloat16() for k, v in params(m).items()}, x.bfloat16(), idx,
                                        num_heads=HQ, num_kv_heads=HKV, head_dim=HD, group_sizes=(1, 2, 4))
    err = (got.double() - exact).abs().max().item()
    base = (pytorch_bf16.double() - exact).abs().max().item()
    assert err <= 2 * base, f"bf16 error {err:.3g} > 2 x PyTorch bf16 error {base:.3g}"


def test_routing_agreement_and_training_teaches_argmax():
    """The aux loss makes argmax routing reproduce expert choice on held-out data, far above chance."""
    torch.manual_seed(1)
    m = MixSGAAttention(16, 4, 4, ratios=(0.25, 0.25, 0.5), aux_loss="logit_ce")
    proto = torch.randn(3, 16) * 2  # three clusters; expert choice depends on the router's view of them
    def batch(n):
        c = torch.randint(0, 3, (n, 24))
        return proto[c] + 0.3 * torch.randn(n, 24, 16)
    opt = torch.optim.Adam(m.router.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        m(batch(8))[1].backward()
        opt.step()
    held_out = m.routing_agreement(batch(16))
    assert held_out.agreement > 0.6, held_out
    torch.testing.assert_close(held_out.expert_choice_ratios, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))


def test_default_positions_follow_the_padding():
    """cumsum(mask) - 1 clamped at 0: left-padded sequences start at position 0 (what a decode step with a
    cache continues from; RoPE alone cannot tell a uniform shift apart)."""
    from mixsga.nn.functional import default_positions

    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()
    assert default_positions(mask, 4, torch.device("cpu")).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert default_positions(None, 3, torch.device("cpu")).tolist() == [0, 1, 2]


def test_stacked_kv_weight_is_reused_without_autograd_and_follows_weight_updates():
    from mixsga.nn.shared_group_kv import grouped_kv, stacked_kv_weight

    k_proj, v_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
    x, idx = torch.randn(2, 5, 16), torch.randint(0, 3, (2, 5))
    with torch.no_grad():
        first = stacked_kv_weight(k_proj, v_proj)
        assert stacked_kv_weight(k_proj, v_proj)[0] is first[0]  # reused while the weights are unchanged
        k_proj.weight.mul_(2.0)  # an in-place update (what optimizers and load_state_dict do)
        second = stacked_kv_weight(k_proj, v_proj)
        assert second[0] is not first[0]
        torch.testing.assert_close(second[0], torch.cat((k_proj.weight, v_proj.weight)))
        torch.testing.assert_close(second[1], torch.cat((k_proj.bias, v_proj.bias)))
        k_nograd, v_nograd = grouped_kv(x, k_proj, v_proj, idx, (1, 2, 4), 8)
    k_grad, v_grad = grouped_kv(x, k_proj, v_proj, idx, (1, 2, 4), 8)  # autograd on: a fresh, differentiable cat
    assert k_grad.requires_grad
    torch.testing.assert_close(k_grad.detach(), k_nograd)
    torch.testing.assert_close(v_grad.detach(), v_nograd)


@pytest.mark.parametrize("bias", [True, False])
def test_compact_kv_is_the_group_means_of_grouped_kv_and_follows_weight_updates(bias):
    from mixsga.nn.shared_group_kv import clear_kv_weight_cache, compact_kv, grouped_kv

    torch.manual_seed(0)
    k_proj = torch.nn.Linear(16, 32, bias=bias, dtype=torch.float64)
    v_proj = torch.nn.Linear(16, 32, bias=bias, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 1, 2, 0], [2, 2, 1, 0, 1]])
    valid = torch.tensor([[True, True, True, True, True], [False, True, True, True, False]])

    def check():
        got = compact_kv(x, k_proj, v_proj, idx, valid, (1, 2, 4), 8)
        k_ref, v_ref = grouped_kv(x, k_proj, v_proj, idx, (1, 2, 4), 8)
        for e, g in enumerate((1, 2, 4)):
            mine = (idx == e) & valid
            assert got.rows[e].tolist() == mine.reshape(-1).nonzero().squeeze(1).tolist()  # batch-major order
            for ref, out in ((k_ref, got.keys[e]), (v_ref, got.values[e])):
                # The expanded K/V repeat each compact head g times: its first copies are the compact heads.
                expected = ref[mine].view(-1, 4 // g, g, 8)[:, :, 0]
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        for _ in range(2):
            check()
            v_proj.weight.add_(1.0)  # an in-place update: the pooled weights must follow it
        v_proj.weight.data.mul_(3.0)  # bypasses the version counter: needs the explicit clear
        clear_kv_weight_cache(v_proj)
        check()
    check()  # with autograd: fresh pooled weights
    # One token (the decode shortcut without the permutation): its expert only, or nothing if padding.
    one = compact_kv(x[:1, :1], k_proj, v_proj, torch.tensor([[1]]), None, (1, 2, 4), 8)
    assert [k.shape[0] for k in one.keys] == [0, 1, 0] and one.rows[1].tolist() == [0]
    k_ref = grouped_kv(x[:1, :1], k_proj, v_proj, torch.tensor([[1]]), (1, 2, 4), 8)[0]
    torch.testing.assert_close(one.keys[1], k_ref.view(1, 2, 2, 8)[:, :, 0], rtol=1e-12, atol=1e-12)
    padded = compact_kv(x[:1, :1], k_proj, v_proj, torch.tensor([[1]]), torch.tensor([[False]]), (1, 2, 4), 8)
    assert [k.shape for k in padded.keys] == [(0, 4, 8), (0, 2, 8), (0, 1, 8)]
