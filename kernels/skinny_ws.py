"""The skinny GEMM's TMA-fed, warp-specialized tile: Y = X @ W^T for 17 to 64 rows on Hopper.

At 32 and 64 rows (tree-verify steps) the pointer-fed tl.dot tiles of skinny_linear.py read the
7B weights at 2.60-3.46 TB/s on the H200 and cuBLAS kept three of the four shapes at 3.53-3.75,
against 3.25-4.10 for one row (nineteenth session); the skinny-rows probe found the tile, not the
re-reads of x, to be what is slow. So the SwiGLU and rotary epilogues, which need one of our tiles,
lost there and the 64-node verify step stayed at 1.28x a plain step (issue 6 asks 1.25x).

This tile streams its operands the way Hopper's own GEMMs do: each K step's x tile (BLOCK_M,
BLOCK_K) and weight tile (BLOCK_N, BLOCK_K) come through device-side TMA tensor descriptors, and the
K loop is warp-specialized (`tl.range(..., warp_specialize=True)`): Triton gives the loads a
producer warp group that runs num_stages tiles ahead on a ring of shared-memory buffers, while the
consumer warp group issues the wgmma and neither computes an address nor issues a load.
Rows past M and columns past K read as zeros (TMA fills them), so nothing in the loop is masked.

SWAP_AB: the tile computes (W_tile @ x_tile^T)^T, the weight rows as wgmma's M (64 or 128), so
that 16 and 32 rows of x (wgmma's N may be 8 to 256) still run on Hopper's asynchronous wgmma;
without it a 16- or 32-row x tile as M would take the synchronous warp-level mma, and Triton's
warp-specialization pass then leaves the loop whole (benchmarks/probe_skinny_ws_forms.py, Triton 3.6
and 3.9).

Epilogues, split-K and the bits: as the pointer-fed tiles (skinny_epilogue.py): SWIGLU pairs the
gate tile n with the up tile N + n of a fused (2F, K) weight; ROPE pairs rows 2n and 2n + 1 of a
fused q/k/v weight, read as [n, 0, :] and [n, 1, :] of a (rows/2, 2, K) view; SPLIT_K > 1 splits K
in whole tiles and the last split of each n tile to arrive adds the partials in split order.

Device-side descriptors keep 128 bytes each in global scratch (`backend.descriptors_allowed`
installs the allocator). A launch needs TMA's layout (`tma_layout_ok`); skinny_linear_run gives any
other layout the unfused launch, and the tuners do not time these tiles on such a layout. Hopper's automatic warp specialization is experimental upstream,
and a warp-specialized attention config that passed every interpreter test gave NaN rows on an H100
(fourteenth session), so these tiles are offered only where `skinny_ws_allowed` says.
"""
from __future__ import annotations

import os

import torch
from .triton_import import tl, triton

from .backend import compute_major, cross_compile_arch, descriptors_allowed, interpreting, tma_aligned
from .dependent_launch import await_prior_grid
from .skinny_epilogue import store_split, store_tile

# Triton versions whose GPU tests of these tiles passed on Hopper (none yet). Until then MTP_SKINNY_WS
# offers them: "1" all, or a list of tile ids, as benchmarks/gpu_check.sh sets the ones whose GPU test
# passed in the same call.
SKINNY_WS_VALIDATED_TRITON: tuple = ()


def _ws_setting() -> str:
    """MTP_SKINNY_WS, stripped: "" (unset), "0", "1" or a comma-separated list of tile ids."""
    return os.environ.get("MTP_SKINNY_WS", "").strip()


def skinny_ws_allowed(device: torch.device) -> bool:
    """Whether the skinny tuners may time warp-specialized tiles on `device`: under the
    interpreter (the tests) and in an sm_90 cross-compile (compile_check.py) always; on a GPU when
    MTP_SKINNY_WS is 1 or a list of tiles (`skinny_ws_offered`), or, unless MTP_SKINNY_WS=0, on
    Hopper with a Triton version in SKINNY_WS_VALIDATED_TRITON. Never elsewhere (Triton's pass
    targets Hopper's wgmma; Blackwell's differs and is unchecked)."""
    if interpreting():
        return True
    arch = cross_compile_arch()
    if arch is not None:
        return arch == 90
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    setting = _ws_setting()
    if setting == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if compute_major(index) != 9:
        return False
    if setting:   # "1", or a list of tiles
        return True
    return any(triton.__version__.startswith(v) for v in SKINNY_WS_VALIDATED_TRITON)


