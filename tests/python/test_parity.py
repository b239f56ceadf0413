"""The C++ modules (through the pybind11 module mixsga._C) against the Python modules: same weights ->
same routing, outputs, aux losses and gradients. Also the C++ helpers against their Python twins."""

from __future__ import annotations

import pytest
import torch

import mixsga
from mixsga import _C
from mixsga.nn import ExpertChoiceRouter, MixSGAAttention, SharedGroupKV

CONFIGS = [
    dict(hidden_size=64, num_heads=8, num_kv_heads=4),
    dict(hidden_size=48, num_heads=4, num_kv_heads=4, bias=True, aux_loss="logit_ce", aux_alpha=0.3),
    dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=12, group_sizes=(1, 2), ratios=(0.5, 0.5),
         aux_loss="bce", rope_theta=500000.0),
    dict(hidden_size=64, num_heads=8, num_kv_heads=8, group_sizes=(1, 2, 8), ratios=(0.25, 0.25, 0.5),
         prefill_routing="argmax", detach_router_input=True),
    dict(hidden_size=64, num_heads=8, num_kv_heads=4, ratios=(1.0, 0.0, 0.0), aux_alpha=0.0),
    # The quality extensions (docs/METHOD.md E1, E2).
    dict(hidden_size=64, num_heads=8, num_kv_heads=4, key_scale="group", routing_signal="pooling_error"),
    dict(hidden_size=64, num_heads=8, num_kv_heads=4, bias=True, key_scale="learned", ratios=(0.5, 0.5, 0.0),
         routing_signal="pooling_error", prefill_routing="argmax"),
]


def twins(dtype, **config):
    """A Python module and a C++ module holding the same weights."""
    py = MixSGAAttention(**config).to(dtype)
    cpp = _C.MixSGAAttention(**config)
    cpp.to(dtype)
    missing, unexpected = cpp.load_state_dict(py.state_dict())
    assert not missing and not unexpected
    return py, cpp


def inputs(B, L, D, dtype, masked):
    x = torch.randn(B, L, D, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, :4] = 0
    return x, mask


