"""Flash attention in Triton: training / prefill, forward and backward. KV-cache attention (decode
and tree verification) is in kv_cache_attention.py, which imports the helpers it shares with
these kernels from here: the tile loads and stores (`_load_tile`, `_store_tile`), the online-softmax
step (`_softmax_step`), the head-dim tile (`_head_dim_tile`) and the input checks.

Layout is Meta's (batch, time, heads, head_dim). Grouped-query attention (GQA): query head h reads
kv head h // (H // Hkv); K/V are never repeated in memory.

Flash attention (FA2 structure):
  forward   one program per (query block, batch*head); online softmax in float32 with exp2 (log2(e)
            folded into the scale); saves the log-sum-exp (in log2 units) for the backward.
  backward  delta = rowsum(dO * O); one program per (key block, batch*kv head) computes dK/dV and
            loops over the query heads of its GQA group itself, so the group sum is deterministic
            (no atomics); one program per (query block, batch*head) computes dQ.
  Causal programs skip the blocks above the diagonal and only mask the blocks on it (and the tail).
  Each of the three kernels also has a warp-specialized variant for Hopper (WARP_SPEC configs, the
  autotuner chooses): one branch-free loop over TMA tensor descriptors, which Triton splits into a
  producer warp and two consumer warpgroups (FlashAttention-3's division of labour). Triton's pass
  only takes a kernel whose loop is its only loop and whose dot operands all come through
  descriptors, so these loops mask every block, and they run only where the layout allows the
  descriptors (`_ws_ok`). They are offered with MTP_WARP_SPEC=1 (`warp_spec_allowed`), and by
  default for the kernels in WARP_SPEC_DEFAULT_KERNELS (dK/dV's, the one measured to pay; its GPU
  tests passed on an H200) on Hopper with a Triton version and head dim checked on a GPU: configs
  that passed every interpreter test gave NaN rows on an H100 (since removed), so nothing is
  trusted untested.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch
from .triton_import import tl, triton

from . import reference
from .backend import (check_one_device, compute_major, descriptors_allowed, finite_number, gpu_launch, kernel_op,
                      interpreting, refuse_double_backward, tma_aligned, use_triton)

LOG2E = 1.4426950408889634


# Any head dim up to 128 runs on the kernels: a tile of the next power of two (at least 16, tl.dot's
# smallest K) with the padding columns masked to zero. Powers of two take the unmasked code.
MAX_HEAD_DIM = 128


def _head_dim_tile(head_dim: int) -> dict:
    """The head-dim constexprs of every attention kernel: HEAD_DIM (real), BLOCK_D (the tile), EVEN_D."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim)


# ============================================================================================
# Flash attention: forward
# ============================================================================================
@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile of q, k, v, o or do. Rows outside the sequence (row_ok, read when
    MASK_ROWS) and the padding columns of a head dim that is not a power of two (d_ok, read unless
    EVEN_D) load as 0, so they add nothing to any dot product."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, value, row_ok, d_ok, EVEN_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile: rows where row_ok, head-dim columns where d_ok."""
    if EVEN_D:
        tl.store(ptrs, value, mask=row_ok[:, None])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, qk_scale, v_ptrs, v_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                  FOLD_SCALE: tl.constexpr):
    """One online-softmax step over a key block, shared by flash and KV-cache attention.
    qk: (M, N) float32 scores, -inf where masked: already scaled, or raw q.k when FOLD_SCALE, which
    multiplies by qk_scale (> 0) inside the exponent's FMA instead of over the whole tile (the max
    of raw scores times the scale is the max of scaled ones). v_ptrs: the block's V rows, v_ok (N,)
    which of them exist (read when MASKED); d_ok: the real head-dim columns. Returns (acc, l_i, m_i)."""
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row may see nothing yet: keep m_i = -inf but exponentiate against 0 (no NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if FOLD_SCALE:
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(v_ptrs, v_ok, d_ok, MASKED, EVEN_D)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
               offs_m, offs_n, offs_d, d_ok, lo, hi, T, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
               FOLD_SCALE: tl.constexpr):
    # MASKED=False is the hot loop: every key in [lo, hi) is visible to every query row.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        k = _load_tile(k_ptrs, cols < T, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            visible = cols[None, :] < T
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= cols[None, :])
            if FOLD_SCALE:
                qk = tl.where(visible, qk, float("-inf"))
            else:
                qk = tl.where(visible, qk * qk_scale, float("-inf"))
        else:
            if not FOLD_SCALE:
                qk = qk * qk_scale
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, qk_scale, v_ptrs, cols < T, d_ok, MASKED, EVEN_D,
                                      FOLD_SCALE)
    return acc, l_i, m_i


@triton.jit
def _kv_descriptors(K, V, B, T, kv_cols, stride_kb, stride_kt, stride_vb, stride_vt,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V (B, T, Hkv, D) as (B, T, kv_cols = Hkv*D) tensor descriptors read in (1, BLOCK_N, D)
    blocks: rows past T load as zeros from the same sequence, never the next one's."""
    k_desc = tl.make_tensor_descriptor(K, shape=[B, T, kv_cols], strides=[stride_kb, stride_kt, 1],
                                       block_shape=[1, BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[B, T, kv_cols], strides=[stride_vb, stride_vt, 1],
                                       block_shape=[1, BLOCK_N, HEAD_DIM])
    return k_desc, v_desc


@triton.jit
def _ws_visible(offs_m, cols, T, CAUSAL: tl.constexpr):
    """The (rows, keys) mask of a warp-specialized loop's block. Causal, keys past T need no test of
    their own: they are past every real query row (rows past T are never stored)."""
    if CAUSAL:
        visible = offs_m[:, None] >= cols[None, :]
    else:
        visible = cols[None, :] < T
    return visible


@triton.jit
def _fwd_ws_loop(acc, l_i, m_i, q, K, V, B, T, kv_cols, stride_kb, stride_kt, stride_vb, stride_vt, b, kv_col0,
                 offs_m, offs_n, hi, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr):
    """All key blocks [0, hi) in one loop that Triton warp-specializes on Hopper: a producer warp
    streams K and V tiles with TMA while two consumer warpgroups (64 query rows each) run the
    matmuls and the softmax, so one group's exponentials overlap the other's wgmma (FlashAttention-3's
    split, by Triton's automatic warp specialization). The pass keeps only a loop that is its
    kernel's only loop and has no branch inside, hence one loop masking every block, not an unmasked
    loop plus a diagonal one (`_ws_visible`). K, V come through `_kv_descriptors`. qk_scale (> 0)
    is applied inside the exponent, as FOLD_SCALE does."""
    k_desc, v_desc = _kv_descriptors(K, V, B, T, kv_cols, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_N,
                                     HEAD_DIM)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        cols = start_n + offs_n
        k = k_desc.load([b, start_n, kv_col0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.where(_ws_visible(offs_m, cols, T, CAUSAL), tl.dot(q, tl.trans(k)), float("-inf"))
        # Every row sees key 0 in the first block, so m_new is finite from then on: no -inf guard.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([b, start_n, kv_col0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(T, H, GROUP, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query block and (batch, head) of this program (forward and dQ kernels share the grid)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query blocks do the most work under a causal mask: launch them first.
        pid_m = tl.cdiv(T, BLOCK_M) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return bh, b, h, h // GROUP, start_m, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), offs_m < T


@triton.jit
def _key_ranges(start_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [0, full_hi) are visible to the whole query block (no mask); [full_hi, masked_hi) need
    the mask (the diagonal block under CAUSAL, else the ragged tail)."""
    if CAUSAL:
        full_hi = start_m
        masked_hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        masked_hi = T
    return full_hi, masked_hi


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    B, T, H, GROUP, qk_scale, T_BUCKET, WS_OK, stride_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FOLD_SCALE: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    # WS_OK (1 where `_ws_ok` holds for q, k, v) is read by the autotuner's prune only: WARP_SPEC
    # configs run only where their descriptors are valid.
    bh, b, h, kvh, start_m, offs_m, offs_n, offs_d, row_ok = _query_block(T, H, GROUP, BLOCK_D, CAUSAL,
                                                                          BLOCK_M, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WARP_SPEC:
        # q through a (B*T, H*D) descriptor (Triton 3.9's partitioner splits a 2-D block, not a 3-D
        # one): rows past T read the next sequence's queries, which only ever reach rows not stored.
        b32 = b.to(tl.int32)
        q_desc = tl.make_tensor_descriptor(Q, shape=[B * T, H * HEAD_DIM], strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        q = q_desc.load([b32 * T + start_m, h * HEAD_DIM])
        hi = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
        acc, l_i, m_i = _fwd_ws_loop(acc, l_i, m_i, q, K, V, B, T, (H // GROUP) * HEAD_DIM, stride_kb, stride_kt,
                                     stride_vb, stride_vt, b32, kvh * HEAD_DIM, offs_m, offs_n, hi, qk_scale,
                                     BLOCK_N, HEAD_DIM, CAUSAL)
    else:
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        q = _load_tile(q_ptrs, row_ok, d_ok, True, EVEN_D)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        full_hi, masked_hi = _key_ranges(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_n, offs_d, d_ok, 0, full_hi, T, qk_scale,
                                   BLOCK_N, CAUSAL, False, EVEN_D, FOLD_SCALE)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_n, offs_d, d_ok, full_hi, masked_hi, T, qk_scale,
                                   BLOCK_N, CAUSAL, True, EVEN_D, FOLD_SCALE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh.to(tl.int64) * stride_lse + offs_m, lse, mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    _store_tile(o_ptrs, out.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)


# ============================================================================================
# Flash attention: backward
# ============================================================================================
@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    T, H, stride_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D).to(tl.float32)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    row_ok, d_ok, True, EVEN_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * stride_lse + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_d, d_ok, lo, hi, T, qk_scale,
                    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    # Scores are built transposed (keys x queries) so dK and dV accumulate without a transpose.
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        row_ok = offs_m < T
        q = _load_tile(q_ptrs, row_ok, d_ok, MASKED, EVEN_D)
        do = _load_tile(do_ptrs, row_ok, d_ok, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            visible = row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_ws_loop(dk, dv, k, v, Q, DO, LSE, DELTA, B, T, H, stride_qb, stride_qt, stride_dob, stride_dot,
                      stride_lse, b, kvh, GROUP, start_n, offs_n, qk_scale,
                      BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr):
    """dK, dV of one key block over every (query head of the GQA group, query block) pair that can
    see it, in one flat, branch-free loop over descriptors, which Triton warp-specializes on Hopper
    (see `_fwd_ws_loop`). Here the query rows are summed over, so rows past T must add exactly
    nothing: q and dO come through (B, T, H*D) descriptors, which read zeros there, and p and dS
    are selected to 0 outside the mask (lse and delta past T are other rows' values, or padding)."""
    q_desc = tl.make_tensor_descriptor(Q, shape=[B, T, H * HEAD_DIM], strides=[stride_qb, stride_qt, 1],
                                       block_shape=[1, BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO, shape=[B, T, H * HEAD_DIM], strides=[stride_dob, stride_dot, 1],
                                        block_shape=[1, BLOCK_M, HEAD_DIM])
    lse_desc = tl.make_tensor_descriptor(LSE, shape=[B * H * stride_lse], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA, shape=[B * H * stride_lse], strides=[1], block_shape=[BLOCK_M])
    offs_m0 = tl.arange(0, BLOCK_M)
    # Causal: the first query block that reaches this key block's first key; before it, nothing.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    n_blocks = tl.cdiv(T - lo, BLOCK_M)
    for i in tl.range(0, GROUP * n_blocks, warp_specialize=True):
        h = kvh * GROUP + i // n_blocks
        start_m = lo + (i % n_blocks) * BLOCK_M
        offs_m = start_m + offs_m0
        q = q_desc.load([b, start_m, h * HEAD_DIM]).reshape(BLOCK_M, HEAD_DIM)
        do = do_desc.load([b, start_m, h * HEAD_DIM]).reshape(BLOCK_M, HEAD_DIM)
        lse = lse_desc.load([(b * H + h) * stride_lse + start_m])
        delta = delta_desc.load([(b * H + h) * stride_lse + start_m])
        visible = offs_m[None, :] < T
        if CAUSAL:
            visible = visible & (offs_m[None, :] >= offs_n[:, None])
        qk_t = tl.dot(k, tl.trans(q))
        p_t = tl.where(visible, tl.math.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0)
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    B, T, H, HKV, GROUP, qk_scale, sm_scale, T_BUCKET, WS_OK, stride_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_LOOP: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    # WS_OK: as in the forward, read by the autotuner's prune only.
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // HKV).to(tl.int64)
    kvh = bkv % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_ok = offs_n < T
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if WARP_SPEC:
        # k, v through (B*T, Hkv*D) descriptors (Triton 3.9 cannot split a 3-D block between the
        # consumers): key rows past T read the next sequence and only reach their own rows, not stored.
        b32 = b.to(tl.int32)
        k = tl.make_tensor_descriptor(K, shape=[B * T, HKV * HEAD_DIM], strides=[stride_kt, 1],
                                      block_shape=[BLOCK_N, HEAD_DIM]).load([b32 * T + start_n, kvh * HEAD_DIM])
        v = tl.make_tensor_descriptor(V, shape=[B * T, HKV * HEAD_DIM], strides=[stride_vt, 1],
                                      block_shape=[BLOCK_N, HEAD_DIM]).load([b32 * T + start_n, kvh * HEAD_DIM])
        dk, dv = _bwd_dkdv_ws_loop(dk, dv, k, v, Q, DO, LSE, DELTA, B, T, H, stride_qb, stride_qt, stride_dob,
                                   stride_dot, stride_lse, b32, kvh, GROUP, start_n, offs_n, qk_scale, BLOCK_M,
                                   HEAD_DIM, CAUSAL)
    else:
        k = _load_tile(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                       key_ok, d_ok, True, EVEN_D)
        v = _load_tile(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                       key_ok, d_ok, True, EVEN_D)

        # Query blocks: [diag_lo, diag_hi) straddle the diagonal (masked), [diag_hi, full_hi) are
        # entirely visible, [full_hi, T) is the ragged tail (masked).
        if CAUSAL:
            diag_lo = start_n
            diag_hi = tl.minimum(start_n + BLOCK_N, T)
        else:
            diag_lo = 0
            diag_hi = 0
        full_hi = tl.maximum(diag_hi, (T // BLOCK_M) * BLOCK_M)

        # The GQA group's query heads in a fixed order: a deterministic sum with no atomics.
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            bh = b * H + h
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_base = LSE + bh * stride_lse
            delta_base = DELTA + bh * stride_lse
            if ONE_LOOP:
                # One loop that always masks: three specialised loops keep dK, dV, K, V and three
                # pipelines live at once and spill registers at head_dim 128 (sm_90, 8 warps).
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         offs_n, offs_d, d_ok, diag_lo, T, T, qk_scale, BLOCK_M, CAUSAL, True, EVEN_D)
            else:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         offs_n, offs_d, d_ok, diag_lo, diag_hi, T, qk_scale, BLOCK_M, CAUSAL, True,
                                         EVEN_D)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         offs_n, offs_d, d_ok, diag_hi, full_hi, T, qk_scale, BLOCK_M, CAUSAL, False,
                                         EVEN_D)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         offs_n, offs_d, d_ok, full_hi, T, T, qk_scale, BLOCK_M, CAUSAL, True, EVEN_D)

    dk = dk * sm_scale
    _store_tile(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
                dk.to(DK.dtype.element_ty), key_ok, d_ok, EVEN_D)
    _store_tile(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
                dv.to(DV.dtype.element_ty), key_ok, d_ok, EVEN_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  offs_m, offs_n, offs_d, d_ok, lo, hi, T, qk_scale,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        k = _load_tile(k_ptrs, cols < T, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_ptrs, cols < T, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < T
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= cols[None, :])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_ws_loop(dq, q, do, lse, delta, K, V, B, T, kv_cols, stride_kb, stride_kt, stride_vb, stride_vt, b,
                    kv_col0, offs_m, offs_n, hi, qk_scale,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ over all key blocks [0, hi) in one branch-free loop over (B, T, kv_cols) descriptors, which
    Triton warp-specializes on Hopper (see `_fwd_ws_loop`: the same rules, the same zero rows past
    T). Masked scores go to -inf before the exponent, so their p, and so their dS, are 0."""
    k_desc, v_desc = _kv_descriptors(K, V, B, T, kv_cols, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_N,
                                     HEAD_DIM)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        cols = start_n + offs_n
        k = k_desc.load([b, start_n, kv_col0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, start_n, kv_col0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(tl.where(_ws_visible(offs_m, cols, T, CAUSAL), qk * qk_scale, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    B, T, H, GROUP, qk_scale, sm_scale, T_BUCKET, WS_OK, stride_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    # WS_OK: as in the forward, read by the autotuner's prune only.
    bh, b, h, kvh, start_m, offs_m, offs_n, offs_d, row_ok = _query_block(T, H, GROUP, BLOCK_D, CAUSAL,
                                                                          BLOCK_M, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WARP_SPEC:
        # Everything the loop's dots and rows read comes through descriptors (the pass gives up on a
        # pointer load): q and dO as (B*T, H*D) rows, lse and delta as flat vectors of rows
        # stride_lse apart (a multiple of 4, so every block starts 16-byte aligned). Rows past T read
        # other rows' values and are never stored.
        b32 = b.to(tl.int32)
        bh32 = bh.to(tl.int32)
        q = tl.make_tensor_descriptor(Q, shape=[B * T, H * HEAD_DIM], strides=[stride_qt, 1],
                                      block_shape=[BLOCK_M, HEAD_DIM]).load([b32 * T + start_m, h * HEAD_DIM])
        do = tl.make_tensor_descriptor(DO, shape=[B * T, H * HEAD_DIM], strides=[stride_dot, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM]).load([b32 * T + start_m, h * HEAD_DIM])
        lse = tl.make_tensor_descriptor(LSE, shape=[B * H * stride_lse], strides=[1], block_shape=[BLOCK_M]).load(
            [bh32 * stride_lse + start_m])
        delta = tl.make_tensor_descriptor(DELTA, shape=[B * H * stride_lse], strides=[1], block_shape=[BLOCK_M]).load(
            [bh32 * stride_lse + start_m])
        hi = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
        dq = _bwd_dq_ws_loop(dq, q, do, lse, delta, K, V, B, T, (H // GROUP) * HEAD_DIM, stride_kb, stride_kt,
                             stride_vb, stride_vt, b32, kvh * HEAD_DIM, offs_m, offs_n, hi, qk_scale,
                             BLOCK_N, HEAD_DIM, CAUSAL)
    else:
        q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                       row_ok, d_ok, True, EVEN_D)
        do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                        row_ok, d_ok, True, EVEN_D)
        lse = tl.load(LSE + bh.to(tl.int64) * stride_lse + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * stride_lse + offs_m, mask=row_ok, other=0.0)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        full_hi, masked_hi = _key_ranges(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                           offs_m, offs_n, offs_d, d_ok, 0, full_hi, T, qk_scale, BLOCK_N, CAUSAL, False, EVEN_D)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                           offs_m, offs_n, offs_d, d_ok, full_hi, masked_hi, T, qk_scale, BLOCK_N, CAUSAL, True,
                           EVEN_D)
    dq = dq * sm_scale
    _store_tile(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_D)


# ============================================================================================
# Flash attention: launch configuration
# ============================================================================================
# Under the interpreter: one small fixed config whose blocks still exercise the multi-block
# diagonal logic (BLOCK_M = 2 * BLOCK_N in the forward and dQ, the reverse in dK/dV).
_INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=True, WARP_SPEC=False)
_INTERP_DKDV = dict(BLOCK_M=16, BLOCK_N=32, ONE_LOOP=False, WARP_SPEC=False)
_INTERP_DQ = dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=False)

# Hopper (H100/H200) candidates. The causal stage split needs BLOCK_M % BLOCK_N == 0 in the
# forward and dQ kernels and BLOCK_N % BLOCK_M == 0 in the dK/dV kernel. Chosen from sm_90
# compiles on a CPU box (ptxas register counts, no spills at head_dim 64 and 128; shared memory
# under 227 KiB); the autotuner picks among them on the device.
# FOLD_SCALE (the softmax scale inside the exponent's FMA, as Triton's tutorial does) saves a
# multiply per score; it is offered beside the plain variant for the autotuner to judge, at 128 x 64
# only: at 128 x 128, where the plain variant already uses 254 registers, its sm_90 compile spilled.
# Tried and dropped after H100 runs (NOTES.md): K/V (and Q/dO) through TMA tensor descriptors (fewer
# registers, but never chosen: the best one 0.5-13% slower than the best pointer config in every
# kernel at both shapes in three runs; removed in the tenth session, the code is in git before
# e79b81f) and a softmax-overlapped forward (7-31% slower; 98a89e9).
_GPU_FWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=block_n, FOLD_SCALE=fold, WARP_SPEC=False), num_warps=8, num_stages=stages)
    for block_n, fold, stages in ((64, False, 3), (64, False, 4), (128, False, 3), (64, True, 3), (64, True, 4))
] + [
    # One warpgroup per 64-row tile: 168 registers at head dim 128 (128 at 64), so two CTAs share an
    # SM and the warp schedulers interleave one CTA's softmax with another's matmuls (the 128-row
    # tiles run one CTA of two warpgroups per SM). Chosen at both benchmark shapes on the H100.
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, FOLD_SCALE=fold, WARP_SPEC=False), num_warps=4, num_stages=stages)
    for fold, stages in ((True, 2), (True, 3), (False, 3))
] + [
    # Warp-specialized (`_fwd_ws_loop`): num_warps=4 per partition, and Triton adds a TMA producer
    # and a second consumer warpgroup: 12 warps, the 128 rows split 64 + 64. sm_90 compiles (Triton
    # 3.6 and 3.9): 168 registers, no spill; 115-181 KB of shared memory at head dim 128. Both
    # versions compile it only with num_warps=4 and only as a single, branch-free loop. Pruned where
    # the layout does not allow its descriptors (`_ws_ok`). num_stages=3 (a ring of three K/V buffers)
    # gave NaN rows on an H100 with Triton 3.6 in every case of probe_warp_spec.py, num_stages=2 none:
    # only the latter are offered.
    triton.Config(dict(BLOCK_M=128, BLOCK_N=block_n, FOLD_SCALE=True, WARP_SPEC=True), num_warps=4, num_stages=2)
    for block_n in (64, 128)
]
_GPU_DKDV_CONFIGS = [
    triton.Config(dict(BLOCK_M=32, BLOCK_N=128, ONE_LOOP=False, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=32, BLOCK_N=64, ONE_LOOP=False, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=32, BLOCK_N=64, ONE_LOOP=True, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=16, BLOCK_N=128, ONE_LOOP=True, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=32, BLOCK_N=128, ONE_LOOP=True, WARP_SPEC=False), num_warps=8, num_stages=2),
] + [
    # 64-row query blocks, head dim 64 and below only (`_prune_dkdv`): half the loop trips of the
    # 32-row ones, whose 0.494 ms at D64 on the H100 is 2.3x the dQ kernel's time for 4/3 of its
    # matmuls (seventeenth session). sm_90 at D64: 228 registers with Triton 3.9, 245 with 3.6, no
    # spill, 83 KB of shared memory; the three-loop form spills 32-40 bytes (3.9), so only the
    # one-loop form is offered. Not yet timed on a GPU.
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, ONE_LOOP=True, WARP_SPEC=False), num_warps=8, num_stages=3),
] + [
    # Warp-specialized (`_bwd_dkdv_ws_loop`; ONE_LOOP unused there): the consumers split the 128
    # keys. sm_90 with Triton 3.6: 168 registers; 64-row query blocks spill 24-40 bytes at head dim
    # 128 (none at 64, none with Triton 3.9). 32-row query blocks gave a NaN key row per block on an H100
    # with Triton 3.6 in every case of probe_warp_spec.py (their lse and delta loads are 128-byte
    # 1-D descriptor blocks); 64-row ones none: only those are offered.
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, ONE_LOOP=True, WARP_SPEC=True), num_warps=4, num_stages=2)
]
_GPU_DQ_CONFIGS = [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=32, WARP_SPEC=False), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, WARP_SPEC=False), num_warps=4, num_stages=3),
] + [
    # Warp-specialized (`_bwd_dq_ws_loop`), as the forward's: 12 warps, 168 registers, no spill,
    # 149-182 KB of shared memory at head dim 128 (sm_90, Triton 3.6 and 3.9).
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64, WARP_SPEC=True), num_warps=4, num_stages=stages)
    for stages in (2, 3)
]
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "T_BUCKET"]


# Triton versions whose warp-specialized flash configs were checked on a GPU: 3.6 on an H100
# (probe_warp_spec.py, every case, seventeenth session) and an H200 (the benchmark's shapes). The
# configs that failed there (forward num_stages=3, dK/dV 32-row query blocks) are gone from the lists.
WARP_SPEC_VALIDATED_TRITON = ("3.6.",)
# The kernels whose warp-specialized configs are offered by default: dK/dV's, the one measured to
# pay: on the H200 (Triton 3.6) 1.20x faster than the best plain config at head dim 128, where the
# forward's tied and dQ's lost (warp_spec_probe_nvidia-h200_timing.md). Its GPU tests, all three
# gradients on the reduced config lists, passed on an H200 (nineteenth session).
WARP_SPEC_DEFAULT_KERNELS: tuple = ("dkdv",)
# The head dims those checks ran at (the probe's and the benchmark's).
WARP_SPEC_CHECKED_HEAD_DIMS = (64, 128)


def warp_spec_allowed(kernel: str, device: torch.device | None = None, head_dim: int | None = None) -> bool:
    """Whether the autotuner may try `kernel`'s ("fwd", "dq", "dkdv") warp-specialized configs on
    `device` (a CUDA device; None: the current one) at `head_dim` (None: any). MTP_WARP_SPEC=1 or 0
    decides for all three kernels. Otherwise a kernel's configs are offered only where they were
    checked on a GPU: the kernel in WARP_SPEC_DEFAULT_KERNELS, a head dim in
    WARP_SPEC_CHECKED_HEAD_DIMS, a Hopper GPU, a Triton version in WARP_SPEC_VALIDATED_TRITON. Hopper's
    automatic warp specialization is experimental upstream, and the first GPU run of these kernels
    (H100, Triton 3.6, fourteenth session) gave NaN rows from configs since removed."""
    if kernel not in ("fwd", "dq", "dkdv"):
        raise ValueError(f"warp_spec_allowed: kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    setting = os.environ.get("MTP_WARP_SPEC", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if kernel not in WARP_SPEC_DEFAULT_KERNELS or not triton.__version__.startswith(WARP_SPEC_VALIDATED_TRITON):
        return False
    if head_dim is not None and head_dim not in WARP_SPEC_CHECKED_HEAD_DIMS:
        return False
    if device is not None and device.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return compute_major(index) == 9


def _prune_ws(configs, named_args, *, kernel: str, **kwargs):
    """WARP_SPEC configs only where `_ws_ok` allowed their tensor descriptors (WS_OK = 1),
    and only where `warp_spec_allowed(kernel)` on Q's device and head dim (read at tuning time)."""
    device = getattr(named_args.get("Q"), "device", None)
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    if named_args.get("WS_OK", kwargs.get("WS_OK")) and warp_spec_allowed(kernel, device, head_dim):
        return configs
    return [c for c in configs if not c.kwargs["WARP_SPEC"]]


def _prune_dkdv(configs, named_args, **kwargs):
    """The three-loop dK/dV variant and the plain 64-row query blocks only fit the register file
    below head dim 128 (sm_90); WARP_SPEC configs as `_prune_ws` says."""
    configs = _prune_ws(configs, named_args, kernel="dkdv", **kwargs)
    if (kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) or 0) <= 64:
        return configs
    return [c for c in configs if c.kwargs["ONE_LOOP"] and (c.kwargs["WARP_SPEC"] or c.kwargs["BLOCK_M"] < 64)]


@functools.lru_cache(maxsize=None)
def _tuned(which: str):
    """Autotuned variants, built on first GPU use (never at import, never under the interpreter)."""
    kernel, configs = {
        "fwd": (_flash_fwd_kernel, _GPU_FWD_CONFIGS),
        "dkdv": (_flash_bwd_dkdv_kernel, _GPU_DKDV_CONFIGS),
        "dq": (_flash_bwd_dq_kernel, _GPU_DQ_CONFIGS),
    }[which]
    prune = _prune_dkdv if which == "dkdv" else functools.partial(_prune_ws, kernel=which)
    return triton.autotune(configs=configs, key=_TUNE_KEY + ["WS_OK"], prune_configs_by={"early_config_prune": prune})(kernel)


def _tma_rows_ok(x: torch.Tensor, head_dim: int) -> bool:
    """Whether x (B, rows, heads, head_dim) reads as (B, rows, heads * head_dim) through a TMA tensor
    descriptor: heads packed, rows not overlapping, and TMA's alignment (`backend.tma_aligned`)."""
    return x.stride(2) == head_dim and x.stride(1) >= x.shape[2] * head_dim and tma_aligned(x)


def _ws_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor | None = None) -> bool:
    """Whether the warp-specialized forward (and dQ and dK/dV, given dO) may read q (and dO)
    (B, T, H, D) through (B*T, H*D) tensor descriptors and k, v (B, T, Hkv, D) through (B, T, Hkv*D)
    ones (the forward, dQ) or (B*T, Hkv*D) ones (dK/dV): a power-of-two head dim of 16 to 128, every
    tensor as `_tma_rows_ok` says, the batches of every tensor read flat T rows apart (a column
    slice of a fused qkv projection qualifies; k, v as the first T slots of a longer buffer do not),
    and where kernels can build descriptors (`backend.descriptors_allowed`)."""
    B, T, H, D = q.shape
    rows = (q,) if do is None else (q, do, k, v)
    return (16 <= D <= MAX_HEAD_DIM and D & (D - 1) == 0
            and all(x.dtype in (torch.float16, torch.bfloat16, torch.float32) for x in rows)
            and all(_tma_rows_ok(x, D) for x in (q, k, v, *rows))
            and all(B == 1 or x.stride(0) == T * x.stride(1) for x in rows)
            and B * T < 2 ** 31 and descriptors_allowed())


def _asks_warp_spec(config: triton.Config | None, interp_config: dict) -> bool:
    """Whether this launch asks for a WARP_SPEC config: `config`, or under the interpreter the fixed
    `interp_config` a test set."""
    asked = config.kwargs if config is not None else interp_config if interpreting() else {}
    return bool(asked.get("WARP_SPEC"))


def _check_warp_spec(kernel: str, config: triton.Config | None, interp_config: dict, ws_ok: bool,
                     layout: Callable[[], str]) -> None:
    """A WARP_SPEC config asked for where `_ws_ok` refused the layout: a ValueError naming the kernel
    and the layout (`layout()`, formatted only then), not a failure inside the kernel. The autotuner
    never gets there: `_prune_ws` drops those configs."""
    if not ws_ok and _asks_warp_spec(config, interp_config):
        raise ValueError(f"flash attention: a WARP_SPEC {kernel} config needs q, k, v (and dO, lse in the "
                         f"backward) laid out as `_ws_ok` says; got {layout()}")


def _lse_rows(B: int, H: int, T: int, device) -> torch.Tensor:
    """An empty (B, H, T) float32 log-sum-exp whose rows are padded to a multiple of 4 floats, so
    that each row starts 16-byte aligned, as the warp-specialized dQ's descriptors need."""
    return torch.empty((B, H, triton.cdiv(T, 4) * 4), dtype=torch.float32, device=device)[..., :T]


def _t_bucket(T: int) -> int:
    # Tune once per power-of-two length band, not once per prompt length.
    return min(triton.next_power_of_2(max(T, 1)), 16384)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bth_strides(x: torch.Tensor):
    return x.stride()[:3]


# The config the autotuner chose, per flash kernel and autotune key (`_launch`).
_CHOSEN_CONFIGS: dict[tuple, triton.Config] = {}


def _flash_kernel(which: str):
    return {"fwd": _flash_fwd_kernel, "dkdv": _flash_bwd_dkdv_kernel, "dq": _flash_bwd_dq_kernel}[which]


def _launch(which: str, args: tuple, T: int, block: str, programs: int, D: int, causal: bool,
            config: triton.Config | None, ws_ok: bool) -> None:
    """Launch flash kernel `which` over (cdiv(T, config[block]), programs): with `config` if given,
    the interpreter's fixed config under the interpreter, else the autotuned one. The autotuner runs
    once per key (its key: head dim, causal, length band, WS_OK and the tensors' dtypes); later calls
    launch its choice directly, which saves the autotuner's per-call work on the host (29-35 us a
    launch on an H200 host, 3 launches per training step of each layer: host_overhead_*.md)."""
    head_dim = _head_dim_tile(D)
    if config is None and not interpreting():
        key = (which, D, causal, _t_bucket(T), ws_ok, args[0].device,
               *(a.dtype for a in args if isinstance(a, torch.Tensor)))
        config = _CHOSEN_CONFIGS.get(key)
        if config is None:
            tuned = _tuned(which)
            tuned[lambda meta: (triton.cdiv(T, meta[block]), programs)](*args, **head_dim, CAUSAL=causal)
            if getattr(tuned, "best_config", None) is not None:   # set by Autotuner.run (3.6 and 3.9)
                _CHOSEN_CONFIGS[key] = tuned.best_config
            return
    if config is None:
        fixed = {"fwd": _INTERP_FWD, "dkdv": _INTERP_DKDV, "dq": _INTERP_DQ}[which]
        config = triton.Config(dict(fixed), num_warps=4)
    _flash_kernel(which)[(triton.cdiv(T, config.kwargs[block]), programs)](*args, **head_dim, CAUSAL=causal,
                                                                           **config.all_kwargs())


def flash_attention_fwd(q, k, v, causal: bool, sm_scale: float, config: triton.Config | None = None):
    """q: (B, T, H, D), k/v: (B, T, Hkv, D), last dim contiguous. Returns o (B, T, H, D) in q.dtype
    and lse (B, H, T) float32 in log2 units (log2 of the softmax denominator, scale included), a
    view of rows padded to a multiple of 4 floats (`_lse_rows`).
    `config` launches one of `_GPU_FWD_CONFIGS` instead of the autotuned choice (GPU tests)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = _lse_rows(B, H, T, q.device)
    # The layout check costs host time at every call: only where a warp-specialized config may run.
    ws_ok = (warp_spec_allowed("fwd", q.device, q.shape[-1]) or _asks_warp_spec(config, _INTERP_FWD)) and _ws_ok(q, k, v)
    _check_warp_spec("forward", config, _INTERP_FWD, ws_ok,
                     lambda: f"q {tuple(q.shape)} strides {q.stride()}, k strides {k.stride()}, v strides {v.stride()}")
    args = (q, k, v, o, lse, *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(o),
            B, T, H, H // Hkv, sm_scale * LOG2E, _t_bucket(T), int(ws_ok), lse.stride(1))
    _launch("fwd", args, T, "BLOCK_M", B * H, D, causal, config, ws_ok)
    return o, lse


def flash_attention_bwd(do, q, k, v, o, lse, causal: bool, sm_scale: float,
                        dkdv_config: triton.Config | None = None, dq_config: triton.Config | None = None):
    """Gradients (dq, dk, dv) with the shapes and dtypes of (q, k, v). The configs launch one of
    `_GPU_DKDV_CONFIGS` / `_GPU_DQ_CONFIGS` instead of the autotuned choice (GPU tests)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    do = _last_dim_contiguous(do)
    if lse.shape != (B, H, T) or lse.stride(2) != 1 or lse.stride(0) != H * lse.stride(1):
        raise ValueError(f"flash attention backward: lse must be (B, H, T) = {(B, H, T)} rows with a unit last "
                         f"stride, as flash_attention_fwd returns it; got {tuple(lse.shape)} strides {lse.stride()}")
    stride_lse = lse.stride(1)
    delta = torch.empty((B, H, stride_lse), dtype=torch.float32, device=q.device)[..., :T]   # lse's row stride
    block = 16 if interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(T, block), B * H)](
        o, do, delta, *_bth_strides(o), *_bth_strides(do), T, H, stride_lse, **_head_dim_tile(D), BLOCK_M=block)

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    qk_scale = sm_scale * LOG2E
    # lse, delta: read by WARP_SPEC as flat vectors whose rows start 16-byte aligned (`_lse_rows`).
    kernels = (("dK/dV", dkdv_config, _INTERP_DKDV), ("dQ", dq_config, _INTERP_DQ))
    allowed = any(warp_spec_allowed(kernel, q.device, q.shape[-1]) for kernel in ("dkdv", "dq"))
    ws_ok = ((allowed or any(_asks_warp_spec(config, fixed) for _, config, fixed in kernels))
             and _ws_ok(q, k, v, do) and tma_aligned(lse))
    for name, config, fixed in kernels:
        _check_warp_spec(name, config, fixed, ws_ok,
                         lambda: f"q strides {q.stride()}, dO strides {do.stride()}, lse strides {lse.stride()}")
    dkdv_args = (q, k, v, do, lse, delta, dk, dv,
                 *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(do),
                 *_bth_strides(dk), *_bth_strides(dv),
                 B, T, H, Hkv, H // Hkv, qk_scale, sm_scale, _t_bucket(T), int(ws_ok), stride_lse)
    dq_args = (q, k, v, do, lse, delta, dq,
               *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(do), *_bth_strides(dq),
               B, T, H, H // Hkv, qk_scale, sm_scale, _t_bucket(T), int(ws_ok), stride_lse)
    _launch("dkdv", dkdv_args, T, "BLOCK_N", B * Hkv, D, causal, dkdv_config, ws_ok)
    _launch("dq", dq_args, T, "BLOCK_M", B * H, D, causal, dq_config, ws_ok)
    return dq, dk, dv


# The kernels as torch.library custom ops (with shape functions), so torch.compile traces a model
# around them, fullgraph too, where Dynamo would trace into the launchers; eager calls take the same ops.
@kernel_op("flash_attention")
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, T, H, Dh) in q's dtype, lse (B, H, T) float32 rows as `_lse_rows` lays them out)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return flash_attention_fwd(q, k, v, causal, sm_scale)


@torch.library.register_fake(_flash_attention_op)
def _(q, k, v, causal, sm_scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), _lse_rows(B, H, T, q.device)


@kernel_op("flash_attention_backward")
def _flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, causal: bool,
                                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each like its input, contiguous."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return flash_attention_bwd(do, q, k, v, o, lse, causal, sm_scale)


@torch.library.register_fake(_flash_attention_backward_op)
def _(do, q, k, v, o, lse, causal, sm_scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _flash_attention_setup(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.sm_scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zero-filled gradient for lse, which no loss uses


def _flash_attention_backward(ctx, do, _dlse):
    refuse_double_backward("flash_attention")
    if do is None:
        return None, None, None, None, None
    q, k, v, o, lse = ctx.saved_tensors
    return _flash_attention_backward_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale) + (None, None)


torch.library.register_autograd(_flash_attention_op, _flash_attention_backward, setup_context=_flash_attention_setup)


# ============================================================================================
# Public functions
# ============================================================================================
def _check_heads(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str, v_name: str):
    for t, n in ((q, "q"), (k, k_name), (v, v_name)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {n} must be a 4-D tensor (batch, time, heads, head_dim), got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: {k_name} shape {tuple(k.shape)} != {v_name} shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{name}: batch of q {tuple(q.shape)} != batch of {k_name} {tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: head_dim of q {tuple(q.shape)} != head_dim of {k_name} {tuple(k.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{name}: q heads H={q.shape[2]} must be a multiple of kv heads Hkv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{name}: q, {k_name}, {v_name} must share one floating dtype, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    check_one_device(name, q=q, **{k_name: k, v_name: v})


def _kernel_supports(q: torch.Tensor) -> bool:
    """Shapes/dtypes the Triton kernels handle; anything else valid runs without them."""
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return False
    if gpu_launch(q.device):
        return q.dtype in (torch.float16, torch.bfloat16)
    return q.dtype in (torch.float32, torch.float16)


def _default_scale(sm_scale, head_dim: int) -> float:
    if head_dim < 1:
        raise ValueError(f"attention: head dim must be >= 1, got {head_dim}")
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    # The FOLD_SCALE forward takes max(q.k) before scaling: a positive scale (and a finite one).
    if not finite_number(sm_scale) or not sm_scale > 0:
        raise ValueError(f"sm_scale must be None or a finite number > 0, got {sm_scale!r}")
    return float(sm_scale)


def flash_attention(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """Training/prefill attention. q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh) with H % Hkv == 0 (GQA: query head h
    uses kv head h // (H // Hkv)); any strides (a last dim that is not contiguous is copied). Returns
    (B, T, H, Dh) in q.dtype; differentiable w.r.t. q, k, v. sm_scale defaults to 1/sqrt(Dh).
    Triton path: Dh <= 128 (a power of two, or padded to one), fp16/bf16 on CUDA (fp32/fp16 under the interpreter);
    other valid inputs run torch's SDPA (`_sdpa`; non-float inputs the eager reference). fp16 backward: dS = P (dP - delta) is cast to fp16 before
    its matmuls, so |dP - delta| past 65504 gives inf in dq, dk (a loss scaler skips such steps and
    backs off); bf16 has the range."""
    _check_heads("flash_attention", q, k, v, "k", "v")
    if not isinstance(causal, bool):
        raise ValueError(f"flash_attention: causal must be True or False, got {causal!r}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"flash_attention: q length {q.shape[1]} != k/v length {k.shape[1]} "
                         f"(use kv_cache_attention for queries against a cache)")
    scale = _default_scale(sm_scale, q.shape[-1])
    if not use_triton(q, k, v) or not _kernel_supports(q) or q.numel() == 0:
        if q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.numel():
            return _sdpa(q, k, v, causal, scale)
        return reference.attention(q, k, v, causal=causal, sm_scale=scale)
    return _flash_attention_op(q, k, v, bool(causal), scale)[0]


def _sdpa(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """The non-Triton path for float inputs: torch's fused SDPA (flash on CPU), which keeps no T x T
    matrix and, unlike the eager `reference.attention` (the float64-capable oracle the tests use),
    computes in the inputs' dtype; equal to it up to rounding. The KV reference's GQA call."""
    out = reference._sdpa_gqa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, scale, causal)
    return out.transpose(1, 2)
