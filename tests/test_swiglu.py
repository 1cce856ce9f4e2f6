"""SwiGLU (silu(gate) * up): the Triton kernel (interpreted on CPU) against its reference."""
import pytest
import torch

from mtp_kernels import reference, swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 37), (2, 5, 300)])
def test_kernel_matches_reference(triton_backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(*shape, generator=g) * 4).to(dtype)     # both tails of the sigmoid
    up = torch.randn(*shape, generator=g).to(dtype)
    out = swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out, reference.swiglu(gate, up), rtol=tol, atol=tol)
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2 if dtype == torch.float16 else 1e-6, atol=1e-3)


def test_zero_dim_inputs_give_the_scalar(triton_backend):
    gate, up = torch.tensor(0.7), torch.tensor(-2.0)
    torch.testing.assert_close(swiglu(gate, up), torch.nn.functional.silu(gate) * up)


def test_halves_of_one_fused_projection_are_read_in_place(triton_backend):
    fused = torch.randn(2, 3, 2 * 37)
    gate, up = fused[..., :37], fused[..., 37:]          # row stride 74, not 37
    torch.testing.assert_close(swiglu(gate, up), reference.swiglu(gate, up), rtol=1e-6, atol=1e-6)


def test_extreme_gates_give_no_nan(triton_backend):
    gate = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4])
    out = swiglu(gate, torch.ones(5))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 100.0, 1e4]), rtol=1e-6, atol=1e-6)


def test_autograd_uses_the_eager_expression(triton_backend):
    gate = torch.randn(3, 8, requires_grad=True)
    up = torch.randn(3, 8, requires_grad=True)
    swiglu(gate, up).sum().backward()
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    reference.swiglu(g64, u64).sum().backward()
    torch.testing.assert_close(gate.grad.double(), g64.grad)
    torch.testing.assert_close(up.grad.double(), u64.grad)


def test_bad_input():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="on meta"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, device="meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference(dtype):
    gate = (torch.randn(8, 11008, device="cuda") * 3).to(dtype)
    up = torch.randn(8, 11008, device="cuda").to(dtype)
    torch.testing.assert_close(swiglu(gate, up), reference.swiglu(gate, up), rtol=1e-2, atol=1e-2)


def test_integer_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="swiglu: gate and up must be floating tensors, got torch.int64"):
        swiglu(torch.arange(4), torch.arange(4))
