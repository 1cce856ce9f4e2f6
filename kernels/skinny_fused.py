"""The skinny GEMM's fused epilogues: the gate/up GEMM with SwiGLU in its epilogue
(`skinny_linear_swiglu`) and a cached step's q/k/v GEMM with rotary and the KV-cache write in it
(`skinny_linear_rope`, its operands a `RotaryCacheWrite`), each with its tile twins, candidates and
tuner. The kernels are skinny_linear.py's and skinny_ws.py's, launched by `skinny_linear_run`; what a
tile does with its sums is skinny_epilogue.py. Both entry points can also take the block's residual
add and RMSNorm in front (norm=..., skinny_norm.py).

The feed-forward's gate/up GEMM can also form SwiGLU in its epilogue (`skinny_linear_swiglu`):
each program sums a gate tile and the matching up tile of the fused (2F, K) weight over the same
x tiles and stores silu(gate) * up, (rows, F), rounded as the unfused pair rounds it. That saves
the swiglu kernel's launch and the (rows, 2F) write and read: in the H100's step profiles the
swiglu kernels took 0.104 ms of the 6.1 ms 64-node verify step at batch 1 and 0.044 ms of a plain
step (seventeenth session). A separate tuner times it against the unfused pair (the GEMM
`skinny_linear` chose, then the swiglu kernel): the SwiGLU twins (half as wide) of the three plain
tiles timed fastest for the fused weight, so a first call compiles three more launches, not the
whole list again.

The q/k/v GEMM of a cached step can likewise rotate q and k and write k and v into the KV caches in
its epilogue (`skinny_linear_rope`; all but stream-K launches), in place of the rotary kernel
(rope_cache.py): 0.145 ms of the 64-node verify step and 0.072 ms of a plain step in the same
profiles. A third tuner times it against the unfused pair.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import reference
from .backend import as_rows, use_triton
from .launch_tuner import LaunchTuner, close_to, rotating_copies
from .rope_cache import check_cache_write
from .skinny_linear import (MAX_ROWS, SkinnyLaunch, _check_operands, _kernel_takes, _plain_times, _run_as_themselves,
                            _unfused_rope, _unfused_swiglu, row_tile, skinny_candidates, skinny_linear,
                            skinny_linear_run)
from .skinny_norm import NormPrologue, normed_projection


def swiglu_twin(launch: SkinnyLaunch) -> SkinnyLaunch:
    """The SwiGLU form of a plain tile: each program reads a gate and an up tile per K step, so it is
    half as wide (16 at least, tl.dot's smallest; 4 for multiply-add; 64 for a swapped
    warp-specialized tile, whose weight rows are wgmma's M). Its weight bytes per stage, shared
    memory, accumulator registers and re-reads of x are then those of the plain tile; a
    warp-specialized tile that cannot halve keeps its width and drops stages (`ws_paired_stages`)."""
    if launch.ws:
        narrowest = 64 if launch.swap_ab else 16
        if launch.block_n // 2 >= narrowest:
            return replace(launch, block_n=launch.block_n // 2)
        return replace(launch, num_stages=ws_paired_stages(launch))
    return replace(launch, block_n=max(launch.block_n // 2, 16 if launch.use_dot else 4))


WS_SHARED_BYTES = 200 * 1024   # the ring's budget per CTA (sm_90 allows 227 KB; the epilogue needs some)


def ws_paired_stages(launch: SkinnyLaunch) -> int:
    """Stages of a warp-specialized tile that reads two weight tiles per K step at launch's width:
    launch.num_stages, or fewer (2 at least) where its ring of fp16/bf16 tiles (the only dtypes
    these tiles take) would pass WS_SHARED_BYTES."""
    stage = (launch.block_m + 2 * launch.block_n) * launch.block_k * 2
    return max(2, min(launch.num_stages, WS_SHARED_BYTES // stage))


def rope_twin(launch: SkinnyLaunch) -> Optional[SkinnyLaunch]:
    """The rotary-epilogue form of a plain tile: each program sums the even and the odd weight rows
    of its column pairs side by side, so, as a SwiGLU twin, it is half as wide (`swiglu_twin`); None
    for stream-K tiles (their kernel has no rotary epilogue)."""
    return None if launch.stream_k else swiglu_twin(launch)


EPILOGUE_TILES_KEPT = 3   # plain tiles whose twins an epilogue's tuner times, the fastest first


def _epilogue_candidates(M: int, device: torch.device, plain_times: Optional[dict], twin) -> list:
    """The unfused pair (None) first, then twin(tile) of every plain tile for M rows that has one;
    given the plain tuner's times for the fused weight's shape (plain_times, {launch: ms}), only the
    twins of the EPILOGUE_TILES_KEPT fastest such tiles: a twin streams the weight as its plain tile
    does, and each one timed is a compile at a first call."""
    tiles = [c for c in skinny_candidates(M, device)[1:] if twin(c) is not None]
    if plain_times:
        timed = [c for c in tiles if plain_times.get(c, float("inf")) < float("inf")]
        tiles = sorted(timed, key=plain_times.get)[:EPILOGUE_TILES_KEPT] or tiles
    return [None, *dict.fromkeys(twin(c) for c in tiles)]   # halving can make two tiles one


def swiglu_candidates(M: int, device: torch.device, plain_times: Optional[dict] = None) -> list:
    """The launches `skinny_linear_swiglu` times (`_epilogue_candidates` with `swiglu_twin`)."""
    return _epilogue_candidates(M, device, plain_times, swiglu_twin)


def rope_candidates(M: int, device: torch.device, plain_times: Optional[dict] = None) -> list:
    """The launches `skinny_linear_rope` times (`_epilogue_candidates` with `rope_twin`)."""
    return _epilogue_candidates(M, device, plain_times, rope_twin)


_SWIGLU_TUNER = LaunchTuner("skinny_linear_swiglu")


def _tune_epilogue(tuner: LaunchTuner, key, x2: torch.Tensor, weight: torch.Tensor, candidates, timer, l2_bytes,
                   **epilogue) -> dict:
    """As `tune_skinny`, for an epilogue's launches: the unfused pair (None) against
    candidates(M, device, plain_times), each call on the next weight copy. The plain GEMM is tuned
    first (outside the timings), which gives both the unfused pair's GEMM and plain_times; a launch
    whose result is not `close_to` the unfused pair's is left out."""
    skinny_linear(x2, weight)
    plain_times = _plain_times(x2, weight)
    next_weight = rotating_copies(weight, l2_bytes)

    def run(launch):
        return skinny_linear_run(x2, next_weight(), launch, **epilogue)
    rope = epilogue.get("rope")
    probe = run if rope is None else (lambda launch: rope.probe(lambda: run(launch)))
    agrees = close_to(probe(None))
    return tuner.tune(key, _run_as_themselves(candidates(x2.shape[0], x2.device, plain_times), x2, weight), run,
                      timer, agrees, probe)


def tune_skinny_swiglu(key, x2: torch.Tensor, weight: torch.Tensor, timer=None,
                       l2_bytes: Optional[int] = None) -> dict:
    """`skinny_linear_swiglu`'s tuning: the unfused pair against the SwiGLU twins of the plain tiles
    timed fastest for the fused weight (`swiglu_candidates`, `_tune_epilogue`)."""
    return _tune_epilogue(_SWIGLU_TUNER, key, x2, weight, swiglu_candidates, timer, l2_bytes, swiglu=True)


def skinny_linear_swiglu(x: torch.Tensor, w13: torch.Tensor, norm: Optional[NormPrologue] = None):
    """The feed-forward's gate: silu(x @ w1^T) * (x @ w3^T) for a fused gate/up weight
    w13 = [w1; w3] (2F, K), gate rows first: x (..., K) -> (..., F) in x.dtype.
    With norm (a NormPrologue): the gate of rms_norm(h) (h = x + norm.delta), returned as the pair
    (gate, h) (`normed_projection`).

    Where `skinny_linear` would take w13 (no autograd, 1 to MAX_ROWS rows, a CUDA fp16/bf16
    weight), the launch is the one tuned for this row tile and shape: the unfused pair (the GEMM
    skinny_linear picks, then the swiglu kernel) or a kernel tile that forms SwiGLU in its epilogue,
    which saves the swiglu launch and the (rows, 2F) round trip. Everything else, and a shape not
    tuned yet, is the unfused pair (eager under autograd); CPU tensors take the reference."""
    _check_operands("skinny_linear_swiglu", x, w13)
    if w13.shape[0] % 2:
        raise ValueError(f"skinny_linear_swiglu: w13 must be a (2F, K) gate/up weight, got shape {tuple(w13.shape)}")
    if norm is not None:
        return normed_projection("skinny_linear_swiglu", x, w13, norm, lambda normed: skinny_linear_swiglu(normed, w13),
                                 swiglu_candidates, swiglu=True)
    if not use_triton(x, w13):   # the CPU path (autograd included)
        return reference.skinny_linear_swiglu(x, w13)
    F = w13.shape[0] // 2
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad)) or not 1 <= M <= MAX_ROWS \
            or not _kernel_takes(x, w13):
        return _unfused_swiglu(x, w13)
    x2 = as_rows(x)
    key = (str(x.device), x.dtype, row_tile(M), *w13.shape)
    launch = _SWIGLU_TUNER.choose(key, x.device, lambda: tune_skinny_swiglu(key, x2, w13), lambda: None)
    return skinny_linear_run(x2, w13, launch, swiglu=True).view(*x.shape[:-1], F)


