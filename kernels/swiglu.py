"""SwiGLU, the feed-forward's gate silu(gate) * up, in one Triton pass (inference).

Eager PyTorch runs it as two kernels (silu, then the product), each reading and writing the
(tokens, ffn_dim) activations, each a separate launch. The rounding
follows PyTorch's: silu in float32, rounded to the input dtype, then the product in float32,
rounded again. gate and up may be column slices of one fused (tokens, 2 * ffn_dim) projection: rows
are read through their strides, nothing is copied. With autograd (training) the public function
is the eager expression.
"""
from __future__ import annotations

import torch
from .triton_import import tl, triton

from . import reference
from .backend import as_rows, check_one_device, interpreting, kernel_op, use_triton
from .dependent_launch import await_prior_grid, launch_programmatic


@triton.jit
def silu_times_up(g, u, dtype: tl.constexpr):
    """silu(g) * u rounded to `dtype` as PyTorch rounds it: g, u are float32 holding `dtype` values;
    silu in float32, rounded to dtype, then the product in float32, rounded again. Shared with the
    gate/up GEMM's SwiGLU epilogue (skinny_linear.py), so both do the same arithmetic (the same bits
    under the interpreter, tested; on a GPU the compiler may contract differently per kernel)."""
    e = tl.exp(-tl.abs(g))                    # never overflows: sigmoid from the side it is small on
    sigmoid = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    silu = (g * sigmoid).to(dtype).to(tl.float32)
    return (silu * u).to(dtype)


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, F, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    await_prior_grid(PDL)   # PDL: a programmatic dependent launch (dependent_launch.py)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, silu_times_up(g, u, out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., F) in their dtype. gate, up: same shape and dtype, any row strides
    (e.g. the two halves of one fused projection). Differentiable (eager) when autograd needs it."""
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor) or gate.shape != up.shape \
            or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must be tensors of one shape and dtype, got "
                         f"{getattr(gate, 'shape', type(gate))} {getattr(gate, 'dtype', '')} and "
                         f"{getattr(up, 'shape', type(up))} {getattr(up, 'dtype', '')}")
    check_one_device("swiglu", gate=gate, up=up)
    if not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must be floating tensors, got {gate.dtype}")
    needs_grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if needs_grad or not use_triton(gate, up) or gate.numel() == 0 or gate.dim() == 0:
        return reference.swiglu(gate, up)
    # (the op only under torch.compile: an op call costs dispatcher time that a decode step without
    # CUDA graphs pays per layer)
    return (_swiglu_op if torch.compiler.is_compiling() else _swiglu_triton)(gate, up)


def _swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = as_rows(gate), as_rows(up)
    R, F = g2.shape
    out = torch.empty((R, F), dtype=gate.dtype, device=gate.device)
    block = 256 if interpreting() else 1024
    pdl = launch_programmatic(gate.device)
    _swiglu_kernel[(R, triton.cdiv(F, block))](g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), F,
                                               BLOCK=block, PDL=pdl, num_warps=1 if interpreting() else 4,
                                               launch_pdl=pdl)
    return out.view(gate.shape)


# The launch as a torch.library custom op (with a shape function), so torch.compile traces a model
# around it, fullgraph too, where Dynamo would trace into the launcher.
_swiglu_op = kernel_op("swiglu")(_swiglu_triton)


@torch.library.register_fake(_swiglu_op)
def _(gate, up):
    return gate.new_empty(gate.shape)
