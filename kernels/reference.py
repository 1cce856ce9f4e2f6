"""Plain PyTorch twins of every Triton kernel in this package.

Each function has the same signature as its Triton counterpart. They are the CPU path
(dispatch picks them for CPU tensors) and the oracle in the tests.
"""
from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from .cpu_linear import matmul_t


# --------------------------------------------------------------------------------------------
# RMSNorm (Meta's Llama definition: normalize in float32, cast back, then scale)
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., D) any float dtype; weight: (D,). Returns promote(x.dtype, weight.dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(h, rms_norm(h)) with h = x + residual: a block's residual add and the next norm."""
    h = x + residual
    return h, rms_norm(h, weight, eps)


# --------------------------------------------------------------------------------------------
# SwiGLU (the feed-forward's gate: silu(w1 x) * (w3 x))
# --------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Skinny linear (a decode step's projections: few rows times a weight)
# --------------------------------------------------------------------------------------------
def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T, no bias: F.linear (on the CPU in the BLAS layout timed faster
    for a few rows, `cpu_linear.matmul_t`)."""
    return matmul_t(x, weight)


def skinny_linear_swiglu(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """silu(x @ w1^T) * (x @ w3^T) for w13 = [w1; w3] (2F, K): x (..., K) -> (..., F), each
    product rounded to x's dtype before the gate, as the fused kernel's epilogue rounds them."""
    gate, up = skinny_linear(x, w13).chunk(2, dim=-1)
    return swiglu(gate, up)


# --------------------------------------------------------------------------------------------
# Fused n-head linear cross-entropy: the per-chunk step and the whole CPU path
# --------------------------------------------------------------------------------------------
def ce_chunk(logits, targets, row_scale, loss_out, opts, compute_grad: bool) -> None:
    """Twin of the Triton chunk kernel in fused_linear_ce.py.

    logits: (R, V) any float dtype, overwritten with d(total)/d(logits) when compute_grad;
    targets: (R,) int64; row_scale: (R,) float32 gradient factor per row (float64 for float64 logits);
    loss_out: (R,) like row_scale, written (per-row loss without row_scale; 0 where ignored). The
    math runs in float32, or in float64 for float64 logits.
    Loss per row, with s = softcap * tanh(z / softcap) (or s = z):
        lse(s) - (1 - eps) * s[t] - eps * mean(s) + z_loss * lse^2
    """
    V = logits.shape[1]
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    s = opts.softcap * torch.tanh(z / opts.softcap) if opts.softcap is not None else z
    lse = torch.logsumexp(s, dim=1)
    valid = targets != opts.ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    s_t = s.gather(1, safe_t[:, None])[:, 0]
    eps = opts.label_smoothing
    loss = lse - (1.0 - eps) * s_t + opts.z_loss * lse * lse
    if eps:
        loss = loss - eps * s.mean(dim=1)
    loss_out.copy_(torch.where(valid, loss, torch.zeros_like(loss)))
    if not compute_grad:
        return
    grad = torch.exp(s - lse[:, None]) * (1.0 + 2.0 * opts.z_loss * lse[:, None])
    grad.scatter_add_(1, safe_t[:, None], torch.full_like(s_t[:, None], -(1.0 - eps)))
    if eps:
        grad -= eps / V
    if opts.softcap is not None:
        grad *= 1.0 - (s / opts.softcap) ** 2
    grad *= torch.where(valid, row_scale, torch.zeros_like(row_scale))[:, None]
    logits.copy_(grad)


# --------------------------------------------------------------------------------------------
# Rotary embedding + KV-cache write (the cached forward's step between the projections and attention)
# --------------------------------------------------------------------------------------------
def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's interleaved rotary form: pairs (0,1), (2,3), ... of each head dim rotated in float32.
    x: (B, T, H, Dh); freqs_cis: complex (T, Dh/2) shared by the batch, or (B, T, Dh/2) per sequence."""
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rot = freqs_cis.unsqueeze(-2) if freqs_cis.dim() == 3 else freqs_cis[None, :, None, :]
    return torch.view_as_real(x_c * rot).flatten(3).type_as(x)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs_cis: torch.Tensor,
                     slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q and k, write rotated k and v into the caches at `slots`, return rotated q.
    q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh); freqs_cis: complex (B, T, Dh/2) or (T, Dh/2); slots: (B, T)
    int64 cache slot of each new token; k_cache, v_cache: (>= B, S, Hkv, Dh), written in place."""
    q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
    # Indexed writes, not scatter_: torch's CPU scatter_ along the slot dim costs time in proportion
    # to the cache's length (15 ms per call for 64K slots), an index_put_ only to what it writes.
    # (Through fresh views, as scatter_ went: a view made before autograd touched the cache cannot
    # take a write that needs grad.)
    B = k.shape[0]
    rows = torch.arange(B, device=slots.device)[:, None].expand_as(slots)
    k_cache[:B].index_put_((rows, slots), k.to(k_cache.dtype))
    v_cache[:B].index_put_((rows, slots), v.to(v_cache.dtype))
    return q


# --------------------------------------------------------------------------------------------
# Attention (flash attention for training/prefill; KV-cache attention for decode/tree verify)
# --------------------------------------------------------------------------------------------
def _attention_compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              sm_scale: float | None = None) -> torch.Tensor:
    """q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh), H % Hkv == 0 (query head h uses kv head h // (H // Hkv)).
    Eager softmax(q k^T * sm_scale) v in float32 (float64 stays float64); sm_scale defaults to
    1/sqrt(Dh). Returns (B, T, H, Dh) in q.dtype. Differentiable."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    ct = _attention_compute_dtype(q)
    qf = q.to(ct).transpose(1, 2)                                        # (B, H, T, D)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(ct).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


def kv_cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cache_seqlens: torch.Tensor, tree_mask: torch.Tensor | None = None,
                       sm_scale: float | None = None) -> torch.Tensor:
    """q: (B, Tq, H, Dh); k_cache, v_cache: (B, S_max, Hkv, Dh); cache_seqlens: (B,) int = tokens in the cache
    before the Tq new ones (whose K/V already sit at slots cache_seqlens[b] + j). Query i sees slots
    [0, cache_seqlens[b]) and new slot cache_seqlens[b] + j where tree_mask[i, j] ((Tq, Tq) bool; None =
    causal j <= i). A row that sees nothing gives 0. Returns (B, Tq, H, Dh) in q.dtype.

    One call per cache length, over those sequences' own slots only (reading the lengths is a host
    sync on a GPU, where this runs as the eager peer and the oracle), in float32 (float64 stays
    float64) through torch's scaled_dot_product_attention: no slot past a sequence's length is read,
    so a stale inf there cannot reach the output, and no (T, S) float32 scores are kept (a long
    prefill's were gigabytes, and every decode step copied the live K and V twice)."""
    B, Tq, H, D = q.shape
    scale = D ** -0.5 if sm_scale is None else sm_scale
    ct = _attention_compute_dtype(q)
    out = torch.zeros(B, Tq, H, D, dtype=q.dtype, device=q.device)
    if B == 0 or Tq == 0:
        return out
    if tree_mask is None:
        sees_new = torch.ones(Tq, Tq, dtype=torch.bool, device=q.device).tril()
    else:
        sees_new = tree_mask.to(device=q.device, dtype=torch.bool)
    sees_nothing = ~sees_new.any(1)                      # (past slots aside: a hand-made tree's empty row)
    rows_of = {}                                         # sequences of one length share a call
    for b, length in enumerate(cache_seqlens.tolist()):
        rows_of.setdefault(length, []).append(b)
    for length, rows in rows_of.items():
        # consecutive rows as a view (no copy of their K and V), others gathered
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        pick = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=q.device)
        live = slice(0, length + Tq)
        qb = q[pick].to(ct).transpose(1, 2)                                         # (b, H, Tq, D)
        # live slots first: gathering scattered rows copies only them, not every slot to S_max
        kb, vb = (c[:, live][pick].to(ct).transpose(1, 2) for c in (k_cache, v_cache))   # (b, Hkv, S_b, D)
        # Decode (one query, causal) sees every live slot, and a prefill from an empty cache is plain
        # causal attention: no mask, torch's fused paths (a mask of a long prefill takes the matmul path).
        causal = tree_mask is None and length == 0 and Tq > 1
        mask = None if (Tq == 1 and tree_mask is None) or causal else \
            torch.cat([sees_new.new_ones(Tq, length), sees_new], dim=1)
        ob = _sdpa_gqa(qb, kb, vb, mask, scale, causal)                      # (b, H, Tq, D)
        if length == 0 and bool(sees_nothing.any()):
            ob[:, :, sees_nothing] = 0
        out[pick] = ob.transpose(1, 2).to(q.dtype)
    return out


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
              causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention of q (b, H, T, D) against k, v (b, Hkv, S, D), query head h on
    kv head h // (H // Hkv), without repeating K and V where torch can (enable_gqa: on the CPU, and
    for 16-bit inputs on CUDA, whose flash backend takes it; float32 there would fall to the math
    backend's T x S scores, so K and V are repeated for the memory-efficient one). 4-D: torch's
    fused CPU kernel takes no 3-D inputs (they take the matmul path, 8x slower at a 4096-token
    prefill)."""
    if q.shape[1] != k.shape[1]:
        if q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16):
            try:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                      enable_gqa=True)
            except TypeError:   # a torch without enable_gqa
                pass
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


# --------------------------------------------------------------------------------------------
# Token selection from hidden states: linear + argmax / linear + sample (kernels/sampling.py)
# --------------------------------------------------------------------------------------------
# Rows of float32 logits materialized at once by the references below: bounds their memory
# (V = 128256 -> 130 rows, 64 MiB) while the row count grows to batch x tree nodes.
_LOGIT_ELEMENTS_PER_CHUNK = 1 << 24


# Rows of a 16-bit weight converted to float32 at once by `_float32_logits`.
_WEIGHT_ROWS_PER_BLOCK = 2048


def _float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (R, D) @ weight (V, D)^T as float32 (R, V) from float32 operands. A weight in another
    dtype is converted _WEIGHT_ROWS_PER_BLOCK rows at a time into one reused buffer: converting it
    whole made a float32 copy of the weight at every call, which on the CPU cost more than the
    product (a bf16 dim-1024 model's plain decode step took 51-59 ms that way, 15 ms block by block:
    benchmarks/results/NOTES.md, thirteenth session)."""
    h = hidden.float()
    if weight.dtype == torch.float32:
        return matmul_t(h, weight)
    V = weight.shape[0]
    logits = torch.empty(h.shape[0], V, dtype=torch.float32, device=h.device)
    block = torch.empty(min(_WEIGHT_ROWS_PER_BLOCK, V), weight.shape[1], dtype=torch.float32, device=h.device)
    for start in range(0, V, _WEIGHT_ROWS_PER_BLOCK):
        cols = slice(start, min(start + _WEIGHT_ROWS_PER_BLOCK, V))
        weight_f32 = block[: cols.stop - cols.start]
        weight_f32.copy_(weight[cols])
        logits[:, cols] = matmul_t(h, weight_f32)
    return logits


