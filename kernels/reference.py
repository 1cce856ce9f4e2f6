"""Plain PyTorch twins of every Triton kernel in this package.

Each function has the same signature as its Triton counterpart. They are the CPU path
(dispatch picks them for CPU tensors) and the oracle in the tests.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------------------------
# RMSNorm (Meta's Llama definition: normalize in float32, cast back, then scale)
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., D) any float dtype; weight: (D,). Returns promote(x.dtype, weight.dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight
