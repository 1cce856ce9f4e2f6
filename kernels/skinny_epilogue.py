"""What a skinny GEMM tile does with its float32 sums, shared by the pointer-fed tiles
(skinny_linear.py) and the TMA-fed warp-specialized ones (skinny_ws.py): round them to Y's dtype
(with SwiGLU, silu(gate) * up from the paired sums), or with the rotary epilogue rotate q and k and
write k and v into the KV caches; a split-K tile stores its partial and the last split of its n tile
to arrive adds them all in split order.
"""
from __future__ import annotations

from .triton_import import tl, triton

from .arrival import last_to_arrive
from .rope_cache import rotate
from .swiglu import silu_times_up


@triton.jit
def tile_values(acc, acc_up, dtype: tl.constexpr, SWIGLU: tl.constexpr):
    """The float32 sums as Y's values: acc rounded to dtype, or with SWIGLU silu(gate) * up from the
    gate and up sums, each rounded to dtype first as the unfused GEMM's outputs are."""
    if SWIGLU:
        return silu_times_up(acc.to(dtype).to(tl.float32), acc_up.to(dtype).to(tl.float32), dtype)
    else:
        return acc.to(dtype)


@triton.jit
def rope_store(even, odd, offs_m, offs_pair, m_ok, pair_ok, Q, stride_qm, FREQS, stride_fb, stride_ft, SLOTS,
                stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM):
    """The rotary epilogue of a fused q/k/v projection. even, odd: the float32 sums of columns
    2 offs_pair and 2 offs_pair + 1 of [q | k | v] ((H + 2 Hkv) x HEAD_DIM columns, Q_COLS =
    H x HEAD_DIM, KV_COLS = Hkv x HEAD_DIM) for rows offs_m (token b * T + t). Each is rounded to
    the dtype as the unfused GEMM's outputs are; q and k pairs are rotated by the token's angles
    (FREQS: float32 (cos, sin) pairs, (B, T, HEAD_DIM/2, 2), or stride_fb 0: shared by the batch)
    as `rope_cache.py` rotates them; q goes to Q (B*T, Q_COLS), k and v to the caches (B, S, Hkv,
    HEAD_DIM, heads packed: stride_cb, stride_cs) at the token's slot. A pair never straddles a head
    (HEAD_DIM is even)."""
    dtype = Q.dtype.element_ty
    x0 = even.to(dtype).to(tl.float32)
    x1 = odd.to(dtype).to(tl.float32)
    b = (offs_m // T).to(tl.int64)
    t = (offs_m % T).to(tl.int64)
    col = 2 * offs_pair
    f_ptrs = FREQS + b[:, None] * stride_fb + t[:, None] * stride_ft + (col % HEAD_DIM)[None, :]
    ok = m_ok[:, None] & pair_ok[None, :]
    y0, y1 = rotate(x0, x1, tl.load(f_ptrs, mask=ok, other=1.0), tl.load(f_ptrs + 1, mask=ok, other=0.0))
    is_v = (col >= Q_COLS + KV_COLS)[None, :]
    y0 = tl.where(is_v, x0, y0).to(dtype)
    y1 = tl.where(is_v, x1, y1).to(dtype)
    q_ptrs = Q + offs_m[:, None] * stride_qm + col[None, :]
    q_ok = ok & (col < Q_COLS)[None, :]
    tl.store(q_ptrs, y0, mask=q_ok)
    tl.store(q_ptrs + 1, y1, mask=q_ok)
    slot = tl.load(SLOTS + b * stride_sb + t * stride_st, mask=m_ok, other=0).to(tl.int64)
    row = (b * stride_cb + slot * stride_cs)[:, None]
    k_ok = ok & ((col >= Q_COLS)[None, :] & ~is_v)
    tl.store(K_CACHE + row + (col - Q_COLS)[None, :], y0, mask=k_ok)
    tl.store(K_CACHE + row + (col - Q_COLS + 1)[None, :], y1, mask=k_ok)
    v_ok = ok & is_v
    tl.store(V_CACHE + row + (col - Q_COLS - KV_COLS)[None, :], y0, mask=v_ok)
    tl.store(V_CACHE + row + (col - Q_COLS - KV_COLS + 1)[None, :], y1, mask=v_ok)


@triton.jit
def store_tile(Y, stride_ym, acc, acc_up, offs_m, offs_n, m_ok, n_ok, FREQS, stride_fb, stride_ft, SLOTS, stride_sb,
               stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM,
               SWIGLU: tl.constexpr, ROPE: tl.constexpr):
    """Store a tile of sums (rows offs_m, outputs offs_n): Y's values (`tile_values`), or with ROPE the
    rotary epilogue (`rope_store`: offs_n count column pairs, acc the even columns, acc_up the odd)."""
    if ROPE:
        rope_store(acc, acc_up, offs_m, offs_n, m_ok, n_ok, Y, stride_ym, FREQS, stride_fb, stride_ft, SLOTS,
                    stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM)
    else:
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], tile_values(acc, acc_up, Y.dtype.element_ty, SWIGLU),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def store_split(Y, stride_ym, acc, acc_up, PARTIALS, COUNTERS, tile, split, M, N, offs_m, offs_n, m_ok, n_ok, FREQS,
                stride_fb, stride_ft, SLOTS, stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb,
                stride_cs, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                SWIGLU: tl.constexpr, ROPE: tl.constexpr):
    """A split-K tile's end: split `split` of n tile `tile` stores its float32 partial to PARTIALS
    (SPLIT_K, M, N) (paired launches: the second sums' follow, (2, SPLIT_K, M, N)); the last of the
    tile's SPLIT_K programs to arrive on COUNTERS[tile] adds them in split order, never in arrival
    order, and stores the tile (`store_tile`): Y is the same bits at every run (no second kernel, no
    float atomics)."""
    y_ok = m_ok[:, None] & n_ok[None, :]
    part_ptrs = PARTIALS + offs_m[:, None] * N + offs_n[None, :]
    tl.store(part_ptrs + split * M * N, acc, mask=y_ok)
    if SWIGLU or ROPE:
        tl.store(part_ptrs + (SPLIT_K + split) * M * N, acc_up, mask=y_ok)
    if last_to_arrive(COUNTERS + tile, SPLIT_K):
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        y_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            y += tl.load(part_ptrs + s * M * N, mask=y_ok, other=0.0, cache_modifier=".cg")
            if SWIGLU or ROPE:
                y_up += tl.load(part_ptrs + (SPLIT_K + s) * M * N, mask=y_ok, other=0.0, cache_modifier=".cg")
        store_tile(Y, stride_ym, y, y_up, offs_m, offs_n, m_ok, n_ok, FREQS, stride_fb, stride_ft, SLOTS,
                   stride_sb, stride_st, T, Q_COLS, KV_COLS, K_CACHE, V_CACHE, stride_cb, stride_cs, HEAD_DIM,
                   SWIGLU, ROPE)
