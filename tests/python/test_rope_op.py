"""torch.ops.mixsga.rope_rotate: the fused CPU RoPE against the composite rotate_half form (float64),
its transpose (the backward), gradients, the layer path using it, and bad input."""

from __future__ import annotations

import pytest
import torch

import mixsga  # noqa: F401  (registers the ops)
from mixsga.nn.functional import apply_rope, apply_rope_cos_sin, rope_angles, rotate_reference

rope_rotate = torch.ops.mixsga.rope_rotate


def angles(B: int, L: int, d: int, dtype=torch.float64):
    """Arbitrary angles whose two halves differ, so a kernel that reads only one half is caught."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, d, generator=g, dtype=dtype), torch.randn(B, L, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("angle_batch", [1, 3])
def test_matches_the_composite_rotation_in_float64(angle_batch):
    x = torch.randn(3, 7, 5, 8, dtype=torch.float64)
    cos, sin = angles(angle_batch, 7, 8)
    out = rope_rotate(x, cos, sin)
    torch.testing.assert_close(out, rotate_reference(x, cos, sin), rtol=0, atol=1e-14)
    assert out.is_contiguous() and out.shape == x.shape


def test_strided_inputs_give_the_same_result():
    base = torch.randn(2, 6, 10, 8, dtype=torch.float64)
    k = base.split(5, dim=2)[1]  # a head-axis view, as the layer's k and v are
    x = torch.randn(6, 2, 4, 8, dtype=torch.float64).transpose(0, 1)  # leading dims permuted
    rows_strided = torch.randn(2, 6, 4, 16, dtype=torch.float64)[..., ::2]  # rows not contiguous: copied
    cos, sin = angles(1, 6, 8)
    for t in (k, x, rows_strided):
        torch.testing.assert_close(rope_rotate(t, cos, sin), rotate_reference(t.contiguous(), cos, sin), rtol=0, atol=1e-14)


def test_transpose_is_the_adjoint():
    """<R x, y> == <x, R^T y> for arbitrary angles: the backward is exact even when cos^2 + sin^2 != 1."""
    x, y = torch.randn(2, 4, 3, 6, dtype=torch.float64), torch.randn(2, 4, 3, 6, dtype=torch.float64)
    cos, sin = angles(2, 4, 6)
    lhs = (rope_rotate(x, cos, sin) * y).sum()
    rhs = (x * rope_rotate(y, cos, sin, True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-13, atol=1e-13)


def test_real_angles_make_an_orthogonal_rotation():
    x = torch.randn(2, 9, 4, 16, dtype=torch.float64)
    cos, sin = rope_angles(torch.arange(9), 16, 10000.0, torch.float64, x.device)
    y = rope_rotate(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rope_rotate(y, cos, sin, True), x, rtol=1e-13, atol=1e-13)


def test_gradcheck_in_x():
    x = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    cos, sin = angles(1, 3, 4)
    assert torch.autograd.gradcheck(lambda t: rope_rotate(t, cos, sin), (x,))
    assert torch.autograd.gradgradcheck(lambda t: rope_rotate(t, cos, sin), (x,))


def test_apply_rope_with_trainable_angles_falls_back_and_trains_them():
    x = torch.randn(1, 4, 2, 6, dtype=torch.float64)
    cos, sin = angles(1, 4, 6)
    cos.requires_grad_()
    apply_rope_cos_sin(x, cos, sin).sum().backward()
    ref = cos.detach().clone().requires_grad_()
    rotate_reference(x, ref, sin).sum().backward()
    torch.testing.assert_close(cos.grad, ref.grad)
    with pytest.raises(ValueError, match="cos: rope_rotate differentiates x only"):
        rope_rotate(x, cos, sin)


def test_bfloat16_is_close_to_float64():
    x = torch.randn(2, 8, 4, 64)
    cos, sin = rope_angles(torch.arange(8), 64, 10000.0, torch.bfloat16, x.device)
    out = apply_rope(x.bfloat16(), torch.arange(8))
    ref = apply_rope(x.double(), torch.arange(8))
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    assert rope_rotate(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((torch.randn(2, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)), ValueError, ["x: expected shape [B, L, H, d]", "[2, 3, 4]"]),
        ((torch.randn(2, 3, 1, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5)), ValueError, ["even d", "[2, 3, 1, 5]"]),
        ((torch.randn(2, 3, 1, 4), torch.randn(1, 2, 4), torch.randn(1, 3, 4)), ValueError, ["cos: expected shape", "[1, 2, 4]"]),
        ((torch.randn(2, 3, 1, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4).double()), TypeError, ["sin: expected the dtype of x", "Double"]),
        ((torch.randn(2, 3, 1, 4), torch.randn(2, 3, 4), torch.randn(1, 3, 4)), ValueError, ["sin: expected the batch size of cos (2)", "got 1"]),
        ((torch.ones(2, 3, 1, 4, dtype=torch.int32), torch.randn(1, 3, 4), torch.randn(1, 3, 4)), TypeError, ["x: expected float32", "Int"]),
    ],
)
def test_bad_input_names_the_argument_and_the_value(args, error, words):
    with pytest.raises(error) as info:
        rope_rotate(*args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def _cuda_rope_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mixsga::rope_rotate", "CUDA"):
        pytest.skip("libmixsga was built without CUDA kernels")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("angle_batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_the_cpu_op(transpose, angle_batch, dtype):
    _cuda_rope_or_skip()
    x = torch.randn(6, 2, 5, 8, dtype=torch.float64).transpose(0, 1)[:3]  # strided leading dims
    cos, sin = angles(angle_batch, 6, 8)
    want = rope_rotate(x.to(dtype), cos.to(dtype), sin.to(dtype), transpose)
    got = rope_rotate(x.to(dtype).cuda(), cos.to(dtype).cuda(), sin.to(dtype).cuda(), transpose)
    assert got.device.type == "cuda" and got.dtype == dtype and got.is_contiguous()
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol, atol=tol)
    if dtype == torch.float64:
        ref = rotate_reference(x, cos, sin) if not transpose else None
        if ref is not None:
            torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-14)


def test_cuda_gradcheck_in_x():
    _cuda_rope_or_skip()
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    cos, sin = (t.cuda() for t in angles(2, 3, 6))
    assert torch.autograd.gradcheck(lambda t: rope_rotate(t, cos, sin), (x,))