def test_parameter_names_and_shapes_match():
    for config in CONFIGS:
        py, cpp = MixSGAAttention(**config), _C.MixSGAAttention(**config)
        assert [(k, tuple(v.shape)) for k, v in py.named_parameters()] == \
               [(k, tuple(v.shape)) for k, v in cpp.named_parameters()]
        assert cpp.options["head_dim"] == py.head_dim and cpp.kv_fraction() == pytest.approx(py.kv_fraction())
    r_py, r_cpp = ExpertChoiceRouter(16, (0.5, 0.5)), _C.ExpertChoiceRouter(16, (0.5, 0.5))
    assert {k: v.shape for k, v in r_py.state_dict().items()} == {k: v.shape for k, v in r_cpp.state_dict().items()}
    kv_py, kv_cpp = SharedGroupKV(16, 4, 8, bias=True), _C.SharedGroupKV(16, 4, 8, bias=True)
    assert {k: v.shape for k, v in kv_py.state_dict().items()} == {k: v.shape for k, v in kv_cpp.state_dict().items()}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_forward_and_gradients_match(config, dtype, masked):
    py, cpp = twins(dtype, **config)
    x, mask = inputs(3, 10, config["hidden_size"], dtype, masked)
    x_py, x_cpp = x.clone().requires_grad_(), x.clone().requires_grad_()
    r_py = py.forward_with_routing(x_py, mask)
    out, aux, expert_idx, target_idx = cpp.forward_with_routing(x_cpp, mask)
    assert torch.equal(r_py.expert_idx, expert_idx) and torch.equal(r_py.target_idx, target_idx)
    # Not bitwise: for inputs of rank > 2 the C++ frontend's torch::nn::Linear adds the bias after the
    # matmul, Python's nn.Linear fuses it into addmm (1-ulp differences when bias=True).
    torch.testing.assert_close(r_py.output, out)
    torch.testing.assert_close(r_py.aux_loss, aux)

    g = torch.randn_like(out)
    (r_py.output * g).sum().add(r_py.aux_loss).backward()
    (out * g).sum().add(aux).backward()
    torch.testing.assert_close(x_py.grad, x_cpp.grad)
    cpp_params = dict(cpp.named_parameters())
    for name, p in py.named_parameters():
        q = cpp_params[name]
        if p.grad is None:
            assert q.grad is None or (q.grad == 0).all(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_attention_position_ids_and_forward_match():
    py, cpp = twins(torch.float32, **CONFIGS[0])
    x, mask = inputs(3, 10, 64, torch.float32, True)
    for pos in (torch.arange(10) * 3, torch.randint(0, 1000, (3, 10))):
        a, aux_a = py(x, mask, pos)
        b, aux_b = cpp(x, mask, pos)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(aux_a, aux_b, rtol=0, atol=0)
    torch.testing.assert_close(py(x)[0], cpp.forward(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sigmoid_ce", "logit_ce", "bce"])
def test_router_matches(kind):
    py = ExpertChoiceRouter(24, (0.3, 0.1, 0.6), kind).double()
    cpp = _C.ExpertChoiceRouter(24, (0.3, 0.1, 0.6), kind)
    cpp.to(torch.float64)
    cpp.load_state_dict(py.state_dict())
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    logits = py(x)
    torch.testing.assert_close(logits, cpp(x))
    torch.testing.assert_close(py.scores(x), cpp.scores(x))
    target = py.route(py.scores(x), mask)
    assert torch.equal(target, cpp.route(cpp.scores(x), mask))
    assert torch.equal(py.argmax_route(logits), cpp.argmax_route(logits))
    torch.testing.assert_close(py.aux_loss(logits, target, mask), cpp.aux_loss(logits, target, mask))
    torch.testing.assert_close(py.aux_loss(logits, target), cpp.aux_loss(logits, target))
    assert cpp.num_experts == 3 and cpp.aux_loss_kind == kind


def test_shared_group_kv_matches():
    py = SharedGroupKV(20, 4, 6, (1, 2, 4), bias=True)
    cpp = _C.SharedGroupKV(20, 4, 6, [1, 2, 4], bias=True)
    cpp.load_state_dict(py.state_dict())
    x = torch.randn(2, 7, 20)
    idx = torch.randint(0, 3, (2, 7))
    for a, b in zip(py(x, idx), cpp(x, idx)):
        torch.testing.assert_close(a, b)
    for e in range(3):
        for key in (True, False):
            for a, b in zip(py.expert_weights(e, key), cpp.expert_weights(e, key)):
                torch.testing.assert_close(a, b)


def test_helpers_match():
    x = torch.randn(2, 5, 3, 8)
    for pos in (torch.arange(5), torch.randint(0, 99, (2, 5))):
        torch.testing.assert_close(mixsga.nn.apply_rope(x, pos, 1e4), _C.apply_rope(x, pos, 1e4), rtol=0, atol=0)
    w = torch.randn(32, 7)
    for g in (1, 2, 4):
        torch.testing.assert_close(mixsga.nn.pool_kv_weight(w, g, 8), _C.pool_kv_weight(w, g, 8))
    for groups, ratios in [((1, 2, 4), (0.3, 0.1, 0.6)), ((1, 2), (0.5, 0.5)), ((1, 4, 8), (0.2, 0.2, 0.6))]:
        assert mixsga.kv_fraction(groups, ratios) == pytest.approx(_C.kv_fraction(groups, ratios))


def test_cpp_module_state_dict_round_trip_and_repr():
    cpp = _C.MixSGAAttention(32, 4, 4, bias=True)
    state = {k: torch.randn_like(v) for k, v in cpp.state_dict().items()}
    cpp.load_state_dict(state)
    for k, v in cpp.state_dict().items():
        assert torch.equal(v, state[k])
    assert "MixSGAAttention(hidden_size=32" in repr(cpp) and isinstance(cpp, torch.nn.Module)
    with pytest.raises(ValueError, match="unexpected keys \\[extra\\]"):
        cpp.load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing keys \\[q_proj.bias"):
        cpp.load_state_dict({k: v for k, v in state.items() if k != "q_proj.bias"})
    with pytest.raises(ValueError, match="'q_proj.weight' has shape \\[3\\]"):
        cpp.load_state_dict({**state, "q_proj.weight": torch.zeros(3)})
    assert mixsga.library_path().endswith((".so", ".so.0")) and "libmixsga" in mixsga.library_path()


def test_forward_routed_and_routing_agreement_match():
    py, cpp = twins(torch.float64, **CONFIGS[1])
    x, mask = inputs(3, 10, 48, torch.float64, True)
    idx = torch.randint(0, 3, (3, 10))
    torch.testing.assert_close(py.forward_routed(x, idx, mask), cpp.forward_routed(x, idx, mask))
    a, b = py.routing_agreement(x, mask), cpp.routing_agreement(x, mask)
    assert a.agreement == pytest.approx(b[0])
    torch.testing.assert_close(a.argmax_ratios, b[1])
    torch.testing.assert_close(a.expert_choice_ratios, b[2])


def test_cpp_compact_cache_decode_equals_python_full_forward():
    """METHOD.md: decode with the compact cache gives the same outputs as a full forward pass with the
    same routing. Prefill + decode run in C++ (through mixsga._C); the full pass is the Python module."""
    py, cpp = twins(torch.float64, **CONFIGS[0])
    cpp.eval()
    x = torch.randn(2, 14, 64, dtype=torch.float64)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the prompt
    cache = _C.HeteroKVCache(cpp.cache_options(num_layers=1))
    out, _, idx, _ = cpp.forward_with_routing(x[:, :9], mask[:, :9], cache=cache)
    outs, idxs = [out], [idx]
    for t in range(9, 14):
        out, aux, idx, _ = cpp.forward_with_routing(x[:, t : t + 1], cache=cache)
        assert aux.item() == 0.0
        outs.append(out)
        idxs.append(idx)
    full = py.forward_routed(x, torch.cat(idxs, 1), mask)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(outs, 1)[real], full[real])

    # The memory identity: every stored token costs 2 * (Hkv/g_e) * d * elem_size bytes, plus its expert id
    # in 2 bits (3 experts), rounded up to whole bytes per sequence.
    counts = cache.token_counts(0)
    assert int(counts.sum()) == int(mask.sum())  # padding is never stored
    per_token = [2 * (4 // g) * 8 * 8 for g in (1, 2, 4)]
    index = sum((2 * n + 7) // 8 for n in cache.seq_lengths(0).tolist())
    assert cache.bytes_stored() == sum(int(n) * b for n, b in zip(counts, per_token)) + index
    assert cache.full_bytes_per_token() == 2 * 4 * 8 * 8
    torch.testing.assert_close(cache.decode_ratios().sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(IndexError, match="layer: must be in \\[0, 1\\)"):
        cpp(x[:, :1], cache=cache, layer_idx=1)


# Cases where the two layers once behaved differently (the architecture review); each must now agree.
def _both_raise(make, exc, match):
    for build in make:
        with pytest.raises(exc, match=match):
            build()


def test_drift_argmax_routing_ranks_nan_lowest_and_skips_closed_experts_in_both():
    nan = float("nan")
    scores = torch.tensor([[nan, 0.2, 0.1], [0.9, nan, 0.3], [nan, nan, nan], [0.1, 0.9, 0.2]], dtype=torch.float64)
    for ratios in ((0.3, 0.1, 0.6), (0.5, 0.0, 0.5)):
        py, cpp = ExpertChoiceRouter(8, ratios), _C.ExpertChoiceRouter(8, ratios)
        assert py.argmax_route(scores).tolist() == cpp.argmax_route(scores).tolist()
    assert ExpertChoiceRouter(8, (0.5, 0.0, 0.5)).argmax_route(scores).tolist() == [2, 0, 0, 2]


def test_drift_option_and_input_checks_agree():
    _both_raise([lambda: MixSGAAttention(32, 4, 4, rope_theta=float("inf")),
                 lambda: _C.MixSGAAttention(32, 4, 4, rope_theta=float("inf"))], ValueError,
                "rope_theta: must be finite and > 0, got inf")
    py, cpp = twins(torch.float64, hidden_size=32, num_heads=4, num_kv_heads=2, group_sizes=(1, 2), ratios=(0.5, 0.5))
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    _both_raise([lambda: py(x, position_ids=torch.arange(4.0)), lambda: cpp(x, position_ids=torch.arange(4.0))],
                TypeError, "position_ids: expected an integer dtype, got torch.float32")
    _both_raise([lambda: py(x, torch.tensor([[1, 2, 1, 1]])), lambda: cpp(x, torch.tensor([[1, 2, 1, 1]]))],
                ValueError, r"attention_mask: must hold only 0 and 1, got 2 at \[0, 1\]")
    _both_raise([lambda: py(x, torch.ones(1, 4)), lambda: cpp(x, torch.ones(1, 4))],
                TypeError, "attention_mask: expected a bool or integer 0/1 mask, got torch.float32")
    for name, value in (("key_scale", "norm"), ("routing_signal", "oracle")):
        _both_raise([lambda: MixSGAAttention(32, 4, 4, **{name: value}),
                     lambda: _C.MixSGAAttention(32, 4, 4, **{name: value})], ValueError, f"{name}: must be one of")


def test_drift_cache_keyword_and_no_dropout_with_a_cache():
    # Both take the cache's layer as layer_idx, and neither applies attention dropout when a cache is
    # given (inference), even in training mode: a chunk after cached tokens is deterministic in both.
    config = dict(hidden_size=32, num_heads=4, num_kv_heads=2, group_sizes=(1, 2), ratios=(0.5, 0.5),
                  attention_dropout=0.5)
    py, cpp = twins(torch.float64, **config)
    py.train(), cpp.train()
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    outs = []
    for module in (py, cpp):
        cache = _C.HeteroKVCache(module.cache_options(num_layers=2))
        with torch.no_grad():
            module(x[:, :5], cache=cache, layer_idx=1)
            outs.append(module(x[:, 5:], cache=cache, layer_idx=1)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[6]], ids=["paper", "extensions"])
def test_rope_override_and_explicit_positions_match_through_prefill_chunk_and_decode(config):
    """A caller's (cos, sin) (the Hugging Face path) and explicit position_ids, in both layers: the same
    outputs at prefill, a chunk and a decode step, the same compact pools and stored positions."""
    torch.manual_seed(4)
    py, cpp = twins(torch.float64, **config)
    py.eval()
    cpp.eval()
    x = torch.randn(2, 12, config["hidden_size"], dtype=torch.float64)
    positions = torch.arange(40, 52).expand(2, 12)
    # Angles that plain RoPE at rope_theta would not give (a linear-scaled variant, factor 4).
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, py.head_dim, 2, dtype=torch.float64) / py.head_dim)) / 4.0
    emb = torch.cat([positions[..., None] * inv_freq] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    caches = {name: mixsga.HeteroKVCache(py.cache_options()) for name in ("py", "cpp")}
    outs = {"py": [], "cpp": []}
    for lo, hi in ((0, 7), (7, 11), (11, 12)):  # prefill, chunk, decode step
        args = (x[:, lo:hi], None, positions[:, lo:hi])
        rope = (cos[:, lo:hi], sin[:, lo:hi])
        outs["py"].append(py(*args, cache=caches["py"], layer_idx=0, rope=rope)[0])
        outs["cpp"].append(cpp(*args, cache=caches["cpp"], layer_idx=0, rope=rope)[0])
    torch.testing.assert_close(torch.cat(outs["cpp"], 1), torch.cat(outs["py"], 1), rtol=1e-10, atol=1e-12)
    for a, b in zip(caches["cpp"].keys(0) + caches["cpp"].values(0), caches["py"].keys(0) + caches["py"].values(0)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(caches["cpp"].positions(0), caches["py"].positions(0)))
    assert caches["py"].next_positions(0).tolist() == [52, 52]
    # The override is used: plain RoPE gives other outputs.
    plain = py(x[:, :7], None, positions[:, :7])[0]
    assert not torch.allclose(plain, outs["py"][0], atol=1e-6)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[6]])
def test_aux_in_backward_sends_the_same_aux_gradient_in_both(config):
    # aux_in_backward: the output carries aux_backward_scale * d aux; the returned aux is a detached value.
    # Reference: the layer without it, its aux loss added to the loss by hand at the same scale.
    py, cpp = twins(torch.float64, aux_in_backward=True, **config)
    explicit = MixSGAAttention(**config).to(torch.float64)
    explicit.load_state_dict(py.state_dict())
    py.set_aux_backward_scale(0.25)
    cpp.set_aux_backward_scale(0.25)
    assert py.aux_backward_scale == 0.25
    x, mask = inputs(2, 10, config["hidden_size"], torch.float64, True)
    grads = {}
    for name, layer in (("py", py), ("cpp", cpp), ("explicit", explicit)):
        out, aux = layer(x, mask)
        assert aux.requires_grad == (name == "explicit" and config.get("aux_alpha", 0.1) > 0)
        (out.square().sum() + (0.25 * aux if name == "explicit" else 0.0)).backward()
        grads[name] = {n: p.grad for n, p in layer.named_parameters()}
    if config.get("aux_alpha", 0.1) > 0:
        assert grads["py"]["router.proj.weight"].abs().sum() > 0
    for name in ("py", "cpp"):
        for n, g in grads["explicit"].items():
            torch.testing.assert_close(grads[name][n], g, rtol=1e-10, atol=1e-12, msg=f"{name} {n}")
    assert cpp.options["aux_in_backward"] is True and "aux_in_backward=True" in repr(py)
    assert "aux_in_backward=true" in repr(cpp).lower()
    for layer in (py, cpp):
        with pytest.raises(ValueError, match="aux_backward_scale: must be finite and >= 0, got -1"):
            layer.set_aux_backward_scale(-1.0)


def test_decode_offsets_route_identically_in_both_and_zero_offsets_change_nothing():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(200, 3, generator=g, dtype=torch.float64)
    scores[3, 1] = float("nan")  # NaN ranks lowest
    scores[5] = 0.5  # a tie: the finer expert
    offsets = [0.0, 0.15, -0.1]
    for ratios in ([0.3, 0.1, 0.6], [0.5, 0.0, 0.5]):
        plain = ExpertChoiceRouter(16, ratios)
        zero = ExpertChoiceRouter(16, ratios, decode_offsets=[0.0, 0.0, 0.0])
        assert torch.equal(plain.argmax_route(scores), zero.argmax_route(scores))  # float64, bitwise
        py = ExpertChoiceRouter(16, ratios, decode_offsets=offsets)
        cpp = _C.ExpertChoiceRouter(16, ratios, decode_offsets=offsets)
        got = py.argmax_route(scores)
        assert torch.equal(got, cpp.argmax_route(scores))
        assert not torch.equal(got, plain.argmax_route(scores))
    # Whole layers: prefill routed by argmax (as decoding routes), after set_routing, in both.
    config = dict(hidden_size=64, num_heads=8, num_kv_heads=4, prefill_routing="argmax")
    py, cpp = twins(torch.float64, **config)
    for layer in (py, cpp):
        layer.set_routing([0.2, 0.2, 0.6], offsets)
    x, mask = inputs(2, 12, 64, torch.float64, True)
    out_py, _, idx_py, _ = py.forward_with_routing(x, mask)
    out_cpp, _, idx_cpp, _ = cpp.forward_with_routing(x, mask)
    assert torch.equal(idx_py, idx_cpp)
    torch.testing.assert_close(out_py, out_cpp)
    assert py.ratios == (0.2, 0.2, 0.6) and py.decode_offsets == tuple(offsets)
    assert cpp.routing() == ([0.2, 0.2, 0.6], offsets)
    for layer in (py, cpp):
        with pytest.raises(ValueError, match="decode_offsets: expected none or one per expert"):
            layer.set_routing([0.2, 0.2, 0.6], [0.1])
    assert py.ratios == (0.2, 0.2, 0.6) and cpp.routing() == ([0.2, 0.2, 0.6], offsets)  # unchanged


def test_fit_decode_offsets_and_ratios_for_budget():
    g = torch.Generator().manual_seed(5)
    scores = torch.sigmoid(torch.randn(3000, 3, generator=g) + torch.tensor([1.0, 0.0, -0.5]))
    for target in ((0.3, 0.1, 0.6), (0.6, 0.3, 0.1)):
        offsets = mixsga.fit_decode_offsets(scores, target)
        idx = ExpertChoiceRouter(16, target, decode_offsets=offsets).argmax_route(scores)
        share = torch.bincount(idx, minlength=3).double() / idx.numel()
        torch.testing.assert_close(share, torch.tensor(target, dtype=torch.float64), atol=2 / 3000, rtol=0)
    r = mixsga.ratios_for_budget((1, 2, 4), (0.3, 0.1, 0.6), 0.3)
    assert mixsga.kv_fraction((1, 2, 4), r) == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match=r"budget: must be in \[0.25, 1\] .* got 0.1"):
        mixsga.ratios_for_budget((1, 2, 4), (0.3, 0.1, 0.6), 0.1)
    with pytest.raises(ValueError, match="scores: 30 calibration tokens are too few"):
        mixsga.fit_decode_offsets(scores[:30], (0.3, 0.1, 0.6))


@pytest.mark.parametrize("cap", [0.0, 0.4])
def test_a_capped_cache_routes_identically_in_both(cap):
    """The cache's kv_cap moves the same tokens in both layers (prefill and decode), and no cap changes nothing."""
    config = dict(hidden_size=64, num_heads=8, num_kv_heads=4, ratios=(0.5, 0.3, 0.2))  # budget 0.7
    py, cpp = twins(torch.float64, **config)
    x, mask = inputs(2, 20, 64, torch.float64, True)
    results = []
    for layer in (py, cpp):
        options = layer.cache_options(num_layers=1)
        options.kv_cap = cap
        cache = mixsga.HeteroKVCache(options)
        outs, idx = [], []
        with torch.no_grad():
            r = layer.forward_with_routing(x[:, :12], mask[:, :12], cache=cache)
            outs.append(r[0]), idx.append(r[2])
            for t in range(12, 20):
                r = layer.forward_with_routing(x[:, t : t + 1], mask[:, t : t + 1], cache=cache)
                outs.append(r[0]), idx.append(r[2])
        results.append((torch.cat(outs, 1), torch.cat(idx, 1), cache.lengths(0)))
    (out_py, idx_py, len_py), (out_cpp, idx_cpp, len_cpp) = results
    assert torch.equal(idx_py, idx_cpp) and torch.equal(len_py, len_cpp)
    torch.testing.assert_close(out_py, out_cpp)
    share = (len_py.double() / torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)).sum(1) / len_py.sum(1)
    if cap:
        assert bool((share <= cap + 1e-12).all())
    else:
        assert bool((share > 0.5).any())  # uncapped, the 0.7 budget shows