def _float32_logit_chunks(hidden: torch.Tensor, weight: torch.Tensor):
    """Yield (row_slice, logits) with logits = hidden[row_slice] @ weight.T in float32, chunked over rows."""
    rows_per_chunk = max(1, _LOGIT_ELEMENTS_PER_CHUNK // max(weight.shape[0], 1))
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, hidden.shape[0]))
        yield rows, _float32_logits(hidden[rows], weight)


def linear_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden: (R, D) fp32/fp16/bf16; weight: (V, D) same dtype. Returns (R,) int64
    argmax_v of hidden @ weight.T in float32; ties go to the smallest index (torch.argmax); NaN
    counts as -inf, as in the kernel (a row of NaN picks id 0, never an id past the vocabulary)."""
    tokens = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for rows, logits in _float32_logit_chunks(hidden, weight):
        tokens[rows] = _argmax_nan_as_low(logits)
    return tokens


def _argmax_nan_as_low(scores: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim with NaN counted as -inf (torch.argmax lets NaN win)."""
    return torch.argmax(scores.masked_fill(scores.isnan(), float("-inf")), dim=-1)


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: (R, N) float32, 1 <= k <= N. Returns (R, k) int64: the positions of each row's k
    largest scores, best first; equal scores go to the smaller position first (torch.argmax's rule);
    NaN counts as -inf. Exact and deterministic, where torch.topk alone leaves the order of ties open.
    On CUDA no host synchronization (CUDA-graph safe)."""
    scores = torch.nan_to_num(scores.float() + 0.0, nan=float("-inf"), posinf=float("inf"),
                              neginf=float("-inf"))   # + 0.0 turns -0.0 into +0.0: they are equal
    if scores.device.type == "cpu":
        # torch.topk, then ties ordered by position: right unless the k-th score has an equal
        # outside the k taken (checked on the host). At (3, 32000) on 2 threads this whole function
        # took 0.15 ms against the keys' 0.40 (timed by hand, not a benchmark in the repo).
        values, positions = torch.topk(scores, k, dim=-1)
        if bool(((scores >= values[:, -1:]).sum(dim=-1) == k).all()):
            positions, by_position = positions.sort(dim=-1)
            order = torch.sort(values.gather(-1, by_position), dim=-1, descending=True, stable=True).indices
            return positions.gather(-1, order)
    return _top_k_positions_by_keys(scores, k)


def _top_k_positions_by_keys(scores: torch.Tensor, k: int) -> torch.Tensor:
    """top_k_positions on unique int64 keys (the score's order-preserving int32 image in the high
    half, the reversed position in the low half): one torch.topk, no tie left to chance."""
    N = scores.shape[1]
    bits = scores.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)   # negative floats: larger bits, smaller value
    reversed_position = (N - 1) - torch.arange(N, device=scores.device, dtype=torch.int64)
    keys = (ordered << 32) | reversed_position
    return (N - 1) - torch.topk(keys, k, dim=-1).values.bitwise_and(0xFFFFFFFF)


def linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """hidden: (R, D) fp32/fp16/bf16; weight: (V, D) same dtype; 1 <= k <= V. Returns (R, k) int64:
    the ids of the k largest float32 logits hidden @ weight.T per row, best first, ties to the
    smallest id (`top_k_positions`)."""
    ids = torch.empty(hidden.shape[0], k, dtype=torch.int64, device=hidden.device)
    for rows, logits in _float32_logit_chunks(hidden, weight):
        ids[rows] = top_k_positions(logits, k)
    return ids


# Philox-4x32-10 (Salmon et al., 2011), as Triton's tl.philox computes it: the counter-based generator
# behind the sampling kernel's noise. Here in int64 torch ops: every value is a uint32 held in an
# int64, and a product of two of them wraps modulo 2^64 in int64, which keeps its 64 bits.
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_UINT32 = 0xFFFFFFFF


def philox4x32(key0, key1, c0, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 with key (key0, key1) on counter (c0, c1, c2, c3): uint32 values held in int64
    torch tensors or uint64 numpy arrays (broadcastable). Returns the four uint32 outputs in the same
    kind (Random123's known-answer vectors: tests/test_sampling_kernels.py)."""
    for _ in range(rounds):
        p0 = _PHILOX_ROUND_B * c2
        p1 = _PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = ((p0 >> 32) & _UINT32) ^ c1 ^ key0, p0 & _UINT32, ((p1 >> 32) & _UINT32) ^ c3 ^ key1, p1 & _UINT32
        key0 = (key0 + _PHILOX_KEY_A) & _UINT32
        key1 = (key1 + _PHILOX_KEY_B) & _UINT32
    return c0, c1, c2, c3


def sampling_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, V: int) -> torch.Tensor:
    """The sampling kernel's uniforms, bit for bit: (R, V) float32 in [0, 1) for seeds (R,) and
    offsets (R,) int64. Token v of row r takes output v % 4 of Philox keyed by seeds[r] (low word,
    high word) at counter (v // 4, offsets[r] low word, offsets[r] high word, 0), turned into a float
    as tl.uint_to_uniform_float does. So a row's noise depends on its (seed, offset) alone, not on
    the rows beside it nor on the tiling."""
    words = torch.arange((V + 3) // 4, dtype=torch.int64, device=seeds.device)
    return _keyed_uniforms(seeds[:, None], offsets[:, None], words[None, :], lane=None)[:, :V]


def _token_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`sampling_uniforms`' value for each (seeds[i], offsets[i], tokens[i]), all (n,) int64: the
    noise of a few tokens without the rest of their rows."""
    return _keyed_uniforms(seeds, offsets, tokens // 4, lane=tokens % 4)


def _keyed_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor, lane) -> torch.Tensor:
    """float32 uniforms from philox4x32 keyed by seeds at counters (words, offsets' two words, 0),
    int64 tensors that broadcast: output `lane` (a tensor like words) of each, or all four
    interleaved along the last dim (lane None: word w gives tokens 4w..4w+3). On the CPU in numpy
    (uint64: its per-operation overhead is below torch's, which the ~140 small operations of ten
    Philox rounds pay); elsewhere in int64 torch ops."""
    on_cpu = seeds.device.type == "cpu"
    if on_cpu:
        seeds, offsets, words = (t.numpy().astype(np.uint64) for t in (seeds, offsets, words))
        lane = None if lane is None else lane.numpy()
    xp = np if on_cpu else torch
    outputs = philox4x32(seeds & _UINT32, (seeds >> 32) & _UINT32, words, offsets & _UINT32,
                         (offsets >> 32) & _UINT32, xp.zeros_like(words))
    if lane is None:
        bits = xp.stack(outputs, -1)
        bits = bits.reshape(bits.shape[0], -1)
    else:
        bits = xp.stack(outputs)
        bits = np.take_along_axis(bits, lane[None], 0)[0] if on_cpu else bits.gather(0, lane[None])[0]
    # As tl.uint_to_uniform_float: read the uint32 as int32, fold a negative x onto -x - 1 (for
    # b >= 2^31 that is b ^ 0xFFFFFFFF), scale by just under 2^-31.
    folded = bits ^ ((bits >> 31) * _UINT32)
    if on_cpu:
        return torch.from_numpy(folded.astype(np.float32) * np.float32(_UNIFORM_SCALE))
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    # u == 0 gives -log(-log 0) = -inf: that token simply loses.
    return -torch.log(-torch.log(uniform))


_UNIFORM_SCALE = 4.6566127342e-10
# The Gumbel noise's range with these uniforms: u = 0 (probability 2^-31 per token) gives -inf; else
# u lies in [scale, (2^31 - 1) * scale], which float32 rounds to 1 - 2^-24, and G in [-3.07, 16.64].
_GUMBEL_MIN = float(_gumbel(torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)))
_GUMBEL_MAX = float(_gumbel(torch.tensor(2 ** 31 - 1, dtype=torch.float32) * torch.tensor(_UNIFORM_SCALE,
                                                                                          dtype=torch.float32)))
# A token scoring more than this below its row's best cannot win the Gumbel-max unless the best
# token's own noise is -inf: the range, plus 2 (see _gumbel_argmax: 1 of slack for rounding).
_CANDIDATE_MARGIN = _GUMBEL_MAX - _GUMBEL_MIN + 2.0
# Rows whose candidates are at least this share of the logits draw the whole noise: 4 tokens per
# Philox call beat 1 per call for the candidates.
_DENSE_NOISE_SHARE = 0.25


def _gumbel_argmax(scores: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                   noisy: torch.Tensor | None = None) -> torch.Tensor:
    """argmax_v(scores_v + G_v) per row, G the kernel's noise (ties and NaN as `_argmax_nan_as_low`),
    computing G only where it can matter. G lies in [_GUMBEL_MIN, _GUMBEL_MAX] or is -inf, so a token
    more than _CANDIDATE_MARGIN below the row's best score perturbs to under best + _GUMBEL_MIN - 2,
    while the best token perturbs to at least best + _GUMBEL_MIN unless its noise is -inf: a peaked
    distribution (a trained model at T <= 1) has a handful of candidates out of the vocabulary. A row
    whose winner does not reach best + _GUMBEL_MIN - 1 (the case left open; the 1 between the two
    bounds absorbs rounding) draws its whole noise, as do flat distributions and every row off the
    CPU (the candidates' count is a host sync, which a CUDA-graph capture refuses; meta tensors).
    scores: (R, V) float32 without NaN; seeds, offsets (R,) int64; noisy: (R,) bool, False for the
    rows that take no noise (greedy rows: a plain argmax), None for all noisy."""
    R, V = scores.shape
    if scores.device.type != "cpu":   # no host sync: a sampled step stays capturable in a CUDA graph
        perturbed = _perturbed(scores, seeds, offsets)
        return _argmax_nan_as_low(perturbed if noisy is None else torch.where(noisy[:, None], perturbed, scores))
    if noisy is not None and not bool(noisy.all()):
        tokens = _argmax_nan_as_low(scores)
        rows = noisy.nonzero()[:, 0]
        if len(rows):
            tokens[rows] = _gumbel_argmax(scores[rows], seeds[rows], offsets[rows])
        return tokens
    top = scores.max(dim=-1).values
    candidates = scores >= (top - _CANDIDATE_MARGIN)[:, None]
    if int(candidates.sum()) >= _DENSE_NOISE_SHARE * R * V:
        return _argmax_nan_as_low(_perturbed(scores, seeds, offsets))
    r_idx, v_idx = candidates.nonzero(as_tuple=True)
    perturbed = torch.full_like(scores, float("-inf"))
    perturbed[r_idx, v_idx] = scores[r_idx, v_idx] + _gumbel(_token_uniforms(seeds[r_idx], offsets[r_idx], v_idx))
    tokens = _argmax_nan_as_low(perturbed)
    winner = perturbed.gather(1, tokens[:, None])[:, 0]
    unsure = ~(winner >= top + (_GUMBEL_MIN - 1.0))   # NaN too
    if bool(unsure.any()):
        rows = unsure.nonzero()[:, 0]
        tokens[rows] = _argmax_nan_as_low(_perturbed(scores[rows], seeds[rows], offsets[rows]))
    return tokens


def _perturbed(scores: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """scores (R, V) plus every token's Gumbel noise (the dense draw)."""
    return scores + _gumbel(sampling_uniforms(seeds, offsets, scores.shape[-1]))


def row_values(values, rows: slice):
    """A per-row tensor's rows, or a number as it is (a temperature, top_p or top_k for every row)."""
    return values[rows] if isinstance(values, torch.Tensor) else values


def nucleus(probs: torch.Tensor, top_p) -> torch.Tensor:
    """probs: (R, V) float, rows summing to 1; top_p: a number or (R,) per row. Returns (R, V) bool,
    True for the tokens of the top-p nucleus by the Llama release's rule: sort descending (stable, so
    equal probabilities keep id order), drop a token only when the mass before it exceeds top_p, so
    the token that crosses top_p stays, and so does one whose mass before equals top_p exactly; the
    most likely token always stays."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.to(probs_sort.dtype)[:, None]
    drop = (torch.cumsum(probs_sort, dim=-1) - probs_sort) > top_p   # the release's `probs_sum - probs_sort > p`
    drop[..., 0] = False   # a top_p below float32's range would drop it too
    return torch.empty_like(drop).scatter_(-1, probs_idx, ~drop)


def top_k_keep(scores: torch.Tensor, top_k, max_top_k: int | None = None) -> torch.Tensor | None:
    """scores: (R, V) float without NaN; top_k: an int or (R,) integer tensor, one per row, 0 (or V and
    more) keeping every token. Returns (R, V) bool, True for the tokens scoring at least the row's
    k-th highest score (every token tied with it kept, as Hugging Face's and vLLM's cuts keep them),
    or None when a number keeps every token. max_top_k: with a tensor, a bound on its values below
    V, known on the host (the Generator's): the k-th score then comes from torch.topk of that many,
    not a sort of the whole row; a row above it is cut at it (the caller's to keep: not checked here)."""
    V = scores.shape[-1]
    if not isinstance(top_k, torch.Tensor):
        if top_k <= 0 or top_k >= V:
            return None
        return scores >= torch.topk(scores, top_k, dim=-1).values[:, -1:]
    bound = V if max_top_k is None else max(1, min(int(max_top_k), V))
    best = (torch.topk(scores, bound, dim=-1).values if bound < V
            else torch.sort(scores, dim=-1, descending=True).values)   # (R, bound) highest first
    k = top_k.to(torch.int64)[:, None]
    kth = best.gather(-1, k.clamp(min=1, max=bound) - 1)
    return (scores >= kth) | (k <= 0) | (k >= V)


def min_p_keep(scores: torch.Tensor, min_p) -> torch.Tensor | None:
    """scores: (R, V) float without NaN, a finite maximum per row; min_p in [0, 1], a number or (R,)
    per row. Returns (R, V) bool, True for the tokens whose probability is at least min_p times the
    row's most likely token's (min-p sampling: exp(score - best) >= min_p, so min_p 1 keeps the
    tokens tied with the best and 0 keeps all), or None when a number keeps every token."""
    if not isinstance(min_p, torch.Tensor):
        if min_p <= 0:
            return None
        log_min_p = math.log(min_p)
    else:
        log_min_p = torch.log(min_p.to(scores.dtype))[:, None]   # log 0 = -inf: that row keeps all
    return scores - scores.max(dim=-1, keepdim=True).values >= log_min_p


def filters_rows(top_p, top_k, V: int, min_p=0.0):
    """Which rows a top-p nucleus, a top-k cut or a min-p cut narrows: None when none does (numbers
    that keep every token), True when every row is (a number that narrows), else an (R,) bool tensor."""
    numbers = ((not isinstance(top_p, torch.Tensor) and top_p < 1.0)
               or (not isinstance(top_k, torch.Tensor) and 0 < top_k < V)
               or (not isinstance(min_p, torch.Tensor) and min_p > 0.0))
    if numbers:
        return True
    rows = None
    for value, narrows in ((top_p, lambda v: v < 1.0), (top_k, lambda v: (v > 0) & (v < V)),
                           (min_p, lambda v: v > 0.0)):
        if isinstance(value, torch.Tensor):
            rows = narrows(value) if rows is None else rows | narrows(value)
    return rows


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Llama release's draw: probs (R, V) float, rows summing to 1. Returns (R,) int64 ids drawn
    with torch.multinomial from the top-p nucleus (`nucleus`), renormalized. (Generation draws with
    `sample_logits`' keyed Gumbel noise instead: the same distribution.)"""
    kept = probs.masked_fill(~nucleus(probs, top_p), 0.0)
    return torch.multinomial(kept / kept.sum(dim=-1, keepdim=True), num_samples=1, generator=generator).squeeze(-1)


def sample_logits(logits: torch.Tensor, temperature, top_p, seeds: torch.Tensor,
                  offsets: torch.Tensor, top_k=0, max_top_k: int | None = None, min_p=0.0) -> torch.Tensor:
    """logits: (R, V) float32; temperature >= 0, 0 < top_p <= 1, top_k >= 0 and 0 <= min_p <= 1, each
    a number or (R,) per row (a row at temperature 0 picks greedily, `linear_argmax`'s rule; top_k 0
    and min_p 0 keep every token); seeds and offsets (R,) int64; max_top_k: see `top_k_keep`.
    Returns (R,) int64: one draw per row from softmax(logits / temperature) restricted to its top_k
    highest logits (and those tied with the k-th) and to the tokens at least min_p times as likely
    as its most likely one (`min_p_keep`; the two cuts commute, since both keep the best token),
    then to the top-p nucleus of that renormalized distribution (vLLM's order: min-p, top-k, top-p;
    Hugging Face's applies top-k then top-p, and min-p after them),
    by Gumbel-max, argmax_v(logits_v / T + G_v) over the tokens kept, with G = -log(-log U) and U the
    kernel's uniforms (`sampling_uniforms`): the same draw as the kernel's wherever no two scores
    tie within rounding. An argmax over a subset of Gumbel-perturbed logits is an exact draw from the
    renormalized softmax over that subset.

    Non-finite logits: NaN counts as -inf (ranked last, so a row of NaN gives token 0). Without a
    nucleus or cut the rule is the kernel's (an +inf logit wins, the first of several); with one,
    several +inf logits share the row (softmax's limit) and a row with nothing above -inf gives 0."""
    noisy = None
    if not isinstance(temperature, torch.Tensor) and temperature == 0:   # every row greedy (penalized logits)
        temperature = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.float()
        noisy = temperature > 0
        # Greedy rows keep their logits (divided by 1): the argmax's rule, and no noise below.
        scores = logits.float() / torch.where(noisy, temperature, 1.0)[:, None]
    else:
        scores = logits.float() / temperature
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    filtered = filters_rows(top_p, top_k, scores.shape[-1], min_p)
    if filtered is not None:
        top = scores == float("inf")
        shared = torch.where(top.any(-1, keepdim=True), torch.where(top, 0.0, float("-inf")), scores)
        dead = (shared == float("-inf")).all(-1, keepdim=True)
        kept = torch.where(dead & (torch.arange(scores.shape[-1], device=scores.device) == 0), 0.0, shared)
        for cut in (top_k_keep(kept, top_k, max_top_k), min_p_keep(kept, min_p)):
            if cut is not None:
                kept = kept.masked_fill(~cut, float("-inf"))
        if isinstance(top_p, torch.Tensor) or top_p < 1.0:   # the nucleus of what the cut kept
            kept = kept.masked_fill(~nucleus(torch.softmax(kept, dim=-1), top_p), float("-inf"))
        # Only sampled rows under a nucleus or a cut: a greedy row, or one at top_p 1, top_k 0 and
        # min_p 0 among per-row values, keeps the rules it has alone (argmax; Gumbel-max over all).
        narrowed = noisy
        if filtered is not True:
            narrowed = filtered if narrowed is None else narrowed & filtered
        scores = kept if narrowed is None else torch.where(narrowed[:, None], kept, scores)
    return _gumbel_argmax(scores, seeds, offsets, noisy)


def linear_sample(hidden: torch.Tensor, weight: torch.Tensor, *, temperature, top_p,
                  seeds: torch.Tensor, offsets: torch.Tensor, top_k=0, max_top_k: int | None = None,
                  min_p=0.0, penalties=None) -> torch.Tensor:
    """hidden: (R, D); weight: (V, D) same dtype; temperature, top_p, top_k and min_p each a number
    or (R,) per row; seeds and offsets (R,) int64; penalties: a `penalties.TokenPenalties` for the R
    rows, or None. Returns (R,) int64, one draw per row from softmax(penalized logits / temperature)
    (float32 logits; `TokenPenalties.apply_`) restricted to the top_k highest and the min-p cut, then
    to the top-p nucleus (`sample_logits`); a temperature of 0 picks the argmax (all rows without
    penalties: linear_argmax). The Triton kernel's noise (no nucleus nor cut) and its logits (a
    nucleus, a cut, penalties, or values per row) with the same seeds and offsets: the same tokens up
    to ties within rounding."""
    if not isinstance(temperature, torch.Tensor) and temperature == 0 and penalties is None:
        return linear_argmax(hidden, weight)
    tokens = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for rows, logits in _float32_logit_chunks(hidden, weight):
        if penalties is not None:
            logits = penalties.apply_(logits, rows)
        tokens[rows] = sample_logits(logits, row_values(temperature, rows), row_values(top_p, rows), seeds[rows],
                                     offsets[rows], row_values(top_k, rows), max_top_k, row_values(min_p, rows))
    return tokens


# --------------------------------------------------------------------------------------------
# Tree verification: accepted path per sequence, KV-cache compaction (kernels/tree_verify.py)
# --------------------------------------------------------------------------------------------
def tree_depths(parents: torch.Tensor) -> list[int]:
    """parents: (T,) int with parents[0] == -1 and parents[t] < t. Returns depth per node (root 0)."""
    parent_list = parents.tolist()
    depths = [0] * len(parent_list)
    for t in range(1, len(parent_list)):
        depths[t] = depths[parent_list[t]] + 1
    return depths


def tree_accept(candidates: torch.Tensor, verifier: torch.Tensor, parents: torch.Tensor):
    """Accepted path of every sequence through a static token tree.

    candidates: (B, T) int64, token at every node (column 0 = root, never checked);
    verifier: (B, T) int64, the model's token after the path ending at each node;
    parents: (T,) int64, parents[0] == -1, parents[t] < t (nodes in BFS/depth order).
    From the root, descend into the first child c (in node order) with
    candidates[b, c] == verifier[b, current]; stop when no child matches.
    Returns accepted_nodes (B, max_depth + 1) int64 (root first, padded with -1),
    accept_len (B,) int64 (>= 1, root included), bonus (B,) int64 = verifier[b, last accepted node].
    """
    B, T = candidates.shape
    device = candidates.device
    max_depth = max(tree_depths(parents))
    parents = parents.to(device=device, dtype=torch.int64)
    node_ids = torch.arange(T, device=device)
    rows = torch.arange(B, device=device)
    current = torch.zeros(B, dtype=torch.int64, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    accepted_nodes = torch.full((B, max_depth + 1), -1, dtype=torch.int64, device=device)
    accepted_nodes[:, 0] = 0
    accept_len = torch.ones(B, dtype=torch.int64, device=device)
    for depth in range(1, max_depth + 1):
        wanted = verifier[rows, current]                                          # (B,)
        matches = (parents[None, :] == current[:, None]) & (candidates == wanted[:, None])  # (B, T)
        found = matches.any(dim=1) & active
        first_match = torch.where(matches, node_ids, T).amin(dim=1)              # first child in node order
        current = torch.where(found, first_match, current)
        accepted_nodes[:, depth] = torch.where(found, first_match, -1)
        accept_len += found.long()
        active = found
    bonus = verifier[rows, current]
    return accepted_nodes, accept_len, bonus


def tree_accept_tokens(candidates: torch.Tensor, verifier: torch.Tensor, parents: torch.Tensor):
    """tree_accept plus the emitted tokens: (accepted_nodes (B, W), packed (B, 1 + W), bonus (B,),
    last_node (B,)), int64, W = max_depth + 1; packed[b] = [accept_len, the candidates at the accepted
    nodes below the root, the bonus, -1 padding]; last_node[b] = the last accepted node."""
    accepted_nodes, accept_len, bonus = tree_accept(candidates, verifier, parents)
    B, W = accepted_nodes.shape
    below_root = candidates.gather(1, accepted_nodes[:, 1:].clamp(min=0))                 # (B, W - 1)
    emitted = torch.cat([below_root, below_root.new_full((B, 1), -1)], dim=1)
    emitted.scatter_(1, (accept_len - 1)[:, None], bonus[:, None])
    emitted = emitted.masked_fill(torch.arange(W, device=emitted.device)[None, :] >= accept_len[:, None], -1)
    last_node = accepted_nodes.gather(1, (accept_len - 1)[:, None]).squeeze(1)
    return accepted_nodes, torch.cat([accept_len[:, None], emitted], dim=1), bonus, last_node


def compact_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
    """In place. k_cache, v_cache: (L, B_max, S, Hkv, Dh); cache_seqlens: (B_max,) or (B,) int32;
    accepted_nodes: (B, W) int64 node ids (root first); accept_len: (B,) int64, 0 = copy nothing.
    For every layer and sequence b < B, slot cache_seqlens[b] + j <- slot cache_seqlens[b] +
    accepted_nodes[b, j] for j < accept_len[b]; then cache_seqlens[:B] += accept_len."""
    B = accepted_nodes.shape[0]
    starts = cache_seqlens[:B].tolist()
    lengths = accept_len.tolist()
    for b in range(B):
        n = lengths[b]
        if n == 0:
            continue
        src = starts[b] + accepted_nodes[b, :n].to(device=k_cache.device, dtype=torch.int64)
        dst = torch.arange(starts[b], starts[b] + n, device=k_cache.device)
        # Advanced indexing gathers a copy of every source slot before any write: no overlap hazard.
        k_cache[:, b, dst] = k_cache[:, b, src]
        v_cache[:, b, dst] = v_cache[:, b, src]
    cache_seqlens[:B] += accept_len.to(device=cache_seqlens.device, dtype=cache_seqlens.dtype)


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy (vocab_parallel_ce.py): per-chunk steps on a vocabulary shard
# --------------------------------------------------------------------------------------------
def _vp_scores(logits, targets, vocab_start: int, opts):
    """Shared by the vocab-parallel twins: float32 (softcapped) scores s of this rank's slice, which rows
    count, targets relative to the slice, and which rows' targets this rank owns."""
    z = logits.float()
    s = opts.softcap * torch.tanh(z / opts.softcap) if opts.softcap is not None else z
    valid = targets != opts.ignore_index
    local_t = targets - vocab_start
    owned = valid & (local_t >= 0) & (local_t < logits.shape[1])
    return s, valid, local_t, owned


def vp_chunk_stats(logits, targets, vocab_start: int, stats_out, opts) -> None:
    """Twin of the stats kernel in vocab_parallel_ce.py.

    logits: (R, V_local) this rank's slice [vocab_start, vocab_start + V_local) of the logits;
    targets: (R,) int64 global ids; stats_out: (3, R) float32, written: local log-sum-exp of s,
    local sum of s, s at the target if vocab_start <= target < vocab_start + V_local else 0
    (all 0 for ignored rows). s = softcap * tanh(z / softcap), or z.
    """
    s, valid, local_t, owned = _vp_scores(logits, targets, vocab_start, opts)
    s_t = s.gather(1, torch.where(owned, local_t, torch.zeros_like(local_t))[:, None])[:, 0]
    zero = torch.zeros_like(s_t)
    stats_out[0].copy_(torch.where(valid, torch.logsumexp(s, dim=1), zero))
    stats_out[1].copy_(torch.where(valid, s.sum(dim=1), zero))
    stats_out[2].copy_(torch.where(owned, s_t, zero))


def vp_chunk_grad(logits, targets, vocab_start: int, vocab_size: int, lse, row_scale, opts) -> None:
    """Twin of the gradient kernel in vocab_parallel_ce.py: logits (R, V_local) <- d(total)/d(logits)
    given the global lse (R,) float32 and the global vocabulary size (label smoothing spreads over it);
    rows whose target is ignore_index get 0."""
    s, valid, local_t, owned = _vp_scores(logits, targets, vocab_start, opts)
    eps = opts.label_smoothing
    grad = torch.exp(s - lse[:, None]) * (1.0 + 2.0 * opts.z_loss * lse[:, None]) - eps / vocab_size
    hit = torch.where(owned, torch.full_like(lse, -(1.0 - eps)), torch.zeros_like(lse))
    grad.scatter_add_(1, torch.where(owned, local_t, torch.zeros_like(local_t))[:, None], hit[:, None])
    if opts.softcap is not None:
        grad *= 1.0 - (s / opts.softcap) ** 2
    grad *= torch.where(valid, row_scale, torch.zeros_like(row_scale))[:, None]
    logits.copy_(grad)
