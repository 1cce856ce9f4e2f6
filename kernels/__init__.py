"""mtp_kernels: Triton kernels for multi-token-prediction models, each with a PyTorch reference.

Every public function dispatches (see `backend.py`): Triton for CUDA tensors, the reference in
`reference.py` for CPU tensors.
"""
from .backend import backend_name, use_triton
from .fused_linear_ce import fused_linear_cross_entropy
from .penalties import TokenPenalties
from .rmsnorm import add_rms_norm, rms_norm
from .rope_cache import rope_cache_write
from .swiglu import swiglu
from .sampling import TokenCandidates, linear_argmax, linear_candidates, linear_logits, linear_sample, linear_topk
from .tree_verify import compact_kv_cache, tree_accept, tree_accept_tokens

__all__ = ["backend_name", "use_triton", "fused_linear_cross_entropy", "rms_norm", "add_rms_norm",
           "rope_cache_write", "swiglu", "linear_argmax", "linear_logits", "linear_sample", "linear_topk",
           "linear_candidates", "TokenCandidates", "TokenPenalties", "tree_accept", "tree_accept_tokens", "compact_kv_cache"]
