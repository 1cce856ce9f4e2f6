"""RMSNorm in Triton, forward and backward (Meta's Llama definition).

y = cast_x(x * rstd) * w, with rstd = 1 / sqrt(mean(x^2) + eps) computed in float32.
The cast back to x's dtype before the scale is what the release does; keeping it makes the
kernel bit-compatible with `reference.rms_norm`'s rounding.
"""
from __future__ import annotations

import torch
from .triton_import import tl, triton

from . import reference
from .backend import (as_rows, check_one_device, finite_number, gpu_launch, interpreting, kernel_op,
                      refuse_double_backward, sm_count, use_triton)
from .dependent_launch import await_prior_grid, launch_programmatic


@triton.jit
def _norm_row(x, x_dtype: tl.constexpr, w_ptr, stride_w, y_row_ptr, offs_d, mask, D, eps):
    """Normalize one row x (float32 values of dtype x_dtype), scale by w, store it at y_row_ptr;
    returns rstd. Shared by the plain and the residual-add forward."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(x_dtype).to(tl.float32)
    # The weight at its stride: a (D,) view such as a column of a wider tensor is not contiguous
    # (a unit stride is specialized by Triton, so the common case pays nothing).
    w = tl.load(w_ptr + offs_d * stride_w, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row_ptr + offs_d, (normed * w).to(y_row_ptr.dtype.element_ty), mask=mask)
    return rstd


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    stride_x, stride_y, stride_w, D, eps,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    await_prior_grid(PDL)   # PDL: a programmatic dependent launch (dependent_launch.py)
    # int64: row * stride_x wraps int32 past 524288 rows of 4096 (4 heads' final norm at 32 x 8192 tokens)
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x = tl.load(x_ptr + row * stride_x + offs_d, mask=mask, other=0.0).to(tl.float32)
    rstd = _norm_row(x, x_ptr.dtype.element_ty, w_ptr, stride_w, y_ptr + row * stride_y, offs_d, mask, D, eps)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    stride_x, stride_dy, stride_dx, stride_w, M, D, ROWS_PER_PROGRAM,
    BLOCK_D: tl.constexpr,
):
    # Each program owns a contiguous band of rows and writes one partial dw row: the final
    # sum over programs happens on the host side, so the result is deterministic (no atomics).
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < D
    w = tl.load(w_ptr + offs_d * stride_w, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM   # int64: row * stride_x wraps past 2^31 (see the forward)
    for i in range(0, ROWS_PER_PROGRAM):
        row = row_start + i
        if row < M:
            x = tl.load(x_ptr + row * stride_x + offs_d, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + offs_d, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            normed = x * rstd
            dw_acc += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            dn = dy * w
            dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / D))
            tl.store(dx_ptr + row * stride_dx + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + offs_d, dw_acc, mask=mask)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, y_ptr,
    stride_x, stride_r, stride_h, stride_y, stride_w, D, eps,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    # h = x + r rounded to x's dtype (what torch's add does), then the forward above on h.
    await_prior_grid(PDL)
    row = tl.program_id(0).to(tl.int64)   # int64: row * stride wraps past 2^31 (see the plain forward)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x = tl.load(x_ptr + row * stride_x + offs_d, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + offs_d, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * stride_h + offs_d, h, mask=mask)
    _norm_row(h.to(tl.float32), h_ptr.dtype.element_ty, w_ptr, stride_w, y_ptr + row * stride_y, offs_d, mask,
              D, eps)


def _row_tile(D: int):
    """(BLOCK_D, num_warps) for one program per row of D elements."""
    block_d = triton.next_power_of_2(D)
    return block_d, 1 if interpreting() else min(max(block_d // 256, 1), 16)


def _check_weight(name: str, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    for arg, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a floating tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have a last dim to normalize, got a 0-d tensor")
    if not finite_number(eps) or eps < 0:
        raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    check_one_device(name, x=x, weight=weight)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float):
    x2 = as_rows(x)
    M, D = x2.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((M, D), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    BLOCK_D, num_warps = _row_tile(D)
    pdl = launch_programmatic(x.device)
    _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), weight.stride(0), D, eps,
                               BLOCK_D=BLOCK_D, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return y.view(*x.shape[:-1], D), rstd


def rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    M, D = x2.shape
    dy2 = as_rows(dy)
    dx = torch.empty_like(x2)
    # Enough programs to fill the GPU; few under the interpreter (one program runs at a time).
    target = 4 * sm_count(x2.device) if gpu_launch(x2.device) else 4
    rows_per_program = triton.cdiv(M, max(min(M, target), 1))
    n_programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((n_programs, D), dtype=torch.float32, device=x2.device)
    BLOCK_D, num_warps = _row_tile(D)
    _rms_norm_bwd_kernel[(n_programs,)](
        x2, weight, dy2, rstd, dx, dw_partial,
        x2.stride(0), dy2.stride(0), dx.stride(0), weight.stride(0), M, D, rows_per_program,
        BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


# The kernels as torch.library custom ops (with shape functions), so torch.compile traces a model
# around them, fullgraph too, where Dynamo would trace into the launchers; eager calls take the same ops.
@kernel_op("rms_norm")
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y like x in x's and weight's promoted dtype, rstd (rows,) float32)."""
    return rms_norm_fwd(x, weight, eps)


