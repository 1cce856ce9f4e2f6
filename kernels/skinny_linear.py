"""x @ W^T for the few rows of a decode or verify step: a weight-streaming Triton kernel, or cuBLAS,
by measurement.

A decode step multiplies a few rows (one per sequence) by every weight matrix, a tree verify step
batch x tree nodes, so up to 64 rows these GEMMs cost the time to read the weights. On the H100
the 7B decode step's cuBLAS GEMMs took 4.50 ms for about 11.7 GB of weights at batch 1 (2.6 TB/s),
and cuBLAS split K for two of the four projections, adding a reduction kernel each; with 64 tree
nodes they took 0.97 ms more than that (benchmarks/results/NOTES.md).

Each program owns BLOCK_N output features and streams their weight rows over K in BLOCK_K tiles:
  USE_DOT  tl.dot on a BLOCK_M-row tile of x (16, 32 or 64: the smallest that holds M; rows past M
           load as 0);
  else     M = 1: a float32 multiply-add per weight element into a (BLOCK_N, BLOCK_K) accumulator,
           reduced over K once at the end.
A split-K launch (SPLIT_K > 1, tl.dot only) gives each BLOCK_N tile SPLIT_K programs, each over a
range of whole BLOCK_K tiles. Every program re-reads x (its K range) from L2, so wider weight tiles
cut that traffic, and the splits give the program count back (N = 4096 in 32-wide tiles is only 128
programs for the H100's 132 SMs). Each split stores a float32 partial; the last program of its n
tile to arrive (kernels/arrival.py) adds the partials in split order and writes Y, in the same
kernel. No float atomics, no second kernel and a fixed summation order: every launch gives the same
bits at every run.
A stream-K launch (`_skinny_stream_k_kernel`) runs a fixed number of programs (per SM) over the
(n tile, k tile) units in equal ranges, so a tile wide enough to cut the x re-reads still keeps every
SM busy to the end; the programs that share a tile combine through the same counters, in program
order.
At 32 and 64 rows the tuner also times a TMA-fed, warp-specialized tile (skinny_ws.py; on Hopper,
where `skinny_ws_allowed`): a producer warp group streams x and weight tiles through tensor
descriptors into a ring of shared-memory stages while a consumer warp group runs wgmma, the way
Hopper's own GEMMs are built; it takes the SwiGLU and rotary epilogues and split-K as these tiles do.
Which launch runs is measured per (dtype, row tile, N, K): `LaunchTuner` times cuBLAS, cuBLASLt
(F.linear with torch's preferred BLAS library switched for the call, `BlasLaunch`; at 64 rows cuBLAS
beat our tiles at three of the four 7B shapes on the H200, and its rate there, 2.8-3.7 TB/s, is
short of the 4.0 TB/s our one-row tiles reach) and these tiles as CUDA-graph replays at the first call of a shape outside a capture and keeps the fastest
(cuBLAS on a tie, and whenever nothing is tuned yet). Each timed call reads another copy of the
weight (`tune_skinny`), so that no launch is timed on a weight held in L2. The rows count only
through their tile (1, 16, 32 or 64), so prompts of every length up to 64 tokens share four tunings
per projection. The kernel can only take over where it is faster.

The same kernel also runs paired launches (the SWIGLU and ROPE constexprs: SwiGLU, or rotary and the
KV-cache write, in its epilogue; the shared epilogue code is skinny_epilogue.py) and the residual add
and RMSNorm in its prologue (NORM). `skinny_linear_run` launches every form; the public entry points
of the fused forms, their operands, tile twins and tuners are skinny_fused.py
(`skinny_linear_swiglu`, `skinny_linear_rope`, `RotaryCacheWrite`) and skinny_norm.py
(`NormPrologue`, `normed_projection`). A fused form's unfused pair (`_unfused_swiglu`,
`_unfused_rope`) is here: it is what `skinny_linear_run` runs for a None launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from .triton_import import tl, triton

from . import reference
from .arrival import arrival_counters, last_to_arrive
from .backend import as_rows, check_one_device, gpu_launch, interpreting, sm_count, use_triton
from .dependent_launch import await_prior_grid, launch_programmatic
from .launch_tuner import LaunchTuner, close_to, rotating_copies
from .rope_cache import rope_cache_write
from .skinny_epilogue import rope_store, store_split, store_tile, tile_values
from .skinny_ws import skinny_ws_allowed, skinny_ws_kernel, skinny_ws_offered, tma_layout_ok
from .swiglu import swiglu

if TYPE_CHECKING:   # the fused forms' operands, named in skinny_linear_run's signature only
    from .skinny_fused import RotaryCacheWrite
    from .skinny_norm import NormPrologue

MAX_ROWS = 64   # x rows the kernel takes (one tl.dot tile); more rows are a GEMM for cuBLAS
# A programmatic dependent launch (dependent_launch.py) loads each program's first weight tile before
# it waits for the kernel before it (the weights are constants of a step), at the cost of that tile's
# registers or shared-memory stage (compile_sm90.md); False: it waits first, as the other kernels do.
# benchmarks/probe_dependent_launch.py times both.
EARLY_WEIGHT_TILE = True


@triton.jit
def _load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """A (BLOCK_N, BLOCK_K) weight tile; masked only along the dimensions the shape leaves ragged."""
    if EVEN_N and EVEN_K:
        return tl.load(w_ptrs)
    elif EVEN_K:
        return tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        return tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _load_x_tile(x_ptrs, m_ok, k_ok, EVEN_K: tl.constexpr):
    """A (BLOCK_M, BLOCK_K) tile of x; rows past M read as 0."""
    if EVEN_K:
        return tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        return tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _x_operand(x_ptrs, m_ok, k_ok, ss, k0, d_ptrs, g_ptrs, h_ptrs, store_h, USE_DOT: tl.constexpr,
               EVEN_K: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr):
    """One K step's x operand: a (BLOCK_M, BLOCK_K) tile of x in its dtype (USE_DOT), or x's row as
    (BLOCK_K,) float32. With NORM the norm prologue: x is the residual stream h (ADD: h = x + delta,
    rounded to x's dtype as add_rms_norm rounds it, and stored through h_ptrs where store_h, a
    (BLOCK_K,) mask that is all True in program 0 only; d_ptrs, g_ptrs, h_ptrs point at K = 0 and
    this step's tile starts at k0, where x_ptrs already points); the operand is h * g (g the norm weight;
    rounded to the dtype for tl.dot), and h's squares are added to ss ((BLOCK_M,) per row; one row:
    (BLOCK_K,) lanes, summed at the end). The per-row 1/rms is applied to the sums after the K loop
    (`_rms_scale`). Returns (operand, ss)."""
    if USE_DOT:
        x = _load_x_tile(x_ptrs, m_ok, k_ok, EVEN_K)
        if NORM:
            if ADD:
                x = (x.to(tl.float32) + _load_x_tile(d_ptrs + k0, m_ok, k_ok, EVEN_K).to(tl.float32)).to(x.dtype)
                tl.store(h_ptrs + k0, x, mask=m_ok[:, None] & (store_h & k_ok)[None, :])
            h = x.to(tl.float32)
            ss += tl.sum(h * h, axis=1)
            x = (h * tl.load(g_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
    else:
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        if NORM:
            if ADD:
                x = (x.to(tl.float32) + tl.load(d_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)).to(x.dtype)
                tl.store(h_ptrs + k0, x, mask=store_h & k_ok)
            h = x.to(tl.float32)
            ss += h * h
            x = h * tl.load(g_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)
        x = x.to(tl.float32)
    return x, ss


@triton.jit
def _accumulate(acc, acc_up, w, w_up, x, USE_DOT: tl.constexpr, PAIRED: tl.constexpr):
    """One K step of the sums: acc += x @ w^T (PAIRED: acc_up += x @ w_up^T as well), by tl.dot on a
    (BLOCK_M, BLOCK_K) x tile, or by a float32 multiply-add of one (BLOCK_K,) float32 x row into the
    (BLOCK_N, BLOCK_K) accumulators (`_x_operand` gives x)."""
    if USE_DOT:
        acc = tl.dot(x, tl.trans(w), acc)
        if PAIRED:
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    else:
        acc += w.to(tl.float32) * x[None, :]
        if PAIRED:
            acc_up += w_up.to(tl.float32) * x[None, :]
    return acc, acc_up


@triton.jit
def _rms_scale(acc, acc_up, ss, K, EPS, USE_DOT: tl.constexpr):
    """The norm prologue's last step: the sums times each row's 1 / sqrt(mean(h^2) + eps), the
    scale rms_norm applies to h before its weight (over the K columns h has)."""
    if USE_DOT:
        rstd = tl.math.rsqrt(ss / K + EPS)[:, None]
    else:
        rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / K + EPS)
    return acc * rstd, acc_up * rstd


@triton.jit
def _skinny_linear_kernel(
    X, W, Y, PARTIALS, COUNTERS, M, N, K, stride_xm, stride_wn, stride_ym, UP,
    FREQS, stride_fb, stride_ft, SLOTS, stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE,
    stride_cb, stride_cs, HEAD_DIM, DELTA, stride_dm, NORM_W, H_OUT, stride_hm, EPS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, SWIGLU: tl.constexpr,
    ROPE: tl.constexpr, PDL: tl.constexpr, EARLY_TILE: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr,
):
    """Y = X @ W^T. Paired launches sum two weight rows per output side by side over one x tile, a
    first one and the one UP elements further: with SWIGLU, W is a fused gate/up weight (N gate rows,
    then the up rows; UP = N rows) and Y = silu(X @ Wg^T) * (X @ Wu^T); with ROPE, W is a fused
    q/k/v weight, its outputs are the N column pairs (rows 2n and 2n + 1, UP = one row) and the
    epilogue rotates q and k and writes k and v into the caches (`rope_store`, arguments FREQS to
    HEAD_DIM; Y is q). PDL: a programmatic dependent launch (dependent_launch.py), which waits for
    the kernel before it first, or with EARLY_TILE after loading its first weight tile.
    NORM: the norm prologue (`_x_operand`, `_rms_scale`): Y = rms_norm(h) * NORM_W @ W^T with h = X
    (ADD: h = X + DELTA, which program 0 writes to H_OUT), a block's residual add and norm fused
    into the projection that reads them; unsplit launches only (1/rms needs the whole row)."""
    tl.static_assert(USE_DOT or SPLIT_K == 1, "split-K launches are tl.dot launches")
    tl.static_assert(SPLIT_K == 1 or not NORM, "the norm prologue needs the whole row in one program")
    tl.static_assert(NORM or not ADD, "the residual add comes with the norm prologue")
    tl.static_assert(not (SWIGLU and ROPE), "one epilogue at a time")
    tl.static_assert(PDL or not EARLY_TILE, "the early weight tile is a programmatic launch's")
    if not EARLY_TILE:
        await_prior_grid(PDL)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    if ROPE:
        w_ptrs = W + (2 * offs_n)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    else:
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if USE_DOT:
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        x_ptrs = X + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)   # the second rows' sums (paired launches only: otherwise compiled away)
    # The norm prologue's operands at K = 0 (NORM only; else never read): delta and h_out in x's
    # layout. Each K step offsets them by its k0 (`_x_operand`); the prologue runs unsplit, k_lo = 0.
    d_ptrs = x_ptrs
    g_ptrs = offs_k
    h_ptrs = x_ptrs
    if NORM:
        g_ptrs = NORM_W + offs_k
        if ADD:
            if USE_DOT:
                d_ptrs = DELTA + offs_m[:, None] * stride_dm + offs_k[None, :]
                h_ptrs = H_OUT + offs_m[:, None] * stride_hm + offs_k[None, :]
            else:
                d_ptrs = DELTA + offs_k
                h_ptrs = H_OUT + offs_k
    store_h = (offs_k * 0 + pid) == 0   # (BLOCK_K,): the interpreter (Triton 3.9) refuses a scalar mask term
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        # Split s takes whole BLOCK_K tiles [s * tiles_per_split, (s + 1) * tiles_per_split), so the
        # masks below stay those of an unsplit launch; at odd shapes the last splits may get no tile.
        tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_lo = tl.program_id(1) * tiles_per_split * BLOCK_K
        k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
        w_ptrs += k_lo
        x_ptrs += k_lo
    k_next = k_lo
    if EARLY_TILE:
        # Weights are constants of a step: this program's first weight tile can stream in while the
        # kernel before it ends. Masked to this split's range (an empty split loads nothing).
        k_ok = (k_lo + offs_k) < k_hi
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w_up = w
        if SWIGLU or ROPE:
            w_up = tl.load(w_ptrs + UP, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        await_prior_grid(PDL)
        x, ss = _x_operand(x_ptrs, m_ok, k_ok, ss, k_lo, d_ptrs, g_ptrs, h_ptrs, store_h, USE_DOT, False, NORM, ADD)
        acc, acc_up = _accumulate(acc, acc_up, w, w_up, x, USE_DOT, SWIGLU or ROPE)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k_next = k_lo + BLOCK_K
    for k0 in range(k_next, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        w = _load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
        w_up = w
        if SWIGLU or ROPE:
            w_up = _load_weight_tile(w_ptrs + UP, n_ok, k_ok, EVEN_N, EVEN_K)
        x, ss = _x_operand(x_ptrs, m_ok, k_ok, ss, k0, d_ptrs, g_ptrs, h_ptrs, store_h, USE_DOT, EVEN_K, NORM, ADD)
        acc, acc_up = _accumulate(acc, acc_up, w, w_up, x, USE_DOT, SWIGLU or ROPE)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if NORM:
        acc, acc_up = _rms_scale(acc, acc_up, ss, K, EPS, USE_DOT)
    if USE_DOT:
        if SPLIT_K == 1:
            store_tile(Y, stride_ym, acc, acc_up, offs_m, offs_n, m_ok, n_ok, FREQS, stride_fb, stride_ft, SLOTS,
                       stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM,
                       SWIGLU, ROPE)
        else:
            store_split(Y, stride_ym, acc, acc_up, PARTIALS, COUNTERS, pid, tl.program_id(1), M, N, offs_m, offs_n,
                        m_ok, n_ok, FREQS, stride_fb, stride_ft, SLOTS, stride_sb, stride_st, T, Q_COLS, KV_COLS,
                        K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM, BLOCK_M, BLOCK_N, SPLIT_K, SWIGLU, ROPE)
    elif ROPE:   # one row (M = 1)
        rope_store(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], tl.zeros((1,), dtype=tl.int32),
                    offs_n, tl.full((1,), True, tl.int1), n_ok, Y, stride_ym, FREQS, stride_fb, stride_ft, SLOTS,
                    stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM)
    else:   # one row, stored as a vector (the 2-D store of `store_tile` costs this tile 24-35 registers)
        tl.store(Y + offs_n, tile_values(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), Y.dtype.element_ty, SWIGLU),
                 mask=n_ok)


@triton.jit
def _owner(unit, units, programs):
    """The stream-K program whose unit range [p * units // programs, (p + 1) * units // programs)
    holds `unit` (programs <= units, so no range is empty)."""
    return ((unit + 1) * programs + units - 1) // units - 1


@triton.jit
def _partial_ptrs(PARTIALS, program, slot, half, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SWIGLU: tl.constexpr):
    """A stream-K program's float32 partial of one tile in PARTIALS (programs, 2, halves, M, BLOCK_N):
    slot 0 for its first tile, 1 for its last; half 0 the (gate) sums, 1 the up sums (SWIGLU only)."""
    offs_m = tl.arange(0, BLOCK_M)
    row0 = ((program * 2 + slot) * (1 + SWIGLU) + half) * M
    return PARTIALS + (row0 + offs_m[:, None]) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]


@triton.jit
def _merge_shared_tile(Y, PARTIALS, COUNTERS, tile, k_tiles, units, programs, M, N, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """Take a ticket on a shared tile's counter (this program stored its partial); the tile's last
    sharer to arrive adds every sharer's partial in program order and writes the tile of Y."""
    sharer_lo = _owner(tile * k_tiles, units, programs)
    sharer_hi = _owner((tile + 1) * k_tiles - 1, units, programs)
    if last_to_arrive(COUNTERS + tile, sharer_hi - sharer_lo + 1):
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        y_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in range(sharer_lo, sharer_hi + 1):
            slot = (tile != (p * units // programs) // k_tiles).to(tl.int32)   # 0: p's first tile
            y += tl.load(_partial_ptrs(PARTIALS, p, slot, 0, M, BLOCK_M, BLOCK_N, SWIGLU),
                         mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            if SWIGLU:
                y_up += tl.load(_partial_ptrs(PARTIALS, p, slot, 1, M, BLOCK_M, BLOCK_N, SWIGLU),
                                mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        offs_n = tile * BLOCK_N + offs_j
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], tile_values(y, y_up, Y.dtype.element_ty, SWIGLU),
                 mask=m_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _skinny_stream_k_kernel(
    X, W, Y, PARTIALS, COUNTERS, M, N, K, stride_xm, stride_wn, stride_ym, UP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr,
):
    """Stream-K: the (n tile, k tile) work units, n tile after n tile, cut into one equal range per
    program, so wide weight tiles (few n tiles, hence few re-reads of x) still give every SM the same
    share. One flat loop runs over the program's units, so the load pipeline never drains at a tile
    boundary. A tile the range covers whole is written at once; only the range's first and last
    tiles can be shared, and for those the program stores a float32 partial (`_partial_ptrs`) and,
    after the loop, merges them through the arrival counters (_merge_shared_tile). SWIGLU and UP as
    in `_skinny_linear_kernel`; PDL: a programmatic dependent launch, which waits first."""
    await_prior_grid(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    units = tl.cdiv(N, BLOCK_N) * k_tiles
    unit_lo = pid * units // programs
    unit_hi = (pid + 1) * units // programs
    first_tile = unit_lo // k_tiles
    last_tile = (unit_hi - 1) // k_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    x_rows = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)   # SWIGLU only
    for unit in range(unit_lo, unit_hi):
        tile = unit // k_tiles
        k0 = (unit - tile * k_tiles) * BLOCK_K
        offs_n = tile * BLOCK_N + offs_j
        n_ok = offs_n < N
        k_ok = (k0 + offs_k) < K
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + k0 + offs_k[None, :]
        w = _load_weight_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
        # Its own K step, not `_accumulate`: written that way, ptxas gave these tiles 98-158 registers
        # where this form takes 116-129 (Triton 3.9), with no GPU timing to choose between them.
        x_tile = _load_x_tile(x_rows + k0, m_ok, k_ok, EVEN_K)
        acc = tl.dot(x_tile, tl.trans(w), acc)
        if SWIGLU:
            acc_up = tl.dot(x_tile, tl.trans(_load_weight_tile(w_ptrs + UP, n_ok, k_ok, EVEN_N, EVEN_K)), acc_up)
        if (k0 + BLOCK_K >= K) | (unit == unit_hi - 1):   # the end of this tile's segment
            if (unit - tile * k_tiles + 1 >= k_tiles) & (unit_lo <= tile * k_tiles):   # the whole tile
                tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :],
                         tile_values(acc, acc_up, Y.dtype.element_ty, SWIGLU), mask=m_ok[:, None] & n_ok[None, :])
            else:
                slot = (tile != first_tile).to(tl.int32)
                tl.store(_partial_ptrs(PARTIALS, pid, slot, 0, M, BLOCK_M, BLOCK_N, SWIGLU), acc,
                         mask=m_ok[:, None])
                if SWIGLU:
                    tl.store(_partial_ptrs(PARTIALS, pid, slot, 1, M, BLOCK_M, BLOCK_N, SWIGLU), acc_up,
                             mask=m_ok[:, None])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if SWIGLU:
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Shared tiles: the first if the range starts inside it or ends before its end; the last if it
    # differs from the first and the range ends inside it.
    if (unit_lo > first_tile * k_tiles) | (unit_hi < (first_tile + 1) * k_tiles):
        _merge_shared_tile(Y, PARTIALS, COUNTERS, first_tile, k_tiles, units, programs, M, N, stride_ym,
                           BLOCK_M, BLOCK_N, SWIGLU)
    if (last_tile != first_tile) & (unit_hi < (last_tile + 1) * k_tiles):
        _merge_shared_tile(Y, PARTIALS, COUNTERS, last_tile, k_tiles, units, programs, M, N, stride_ym,
                           BLOCK_M, BLOCK_N, SWIGLU)


@dataclass(frozen=True)
class SkinnyLaunch:
    """One tile config of the kernel (None in its place means cuBLAS)."""
    block_n: int
    block_k: int
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 16   # x rows per tl.dot tile (multiply-add launches take one row)
    split_k: int = 1    # programs per n tile, each over a K range (tl.dot launches only)
    stream_k: int = 0   # > 0: a stream-K launch of stream_k programs per SM (tl.dot, unsplit)
    ws: bool = False    # the TMA-fed warp-specialized tile (skinny_ws.py; tl.dot, not stream-K)
    swap_ab: bool = False   # ws only: the weight rows as the matmul's M (skinny_ws.py)

    def label(self) -> str:
        """E.g. "64x64x128 dot w4 s4 k2": rows x BLOCK_N x BLOCK_K, dot or fma, warps, stages, and
        the K split when there is one ("k2") or the stream-K programs per SM ("sk1"); "ws" (and
        "swap") for the warp-specialized tile."""
        rows = self.block_m if self.use_dot else 1
        split = f" k{self.split_k}" if self.split_k > 1 else ""
        stream = f" sk{self.stream_k}" if self.stream_k else ""
        ws = (" ws swap" if self.swap_ab else " ws") if self.ws else ""
        return (f"{rows}x{self.block_n}x{self.block_k} {'dot' if self.use_dot else 'fma'} "
                f"w{self.num_warps} s{self.num_stages}{split}{stream}{ws}")

    def tile_id(self) -> str:
        """The label without spaces, e.g. "64x64x128_dot_w4_s3_k2_ws": a test id, and an item of
        MTP_SKINNY_WS's list (skinny_ws.skinny_ws_offered)."""
        return self.label().replace(" ", "_")


# Multiply-add tiles (block_n, block_k, num_warps, num_stages) keep a float32 (BLOCK_N, BLOCK_K)
# accumulator: 8192 values = 64 per thread at 4 warps. tl.dot tiles (block_n, block_k, num_warps,
# num_stages, split_k) per row tile: unsplit, taller x tiles take narrower weight tiles, since each
# program re-reads x from L2 (N / BLOCK_N times M x K in all); but at N = 4096 a 32-wide tile makes
# 128 programs for 132 SMs, too few loads in flight. Split in 2, the same tiles make 256. The split
# tiles below were picked from a helper's H100 timings of 28 split tiles (rotated weights, N = 4096
# and 12288; those timings are not in the repo): 32- and 64-wide tiles split in 2 did best, 128-wide
# ones led only at one row. In the tenth session's benchmark the tuner chose a split tile at
# (4096, 11008) for every row tile, 2.48-2.70 TB/s against cuBLAS's 2.35-2.55, and nowhere else
# (generate_nvidia-h100-80gb-hbm3.md). No split-K tile spills or serializes its wgmma in the sm_90
# compiles (compile_sm90*.md), at the 7B shapes or at an odd one (masked K raises the 64-row tiles
# to 226-255 registers there).
_GPU_FMA_TILES = ((8, 1024, 4, 3), (16, 512, 4, 3), (16, 256, 4, 4), (32, 256, 4, 3))
_GPU_DOT_TILES = {16: ((16, 256, 4, 4, 1), (32, 256, 4, 3, 1), (64, 128, 8, 3, 1), (32, 512, 8, 3, 1),
                       (32, 256, 4, 3, 2), (32, 128, 4, 4, 2), (64, 128, 8, 3, 4), (128, 128, 4, 3, 4)),
                  32: ((16, 256, 4, 4, 1), (32, 256, 4, 3, 1), (32, 128, 4, 4, 1), (64, 128, 8, 3, 1),
                       (32, 128, 4, 4, 2), (32, 256, 4, 3, 2), (64, 128, 4, 4, 2), (64, 128, 4, 3, 4)),
                  64: ((16, 256, 4, 3, 1), (32, 128, 4, 4, 1), (32, 256, 8, 3, 1), (64, 128, 8, 3, 1),
                       (64, 128, 4, 4, 2), (32, 128, 4, 4, 2), (64, 128, 8, 4, 2))}
# Stream-K tiles (block_n, block_k, num_warps, num_stages, programs per SM) per row tile: 128- and
# 256-wide weight tiles, which re-read x 4-8 times less than the 32-wide tiles above (at 64 rows a
# 32-wide tile reads 2 bytes of x from L2 per weight byte from HBM; 1-row tiles read next to
# none and run at 2.5-3.0 TB/s against 2.25-2.68 at 64 rows, tenth session) and which unsplit
# would leave SMs idle in a last partial wave (22016 / 128 = 172 tiles on 132 SMs). Shared memory:
# (block_n + rows) x block_k x 2 bytes per stage, plus the float32 accumulator's tile for the
# epilogue's stores; 104-184 KB per CTA in the sm_90 compiles, so 2 CTAs per SM only for the
# 64 x 128 x 64 tile at 3 stages. Not yet timed on a GPU: the tuner keeps one only where it beats
# cuBLAS and the tiles above.
_GPU_STREAM_K_TILES = {16: ((128, 128, 4, 4, 1),),
                       32: ((128, 128, 4, 4, 1), (256, 64, 8, 4, 1)),
                       64: ((128, 128, 8, 3, 1), (128, 64, 4, 3, 2), (256, 64, 8, 3, 1))}
# Interpreter tiles are small, to keep the CPU tests fast; a split-K tile per row tile covers the
# combine (with empty splits at the tests' small K), a stream-K one (3 programs) the shared tiles.
_INTERP_FMA_TILES = ((16, 32, 1, 1), (8, 64, 1, 1))
_INTERP_DOT_TILES = {16: ((16, 32, 1, 1, 1), (32, 16, 1, 1, 1), (16, 16, 1, 1, 3)),
                     32: ((16, 32, 1, 1, 1), (16, 16, 1, 1, 2)),
                     64: ((16, 16, 1, 1, 1), (32, 16, 1, 1, 4))}
_INTERP_STREAM_K_TILES = {16: ((16, 16, 1, 1, 1),), 32: ((16, 16, 1, 1, 1),), 64: ((16, 16, 1, 1, 1),)}
# Warp-specialized TMA tiles (skinny_ws.py; block_n, block_k, num_stages, split_k, swap_ab; 4 warps,
# to which Triton adds the producer's) at the row tiles where the pointer-fed ones lost to cuBLAS
# (32, 64). Swapped, the weight rows are wgmma's M (64 or 128) and 32 x rows its N. 1 CTA per SM
# (168 registers x 384 threads in the sm_90 compiles), so the splits set the waves on 132 SMs:
# 64-wide unsplit, 192 programs at N = 12288 (1.45 waves) and 64 at N = 4096; split in 2, 384 and
# 128; 128-wide split in 4, the same. Not yet timed on a GPU.
_GPU_WS_TILES = {32: ((64, 128, 4, 1, True), (64, 128, 4, 2, True), (128, 128, 3, 4, True)),
                 64: ((64, 128, 4, 1, False), (64, 128, 3, 2, False), (128, 128, 3, 4, True))}
_INTERP_WS_TILES = {16: ((16, 16, 1, 1, True), (16, 32, 1, 3, False)), 32: ((16, 16, 1, 2, True),),
                    64: ((16, 32, 1, 1, False),)}


def row_tile(M: int) -> int:
    """The tuning bucket of M rows: 1 (a multiply-add row), else the tl.dot row tile that holds M."""
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1 to {MAX_ROWS} rows, got {M}")
    return 1 if M == 1 else max(16, triton.next_power_of_2(M))


def skinny_candidates(M: int, device: torch.device) -> list:
    """cuBLAS (None) first, then the kernel's tiles for M rows: multiply-add ones for M = 1, the
    tl.dot ones (split-K and stream-K among them) of M's row tile (16 rows for M = 1), and for
    M > 1 the warp-specialized TMA tiles of that row tile where `skinny_ws_allowed`."""
    gpu = gpu_launch(device)
    fma, dot, stream = ((_GPU_FMA_TILES, _GPU_DOT_TILES, _GPU_STREAM_K_TILES) if gpu else
                        (_INTERP_FMA_TILES, _INTERP_DOT_TILES, _INTERP_STREAM_K_TILES))
    block_m = max(16, row_tile(M))
    out: list = [None]
    if M == 1:
        out += [SkinnyLaunch(n, k, False, w, s) for n, k, w, s in fma]
    out += [SkinnyLaunch(n, k, True, w, s, block_m, split) for n, k, w, s, split in dot[block_m]]
    out += [SkinnyLaunch(n, k, True, w, s, block_m, stream_k=per_sm) for n, k, w, s, per_sm in stream[block_m]]
    if M > 1 and skinny_ws_allowed(device):
        out += [c for c in ws_tiles(block_m, gpu) if skinny_ws_offered(c.tile_id())]
    return out


def ws_tiles(block_m: int, gpu: bool) -> list:
    """The warp-specialized tiles of a row tile (16, 32 or 64): the GPU's (`_GPU_WS_TILES`, gpu=True)
    or the interpreter's, whatever `skinny_ws_allowed` says."""
    table = _GPU_WS_TILES if gpu else _INTERP_WS_TILES
    return [SkinnyLaunch(n, k, True, 4, s, block_m, split, ws=True, swap_ab=swap)
            for n, k, s, split, swap in table.get(block_m, ())]


@dataclass(frozen=True)
class BlasLaunch:
    """F.linear with torch's preferred BLAS library set to `library` for the call (then restored),
    timed beside cuBLAS (None): cuBLASLt's heuristics choose their own kernels, and for a few rows
    torch's F.linear is not always the fastest GEMM (vLLM issues 27173 and 35467, FlashInfer issue
    1974). Offered on CUDA only (`blas_candidates`)."""
    library: str = "cublaslt"

    def label(self) -> str:
        return {"cublaslt": "cuBLASLt"}.get(self.library, self.library)


def blas_candidates(device: torch.device) -> list:
    """The BLAS launches timed beside cuBLAS on `device`: cuBLASLt on a CUDA device; none elsewhere
    (a CPU build refuses the switch, a cross-compile has nothing of ours to compile in it)."""
    if device.type != "cuda":
        return []
    return [BlasLaunch("cublaslt")]


def blas_linear(x2: torch.Tensor, weight: torch.Tensor, launch: BlasLaunch) -> torch.Tensor:
    """x2 @ weight^T by F.linear with `launch.library` preferred for this call only. A library
    this build lacks raises torch's RuntimeError (a tuner counts that launch out)."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(launch.library)
    try:
        return reference.skinny_linear(x2, weight)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def tuned_candidates(M: int, device: torch.device) -> list:
    """What `tune_skinny` times: cuBLAS (None), the other BLAS launches (`blas_candidates`), then
    the kernel's tiles (`skinny_candidates`)."""
    cublas, *tiles = skinny_candidates(M, device)
    return [cublas, *blas_candidates(device), *tiles]


def stream_k_programs(device: torch.device, per_sm: int) -> int:
    """Programs of a stream-K launch: per_sm per SM on a GPU; under the interpreter per_sm x 3, so
    that the tests' small shapes split tiles between programs unevenly."""
    return per_sm * (sm_count(device) if gpu_launch(device) else 3)


def _unfused_swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) as two kernels: the GEMM `skinny_linear` picks for the fused
    (2F, K) weight, then the swiglu kernel on its two column halves (read in place)."""
    gate, up = skinny_linear(x, weight).chunk(2, dim=-1)
    return swiglu(gate, up)


# A launch's arguments for the epilogue and prologue it does not run (where it does:
# RotaryCacheWrite.kernel_args, skinny_fused.py; NormPrologue.kernel_args, skinny_norm.py).
_NO_ROPE = (None, 0, 0, None, 0, 0, 1, 0, 0, None, None, 0, 0, 2)   # FREQS .. HEAD_DIM, unused
_NO_NORM = (None, 0, None, None, 0, 0.0)   # DELTA .. EPS, unused


def _unfused_rope(x: torch.Tensor, weight: torch.Tensor, rope: RotaryCacheWrite,
                  check_slots: bool = False) -> torch.Tensor:
    """The q/k/v GEMM `skinny_linear` picks for x (B, T, K), then `rope_cache_write` (which checks
    the operands): rotated q (B, T, H, D)."""
    B, T, _ = x.shape
    D, kv_cols = rope.head_dim, rope.n_kv_heads * rope.head_dim
    q, k, v = skinny_linear(x, weight).split([rope.n_heads * D, kv_cols, kv_cols], -1)
    return rope_cache_write(q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D), rope.freqs_cis,
                            rope.slots, rope.k_cache, rope.v_cache, check_slots=check_slots)


def _int32_rows(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) as the kernels may read it: their row offsets (offs_m * stride_xm, and the norm
    prologue's delta's) are int32, so a view whose last row starts 2^31 elements or more past its
    first (each sequence's last position after a prefill: stride T x K, 64 rows at T 16384, K 4096)
    would wrap; such a view is read from a compact copy (at most 64 rows). Casting the offsets to
    int64 in the kernels instead changed the registers (and spills) of 45 of the 141 sm_90 variants
    compile_check.py --quick builds."""
    M, K = x2.shape
    return x2.contiguous() if M > 1 and (M - 1) * x2.stride(0) + K > 2 ** 31 - 1 else x2


def skinny_linear_run(x2: torch.Tensor, weight: torch.Tensor, launch: Optional[SkinnyLaunch | BlasLaunch],
                      programs: Optional[int] = None, swiglu: bool = False,
                      rope: Optional[RotaryCacheWrite] = None, norm: Optional[NormPrologue] = None,
                      h_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 (M, K) @ weight (N, K)^T with one launch (None: cuBLAS; a BlasLaunch: F.linear with that
    library preferred); both with a unit last stride.
    programs: a stream-K launch's program count (None: `stream_k_programs`; tests set it).
    swiglu=True: weight is a fused gate/up weight (2F, K), gate rows first, and the result is
    silu(x2 @ gate^T) * (x2 @ up^T), (M, F), formed in the launch's epilogue (None: the unfused
    pair, `_unfused_swiglu`).
    rope: weight is a fused q/k/v weight ((H + 2 Hkv) D, K) and x2's rows the B x T new tokens; the
    launch (not stream-K) rotates q and k in its epilogue, writes k and v into the caches and
    returns q, (M, H D) (None: the unfused pair, `_unfused_rope`).
    norm: the launch (unsplit, not stream-K) reads x2 through the norm prologue and, with a delta
    (x2's rows in any shape), writes h = x2 + delta to h_out (M, K)."""
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"skinny_linear: a SwiGLU launch takes a (2F, K) gate/up weight, got {tuple(weight.shape)}")
    if rope is not None and weight.shape[0] != (rope.n_heads + 2 * rope.n_kv_heads) * rope.head_dim:
        raise ValueError(f"skinny_linear: a rotary launch takes a ({rope.n_heads} + 2 x {rope.n_kv_heads}) x "
                         f"{rope.head_dim}-row q/k/v weight, got {tuple(weight.shape)}")
    if rope is not None and (swiglu or (launch is not None and launch.stream_k)):
        raise ValueError(f"skinny_linear: the rotary epilogue needs a launch without SwiGLU, not stream-K, got {launch}")
    if norm is not None and (launch is None or isinstance(launch, BlasLaunch) or launch.split_k > 1
                             or launch.stream_k or launch.ws):
        raise ValueError(f"skinny_linear: the norm prologue needs an unsplit kernel launch, got {launch}")
    if norm is not None and (norm.delta is None) != (h_out is None):
        raise ValueError("skinny_linear: the norm prologue writes h = x + delta to h_out: give both or neither")
    if norm is not None and h_out is not None and not (h_out.shape == x2.shape == as_rows(norm.delta).shape):
        raise ValueError(f"skinny_linear: the norm prologue's delta and h_out must be x's {tuple(x2.shape)} rows, got "
                         f"{tuple(norm.delta.shape)} and {tuple(h_out.shape)}")
    if isinstance(launch, BlasLaunch):
        if swiglu or rope is not None:
            raise ValueError(f"skinny_linear: {launch.label()} has no epilogue; the unfused pair (None) runs it")
        return blas_linear(x2, weight, launch)
    if launch is not None and launch.ws and not tma_layout_ok(x2, weight):
        launch = None   # a layout TMA cannot read: the unfused launch (cuBLAS, or the unfused pair)
    if launch is None:
        if rope is not None:   # x2's rows are the slots' (B, T) tokens
            return _unfused_rope(x2.view(*rope.slots.shape, -1), weight, rope).view(x2.shape[0], -1)
        return _unfused_swiglu(x2, weight) if swiglu else reference.skinny_linear(x2, weight)
    x2 = _int32_rows(x2)
    M, K = x2.shape
    paired = swiglu or rope is not None
    N = weight.shape[0] // 2 if paired else weight.shape[0]   # outputs: F, or column pairs with rope
    up = N * weight.stride(0) if swiglu else weight.stride(0) if paired else 0   # from a first row to its pair
    halves = 2 if paired else 1
    if launch.use_dot is False and M != 1:
        raise ValueError(f"skinny_linear: a multiply-add launch takes one row, got {M}")
    if launch.use_dot and M > launch.block_m:
        raise ValueError(f"skinny_linear: a {launch.block_m}-row tile takes at most {launch.block_m} rows, got {M}")
    if launch.split_k < 1 or (launch.split_k > 1 and not launch.use_dot):
        raise ValueError(f"skinny_linear: split_k={launch.split_k} needs split_k >= 1, and a tl.dot launch when > 1")
    if launch.ws and (not launch.use_dot or launch.stream_k):
        raise ValueError(f"skinny_linear: a warp-specialized launch is an unstreamed tl.dot launch, got {launch}")
    if launch.stream_k < 0 or (launch.stream_k and (not launch.use_dot or launch.split_k > 1)):
        raise ValueError(f"skinny_linear: stream_k={launch.stream_k} needs stream_k >= 0, and an unsplit tl.dot "
                         f"launch when > 0")
    y = torch.empty((M, rope.n_heads * rope.head_dim if rope is not None else N), dtype=x2.dtype, device=x2.device)
    n_tiles = triton.cdiv(N, launch.block_n)
    pdl = launch_programmatic(x2.device)
    even = dict(EVEN_N=N % launch.block_n == 0, EVEN_K=K % launch.block_k == 0)
    if launch.stream_k:
        units = n_tiles * triton.cdiv(K, launch.block_k)
        # At most one program per unit: then no program's range is empty and every one that takes
        # a ticket on a tile's counter is counted among its sharers.
        programs = min(units, programs or stream_k_programs(x2.device, launch.stream_k))
        if programs < 1 or (programs + 1) * units >= 2 ** 31:   # pid * units is int32 in the kernel
            raise ValueError(f"skinny_linear: a stream-K launch of {programs} programs over {units} units")
        partials = torch.empty((programs, 2, halves, M, launch.block_n), dtype=torch.float32, device=x2.device)
        _skinny_stream_k_kernel[(programs,)](
            x2, weight, y, partials, arrival_counters(x2.device, n_tiles), M, N, K,
            x2.stride(0), weight.stride(0), y.stride(0), up, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            BLOCK_K=launch.block_k, **even, SWIGLU=swiglu, PDL=pdl, num_warps=launch.num_warps,
            num_stages=launch.num_stages, launch_pdl=pdl)
        return y
    partials = counters = None
    if launch.split_k > 1:   # float32 partials of every split, and one arrival counter per n tile
        partials = torch.empty((halves, launch.split_k, M, N), dtype=torch.float32, device=x2.device)
        counters = arrival_counters(x2.device, n_tiles)
    if launch.ws:
        skinny_ws_kernel[(n_tiles, launch.split_k)](
            x2, weight, y, partials, counters, M, N, K, x2.stride(0), weight.stride(0), y.stride(0), weight.shape[0],
            *(rope.kernel_args() if rope is not None else _NO_ROPE),
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, SWAP_AB=launch.swap_ab,
            SPLIT_K=launch.split_k, SWIGLU=swiglu, ROPE=rope is not None, PDL=pdl, num_warps=launch.num_warps,
            num_stages=launch.num_stages, launch_pdl=pdl)
        return y
    _skinny_linear_kernel[(n_tiles, launch.split_k)](
        x2, weight, y, partials, counters, M, N, K, x2.stride(0), weight.stride(0), y.stride(0), up,
        *(rope.kernel_args() if rope is not None else _NO_ROPE),
        *(norm.kernel_args(h_out) if norm is not None else _NO_NORM),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, USE_DOT=launch.use_dot,
        **even, SPLIT_K=launch.split_k, SWIGLU=swiglu, ROPE=rope is not None, PDL=pdl,
        EARLY_TILE=pdl and EARLY_WEIGHT_TILE, NORM=norm is not None, ADD=norm is not None and norm.delta is not None,
        num_warps=launch.num_warps, num_stages=launch.num_stages, launch_pdl=pdl)
    return y


_TUNER = LaunchTuner("skinny_linear")


def _run_as_themselves(candidates: list, x2: torch.Tensor, weight: torch.Tensor) -> list:
    """The candidates that run as themselves on x2 and weight: on a layout TMA cannot read
    (`tma_layout_ok`) a warp-specialized tile would run, and be timed, as the unfused launch
    (`skinny_linear_run`'s fallback), so it is left out of that tuning rather than kept for a key
    whose later calls may be aligned."""
    if tma_layout_ok(x2, weight):
        return list(candidates)
    return [c for c in candidates if not (isinstance(c, SkinnyLaunch) and c.ws)]


def tune_skinny(key, x2: torch.Tensor, weight: torch.Tensor, timer=None, l2_bytes: Optional[int] = None) -> dict:
    """Time cuBLAS, cuBLASLt (CUDA) and every tile for x2's rows and weight's shape (`tuned_candidates`)
    and keep the fastest under `key`
    (LaunchTuner.tune, timer included). Each timed call reads the next of a few copies of the weight
    (`rotating_copies`, l2_bytes: the L2 size, by default the device's), so that a weight smaller
    than the L2 is read from HBM as in a decode step; the copies are freed on return. A launch whose
    result is not `close_to` F.linear's is left out."""
    agrees = close_to(reference.skinny_linear(x2, weight))
    next_weight = rotating_copies(weight, l2_bytes)
    return _TUNER.tune(key, _run_as_themselves(tuned_candidates(x2.shape[0], x2.device), x2, weight),
                       lambda c: skinny_linear_run(x2, next_weight(), c), timer, agrees)


def _check_operands(name: str, x, weight) -> None:
    """x (..., K) and weight (N, K): floating, on one device, in one dtype (except under autocast,
    where F.linear casts both)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a floating tensor (..., K), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__} "
                         f"{getattr(x, 'dtype', '')}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1] \
            or not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be a floating (N, K) tensor with K = x's last dim {x.shape[-1]}, "
                         f"got shape {tuple(getattr(weight, 'shape', ()))} {getattr(weight, 'dtype', '')}")
    check_one_device(name, x=x, weight=weight)
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a kernel launch may take these operands (their shapes are checked: _check_operands)."""
    if x.dtype != weight.dtype or weight.stride(-1) != 1 or not use_triton(x, weight):
        return False
    if gpu_launch(x.device):
        return x.dtype in (torch.float16, torch.bfloat16)
    return x.dtype in (torch.float32, torch.float16) and interpreting()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias: x (..., K), weight (N, K) -> (..., N) in x.dtype.

    Without autograd, with at most MAX_ROWS rows and a CUDA fp16/bf16 weight, the launch is the one
    tuned for this row tile and weight shape (cuBLAS or a kernel tile, see the module docstring);
    everything else, and every shape not tuned yet (inside a CUDA-graph capture), is F.linear."""
    _check_operands("skinny_linear", x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return reference.skinny_linear(x, weight)
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not 1 <= M <= MAX_ROWS or not _kernel_takes(x, weight):
        return reference.skinny_linear(x, weight)
    x2 = as_rows(x)
    N = weight.shape[0]
    key = _plain_key(x2, weight)
    launch = _TUNER.choose(key, x.device, lambda: tune_skinny(key, x2, weight), lambda: None)
    return skinny_linear_run(x2, weight, launch).view(*x.shape[:-1], N)


def _plain_key(x2: torch.Tensor, weight: torch.Tensor) -> tuple:
    """The plain GEMM's tuning key for rows x2 (M, K) and weight (N, K): the epilogue tuners read
    its times under the same key."""
    return (str(x2.device), x2.dtype, row_tile(x2.shape[0]), *weight.shape)


def _plain_times(x2: torch.Tensor, weight: torch.Tensor) -> Optional[dict]:
    """The plain GEMM tuner's times ({launch: ms}) for rows x2 and weight (None: not tuned), which
    the epilogue and norm tuners read (skinny_fused.py, skinny_norm.py)."""
    return _TUNER.times.get(_plain_key(x2, weight))
