"""mtp_kernels: Triton kernels for multi-token-prediction models, each with a PyTorch reference.

Every public function dispatches (see `backend.py`): Triton for CUDA tensors, the reference in
`reference.py` for CPU tensors.
"""
from .backend import backend_name, use_triton
from .fused_linear_ce import fused_linear_cross_entropy
from .rmsnorm import rms_norm

__all__ = ["backend_name", "use_triton", "fused_linear_cross_entropy", "rms_norm"]
