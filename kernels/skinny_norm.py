"""The skinny GEMM's norm prologue: a block's residual add and RMSNorm inside the projection that
reads them (`NormPrologue`, `normed_projection`, `norm_candidates` and the norm tuners), the norm=
argument of `skinny_linear_swiglu` and `skinny_linear_rope` (skinny_fused.py). The kernel is
skinny_linear.py's (its NORM and ADD constexprs: `_x_operand`, `_rms_scale`), launched by
`skinny_linear_run`.

A decode block runs add_rms_norm before its q/k/v GEMM and before its gate/up GEMM: two kernels
of about 2 us each that read and write a few rows (0.128 ms of the H200's 3.63 ms plain step at
batch 1, 59 launches). The prologue moves them into the GEMM: every program forms h = x + delta
and h * weight for its K tiles (the x row is read by every program anyway), sums h's squares on the
way and scales its sums by 1/rms at the end; program 0 writes h, the residual stream. The rounding
differs from the unfused pair's (h * weight is rounded once before the GEMM, 1/rms is applied to the
float32 sums, where the pair rounds h / rms and then its product with the weight): no less exact,
but not the same bits. A tuner per epilogue (`_NORM_TUNERS`) times the unfused pair (add_rms_norm,
then the projection as its own tuner chose it) against the unsplit twins that epilogue's tuner would
time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .backend import as_rows, check_one_device
from .launch_tuner import LaunchTuner, close_to, rotating_copies
from .rmsnorm import add_rms_norm, rms_norm
from .skinny_linear import MAX_ROWS, _int32_rows, _kernel_takes, _plain_times, row_tile, skinny_linear_run

if TYPE_CHECKING:   # the rotary epilogue's operands, named in normed_projection's signature only
    from .skinny_fused import RotaryCacheWrite


@dataclass
class NormPrologue:
    """A block's residual add and RMSNorm in front of a projection (`skinny_linear_swiglu` and
    `skinny_linear_rope` with norm=...): the projection reads rms_norm(h) * weight, h = x + delta
    (x where delta is None), and the caller gets h back as the block's residual stream.
    weight: (K,) in x's dtype; delta: x's shape and dtype, or None; eps: rms_norm's."""
    weight: torch.Tensor
    eps: float
    delta: Optional[torch.Tensor] = None

    def unfused(self, x: torch.Tensor) -> tuple:
        """(h, normed) as the block computes them without the prologue: add_rms_norm, or rms_norm."""
        if self.delta is None:
            return x, rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, self.delta, self.weight, self.eps)

    def kernel_args(self, h_out: Optional[torch.Tensor]) -> tuple:
        """DELTA .. EPS of `_skinny_linear_kernel`: delta as rows, and h_out (M, K) for h (with a delta)."""
        if self.delta is None:
            return (None, 0, self.weight, None, 0, float(self.eps))
        delta2 = _int32_rows(as_rows(self.delta))   # int32 row offsets in the kernel, as x's
        return (delta2, delta2.stride(0), self.weight, h_out, h_out.stride(0), float(self.eps))


_NORM_TUNERS = {"skinny_linear_swiglu": LaunchTuner("skinny_linear_swiglu_norm"),
                "skinny_linear_rope": LaunchTuner("skinny_linear_rope_norm")}


# The prologue holds its x tile (and delta's) in float32 registers: tl.dot tiles of more x elements
# than this spilled in the sm_90 compiles (16 x 512 and every 64-row tile: 64-4944 bytes, Triton 3.9;
# raise it and run `compile_check.py --only norm_prologue` to see them), so the norm tuners do not
# time them (at 64 rows the unfused pair, with cuBLAS, is left alone).
NORM_MAX_X_TILE = 16 * 256


