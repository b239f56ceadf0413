"""torch.ops.mixsga.* against the pure-PyTorch references of reference.py: values, dtypes, layouts,
empty inputs, gradients (float64 gradcheck), bf16 accuracy, and torch.library.opcheck for every op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixsga
import reference as ref
from device_params import DEVICES

ops = torch.ops.mixsga
GROUPS = [1, 2, 4]


def left_padding(B: int, L: int, device="cpu") -> torch.Tensor:
    """[B, L] int64 mask with a different amount of left padding per sequence (>= 1 real token)."""
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    for b in range(B):
        mask[b, : (b * 3) % L] = 0
    return mask


def random_idx(shape, E=3, device="cpu"):
    return torch.randint(0, E, shape, device=device)


def assert_bf16_within_2x(out: torch.Tensor, exact: torch.Tensor, pytorch_bf16: torch.Tensor) -> None:
    """The low-precision rule: mixsga's bf16 error against the exact result is within 2x of the error a
    plain PyTorch bf16 computation of the same thing makes."""
    err = (out.double() - exact.double()).abs().max().item()
    base = (pytorch_bf16.double() - exact.double()).abs().max().item()
    assert err <= 2 * base + 1e-6, f"bf16 error {err:.3g} > 2 x PyTorch bf16 error {base:.3g}"


# --------------------------------------------------------------------------------------------------
# route_expert_choice
# --------------------------------------------------------------------------------------------------
RATIOS = [(0.3, 0.1, 0.6), (0.25, 0.25, 0.5), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratios", RATIOS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_route_matches_reference(device, ratios, padded, dtype):
    B, L, E = 3, 13, len(ratios)
    scores = torch.rand(B, L, E, dtype=torch.float64).to(dtype)
    mask = left_padding(B, L) if padded else None
    got = ops.route_expert_choice(scores.to(device), list(ratios), None if mask is None else mask.to(device))
    assert got.dtype == torch.long and got.shape == (B, L)
    torch.testing.assert_close(got.cpu(), ref.route_expert_choice(scores, ratios, mask), rtol=0, atol=0)


def test_route_counts_and_exclusivity():
    ratios = (0.3, 0.1, 0.6)
    scores = torch.rand(4, 50, 3)
    mask = left_padding(4, 50)
    idx = ops.route_expert_choice(scores, list(ratios), mask)
    for b in range(4):
        n = int(mask[b].sum())
        real = idx[b][mask[b].bool()]
        counts = torch.bincount(real, minlength=3).tolist()
        remaining = n
        for e in range(2):
            want = min(ref.capacity(ratios[e], n), remaining)
            assert counts[e] == want, f"sequence {b}, expert {e}: {counts[e]} tokens, want {want}"
            remaining -= want
        assert counts[2] == remaining and sum(counts) == n  # every valid token has exactly one expert
        assert (idx[b][~mask[b].bool()] == 2).all(), "padding goes to the coarsest expert"


def test_route_ties_go_to_lower_position_and_nan_ranks_last():
    scores = torch.full((1, 10, 3), 0.5)
    idx = ops.route_expert_choice(scores, [0.3, 0.1, 0.6])
    assert idx[0].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    scores = torch.rand(1, 10, 3)
    scores[0, :5, 0] = float("nan")
    idx = ops.route_expert_choice(scores, [0.5, 0.0, 0.5])
    assert (idx[0, :5] == 2).all() and (idx[0, 5:] == 0).all()


def test_route_is_per_sequence():
    """Top-k runs inside each sequence: one sequence's scores never change another's routing."""
    scores = torch.rand(2, 16, 3)
    a = ops.route_expert_choice(scores, [0.3, 0.1, 0.6])
    scores[1] += 10.0
    b = ops.route_expert_choice(scores, [0.3, 0.1, 0.6])
    assert torch.equal(a[0], b[0])


def test_route_noncontiguous_and_empty():
    base = torch.rand(3, 12, 5)
    scores = base[:, :, 1:4]  # non-contiguous view
    assert not scores.is_contiguous()
    got = ops.route_expert_choice(scores, [0.3, 0.1, 0.6])
    assert torch.equal(got, ops.route_expert_choice(scores.contiguous(), [0.3, 0.1, 0.6]))
    assert ops.route_expert_choice(torch.rand(0, 7, 3), [0.3, 0.1, 0.6]).shape == (0, 7)
    assert ops.route_expert_choice(torch.rand(2, 0, 3), [0.3, 0.1, 0.6]).shape == (2, 0)


# --------------------------------------------------------------------------------------------------
# grouped_kv_pool / grouped_kv_proj
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(2, 7), (9,), (1, 1, 3)])
def test_grouped_kv_pool_matches_reference(device, dtype, lead):
    kv = torch.randn(*lead, 8, 6, dtype=dtype)
    idx = random_idx(lead)
    got = ops.grouped_kv_pool(kv.to(device), idx.to(device), GROUPS)
    assert got.dtype == dtype and got.shape == kv.shape
    torch.testing.assert_close(got.cpu(), ref.grouped_kv_pool(kv, idx, GROUPS))


def test_grouped_kv_pool_noncontiguous_empty_and_int32_idx():
    kv = torch.randn(6, 5, 8, 4).transpose(0, 1)  # [5, 6, 8, 4], non-contiguous
    idx = random_idx((5, 6)).to(torch.int32)
    torch.testing.assert_close(ops.grouped_kv_pool(kv, idx, GROUPS), ref.grouped_kv_pool(kv, idx.long(), GROUPS))
    empty = ops.grouped_kv_pool(torch.randn(0, 3, 4, 2), torch.zeros(0, 3, dtype=torch.long), GROUPS)
    assert empty.shape == (0, 3, 4, 2)


def test_grouped_kv_pool_bf16_within_2x():
    kv = torch.randn(4, 33, 8, 16, dtype=torch.float64)
    idx = random_idx((4, 33))
    exact = ref.grouped_kv_pool(kv, idx, GROUPS)
    got = ops.grouped_kv_pool(kv.bfloat16(), idx, GROUPS)
    assert got.dtype == torch.bfloat16
    assert_bf16_within_2x(got, exact, ref.grouped_kv_pool(kv.bfloat16(), idx, GROUPS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [[1, 2, 4], [2, 4], [1]])
def test_grouped_kv_proj_matches_reference(device, dtype, bias, groups):
    D, H, d = 24, 4, 6
    x = torch.randn(3, 10, D, dtype=dtype)
    w = torch.randn(H * d, D, dtype=dtype)
    b = torch.randn(H * d, dtype=dtype) if bias else None
    idx = random_idx((3, 10), len(groups))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = ops.grouped_kv_proj(to(x), to(w), to(b), to(idx), groups, d)
    assert got.dtype == dtype and got.shape == (3, 10, H, d)
    torch.testing.assert_close(got.cpu(), ref.grouped_kv_proj(x, w, b, idx, groups, d))


def test_grouped_kv_proj_single_expert_owns_all_tokens_and_empty():
    x, w, b = torch.randn(2, 5, 16), torch.randn(16, 16), torch.randn(16)
    for e in range(3):
        idx = torch.full((2, 5), e)
        want = ref.grouped_kv_proj(x, w, b, idx, GROUPS, 4)
        torch.testing.assert_close(ops.grouped_kv_proj(x, w, b, idx, GROUPS, 4), want)
    out = ops.grouped_kv_proj(torch.randn(0, 16), w, b, torch.zeros(0, dtype=torch.long), GROUPS, 4)
    assert out.shape == (0, 4, 4)


def test_grouped_kv_proj_noncontiguous_inputs():
    x = torch.randn(16, 3, 7).transpose(0, 2)  # [7, 3, 16]
    w = torch.randn(16, 16).t()
    idx = random_idx((7, 3))
    want = ref.grouped_kv_proj(x, w, None, idx, GROUPS, 4)
    torch.testing.assert_close(ops.grouped_kv_proj(x, w, None, idx, GROUPS, 4), want)


def test_grouped_kv_proj_bf16_within_2x():
    D, H, d = 64, 8, 16
    x = torch.randn(2, 40, D, dtype=torch.float64)
    w, b = torch.randn(H * d, D, dtype=torch.float64) / 8, torch.randn(H * d, dtype=torch.float64)
    idx = random_idx((2, 40))
    exact = ref.grouped_kv_proj(x, w, b, idx, GROUPS, d)
    got = ops.grouped_kv_proj(x.bfloat16(), w.bfloat16(), b.bfloat16(), idx, GROUPS, d)
    assert got.dtype == torch.bfloat16
    assert_bf16_within_2x(got, exact, ref.grouped_kv_proj(x.bfloat16(), w.bfloat16(), b.bfloat16(), idx, GROUPS, d))


def test_pooling_weights_equals_pooling_projections():
    """METHOD.md identity: pool the weights then project == project then pool (biases included)."""
    D, H, d = 20, 4, 5
    x = torch.randn(6, D, dtype=torch.float64)
    w, b = torch.randn(H * d, D, dtype=torch.float64), torch.randn(H * d, dtype=torch.float64)
    for e, g in enumerate(GROUPS):
        compact = F.linear(x, mixsga.nn.pool_kv_weight(w, g, d), mixsga.nn.pool_kv_weight(b, g, d))  # [6, H/g*d]
        expanded = compact.reshape(6, H // g, 1, d).expand(6, H // g, g, d).reshape(6, H, d)
        projected_then_pooled = ref.grouped_kv_pool(F.linear(x, w, b).reshape(6, H, d), torch.full((6,), e), GROUPS)
        torch.testing.assert_close(expanded, projected_then_pooled)
        torch.testing.assert_close(ops.grouped_kv_proj(x, w, b, torch.full((6,), e), GROUPS, d), projected_then_pooled)


# --------------------------------------------------------------------------------------------------
# expert_permutation / expert_scatter / expert_gather
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_expert_permutation_is_stable_sort(device):
    idx = random_idx((4, 9), 3)
    perm, offsets = ops.expert_permutation(idx.to(device), 3)
    flat = idx.reshape(-1)
    assert torch.equal(perm.cpu(), torch.sort(flat, stable=True).indices)
    assert offsets.cpu().tolist() == [0] + torch.bincount(flat, minlength=3).cumsum(0).tolist()
    perm, offsets = ops.expert_permutation(torch.zeros(0, dtype=torch.long), 4)
    assert perm.shape == (0,) and offsets.tolist() == [0] * 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_expert_scatter_gather(device, dtype):
    x = torch.randn(10, 3, 4).to(dtype)
    perm = torch.randperm(10)
    scattered = ops.expert_scatter(x.to(device), perm.to(device)).cpu()
    assert torch.equal(scattered, x[perm])
    gathered = ops.expert_gather(scattered.to(device), perm.to(device)).cpu()
    assert torch.equal(gathered, x)
    xt = torch.randn(3, 10).t()  # non-contiguous [10, 3]
    assert torch.equal(ops.expert_scatter(xt, perm), xt[perm])
    assert ops.expert_gather(torch.randn(0, 2), torch.zeros(0, dtype=torch.long)).shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# hetero_decode_attention
# --------------------------------------------------------------------------------------------------
def decode_inputs(dtype=torch.float32, B=3, Hq=8, Hkv=4, d=16, groups=(1, 2, 4), T=(5, 0, 9)):
    q = torch.randn(B, Hq, d, dtype=torch.float64).to(dtype)
    k_pools = [torch.randn(B, Hkv // g, t, d, dtype=torch.float64).to(dtype) for g, t in zip(groups, T)]
    v_pools = [torch.randn(B, Hkv // g, t, d, dtype=torch.float64).to(dtype) for g, t in zip(groups, T)]
    lengths = torch.stack([torch.randint(0, t + 1, (B,)) for t in T], 1)
    lengths[0] = 0  # a sequence with nothing cached attends to nothing: zeros
    return q, k_pools, v_pools, lengths, Hkv


@pytest.mark.skipif(not hasattr(ops, "hetero_decode_attention"), reason="library built without the KV cache ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hetero_decode_attention_matches_reference(dtype):
    q, k, v, lengths, Hkv = decode_inputs(dtype)
    got = ops.hetero_decode_attention(q, k, v, lengths, Hkv)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), ref.hetero_decode_attention(q, k, v, lengths, Hkv), rtol=1e-5, atol=1e-5)
    assert (got[0] == 0).all()
    scaled = ops.hetero_decode_attention(q, k, v, lengths, Hkv, 0.3)
    want = ref.hetero_decode_attention(q, k, v, lengths, Hkv, 0.3)
    torch.testing.assert_close(scaled.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(ops, "hetero_decode_attention"), reason="library built without the KV cache ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hetero_decode_attention_splits_long_pools_and_merges_them_exactly(dtype):
    """Long pools are cut into token ranges (split-K) merged by log-sum-exp: same answer as the
    reference, and bitwise the same on 1 and 2 threads (the split does not depend on the thread count)."""
    torch.manual_seed(3)
    q, k, v, lengths, Hkv = decode_inputs(dtype, B=2, Hq=16, Hkv=8, d=64, T=(700, 130, 1500))
    lengths[0] = torch.tensor([700, 3, 1])  # uneven pools, one nearly empty
    lengths[1] = torch.tensor([0, 130, 1499])
    # One strongly preferred key late in a long pool: a wrong merge of the ranges would miss it.
    k[2][1, :, 1400] = 4.0 * q[1, :8].reshape(2, 4, 64).mean(1).to(dtype)
    want = ref.hetero_decode_attention(q, k, v, lengths, Hkv)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hetero_decode_attention(q, k, v, lengths, Hkv)
        torch.set_num_threads(2)
        two = ops.hetero_decode_attention(q, k, v, lengths, Hkv)
    finally:
        torch.set_num_threads(threads)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(one.double(), want, rtol=tol, atol=tol)
    assert torch.equal(one, two)


# --------------------------------------------------------------------------------------------------
# Gradients: float64 gradcheck of every differentiable op
# --------------------------------------------------------------------------------------------------
def test_gradcheck_grouped_kv_pool():
    kv = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    idx = random_idx((2, 5))
    assert torch.autograd.gradcheck(lambda t: ops.grouped_kv_pool(t, idx, GROUPS), (kv,))


def grouped_kv_proj_check_args(bias: bool):
    """(function, float64 inputs) for gradcheck / gradgradcheck of grouped_kv_proj in x, weight (and bias):
    4 KV heads of 2 dims over D = 6, fixed random experts."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if bias else None
    idx = random_idx((2, 5))
    inputs = (x, w, b) if bias else (x, w)
    fn = lambda x, w, b=None: ops.grouped_kv_proj(x, w, b, idx, GROUPS, 2)  # noqa: E731
    return fn, inputs