def skinny_ws_offered(tile_id: str) -> bool:
    """Whether the tile `tile_id` (`SkinnyLaunch.tile_id()`) is offered where `skinny_ws_allowed`:
    every tile, unless MTP_SKINNY_WS is a comma-separated list of tile ids (gpu_check.sh sets the
    tiles whose GPU test passed), then those only."""
    setting = _ws_setting()
    if setting in ("", "0", "1"):
        return True
    return tile_id in {t.strip() for t in setting.split(",")}


def tma_layout_ok(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x2 (M, K) and weight (rows, K) read through TMA descriptors (`backend.tma_aligned`)
    where kernels may build them."""
    return tma_aligned(x2, weight) and descriptors_allowed()


@triton.jit
def _mma(acc, w, x, SWAP_AB: tl.constexpr):
    """acc += x @ w^T, as (BLOCK_M, BLOCK_N); with SWAP_AB acc is its transpose, += w @ x^T."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x), acc)
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def skinny_ws_kernel(
    X, W, Y, PARTIALS, COUNTERS, M, N, K, stride_xm, stride_wn, stride_ym, W_ROWS,
    FREQS, stride_fb, stride_ft, SLOTS, stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE,
    stride_cb, stride_cs, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr, SWIGLU: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):
    """Y = X @ W^T, program (n tile, split): outputs [pid * BLOCK_N, + BLOCK_N) over split's K
    tiles. W has W_ROWS rows (SWIGLU: 2N, gate rows first; ROPE: the q/k/v weight, 2N rows, whose
    column pairs are the N outputs). FREQS .. HEAD_DIM: the rotary epilogue's (`rope_store`).
    PDL: a programmatic dependent launch, which waits for the kernel before it first."""
    tl.static_assert(not (SWIGLU and ROPE), "one epilogue at a time")
    await_prior_grid(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if ROPE:   # rows 2n and 2n + 1 as [n, 0, :] and [n, 1, :]
        w_desc = tl.make_tensor_descriptor(W, shape=[W_ROWS // 2, 2, K], strides=[2 * stride_wn, stride_wn, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(W, shape=[W_ROWS, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = split * per_split
    kt_hi = tl.minimum(kt_lo + per_split, k_tiles)   # at odd shapes the last splits may get no tile
    n0 = pid * BLOCK_N
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)   # the paired rows' sums (SWIGLU, ROPE; otherwise compiled away)
    for kt in tl.range(kt_lo, kt_hi, warp_specialize=True):
        k0 = kt * BLOCK_K
        x = x_desc.load([0, k0])
        if ROPE:
            acc = _mma(acc, w_desc.load([n0, 0, k0]).reshape(BLOCK_N, BLOCK_K), x, SWAP_AB)
            acc_up = _mma(acc_up, w_desc.load([n0, 1, k0]).reshape(BLOCK_N, BLOCK_K), x, SWAP_AB)
        elif SWIGLU:
            acc = _mma(acc, w_desc.load([n0, k0]), x, SWAP_AB)
            acc_up = _mma(acc_up, w_desc.load([N + n0, k0]), x, SWAP_AB)
        else:
            acc = _mma(acc, w_desc.load([n0, k0]), x, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if SPLIT_K == 1:
        store_tile(Y, stride_ym, acc, acc_up, offs_m, offs_n, m_ok, n_ok, FREQS, stride_fb, stride_ft, SLOTS,
                   stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM,
                   SWIGLU, ROPE)
    else:
        store_split(Y, stride_ym, acc, acc_up, PARTIALS, COUNTERS, pid, split, M, N, offs_m, offs_n, m_ok, n_ok,
                    FREQS, stride_fb, stride_ft, SLOTS, stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE,
                    stride_cb, stride_cs, HEAD_DIM, BLOCK_M, BLOCK_N, SPLIT_K, SWIGLU, ROPE)
