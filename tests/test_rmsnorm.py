import pytest
import torch

from mtp_kernels import add_rms_norm, reference, rms_norm


@pytest.mark.parametrize("shape", [(1, 8), (37, 64), (3, 5, 100), (2, 1001)])
def test_rmsnorm_triton_matches_reference_fp32(triton_backend, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    y = rms_norm(x, w, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = reference.rms_norm(x64, w64, 1e-5)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_rmsnorm_strided_weight(triton_backend):
    """A (D,) weight that is a column of a wider tensor (stride 2): read at its stride, forward,
    fused add + norm, and both gradients (dw lands in the column it came from)."""
    torch.manual_seed(2)
    D = 40
    x = torch.randn(6, D)
    table = (1 + 0.1 * torch.randn(D, 2)).requires_grad_()
    w_ref = table.detach()[:, 0].clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = rms_norm(x1, table[:, 0]), reference.rms_norm(x2, w_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table.grad[:, 0], w_ref.grad, rtol=1e-4, atol=1e-5)
    assert not table.grad[:, 1].any()
    with torch.no_grad():
        h, y = add_rms_norm(x, 0.5 * x, table[:, 0])
        h_ref, y_ref = reference.add_rms_norm(x, 0.5 * x, w_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_rmsnorm_fp16_rounding_matches_reference(triton_backend):
    torch.manual_seed(1)
    x = torch.randn(7, 48).half()
    w = torch.randn(48).half()
    torch.testing.assert_close(rms_norm(x, w), reference.rms_norm(x, w), rtol=2e-3, atol=2e-3)


def test_rmsnorm_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("MTP_BACKEND", raising=False)
    x = torch.randn(4, 16)
    w = torch.randn(16)
    assert torch.equal(rms_norm(x, w), reference.rms_norm(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 100), (2, 1001)])
def test_add_rms_norm_kernel_matches_reference(triton_backend, dtype, shape):
    """The fused residual add + norm: h exactly the rounded sum, y the norm of that h."""
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    h, y = add_rms_norm(x, r, w, 1e-5)
    h_ref, y_ref = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, h_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


def test_add_rms_norm_with_autograd_is_the_differentiable_pair(triton_backend):
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32)
    w = torch.ones(32, requires_grad=True)
    h, y = add_rms_norm(x, r, w)
    (h.sum() + y.square().sum()).backward()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    h64, y64 = reference.add_rms_norm(x64, r.double(), w64)
    (h64.sum() + y64.square().sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_add_rms_norm_bad_input():
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half(), torch.ones(8))
    with pytest.raises(ValueError, match="weight shape"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="weight on meta"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8, device="meta"), torch.ones(8))


def test_add_rms_norm_promotes_a_mixed_pair_only_under_autocast():
    """Under autocast a block's output is bfloat16 while the residual stream stays float32: the pair is
    added as torch adds it. Outside autocast the same pair is an error (above)."""
    x, r, w = torch.randn(3, 8), torch.randn(3, 8).bfloat16(), torch.rand(8) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, y = add_rms_norm(x, r, w)
    h_ref, y_ref = reference.add_rms_norm(x, r.float(), w)
    assert h.dtype == torch.float32 and torch.equal(h, h_ref)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="must match"):
        add_rms_norm(x, r[:2], w)


def test_rmsnorm_bad_weight_shape():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.randn(7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_gpu(dtype):
    torch.manual_seed(2)
    x = torch.randn(1000, 4096, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype).requires_grad_()
    y = rms_norm(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = reference.rms_norm(x64, w64)
    y64.backward(dy.double())
    tol = 2e-2
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    rel = (w.grad.double() - w64.grad).norm() / w64.grad.norm()
    assert rel < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_gpu(dtype):
    x, r = (torch.randn(64, 4096, device="cuda").to(dtype) for _ in range(2))
    w = torch.randn(4096, device="cuda").to(dtype)
    h, y = add_rms_norm(x, r, w)
    h_ref, y_ref = reference.add_rms_norm(x, r, w)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call,match", [
    (lambda: rms_norm(torch.arange(8).view(2, 4), torch.ones(4, dtype=torch.long)), "x must be a floating tensor"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), eps=-1.0), "eps must be a finite number >= 0"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), eps="a"), "eps must be a finite number"),
    (lambda: rms_norm(torch.tensor(1.0), torch.ones(1)), "0-d tensor"),
    (lambda: rms_norm([[1.0]], torch.ones(1)), "x must be a tensor, got list"),
    (lambda: add_rms_norm(torch.ones(2, 4), [1.0], torch.ones(4)), "residual list must match"),
])
def test_rmsnorm_bad_types_and_eps(call, match):
    with pytest.raises(ValueError, match=match):
        call()
