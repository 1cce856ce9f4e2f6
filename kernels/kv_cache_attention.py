"""KV-cache attention in Triton: decode and tree verification against a static cache, split-KV.
Flash attention (training / prefill) is in attention.py, which holds the tile helpers, the
online-softmax step and the input checks these kernels share with it.

Layout is Meta's (batch, time, heads, head_dim). Grouped-query attention (GQA): query head h reads
kv head h // (H // Hkv); K/V are never repeated in memory.

KV-cache attention: one program per (row tile, KV split, batch*kv head). The rows of a tile are the
GQA group's query heads x the Tq new queries, packed as the M dimension of tl.dot, so each K/V tile
is read once for all of them. Tree masks travel as bits (one int64 word per 64 new nodes per query
row, packed by `pack_tree_mask`). When batch*kv_heads is too small to fill the GPU, the cache length is
split over several programs (flash-decoding); each writes a float32 partial (out, lse) and
`_kv_combine_kernel` merges them, or the last split program of each row tile does (arrival.py).
The launch (row tile, split count) is timed per shape on the GPU the first time the shape runs outside a CUDA-graph capture (`tune_kv_launch`, launch_tuner.py);
`_kv_heuristic` is the fallback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from .triton_import import tl, triton

from . import reference
from .arrival import arrival_counters, last_to_arrive
from .attention import (LOG2E, _bth_strides, _check_heads, _default_scale, _head_dim_tile, _kernel_supports,
                        _last_dim_contiguous, _load_tile, _softmax_step, _store_tile)
from .backend import check_one_device, gpu_launch, graph_capturing, sm_count, use_triton
from .dependent_launch import await_prior_grid, launch_programmatic
from .launch_tuner import LaunchTuner, close_to, rotating_copies

# Tests set this to a small number to force the split-KV (flash-decoding) path; None = automatic.
FORCE_KV_SPLIT_SIZE: int | None = None


# ============================================================================================
# KV-cache attention (decode / tree verification)
# ============================================================================================
@triton.jit
def _kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, q_idx, row_ok, mask_bits,
              offs_n, offs_d, d_ok, lo, hi, cache_len, Tq, MASK_WORDS, qk_scale,
              BLOCK_N: tl.constexpr, TREE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    # MASKED=False: keys in [lo, hi) are all old cache entries, visible to every query row.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
        in_range = cols < hi
        k = _load_tile(k_ptrs, in_range, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            j = cols - cache_len                       # index of the new node in slot `cols`
            is_new = (j >= 0) & (j < Tq)
            if TREE:
                # BLOCK_N <= 64 keys span at most two mask words: load both per row (a
                # (rows x keys) gather of words would cost a pipelined int64 tile of shared memory).
                jc = tl.where(is_new, j, 0)
                w0 = tl.maximum(start_n - cache_len, 0) // 64
                row_bits = mask_bits + q_idx * MASK_WORDS + w0
                word_lo = tl.load(row_bits, mask=row_ok, other=0)
                word_hi = tl.load(row_bits + 1, mask=row_ok & (q_idx * 0 + w0 + 1 < MASK_WORDS), other=0)
                word = tl.where((jc // 64 == w0)[None, :], word_lo[:, None], word_hi[:, None])
                bit = (word >> (jc % 64).to(tl.int64)[None, :]) & 1
                sees_new = is_new[None, :] & (bit != 0)
            else:
                sees_new = is_new[None, :] & (j[None, :] <= q_idx[:, None])
            visible = in_range[None, :] & ((cols < cache_len)[None, :] | sees_new)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
        else:
            qk = qk * qk_scale
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, qk_scale, v_ptrs, in_range, d_ok, MASKED, EVEN_D, False)
    return acc, l_i, m_i


@triton.jit
def _kv_attn_kernel(
    Q, K, V, SEQLENS, MASK_BITS, O, O_PART, LSE_PART, COUNTERS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_ot, stride_oh,
    Tq, HKV, GROUP, SPLIT_SIZE, N_SPLITS, MASK_WORDS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TREE: tl.constexpr, SPLIT: tl.constexpr, COMBINE_LAST: tl.constexpr,
    COMBINE_R: tl.constexpr, COMBINE_S: tl.constexpr, PDL: tl.constexpr,
):
    # Row r of the tile is query q_idx = r // GROUP of head kvh * GROUP + r % GROUP.
    tl.static_assert(BLOCK_N <= 64)
    await_prior_grid(PDL)   # PDL: a programmatic dependent launch (dependent_launch.py)
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    bkv = tl.program_id(2)
    b = (bkv // HKV).to(tl.int64)
    kvh = bkv % HKV
    H = HKV * GROUP

    rows = pid_row * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Tq
    q_idx = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = _load_tile(Q + b * stride_qb + q_idx[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)
    cache_len = tl.load(SEQLENS + b).to(tl.int32)
    lo = split * SPLIT_SIZE
    hi = tl.minimum(lo + SPLIT_SIZE, cache_len + Tq)
    if not TREE:
        # Causal: no row of this tile sees past its last query's own slot.
        last_q = tl.minimum((pid_row * BLOCK_M + BLOCK_M - 1) // GROUP, Tq - 1)
        hi = tl.minimum(hi, cache_len + last_q + 1)
    full_hi = tl.maximum(lo, lo + ((tl.minimum(hi, cache_len) - lo) // BLOCK_N) * BLOCK_N)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, q_idx, row_ok, MASK_BITS,
                              offs_n, offs_d, d_ok, lo, full_hi, cache_len, Tq, MASK_WORDS, qk_scale,
                              BLOCK_N, TREE, False, EVEN_D)
    acc, l_i, m_i = _kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, q_idx, row_ok, MASK_BITS,
                              offs_n, offs_d, d_ok, full_hi, hi, cache_len, Tq, MASK_WORDS, qk_scale,
                              BLOCK_N, TREE, True, EVEN_D)

    # A row that sees nothing (an empty split, or a tree row without its diagonal) yields 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        part = ((b * Tq + q_idx) * H + h) * N_SPLITS + split     # output row (b, i, h), then split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE_PART + part, lse, mask=row_ok)
        _store_tile(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, row_ok, d_ok, EVEN_D)
        if COMBINE_LAST:
            # The last split of this row tile to finish combines all of them (arrival.py): no
            # second kernel in the step. COMBINE_R rows at a time keep the (rows, splits, D) loads
            # and their 64-bit addresses within the registers the attention loop needed.
            if last_to_arrive(COUNTERS + bkv * tl.num_programs(0) + pid_row, N_SPLITS):
                for r0 in range(0, tl.minimum(BLOCK_M, GROUP * Tq - pid_row * BLOCK_M), COMBINE_R):
                    c_rows = pid_row * BLOCK_M + r0 + tl.arange(0, COMBINE_R)
                    c_ok = c_rows < GROUP * Tq
                    c_q = c_rows // GROUP
                    c_h = kvh * GROUP + c_rows % GROUP
                    merged = _combine_splits(O_PART, LSE_PART, (b * Tq + c_q) * H + c_h, c_ok, offs_d, d_ok,
                                             N_SPLITS, HEAD_DIM, COMBINE_S)
                    _store_tile(O + b * stride_ob + c_q[:, None] * stride_ot + c_h[:, None] * stride_oh
                                + offs_d[None, :], merged.to(O.dtype.element_ty), c_ok, d_ok, EVEN_D)
    else:
        _store_tile(O + b * stride_ob + q_idx[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                    out.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)


@triton.jit
def _combine_splits(O_PART, LSE_PART, part_row, row_ok, offs_d, d_ok, N_SPLITS, HEAD_DIM: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Merge the N_SPLITS float32 partials (out, lse in log2 units) of the rows part_row (R,) into
    their (R, BLOCK_D) output: the max lse, then the weighted sum, BLOCK_S splits per load so their
    latencies overlap (one split per iteration would wait out an L2 round trip each), in a fixed
    order. Loads go through L2 (.cg): in a combining split program, other programs wrote them."""
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full(part_row.shape, float("-inf"), dtype=tl.float32)
    for s0 in range(0, N_SPLITS, BLOCK_S):
        part = part_row[:, None] * N_SPLITS + s0 + offs_s[None, :]                       # (R, BLOCK_S)
        ok = row_ok[:, None] & (s0 + offs_s < N_SPLITS)[None, :]
        m = tl.maximum(m, tl.max(tl.load(LSE_PART + part, mask=ok, other=float("-inf"), cache_modifier=".cg"), 1))
    m = tl.where(m == float("-inf"), 0.0, m)     # every split empty: the row yields 0
    acc = tl.zeros((part_row.shape[0], offs_d.shape[0]), dtype=tl.float32)
    denom = tl.zeros(part_row.shape, dtype=tl.float32)
    for s0 in range(0, N_SPLITS, BLOCK_S):
        part = part_row[:, None] * N_SPLITS + s0 + offs_s[None, :]
        ok = row_ok[:, None] & (s0 + offs_s < N_SPLITS)[None, :]
        w = tl.math.exp2(tl.load(LSE_PART + part, mask=ok, other=float("-inf"), cache_modifier=".cg") - m[:, None])
        denom += tl.sum(w, 1)
        o = tl.load(O_PART + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * o, 1)
    return acc / tl.where(denom == 0.0, 1.0, denom)[:, None]