def norm_candidates(M: int, device: torch.device, plain_times: Optional[dict], epilogue_candidates) -> list:
    """The unfused pair (None), then the epilogue's twins (`epilogue_candidates(M, device,
    plain_times)`, e.g. `swiglu_candidates`) that the prologue can run in: unsplit, not stream-K,
    not warp-specialized, and a tl.dot x tile of at most NORM_MAX_X_TILE elements."""
    return [None, *(c for c in epilogue_candidates(M, device, plain_times)[1:]
                    if c.split_k == 1 and not c.stream_k and not c.ws
                    and (not c.use_dot or c.block_m * c.block_k <= NORM_MAX_X_TILE))]


def _check_norm(name: str, x: torch.Tensor, norm: NormPrologue) -> None:
    K = x.shape[-1]
    if not isinstance(norm, NormPrologue):
        raise ValueError(f"{name}: norm must be a NormPrologue, got {type(norm).__name__}")
    if not isinstance(norm.weight, torch.Tensor) or tuple(norm.weight.shape) != (K,):
        raise ValueError(f"{name}: the norm weight must be ({K},) for x's last dim, got "
                         f"{tuple(getattr(norm.weight, 'shape', ()))}")
    if norm.delta is not None and (not isinstance(norm.delta, torch.Tensor) or norm.delta.shape != x.shape
                                   or norm.delta.dtype != x.dtype):
        raise ValueError(f"{name}: the norm's delta must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(getattr(norm.delta, 'shape', ()))} {getattr(norm.delta, 'dtype', '')}")
    check_one_device(name, x=x, norm_weight=norm.weight, delta=norm.delta)


def normed_projection(name: str, x: torch.Tensor, weight: torch.Tensor, norm: NormPrologue, unfused,
                      epilogue_candidates, swiglu: bool = False, rope: Optional[RotaryCacheWrite] = None) -> tuple:
    """(y, h): h = x + norm.delta (x without a delta), y = unfused(normed) for normed =
    rms_norm(h) * norm.weight, where unfused is the projection as `name` runs it (its epilogue
    tuned on its own). Where the projection's launch could take the prologue (no autograd, 1 to
    MAX_ROWS rows of a CUDA fp16/bf16 weight, norm weight and delta in x's dtype), the launch is
    the one tuned for the row tile and shape: the unfused pair, or one kernel launch with the
    prologue and the epilogue (`norm_candidates`). y: (..., N_out) as unfused gives it, or the
    kernel's (..., N_out) rows (q's heads unsplit: the caller views them); h has x's shape."""
    _check_norm(name, x, norm)
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, norm.weight, norm.delta))
    if grad or not 1 <= M <= MAX_ROWS or not _kernel_takes(x, weight) or norm.weight.dtype != x.dtype \
            or norm.weight.stride(0) != 1:
        h, normed = norm.unfused(x)
        return unfused(normed), h
    x2 = as_rows(x)
    tuner = _NORM_TUNERS[name]
    key = (str(x.device), x.dtype, row_tile(M), *weight.shape, rope.n_heads if rope is not None else 0,
           norm.delta is not None)

    def run(launch, w=weight):
        if launch is None:
            h, normed = norm.unfused(x)
            return unfused(normed), h
        h_out = None if norm.delta is None else torch.empty_like(x2)
        y = skinny_linear_run(x2, w, launch, swiglu=swiglu, rope=rope, norm=norm, h_out=h_out)
        return y.view(*x.shape[:-1], -1), (x if h_out is None else h_out.view(x.shape))

    def tune():
        next_weight = rotating_copies(weight)

        def probe(launch):   # y and h, and with rope the k and v it wrote
            def write():
                return run(launch, next_weight())
            return write() if rope is None else rope.probe(write)
        agrees = close_to(probe(None))   # tunes the projection's own launches first, outside the timings
        plain_times = _plain_times(x2, weight)
        tuner.tune(key, norm_candidates(M, x.device, plain_times, epilogue_candidates),
                   lambda c: run(c, next_weight())[0], agrees=agrees, probe=probe)
    return run(tuner.choose(key, x.device, tune, lambda: None))

