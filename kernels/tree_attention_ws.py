"""Tree-verification attention, warp-specialized for Hopper: a `KVLaunch` with warp_spec=True.

The KV-cache kernel (`attention._kv_attn_kernel`) verifies a 64-node tree at about 400 TFLOP/s on
the H100, and issue 5 asks for 1.2x of a one-token decode over the same cache, which needs about
620 (NOTES.md, ninth session): the same shortfall as the flash forward's, the softmax running while
the tensor cores wait. This kernel is the KV-cache kernel's tree case rebuilt for Triton's automatic
warp specialization, as the flash kernels' WARP_SPEC variants are (see attention.py): one
branch-free loop over every key block of a split, the old cache and the new nodes alike, and every
operand of its dots read through a tensor descriptor. So the launcher hands it what descriptors can
read as plain 2-D blocks:
  - q regrouped (one copy) to (B, Hkv, Tq, GROUP, D): the 128 rows of a tile, query t of head
    kvh * GROUP + g at row t * GROUP + g, are then consecutive rows, as the KV-cache kernel orders them;
  - the tree mask expanded to one int64 word per row (`PackedTreeMask.row_words`), which is why
    trees of at most 64 nodes only;
  - the cache read as (B, S_max, Hkv*D) (`attention._kv_descriptors`): slots past S_max load as zeros.
Rows past the last query read other rows' queries and words and are never stored. A split's blocks
end on its boundary (split_size is a multiple of BLOCK_N), and keys past the new nodes are masked,
so no key is counted twice or from a stale slot. Partials (n_splits > 1) go to the same float32
buffers, in the same row order, as the KV-cache kernel's, for `_kv_combine_kernel` to merge.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention import _kv_descriptors


@triton.jit
def _tree_attn_ws_kernel(
    QG, K, V, SEQLENS, ROW_WORDS, O, O_PART, LSE_PART,
    stride_kb, stride_ks, stride_vb, stride_vs,
    stride_ob, stride_ot, stride_oh,
    B, S_MAX, Tq, HKV, GROUP, SPLIT_SIZE, N_SPLITS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    bkv = tl.program_id(2)
    b = bkv // HKV
    kvh = bkv % HKV
    n_rows = GROUP * Tq
    rows = pid_row * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    q_idx = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.make_tensor_descriptor(QG, shape=[B * HKV * n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                  block_shape=[BLOCK_M, HEAD_DIM]).load([bkv * n_rows + pid_row * BLOCK_M, 0])
    words = tl.make_tensor_descriptor(ROW_WORDS, shape=[n_rows], strides=[1], block_shape=[BLOCK_M]).load(
        [pid_row * BLOCK_M])
    k_desc, v_desc = _kv_descriptors(K, V, B, S_MAX, HKV * HEAD_DIM, stride_kb, stride_ks, stride_vb, stride_vs,
                                     BLOCK_N, HEAD_DIM)
    cache_len = tl.load(SEQLENS + b).to(tl.int32)   # a scalar load: the warp-specialization pass allows it
    lo = split * SPLIT_SIZE
    hi = tl.minimum(lo + SPLIT_SIZE, cache_len + Tq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        cols = start_n + offs_n
        k = k_desc.load([b, start_n, kvh * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        j = (cols - cache_len)[None, :]                          # the new node in slot `cols`, if >= 0
        bit = (words[:, None] >> tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)) & 1
        visible = (j < 0) | ((j < Tq) & (bit != 0))
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row that has seen nothing yet
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([b, start_n, kvh * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # A row that sees nothing (an empty split, or a tree row without its diagonal) yields 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    b64 = b.to(tl.int64)
    if SPLIT:
        part = ((b64 * Tq + q_idx) * (HKV * GROUP) + h) * N_SPLITS + split   # output row (b, i, h), then split
        tl.store(LSE_PART + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        tl.store(O + b64 * stride_ob + q_idx[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
