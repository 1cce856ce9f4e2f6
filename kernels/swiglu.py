"""SwiGLU, the feed-forward's gate silu(gate) * up, in one Triton pass (inference).

Eager PyTorch runs it as two kernels (silu, then the product), each reading and writing the
(tokens, ffn_dim) activations; at decode sizes each is a launch of a few microseconds. The rounding
follows PyTorch's: silu in float32, rounded to the input dtype, then the product in float32,
rounded again. With autograd (training) the public function is the eager expression.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .backend import interpreting, use_triton


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(g))                    # never overflows: sigmoid from the side it is small on
    sigmoid = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    silu = (g * sigmoid).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: same shape and dtype. Differentiable (eager) when autograd needs it."""
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor) or gate.shape != up.shape \
            or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must be tensors of one shape and dtype, got "
                         f"{getattr(gate, 'shape', type(gate))} {getattr(gate, 'dtype', '')} and "
                         f"{getattr(up, 'shape', type(up))} {getattr(up, 'dtype', '')}")
    needs_grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if needs_grad or not use_triton(gate, up) or gate.numel() == 0 or not gate.is_floating_point():
        return reference.swiglu(gate, up)
    gate_c, up_c = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate_c)
    n = gate_c.numel()
    block = 256 if interpreting() else 2048
    _swiglu_kernel[(triton.cdiv(n, block),)](gate_c, up_c, out, n, BLOCK=block, num_warps=1 if interpreting() else 8)
    return out