@torch.library.register_fake(_rms_norm_op)
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((x.numel() // max(x.shape[-1], 1),), dtype=torch.float32))


@kernel_op("rms_norm_backward")
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dw like weight)."""
    dx, dw = rms_norm_bwd(dy, as_rows(x), weight, rstd)
    return dx.view(x.shape), dw


@torch.library.register_fake(_rms_norm_backward_op)
def _(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zero-filled gradient for rstd, which no loss uses


def _rms_norm_backward(ctx, dy, _drstd):
    refuse_double_backward("rms_norm")
    if dy is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dw, None


torch.library.register_autograd(_rms_norm_op, _rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., D) fp32/fp16/bf16; weight: (D,). Differentiable."""
    _check_weight("rms_norm", x, weight, eps)
    if not use_triton(x, weight) or x.numel() == 0:
        return reference.rms_norm(x, weight, eps)
    return _rms_norm_op(x, weight, float(eps))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(h, rms_norm(h, weight)) with h = x + residual, in one pass on a GPU: a transformer block's
    residual add fused with the norm that follows it. x, residual: (..., D), same shape and dtype,
    except under torch.autocast, where a block's output comes back in the autocast dtype while the
    residual stream keeps its own: the two are then added as torch adds them (promoted). With
    autograd (training) it is the plain add and the differentiable `rms_norm`."""
    _check_weight("add_rms_norm", x, weight, eps)
    promoted = (isinstance(residual, torch.Tensor) and x.dtype != residual.dtype
                and residual.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type))
    if not isinstance(residual, torch.Tensor) or x.shape != residual.shape or x.device != residual.device \
            or (x.dtype != residual.dtype and not promoted):
        got = (f"{tuple(residual.shape)} {residual.dtype} {residual.device}" if isinstance(residual, torch.Tensor)
               else type(residual).__name__)
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} {x.device} and residual {got} must match")
    if promoted or (torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad)):
        h = x + residual
        return h, rms_norm(h, weight, eps)
    if not use_triton(x, residual, weight) or x.numel() == 0:
        return reference.add_rms_norm(x, residual, weight, eps)
    # (the op only under torch.compile: an op call costs dispatcher time that a decode step without
    # CUDA graphs pays per layer)
    add_norm = _add_rms_norm_op if torch.compiler.is_compiling() else _add_rms_norm_triton
    return add_norm(x, residual, weight, float(eps))


def _add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2, r2 = as_rows(x), as_rows(residual)
    M, D = x2.shape
    h = torch.empty((M, D), dtype=x.dtype, device=x.device)
    y = torch.empty((M, D), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    BLOCK_D, num_warps = _row_tile(D)
    pdl = launch_programmatic(x.device)
    _add_rms_norm_fwd_kernel[(M,)](x2, r2, weight, h, y, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0),
                                   weight.stride(0), D, eps, BLOCK_D=BLOCK_D, PDL=pdl, num_warps=num_warps,
                                   launch_pdl=pdl)
    return h.view(x.shape), y.view(x.shape)


_add_rms_norm_op = kernel_op("add_rms_norm")(_add_rms_norm_triton)


@torch.library.register_fake(_add_rms_norm_op)
def _(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)))