@dataclass
class RotaryCacheWrite:
    """The rotary epilogue's operands (`skinny_linear_rope`, checked there): rotated q goes to the
    result, rotated k and v to the caches at `slots`, as `rope_cache_write` does.
    freqs_cis: complex64 (B, T, D/2) or (T, D/2); slots: (B, T) int; k_cache, v_cache: (>= B, S,
    Hkv, D) in the GEMM's dtype, heads packed (strides (.., .., D, 1)), the same strides."""
    freqs_cis: torch.Tensor
    slots: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    n_heads: int
    n_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[-1]

    def kernel_args(self) -> tuple:
        """FREQS .. HEAD_DIM of `_skinny_linear_kernel` (and of `skinny_ws_kernel`)."""
        freqs = torch.view_as_real(self.freqs_cis)   # (.., D/2, 2) float32, no copy
        stride_fb, stride_ft = (0, freqs.stride(0)) if freqs.dim() == 3 else (freqs.stride(0), freqs.stride(1))
        D = self.head_dim
        return (freqs, stride_fb, stride_ft, self.slots, self.slots.stride(0), self.slots.stride(1),
                self.slots.shape[1], self.n_heads * D, self.n_kv_heads * D, self.k_cache, self.v_cache,
                self.k_cache.stride(0), self.k_cache.stride(1), D)

    def _written_rows(self) -> tuple:
        rows = torch.arange(self.slots.shape[0], device=self.slots.device)[:, None].expand_as(self.slots)
        return rows, self.slots.long()

    def probe(self, write: Callable[[], object]) -> tuple:
        """A tuner's probe of a launch that writes k and v into the caches: write() after the slots
        it writes are filled with NaN, so a launch that writes nothing or writes some rows wrong shows:
        write()'s outputs (a tuple, or one tensor), then the k and v it left at the slots (copies)."""
        index = self._written_rows()
        B = self.slots.shape[0]
        for cache in (self.k_cache, self.v_cache):
            cache[:B].index_put_(index, torch.tensor(float("nan"), dtype=cache.dtype, device=cache.device))
        out = write()
        out = out if isinstance(out, tuple) else (out,)
        return (*out, self.k_cache[:B][index].clone(), self.v_cache[:B][index].clone())