@triton.jit
def _kv_combine_kernel(
    O_PART, LSE_PART, O, N_ROWS, Tq, H, N_SPLITS,
    stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    # BLOCK_R output rows per program, row = (b * Tq + i) * H + h.
    await_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N_ROWS
    h = rows % H
    i = (rows // H) % Tq
    b = (rows // (H * Tq)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    out = _combine_splits(O_PART, LSE_PART, rows.to(tl.int64), row_ok, offs_d, d_ok, N_SPLITS, HEAD_DIM, BLOCK_S)
    _store_tile(O + b[:, None] * stride_ob + i[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                out.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)


@dataclass(frozen=True)
class PackedTreeMask:
    """A tree mask packed once for the kernel, to pass to `kv_cache_attention` in place of the bool
    mask: a model packs once per forward, not once per layer (under a CUDA graph the packing
    kernels would otherwise replay in every layer). Make it with `pack_tree_mask`.
    mask: (Tq, Tq) bool, as given; words: (Tq, ceil(Tq / 64)) int64, bit j % 64 of word j // 64 = mask[i, j],
    contiguous (the kernel reads word w of row i at i * ceil(Tq / 64) + w). One made by hand is checked
    here, once, not at every layer's call."""
    mask: torch.Tensor
    words: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.mask, torch.Tensor) or self.mask.dim() != 2:
            raise ValueError(f"PackedTreeMask: mask must be a (Tq, Tq) tensor, got "
                             f"{tuple(getattr(self.mask, 'shape', ())) or type(self.mask).__name__}")
        Tq = self.mask.shape[0]
        words = self.words
        if not isinstance(words, torch.Tensor) or words.shape != (Tq, triton.cdiv(Tq, 64)) \
                or words.dtype != torch.int64 or not words.is_contiguous():
            got = (f"{tuple(words.shape)} {words.dtype}{'' if words.is_contiguous() else ' not contiguous'}"
                   if isinstance(words, torch.Tensor) else type(words).__name__)
            raise ValueError(f"PackedTreeMask: words must be a contiguous ({Tq}, {triton.cdiv(Tq, 64)}) int64 "
                             f"tensor for a ({Tq}, {Tq}) mask, got {got}: make it with pack_tree_mask")


def pack_tree_mask(tree_mask: torch.Tensor) -> PackedTreeMask:
    """(Tq, Tq) bool tree mask -> PackedTreeMask on the same device (a few small tensor ops)."""
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dim() != 2 or tree_mask.shape[0] != tree_mask.shape[1]:
        shape = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
        raise ValueError(f"pack_tree_mask: tree_mask must be a square (Tq, Tq) tensor, got {shape}")
    if tree_mask.dtype != torch.bool:
        raise ValueError(f"pack_tree_mask: tree_mask must be torch.bool, got {tree_mask.dtype}")
    Tq = tree_mask.shape[0]
    words = triton.cdiv(Tq, 64)
    padded = torch.zeros((Tq, words * 64), dtype=torch.int64, device=tree_mask.device)
    padded[:, :Tq] = tree_mask.to(torch.int64)
    # Bit 63 weighs -2**63 in two's complement; the sum of distinct powers never overflows.
    weights = torch.ones(64, dtype=torch.int64, device=tree_mask.device) << torch.arange(
        64, dtype=torch.int64, device=tree_mask.device)
    return PackedTreeMask(tree_mask, (padded.view(Tq, words, 64) * weights).sum(-1).contiguous())


@dataclass(frozen=True)
class KVLaunch:
    """Launch geometry of KV-cache attention: tile sizes, and the cache split into n_splits ranges
    of split_size slots. n_splits > 1 adds float32 partials, merged by `_kv_combine_kernel` or, with
    combine_last, by the last split program of each row tile (arrival.py: no second kernel)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_size: int
    n_splits: int
    combine_last: bool = False

    def label(self) -> str:
        """e.g. "M16 x9+last": query rows per tile, KV splits, +last when the last split combines."""
        return f"M{self.block_m} x{self.n_splits}{'+last' if self.combine_last else ''}"


def _kv_block_n(gpu: bool) -> int:
    """Keys per tile (the kernel reads at most two tree-mask words per tile: <= 64)."""
    return 64 if gpu else 16


def _kv_launch(block_m: int, S_max: int, split_blocks: int | None, gpu: bool) -> KVLaunch:
    block_n, num_stages = _kv_block_n(gpu), (3 if gpu else 1)
    num_warps = 4 if block_m <= 64 or not gpu else 8
    n_blocks = triton.cdiv(S_max, block_n)
    split_size = min(split_blocks or n_blocks, n_blocks) * block_n
    return KVLaunch(block_m, block_n, num_warps, num_stages, split_size, triton.cdiv(S_max, split_size))


def _kv_heuristic(B: int, Hkv: int, rows: int, S_max: int, device: torch.device) -> KVLaunch:
    """The launch used without tuning: rows = GROUP * Tq query rows per (sequence, kv head)."""
    gpu = gpu_launch(device)
    block_m = min(max(triton.next_power_of_2(rows), 16), 128 if gpu else 32)
    n_blocks = triton.cdiv(S_max, _kv_block_n(gpu))
    if FORCE_KV_SPLIT_SIZE is not None:
        return _kv_launch(block_m, S_max, triton.cdiv(max(int(FORCE_KV_SPLIT_SIZE), 1), _kv_block_n(gpu)), gpu)
    if not gpu:
        return _kv_launch(block_m, S_max, None, gpu)
    # Flash-decoding: split the cache when (batch x kv heads x row tiles) leaves SMs idle, up to
    # about one program per SM. On the H100 (tenth session, tune_kv_launch over 18 shapes, caches
    # read from HBM) the tuner's pick at batch 1 and 8 ran 64-128 programs at every shape, and four
    # programs per SM (this rule before) cost up to 1.48x.
    programs = B * Hkv * triton.cdiv(rows, block_m)
    target = sm_count(device)
    n_splits = 1 if programs >= target // 2 else min(n_blocks, target // programs)
    # Each split writes float32 partials of all `rows` rows, which the merge reads back: 8 * rows * D
    # bytes per split against the 4 * S * D bytes of bf16 K and V it reads. Keep that traffic within
    # twice the cache: at 16 splits a 64-node tree (256 rows) over a 1024-slot cache moved 8x the
    # cache in partials and cost 3.35x a decode (fifth session); the tuner's picks reach 2x.
    n_splits = max(1, min(n_splits, S_max // rows))
    launch = _kv_launch(block_m, S_max, triton.cdiv(n_blocks, n_splits), gpu)
    # The last split merges (no combine kernel): 1-10% faster at every batch-1 and batch-8 decode
    # shape measured (a tie at batch 64), slower for tree tiles, where one program merges up to 128 rows.
    return dataclasses.replace(launch, combine_last=launch.n_splits > 1 and block_m <= 16)


def kv_launch_candidates(B: int, Hkv: int, rows: int, S_max: int, device: torch.device) -> list[KVLaunch]:
    """The launches `tune_kv_launch` times: the heuristic's, and for its row tile and the smaller
    ones down to 16 rows (more programs with fewer registers each, for trees of many rows; 16 alone
    under the interpreter) every power-of-two split count and one key block per split, up to eight
    programs per SM (two splits per tile under the interpreter); each split launch both with the
    combine kernel and with combine_last."""
    gpu = gpu_launch(device)
    base = _kv_heuristic(B, Hkv, rows, S_max, device)
    # A 64-node tree at batch 1 ran its fastest launch, M64 x4, at 128 programs (one per SM, 1.28x
    # a decode on the H100): 32- and 16-row tiles give 2-4x the programs over the same cache.
    smaller = (64, 32, 16) if gpu else (16,)
    block_ms = [base.block_m] + [m for m in smaller if rows > m and base.block_m > m]
    n_blocks = triton.cdiv(S_max, base.block_n)
    max_programs = 8 * sm_count(device) if gpu else 2 * B * Hkv * triton.cdiv(rows, 16)
    out = [base]
    for block_m in block_ms:
        programs = B * Hkv * triton.cdiv(rows, block_m)
        counts = [1 << i for i in range(n_blocks.bit_length()) if (1 << i) < n_blocks] + [n_blocks]
        for n_splits in counts:   # powers of two, then one key block per split
            if n_splits > 1 and programs * n_splits > max_programs:
                break
            launch = _kv_launch(block_m, S_max, triton.cdiv(n_blocks, n_splits), gpu)
            split = [launch, dataclasses.replace(launch, combine_last=True)] if launch.n_splits > 1 else [launch]
            out += [c for c in split if c not in out]
    return out


# The tuned launch of every shape seen (see tune_kv_launch; MTP_TUNE=0 keeps the heuristic).
_KV_TUNER = LaunchTuner("kv_cache_attention")


def _kv_key(q: torch.Tensor, k_cache: torch.Tensor, tree: bool) -> tuple:
    """The tuning key of a call. Prefill chunks (several new tokens, no tree) share one key per
    power-of-two length and power-of-two batch: every launch fits any Tq and B, and a key per
    prompt length (or per group of a prefill in groups, see Generator._prefill) would time 13-40
    launches again at each new shape and keep their timings forever. Decode and tree calls, the
    ones CUDA graphs replay, keep their exact B and Tq."""
    B, Tq, H, D = q.shape
    if not tree and Tq > 1:
        B, Tq = triton.next_power_of_2(B), triton.next_power_of_2(Tq)
    return (str(q.device), q.dtype, B, Tq, H, D, k_cache.shape[1], k_cache.shape[2], tree)


def kv_problem(q: torch.Tensor, k_cache: torch.Tensor) -> tuple:
    """(B, Hkv, rows, S_max) of a KV-cache attention call, what its launch is chosen from:
    rows = GROUP * Tq query rows per (sequence, kv head)."""
    B, Tq, H, _ = q.shape
    Hkv = k_cache.shape[2]
    return B, Hkv, (H // Hkv) * Tq, k_cache.shape[1]


def _kv_reference_in_pieces(q, k_cache, v_cache, cache_seqlens, tree_mask: PackedTreeMask | None, sm_scale: float,
                            score_bytes: int = 1 << 28) -> torch.Tensor:
    """reference.kv_cache_attention, without a tree mask (a prefill of thousands of tokens) in query
    chunks whose float32 scores would stay under score_bytes were they materialized (a GPU's
    attention with a mask may take the matmul path): chunk [i0, i1), with i0 more tokens counted as
    cached, sees what its queries see in the whole call."""
    B, Tq, H, _ = q.shape
    step = Tq if tree_mask is not None else max(1, score_bytes // (4 * B * H * k_cache.shape[1]))
    dense = None if tree_mask is None else tree_mask.mask
    return torch.cat([reference.kv_cache_attention(q[:, i0:i0 + step], k_cache, v_cache, cache_seqlens + i0, dense,
                                                   sm_scale) for i0 in range(0, Tq, step)], dim=1)


def tune_kv_launch(q, k_cache, v_cache, cache_seqlens, tree_mask: PackedTreeMask | None, sm_scale: float,
                   timer=None, l2_bytes: int | None = None) -> dict[KVLaunch, float]:
    """Time every `kv_launch_candidates` launch on these tensors with a full cache (cache_seqlens =
    S_max - Tq, the length the split plan is made for), keep the fastest for this shape and return
    the times (ms). timer(fn) -> ms; default: CUDA-graph replay time (launch_tuner.py). Each timed
    call reads the next of a few copies of the cache (`rotating_copies`; l2_bytes: the L2 size, by
    default the device's, none on a CPU), so that a cache smaller than the L2 is read from HBM as in
    a decode step, where the other layers' caches and weights pass through L2 between two uses.
    KV-cache attention calls this at the first call of a shape on CUDA outside a graph capture.
    A launch whose result is not `close_to` the eager reference's (a race in a split launch's
    combine can be fast and wrong) is left out."""
    full = torch.full_like(cache_seqlens, k_cache.shape[1] - q.shape[1])
    want = _kv_reference_in_pieces(q, k_cache, v_cache, full, tree_mask, sm_scale)
    next_k, next_v = rotating_copies(k_cache, l2_bytes), rotating_copies(v_cache, l2_bytes)   # in lockstep
    return _KV_TUNER.tune(_kv_key(q, k_cache, tree_mask is not None),
                          kv_launch_candidates(*kv_problem(q, k_cache), q.device),
                          lambda launch: _kv_run(q, next_k(), next_v(), full, tree_mask, sm_scale, launch), timer,
                          close_to(want))


def _kv_launch_for(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale) -> KVLaunch:
    def heuristic():
        return _kv_heuristic(*kv_problem(q, k_cache), q.device)
    if FORCE_KV_SPLIT_SIZE is not None:
        return heuristic()
    return _KV_TUNER.choose(_kv_key(q, k_cache, tree_mask is not None), q.device,
                            lambda: tune_kv_launch(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale),
                            heuristic)


def _kv_run(q, k_cache, v_cache, seqlens, tree_mask: PackedTreeMask | None, sm_scale: float,
            launch: KVLaunch) -> torch.Tensor:
    """One KV-cache attention with the given launch (tensors already in kernel layout)."""
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    group = H // Hkv
    rows = group * Tq
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    tree = tree_mask is not None
    mask_bits = tree_mask.words if tree else seqlens   # unused when not TREE
    split = launch.n_splits > 1
    combine_last = split and launch.combine_last
    grid = (triton.cdiv(rows, launch.block_m), launch.n_splits, B * Hkv)
    o_part, lse_part = _kv_partials(out, launch.n_splits)
    # one arrival counter per row tile (grid[0] x grid[2]) when the last split combines
    counters = arrival_counters(q.device, grid[0] * grid[2]) if combine_last else seqlens
    combine_rows = min(launch.block_m, 16, triton.next_power_of_2(rows))
    pdl = launch_programmatic(q.device)
    _kv_attn_kernel[grid](
        q, k_cache, v_cache, seqlens, mask_bits, out, o_part, lse_part, counters,
        *_bth_strides(q), *_bth_strides(k_cache), *_bth_strides(v_cache), *_bth_strides(out),
        Tq, Hkv, group, launch.split_size, launch.n_splits, triton.cdiv(Tq, 64), sm_scale * LOG2E,
        **_head_dim_tile(D), BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, TREE=tree, SPLIT=split,
        COMBINE_LAST=combine_last, COMBINE_R=combine_rows, COMBINE_S=_combine_block_s(combine_rows, D),
        PDL=pdl, num_warps=launch.num_warps, num_stages=launch.num_stages, launch_pdl=pdl)
    if split and not combine_last:
        _kv_combine(o_part, lse_part, out)
    return out


def _kv_partials(out: torch.Tensor, n_splits: int):
    """(o_part (B, Tq, H, n_splits, D), lse_part (B, Tq, H, n_splits)) float32 for a split launch
    writing `out` (B, Tq, H, D); out itself twice when unsplit (the kernels do not touch them then)."""
    if n_splits == 1:
        return out, out
    return (torch.empty((*out.shape[:3], n_splits, out.shape[3]), dtype=torch.float32, device=out.device),
            torch.empty((*out.shape[:3], n_splits), dtype=torch.float32, device=out.device))


def _kv_combine(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> None:
    """Merge the split partials of `_kv_partials` into out with `_kv_combine_kernel`."""
    B, Tq, H, D = out.shape
    block_r = 2
    pdl = launch_programmatic(out.device)
    _kv_combine_kernel[(triton.cdiv(B * Tq * H, block_r),)](
        o_part, lse_part, out, B * Tq * H, Tq, H, lse_part.shape[-1], *_bth_strides(out),
        **_head_dim_tile(D), BLOCK_R=block_r, BLOCK_S=_combine_block_s(block_r, D), PDL=pdl, num_warps=2,
        launch_pdl=pdl)


def _combine_block_s(rows: int, head_dim: int) -> int:
    """Splits merged per load by `_combine_splits` for `rows` rows: at most 4096 float32 partial
    values per load (32 registers a thread at 4 warps, and twice that for their addresses; 8192
    reached 255 registers in a trial sm_90 compile, not kept), at most 16 splits."""
    return max(1, min(16, 4096 // (rows * _head_dim_tile(head_dim)["BLOCK_D"])))


def kv_cache_attention_triton(q, k_cache, v_cache, cache_seqlens, tree_mask: PackedTreeMask | None,
                              sm_scale: float):
    """Launcher (inputs already validated). q: (B, Tq, H, D); caches: (B, S_max, Hkv, D). The launch
    is the one tuned for this shape (tune_kv_launch, on CUDA), else the heuristic's."""
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    seqlens = cache_seqlens.contiguous()
    launch = _kv_launch_for(q, k_cache, v_cache, seqlens, tree_mask, sm_scale)
    return _kv_run(q, k_cache, v_cache, seqlens, tree_mask, sm_scale, launch)


# ============================================================================================
# Public function
# ============================================================================================
def kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask=None, sm_scale=None,
                       check_seqlens: bool = True) -> torch.Tensor:
    """Inference attention against a static KV cache (no autograd).
    q: (B, Tq, H, Dh); k_cache, v_cache: (B, S_max, Hkv, Dh); cache_seqlens: (B,) int32/int64 = tokens already in
    the cache before the Tq new ones, whose K/V the caller has already written at slots cache_seqlens[b] + j.
    Query i of sequence b attends to slots [0, cache_seqlens[b]) and to new slot cache_seqlens[b] + j where
    tree_mask[i, j] (a (Tq, Tq) bool shared by the batch, or its `pack_tree_mask`; None = causal, j <= i).
    Returns (B, Tq, H, Dh) in q.dtype. A query row that sees no slot at all (possible only with a tree mask whose diagonal is False
    on an empty cache) returns zeros. check_seqlens verifies 0 <= cache_seqlens <= S_max - Tq, a host sync
    on CUDA (skipped during CUDA-graph capture); callers that guarantee the range (the model checks once
    per forward, not once per layer) pass False. Slots past a sequence's cache_seqlens[b] + Tq never
    reach its output, whatever they hold; as in FlashAttention, a masked-out new slot inside the
    range (a sibling tree node) still meets a zero weight, so an inf or NaN value there gives NaN."""
    name = "kv_cache_attention"
    _check_heads(name, q, k_cache, v_cache, "k_cache", "v_cache")
    B, Tq, _, _ = q.shape
    S_max = k_cache.shape[1]
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,):
        shape = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"{name}: cache_seqlens must be a tensor of shape ({B},), got {shape}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    check_one_device(name, q=q, cache_seqlens=cache_seqlens)
    packed = tree_mask if isinstance(tree_mask, PackedTreeMask) else None
    if packed is not None:
        tree_mask = packed.mask
    if tree_mask is not None:
        if not isinstance(tree_mask, torch.Tensor) or tree_mask.shape != (Tq, Tq):
            shape = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
            raise ValueError(f"{name}: tree_mask must have shape (Tq, Tq) = ({Tq}, {Tq}), got {shape}")
        if tree_mask.dtype != torch.bool:
            raise ValueError(f"{name}: tree_mask must be torch.bool, got {tree_mask.dtype}")
        check_one_device(name, q=q, tree_mask=tree_mask)
    if packed is not None:   # (its layout is checked when it is made: PackedTreeMask.__post_init__)
        check_one_device(name, q=q, tree_mask_words=packed.words)
    if Tq > S_max:
        raise ValueError(f"{name}: Tq={Tq} new tokens cannot fit a cache of S_max={S_max} slots")
    if check_seqlens and B > 0 and not graph_capturing(cache_seqlens.device):
        bad = ((cache_seqlens < 0) | (cache_seqlens > S_max - Tq)).any()
        if bool(bad):
            raise ValueError(f"{name}: cache_seqlens must lie in [0, S_max - Tq] = [0, {S_max - Tq}] "
                             f"(S_max={S_max}, Tq={Tq}), got {cache_seqlens.tolist()}")
    scale = _default_scale(sm_scale, q.shape[-1])
    with torch.no_grad():
        if not use_triton(q, k_cache, v_cache) or not _kernel_supports(q) or q.numel() == 0:
            return reference.kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, scale)
        if tree_mask is not None and packed is None:
            packed = pack_tree_mask(tree_mask)
        return kv_cache_attention_triton(q, k_cache, v_cache, cache_seqlens, packed, scale)
