"""mtp_kernels: Triton kernels for multi-token-prediction models, each with a PyTorch reference.

Every public function dispatches (see `backend.py`): Triton for CUDA tensors, the reference in
`reference.py` for CPU tensors.
"""
from .backend import backend_name, use_triton
from .rmsnorm import rms_norm

__all__ = ["backend_name", "use_triton", "rms_norm"]