_ROPE_TUNER = LaunchTuner("skinny_linear_rope")


def tune_skinny_rope(key, x2: torch.Tensor, weight: torch.Tensor, rope: RotaryCacheWrite, timer=None,
                     l2_bytes: Optional[int] = None) -> dict:
    """`skinny_linear_rope`'s tuning: the unfused pair against the rotary twins of the plain tiles
    timed fastest for the q/k/v weight (`rope_candidates`, `_tune_epilogue`). Every timed call
    writes the same k and v into the same cache slots."""
    return _tune_epilogue(_ROPE_TUNER, key, x2, weight, rope_candidates, timer, l2_bytes, rope=rope)


def _rope_epilogue_takes(x: torch.Tensor, wqkv: torch.Tensor, rope: RotaryCacheWrite) -> bool:
    caches = (rope.k_cache, rope.v_cache)
    return (_kernel_takes(x, wqkv) and rope.freqs_cis.dtype == torch.complex64 and rope.freqs_cis.stride(-1) == 1
            and all(c.dtype == x.dtype and c.stride(-1) == 1 and c.stride(-2) == rope.head_dim for c in caches)
            and rope.k_cache.stride()[:2] == rope.v_cache.stride()[:2])


def skinny_linear_rope(x: torch.Tensor, wqkv: torch.Tensor, n_heads: int, n_kv_heads: int, freqs_cis: torch.Tensor,
                       slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       check_slots: bool = True, norm: Optional[NormPrologue] = None):
    """The attention's input side of a cached step: q, k, v = x @ wqkv^T with wqkv = [wq; wk; wv]
    ((H + 2 Hkv) Dh, K), then `rope_cache_write` (q and k rotated, k and v written into the caches
    at `slots`): x (B, T, K) -> rotated q (B, T, H, Dh). Arguments as `rope_cache_write`'s.

    Where `skinny_linear` would take wqkv (no autograd, 1 to MAX_ROWS tokens, a CUDA fp16/bf16
    weight) and the caches have x's dtype with heads packed, the launch is the one tuned for this
    row tile and shape: the unfused pair (the GEMM skinny_linear picks, then the rotary kernel) or
    an unsplit kernel tile that rotates and writes in its epilogue (`rope_store`), which saves the
    rotary kernel's launch and the (tokens, (H + 2 Hkv) Dh) round trip. Everything else, and a
    shape not tuned yet, is the unfused pair.
    With norm (a NormPrologue): q of rms_norm(h) (h = x + norm.delta), returned as the pair (q, h)
    (`normed_projection`)."""
    name = "skinny_linear_rope"
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not isinstance(wqkv, torch.Tensor) or wqkv.dim() != 2:
        raise ValueError(f"{name}: x must be (B, T, K) and wqkv 2-D, got {tuple(getattr(x, 'shape', ()))} and "
                         f"{tuple(getattr(wqkv, 'shape', ()))}")
    _check_operands(name, x, wqkv)
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"{name}: k_cache must be (B, S, Hkv, Dh), got {tuple(getattr(k_cache, 'shape', ()))}")
    B, T, K = x.shape
    D = k_cache.shape[-1]
    if wqkv.shape != ((n_heads + 2 * n_kv_heads) * D, K):
        raise ValueError(f"{name}: wqkv must be ((n_heads + 2 n_kv_heads) x head_dim, K) = "
                         f"({(n_heads + 2 * n_kv_heads) * D}, {K}) for {n_heads} + 2 x {n_kv_heads} heads of "
                         f"{D}, got {tuple(wqkv.shape)}")
    rope = RotaryCacheWrite(freqs_cis, slots, k_cache, v_cache, n_heads, n_kv_heads)
    M = B * T
    # Operands the rotary epilogue can write through (rope_cache_write checks the rest on the pair's path).
    epilogue_ok = isinstance(freqs_cis, torch.Tensor) and isinstance(slots, torch.Tensor) \
        and isinstance(v_cache, torch.Tensor) and _rope_epilogue_takes(x, wqkv, rope)
    if norm is not None:
        def unfused(normed):
            return skinny_linear_rope(normed, wqkv, n_heads, n_kv_heads, freqs_cis, slots, k_cache, v_cache,
                                      check_slots)
        if not epilogue_ok:
            h, normed = norm.unfused(x)
            return unfused(normed), h
        check_cache_write(name, B, T, n_kv_heads, D, freqs_cis, slots, k_cache, v_cache, check_slots, x=x, wqkv=wqkv)
        q, h = normed_projection(name, x, wqkv, norm, unfused, rope_candidates, rope=rope)
        return q.view(B, T, n_heads, D), h
    fused = (not torch.is_grad_enabled() or not (x.requires_grad or wqkv.requires_grad)) and 1 <= M <= MAX_ROWS \
        and use_triton(x, wqkv, k_cache) and epilogue_ok
    if not fused:   # rope_cache_write checks the operands there
        return _unfused_rope(x, wqkv, rope, check_slots)
    # rope_cache_write's rules, on the shapes the kernel will write through
    check_cache_write(name, B, T, n_kv_heads, D, freqs_cis, slots, k_cache, v_cache, check_slots, x=x, wqkv=wqkv)
    x2 = as_rows(x)
    key = (str(x.device), x.dtype, row_tile(M), *wqkv.shape, n_heads * D)
    launch = _ROPE_TUNER.choose(key, x.device, lambda: tune_skinny_rope(key, x2, wqkv, rope), lambda: None)
    return skinny_linear_run(x2, wqkv, launch, rope=rope).view(B, T, n_heads, D)