@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_grouped_kv_proj(bias):
    assert torch.autograd.gradcheck(*grouped_kv_proj_check_args(bias))


@pytest.mark.parametrize("bias", [False, True])
def test_gradgradcheck_grouped_kv_proj(bias):
    """Double backward (create_graph=True through the C++ backward op): second-order finite differences."""
    torch.manual_seed(5)
    assert torch.autograd.gradgradcheck(*grouped_kv_proj_check_args(bias))


def test_grouped_kv_proj_gradient_penalty_matches_reference_autograd():
    """A gradient penalty through the op (create_graph=True, then backward again) against the same
    through the pure-PyTorch reference."""
    torch.manual_seed(6)
    x0 = torch.randn(3, 4, 10, dtype=torch.float64)
    w0, b0 = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    idx = random_idx((3, 4))
    g = torch.randn(3, 4, 4, 4, dtype=torch.float64)

    def penalty_grads(proj):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        gx, gw, gb = torch.autograd.grad(proj(x, w, b, idx, GROUPS, 4), (x, w, b), g, create_graph=True)
        (gx.square().sum() + gw.square().sum() + gb.square().sum()).backward()
        return x.grad, w.grad, b.grad

    got = penalty_grads(ops.grouped_kv_proj)
    want = penalty_grads(ref.grouped_kv_proj)
    for a, e in zip(got[:2], want[:2]):  # x and w: the cross terms of the bilinear backward
        assert a is not None and e is not None
        torch.testing.assert_close(a, e)
    # grad_b depends on the upstream gradient only: the penalty does not reach b through it.
    assert got[2] is None and want[2] is None


def test_gradcheck_expert_scatter_gather():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(7)
    assert torch.autograd.gradcheck(lambda t: ops.expert_scatter(t, perm), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.expert_gather(t, perm), (x,))


def test_grouped_kv_proj_gradient_matches_reference_autograd():
    """The C++ backward against autograd through the reference (which projects with the full weights)."""
    x = torch.randn(3, 9, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    idx = random_idx((3, 9))
    g = torch.randn(3, 9, 4, 4, dtype=torch.float64)
    got = torch.autograd.grad(ops.grouped_kv_proj(x, w, b, idx, GROUPS, 4), (x, w, b), g)
    want = torch.autograd.grad(ref.grouped_kv_proj(x, w, b, idx, GROUPS, 4), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch, for every op
# --------------------------------------------------------------------------------------------------
def opcheck_samples() -> dict[str, list[tuple]]:
    """Sample arguments per op: plain, requires_grad, non-contiguous, bias/no bias, empty."""
    x = torch.randn(2, 5, 8)
    w = torch.randn(8, 8)
    b = torch.randn(8)
    idx = random_idx((2, 5))
    kv = torch.randn(2, 5, 4, 2)
    rows = torch.randn(6, 3)
    perm = torch.randperm(6)
    samples = {
        "route_expert_choice": [
            (torch.rand(2, 6, 3), [0.3, 0.1, 0.6], None),
            (torch.rand(2, 6, 3, requires_grad=True), [0.25, 0.25, 0.5], left_padding(2, 6)),
            (torch.rand(3, 2, 6)[:, :, ::2].transpose(0, 1).contiguous().transpose(0, 1), [0.5, 0.5, 0.0], None),
            (torch.rand(0, 4, 2, dtype=torch.float64), [0.5, 0.5], None),
        ],
        "grouped_kv_pool": [
            (kv, idx, GROUPS),
            (kv.clone().requires_grad_(), idx, GROUPS),
            (torch.randn(4, 2, 5, 3).transpose(0, 2), random_idx((5, 2), 2), [1, 4]),
            (torch.randn(0, 4, 2), torch.zeros(0, dtype=torch.long), GROUPS),
        ],
        "grouped_kv_proj": [
            (x, w, b, idx, GROUPS, 2),
            (x.clone().requires_grad_(), w.clone().requires_grad_(), None, idx, GROUPS, 2),
            (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
             random_idx((2, 5), 2), [2, 4], 2),
            (torch.randn(8, 5).t(), w, b, random_idx((5,)), GROUPS, 2),
            (torch.randn(0, 8), w, b, torch.zeros(0, dtype=torch.long), GROUPS, 2),
        ],
        "_grouped_kv_proj_backward": [
            (torch.randn(2, 5, 4, 2), x, w, idx, GROUPS, 2),
            (torch.randn(0, 4, 2), torch.randn(0, 8), w, torch.zeros(0, dtype=torch.long), GROUPS, 2),
        ],
        "expert_permutation": [
            (idx, 3),
            (random_idx((7,), 2).to(torch.int32), 4),
            (torch.zeros(0, dtype=torch.long), 3),
        ],
        "expert_scatter": [
            (rows, perm),
            (rows.clone().requires_grad_(), perm),
            (torch.randn(3, 6).t(), perm),
            (torch.randn(0, 2), torch.zeros(0, dtype=torch.long)),
        ],
        "expert_gather": [
            (rows, perm),
            (rows.clone().requires_grad_(), perm),
            (torch.randn(3, 6).t(), perm),
            (torch.randn(0, 2), torch.zeros(0, dtype=torch.long)),
        ],
    }
    cos, sin = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    samples["rope_rotate"] = [
        (torch.randn(2, 5, 3, 4), cos, sin, False),
        (torch.randn(2, 5, 3, 4, requires_grad=True), torch.randn(2, 5, 4), torch.randn(2, 5, 4), True),
        (torch.randn(2, 5, 6, 4).split(3, dim=2)[1], cos, sin, False),  # strided heads (k/v views)
        (torch.randn(0, 5, 3, 4), cos, sin, False),
    ]
    if hasattr(ops, "hetero_decode_attention"):
        q, k, v, lengths, Hkv = decode_inputs()
        samples["hetero_decode_attention"] = [
            (q, k, v, lengths, Hkv, None),
            (q.bfloat16(), [t.bfloat16() for t in k], [t.bfloat16() for t in v], lengths, Hkv, 0.5),
            (torch.randn(0, 8, 16), [torch.randn(0, 4, 3, 16)], [torch.randn(0, 4, 3, 16)],
             torch.zeros(0, 1, dtype=torch.long), 4, None),
        ]
    if hasattr(ops, "hetero_cache_attention"):
        from test_cache_attention import opcheck_samples as cache_attention_samples

        samples["hetero_cache_attention"] = cache_attention_samples()
    return samples


def library_ops() -> list[str]:
    return sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("mixsga::"))


def test_every_op_has_a_fake_kernel_and_opcheck_samples():
    """A new op in the schema table fails here until it gets a fake kernel and opcheck samples."""
    from mixsga._fake_kernels import FAKE_KERNELS

    names = library_ops()
    assert names, "no torch.ops.mixsga ops registered"
    assert set(names) <= set(FAKE_KERNELS), f"ops without a fake kernel: {set(names) - set(FAKE_KERNELS)}"
    assert set(names) <= set(opcheck_samples()), f"ops without opcheck samples: {set(names) - set(opcheck_samples())}"


@pytest.mark.parametrize("name", library_ops())
def test_opcheck(name):
    for i, args in enumerate(opcheck_samples()[name]):
        result = torch.library.opcheck(getattr(ops, name).default, args)
        failed = {test: str(err) for test, err in result.items() if err != "SUCCESS"}
        assert not failed, f"{name} sample {i}: {failed}"


def test_fake_kernels_give_the_real_output_metadata():
    """Fake outputs have exactly the shapes, dtypes and strides of the CPU outputs (opcheck compares
    them too; this names the op and output on a mismatch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, samples in opcheck_samples().items():
        for args in samples:
            real = getattr(ops, name)(*args)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:

                def to_fake(a):
                    if isinstance(a, torch.Tensor):
                        return mode.from_tensor(a)
                    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                        return [mode.from_tensor(t) for t in a]
                    return a

                fake = getattr(ops, name)(*[to_fake(a) for a in args])
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            for r, f in zip(real, fake):
                assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name


def test_grouped_kv_proj_under_autocast_computes_in_the_input_dtype():
    # The kernel's inner GEMMs must not be recast by autocast (the output buffer has the input dtype).
    x, w, b = torch.randn(2, 9, 16), torch.randn(4 * 8, 16), torch.randn(4 * 8)
    idx = torch.randint(0, 3, (2, 9))
    want = torch.ops.mixsga.grouped_kv_proj(x, w, b, idx, [1, 2, 4], 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.mixsga.grouped_kv_proj(x, w, b, idx, [1, 2, 4], 8)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.ops.mixsga.grouped_kv_proj(xg, wg, None, idx, [1, 2, 4], 8).square().sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.ops.mixsga.grouped_kv_proj(xr, wr, None, idx, [1, 2, 4], 8).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(wg.grad, wr.grad)
