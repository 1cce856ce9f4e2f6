"""Token selection from hidden states without writing the (rows, V) logits: linear + argmax and
linear + Gumbel-max sampling.

Speculative decoding picks one token per (sequence, tree node) from head 0's hidden state; the
rows are few (batch x tree nodes, 1..~2048) and the vocabulary large (up to 128256), so the logits
`hidden @ weight.T` would be the biggest tensor of a decode step. Here they live only in registers:

  pass 1  one program per (row block, vocab block) computes a BLOCK_R x BLOCK_V tile of logits with
          tl.dot over D in BLOCK_D steps (float32 accumulation), turns it into scores (the logits for
          argmax; logits / temperature + Gumbel noise for sampling) and writes, per row, the tile's
          best score and its smallest index: partials of shape (R, n_vocab_blocks).
  pass 2  one program per row (`_merge_candidates_kernel`) over the partials: the row maximum, and
          the first vocab block holding it, then that block's index. No atomics, so the result is
          deterministic, and ties go to the smallest token id like torch.argmax on float32 logits.
          (On the reference path, and for rows too wide for one program, the same in torch.)

Top-k (a drafter's candidates, `linear_topk`): pass 1 keeps each row's TOP_K best of its tile, one
max-and-mask sweep of the tile per rank, as partials (R, n_vocab_blocks, TOP_K); pass 2 (the same
merge kernel) ranks those n_vocab_blocks * TOP_K candidates, not the whole vocabulary. The
partials of one launch serve an argmax and a top-k of the same rows (`linear_candidates`): a verify
step gets head 0's verdict and the drafting heads' candidates from one read of the unembedding.

Splitting the vocabulary gives V / BLOCK_V programs even for one row (783 at V = 100k), so a
batch-1 decode step still spreads the weight read over the whole GPU.

Sampling (Gumbel-max): argmax_v (logits_v / T + G_v) with G_v = -log(-log U_v) i.i.d. Gumbel is an
exact draw from softmax(logits / T). U comes from Philox keyed per row: row r's key is seeds[r] and
token v's counter is (v // 4, offsets[r], 0) (one of the four outputs), so every (row, token) gets
its own uniform whichever program computes it, and a row's noise does not depend on the rows beside
it. The generator gives each sequence its own seed and, as offset, the position of the token being
drawn: a prompt samples the same completion alone or in any batch, and speculative decoding draws
each position with the same noise as plain decoding. Seeds and offsets are read from device memory:
no host synchronization (CUDA-graph friendly). `reference.sampling_uniforms` is the same generator
in torch ops, bit for bit.

top_p < 1 and a top_k cut need the sorted distribution of a whole row; that path writes float32
logits for a chunk of rows at a time with the same tile code and samples the nucleus in torch
(`reference.sample_logits`, the same keyed noise). So do a logit bias and repetition, presence and
frequency penalties (penalties.py), which change a row's logits by its sequence's history before
the draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from .triton_import import tl, triton

from . import reference
from .backend import check_one_device, eager_under_compile, finite_number, gpu_launch, integer, use_triton
from .launch_tuner import LaunchTuner, rotating_copies
from .penalties import TokenPenalties

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Smallest positive temperature: 1 / temperature must stay finite in float32, where the kernels
# scale the logits (1e-40 made it inf, and the draws garbage).
MIN_TEMPERATURE = 1e-30
# float32's largest finite value: the selection kernel ranks NaN and -inf scores at -FLOAT32_MAX.
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


# ============================================================================================
# Kernels
# ============================================================================================
@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, offs_r, offs_v, R, V, D, stride_hr, stride_wv,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 (BLOCK_R, BLOCK_V) tile of hidden @ weight.T; rows >= R and columns >= V hold 0."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + offs_r[:, None] * stride_hr + offs_d[None, :]       # (BLOCK_R, BLOCK_D)
    w_ptrs = weight_ptr + offs_v[None, :] * stride_wv + offs_d[:, None]       # (BLOCK_D, BLOCK_V): W^T tile
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_ok = (d_start + offs_d) < D
        h = tl.load(h_ptrs, mask=(offs_r[:, None] < R) & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_ok[:, None] & (offs_v[None, :] < V), other=0.0)
        # "ieee": float32 inputs stay float32 (TF32 would round them to 10 mantissa bits and
        # change which token wins); fp16/bf16 inputs are exact in any mode.
        acc = tl.dot(h, w, acc, input_precision="ieee")
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return acc


@triton.jit
def _sampling_uniforms(seed_ptr, offset_ptr, stride_seed, stride_offset, offs_r, offs_v, R,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """float32 (BLOCK_R, BLOCK_V) uniforms in [0, 1): token v of row r takes output v % 4 of Philox
    keyed by seed[r] at counter (v // 4, offset[r] low, offset[r] high, 0) (`reference.sampling_uniforms`
    bit for bit). Keyed per row, so a row's draw does not depend on the rows beside it, and a token's
    on the tiling; the kernel computes one Philox per element, as tl.rand does, and keeps a quarter."""
    row_ok = offs_r < R
    seed = tl.load(seed_ptr + offs_r * stride_seed, mask=row_ok, other=0).to(tl.uint64)
    offset = tl.load(offset_ptr + offs_r * stride_offset, mask=row_ok, other=0).to(tl.uint64)
    zeros = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.uint32)
    word = zeros + (offs_v // 4).to(tl.uint32)[None, :]
    offset_lo = zeros + (offset & 0xFFFFFFFF).to(tl.uint32)[:, None]
    offset_hi = zeros + (offset >> 32).to(tl.uint32)[:, None]
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)[:, None]   # keys stay (BLOCK_R, 1): one key step per row
    seed_hi = (seed >> 32).to(tl.uint32)[:, None]
    out0, out1, out2, out3 = tl.philox_impl(word, offset_lo, offset_hi, zeros, seed_lo, seed_hi)
    lane = (offs_v % 4)[None, :]
    bits = tl.where(lane == 0, out0, tl.where(lane == 1, out1, tl.where(lane == 2, out2, out3)))
    return tl.uint_to_uniform_float(bits)


@triton.jit
def _linear_select_partial_kernel(
    hidden_ptr, weight_ptr, seed_ptr, offset_ptr, temperature_ptr, best_score_ptr, best_index_ptr,
    R, V, D, stride_hr, stride_wv, stride_seed, stride_offset, stride_temperature, n_vocab_blocks,
    inv_temperature, SAMPLE: tl.constexpr, ROW_TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row blocks on grid axis 0, the fastest: the row blocks of one vocab block run side by side and
    # can share its weight tile through L2 instead of each reading the whole weight from memory.
    # Vocab blocks on axis 1 (<= 65535 of them).
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    # int64 row offsets: R * stride_hr can pass 2^31 for long hidden buffers.
    logits = _logits_tile(hidden_ptr, weight_ptr, offs_r.to(tl.int64), offs_v.to(tl.int64), R, V, D,
                          stride_hr, stride_wv, BLOCK_R, BLOCK_V, BLOCK_D)
    if SAMPLE:
        uniform = _sampling_uniforms(seed_ptr, offset_ptr, stride_seed, stride_offset, offs_r, offs_v, R,
                                     BLOCK_R, BLOCK_V)
        # U == 0 (probability 2^-31) gives -inf: that token loses, which is harmless.
        if ROW_TEMPERATURE:   # one temperature per row (float32); 0 marks a greedy row (no noise)
            row_t = tl.load(temperature_ptr + offs_r * stride_temperature, mask=offs_r < R, other=0.0)[:, None]
            sampled = row_t > 0
            scores = tl.where(sampled, logits / tl.where(sampled, row_t, 1.0) - tl.log(-tl.log(uniform)), logits)
        else:
            scores = logits * inv_temperature - tl.log(-tl.log(uniform))
    else:
        scores = logits
    # NaN and -inf scores (a NaN hidden state, an infinite logit) rank last, at the lowest finite
    # float: a row of them still picks real token ids. The winners taken out below go to -inf,
    # strictly under every real column still in the running, so a row with fewer than TOP_K finite
    # scores still takes TOP_K distinct ids (ties: smallest id). Padding columns (>= V) sit at -inf.
    scores = tl.where(scores == scores, tl.maximum(scores, -FLOAT32_MAX), -FLOAT32_MAX)
    scores = tl.where(offs_v[None, :] < V, scores, float("-inf"))
    row_ok = offs_r < R
    # Partials are (R, n_vocab_blocks, TOP_K): the tile's TOP_K best per row, best first.
    out_offs = offs_r.to(tl.int64) * (n_vocab_blocks * TOP_K) + pid_v * TOP_K
    for rank in tl.static_range(TOP_K):
        row_best = tl.max(scores, axis=1)
        # Smallest index among the tile's maxima (torch.argmax's tie rule); padding columns can
        # only win once every real column of the tile is taken (a last block narrower than TOP_K).
        is_best = scores == row_best[:, None]
        row_best_index = tl.min(tl.where(is_best, offs_v[None, :], 2147483647), axis=1)
        tl.store(best_score_ptr + out_offs + rank, row_best, mask=row_ok)
        tl.store(best_index_ptr + out_offs + rank, row_best_index, mask=row_ok)
        if rank + 1 < TOP_K:
            # Take the winner out; the next rank is the best of the rest (ties: next smallest id).
            scores = tl.where(offs_v[None, :] == row_best_index[:, None], float("-inf"), scores)


@triton.jit
def _linear_logits_kernel(
    hidden_ptr, weight_ptr, logits_ptr, R, V, D, stride_hr, stride_wv, stride_lr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The top-p fallback: the same float32 tiles as the selection kernel, written out.
    pid_r = tl.program_id(0)   # grid order as in the selection kernel
    pid_v = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    logits = _logits_tile(hidden_ptr, weight_ptr, offs_r, offs_v, R, V, D, stride_hr, stride_wv,
                          BLOCK_R, BLOCK_V, BLOCK_D)
    mask = (offs_r[:, None] < R) & (offs_v[None, :] < V)
    tl.store(logits_ptr + offs_r[:, None] * stride_lr + offs_v[None, :], logits, mask=mask)


@triton.jit
def _merge_candidates_kernel(
    score_ptr, index_ptr, rows_ptr, out_ptr, N, stride_row, stride_cand, stride_rows,
    HAS_ROWS: tl.constexpr, OUT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Pass 2 on the GPU, one program per output row: the OUT_K best of a row's N candidates (scores
    # at stride_cand: 1 for every kept rank, k for each block's best only), ties to the smaller
    # position, which is the smaller id (see TokenCandidates); NaN counts as -inf. One launch
    # where the torch route (`reference.top_k_positions`) takes a dozen small kernels.
    pid = tl.program_id(0)
    if HAS_ROWS:
        # Row ids at their stride: a caller's ids may be a view (a column of a table, an expanded id).
        row = tl.load(rows_ptr + pid.to(tl.int64) * stride_rows).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    alive = offs < N
    score = tl.load(score_ptr + row * stride_row + offs * stride_cand, mask=alive, other=float("-inf"))
    score = tl.where(score == score, score, float("-inf"))
    # Token ids fit int32 (the selection kernel writes them so): half the registers of int64.
    ids = tl.load(index_ptr + row * stride_row + offs * stride_cand, mask=alive, other=0).to(tl.int32)
    for rank in tl.static_range(OUT_K):
        live = tl.where(alive, score, float("-inf"))
        best = tl.max(live, axis=0)
        position = tl.min(tl.where(alive & (live == best), offs, BLOCK_N), axis=0)
        token = tl.sum(tl.where(offs == position, ids, 0), axis=0)
        tl.store(out_ptr + pid * OUT_K + rank, token.to(tl.int64))
        alive = alive & (offs != position)


# ============================================================================================
# Pass 2: from per-block candidates to tokens
# ============================================================================================
# Widest top-k the kernel extracts per tile (one max-and-mask sweep of the tile per rank); wider
# requests write float32 logits, a chunk of rows at a time, and rank them in torch.
MAX_KERNEL_TOP_K = 16


@dataclass
class TokenCandidates:
    """Each row's best k tokens within each vocabulary block, best first: what pass 1 leaves.

    score: (R, n_blocks, k) float32; index: (R, n_blocks, k) int32 or int64 token ids. Within a block,
    equal scores come in id order, and blocks come in id order, so flattened positions keep id order
    among equal scores: ranking positions with ties to the smaller position ranks ids the same way.
    The reference path has one block (n_blocks = 1). One kernel launch can serve both a verifier's
    argmax and a drafter's top-k of the same rows (`linear_candidates`)."""

    score: torch.Tensor
    index: torch.Tensor

    def __post_init__(self):
        # The merge kernels read both by one shape: a mismatch would read past a tensor, silently.
        for name, value in (("score", self.score), ("index", self.index)):
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"TokenCandidates: {name} must be a (rows, n_blocks, k) tensor, got {got}")
        if self.score.shape != self.index.shape or self.score.device != self.index.device:
            raise ValueError(f"TokenCandidates: score {tuple(self.score.shape)} on {self.score.device} and index "
                             f"{tuple(self.index.shape)} on {self.index.device} must match")
        if self.score.dtype != torch.float32 or self.index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TokenCandidates: score must be float32 and index int32/int64, got {self.score.dtype} "
                             f"and {self.index.dtype}")

    def argmax(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The best token of every row, or of rows `rows` (int64 row ids, any shape): int64 of shape
        (R,) or rows.shape. Ties go to the smallest id (torch.argmax's rule: the first block
        holding the row maximum)."""
        self._check_rows(rows)
        if _merge_on_device(self.score):
            return _merge_triton(self.score, self.index, rows, 1, first_only=True).view(_out_shape(self, rows))
        score, index = self._rows(rows)
        best_block = torch.argmax(score[:, :, 0], dim=1, keepdim=True)
        return index[:, :, 0].gather(1, best_block).squeeze(1).to(torch.int64).view(_out_shape(self, rows))

    def topk(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The k best tokens of every row, or of rows `rows` (int64 row ids, any shape), best first,
        ties to the smallest id: int64 of shape (R, k) or (*rows.shape, k); k <= the candidates kept
        per block."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.score.shape[2]:
            raise ValueError(f"TokenCandidates.topk: k must be an int in [1, {self.score.shape[2]}] (the "
                             f"candidates kept per block), got {k!r}")
        self._check_rows(rows)
        shape = (*_out_shape(self, rows), k)
        if _merge_on_device(self.score):
            return _merge_triton(self.score, self.index, rows, k, first_only=False).view(shape)
        score, index = self._rows(rows)
        R, n_blocks, kept = score.shape
        positions = reference.top_k_positions(score.reshape(R, n_blocks * kept), k)
        return index.reshape(R, n_blocks * kept).gather(1, positions).to(torch.int64).view(shape)

    def _rows(self, rows):
        if rows is None:
            return self.score, self.index
        flat = rows.reshape(-1)
        return self.score[flat], self.index[flat]

    def _check_rows(self, rows) -> None:
        """Row ids must be integers in [0, R): checked on the host for CPU tensors (reading a CUDA
        tensor's values would synchronize; the Generator builds its ids in range)."""
        if rows is None:
            return
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TokenCandidates: rows must be an int32/int64 tensor of row ids, got "
                             f"{rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__}")
        R = self.score.shape[0]
        if rows.device.type == "cpu" and rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < R):
            raise ValueError(f"TokenCandidates: row ids must be in [0, {R}), got {int(rows.min())}..{int(rows.max())}")


def _out_shape(candidates: TokenCandidates, rows) -> tuple:
    return (candidates.score.shape[0],) if rows is None else tuple(rows.shape)


# Candidates per row up to which one program of the merge kernel holds a row: at 16 warps, 16 of
# each per thread (compiled for sm_90: no spills with Triton 3.9, 8 bytes with 3.6 at 16 ranks;
# 16384 candidates spilled 264 bytes). Llama 3's vocabulary keeps 8 ranks per block in it (8016);
# wider rows take the torch route.
MAX_MERGE_CANDIDATES = 8192


def _merge_on_device(score: torch.Tensor) -> bool:
    """Pass 2 in the merge kernel: Triton candidates of a size one program holds."""
    return use_triton(score) and score.shape[1] * score.shape[2] <= MAX_MERGE_CANDIDATES and score.shape[0] > 0


@eager_under_compile
def _merge_triton(score: torch.Tensor, index: torch.Tensor, rows, k: int, first_only: bool) -> torch.Tensor:
    """(n_rows, k) int64 from candidates score / index (R, n_blocks, kept), both contiguous as pass
    1 writes them: the k best of each row in `rows` (all rows when None; any layout, a view's ids
    read at their stride); first_only: each block's best alone (an argmax needs no more)."""
    R, n_blocks, kept = score.shape
    score, index = score.contiguous(), index.contiguous()
    row_ids = None if rows is None else rows.reshape(-1)   # a 1-D view keeps its stride, maybe 0
    n_rows = R if row_ids is None else row_ids.numel()
    out = torch.empty((n_rows, k), dtype=torch.int64, device=score.device)
    if n_rows == 0:
        return out
    n = n_blocks if first_only else n_blocks * kept
    block_n = triton.next_power_of_2(n)
    num_warps = 1 if not gpu_launch(score.device) else max(1, min(16, block_n // 512))
    _merge_candidates_kernel[(n_rows,)](
        score, index, out if row_ids is None else row_ids, out, n, n_blocks * kept, kept if first_only else 1,
        0 if row_ids is None else row_ids.stride(0), HAS_ROWS=row_ids is not None, OUT_K=k, BLOCK_N=block_n,
        num_warps=num_warps)
    return out


def _reference_candidates(logit_chunks, R: int, top_k: int, device: torch.device) -> TokenCandidates:
    """One block per row: the top_k of float32 logits given as (row slice, logits) chunks."""
    score = torch.empty((R, 1, top_k), dtype=torch.float32, device=device)
    index = torch.empty((R, 1, top_k), dtype=torch.int64, device=device)
    for rows, logits in logit_chunks:
        ids = reference.top_k_positions(logits, top_k)
        index[rows, 0] = ids
        score[rows, 0] = logits.gather(1, ids)
    return TokenCandidates(score, index)


# ============================================================================================
# Host launchers
# ============================================================================================
def _launch_config(R: int, dtype: torch.dtype, device: torch.device, sample: bool = False,
                   logits: bool = False) -> dict:
    """Tile sizes and warps (logits: for the kernel that writes them out). tl.dot needs every tile
    dim >= 16, so one row still uses BLOCK_R = 16: the extra rows are free while the weight read is
    the cost (R small, memory bound)."""
    if not gpu_launch(device):
        # numpy runs one program at a time: few, moderately sized tiles.
        return dict(BLOCK_R=16, BLOCK_V=64, BLOCK_D=32, num_warps=1, num_stages=1)
    if R <= 16:
        cfg = dict(BLOCK_R=16, BLOCK_V=128, BLOCK_D=128, num_warps=4, num_stages=4)
    elif R <= 64:
        cfg = dict(BLOCK_R=triton.next_power_of_2(R), BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4)
    else:
        # Many rows: the GEMM becomes compute bound; larger square-ish tiles reuse each load more.
        # Stored straight from the accumulator, a 128-wide logits tile at 8 warps made ptxas serialize
        # the kernel's wgmma instructions (C7515, sm_90 with Triton 3.6); 64 wide it does not.
        cfg = dict(BLOCK_R=128, BLOCK_V=64 if logits else 128, BLOCK_D=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        # 4-byte tiles: a quarter of the D step keeps the pipelined tiles inside shared memory.
        cfg.update(BLOCK_D=32, num_stages=2)
    # The Philox noise, or float32 operands (an "ieee" dot runs on FMAs, its operand tiles in
    # registers), need registers next to the float32 tile: at 64 tile elements per thread the
    # sm_90 compile hits 255 registers and spills (benchmarks/compile_check.py); 32 fit.
    while (sample or dtype == torch.float32) and cfg["BLOCK_R"] * cfg["BLOCK_V"] > 32 * 32 * cfg["num_warps"]:
        if cfg["num_warps"] < 8:
            cfg["num_warps"] *= 2
        else:
            cfg["BLOCK_V"] //= 2
    return cfg


@dataclass(frozen=True)
class SelectTile:
    """One tile config of the selection kernel (a LaunchTuner candidate)."""

    block_r: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int

    def config(self) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_V=self.block_v, BLOCK_D=self.block_d, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def label(self) -> str:
        return f"{self.block_r}x{self.block_v}x{self.block_d} w{self.num_warps} s{self.num_stages}"


# Past 64 rows a greedy selection turns compute bound (a verify step's head 0 at batch 8 and more, or
# every head of a one-read verify step), and which tile runs fastest is the GPU's to say: these are
# timed against `_launch_config`'s at the first call of a shape (`_SELECT_TUNER`). Wider tiles reuse
# each loaded tile more; all compile for sm_90 without spills (benchmarks/compile_check.py).
_GPU_MANY_ROW_TILES = (SelectTile(128, 256, 64, 8, 3), SelectTile(64, 256, 64, 4, 4),
                       SelectTile(128, 128, 64, 8, 4), SelectTile(128, 64, 64, 4, 4))
_SELECT_TUNER = LaunchTuner("linear_select")


def select_tiles(R: int, dtype: torch.dtype, device: torch.device) -> list:
    """The tiles a greedy selection over R rows may run: `_launch_config`'s first (the fallback),
    then, past 64 rows on a GPU in fp16/bf16, `_GPU_MANY_ROW_TILES`."""
    base = SelectTile(*(_launch_config(R, dtype, device)[name] for name in
                        ("BLOCK_R", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")))
    if R <= 64 or not gpu_launch(device) or dtype not in (torch.float16, torch.bfloat16):
        return [base]
    return [base] + [tile for tile in _GPU_MANY_ROW_TILES if tile != base]


def _select_tile(hidden: torch.Tensor, weight: torch.Tensor, top_k: int) -> SelectTile:
    """The tuned tile for a greedy selection of hidden's rows (tuned now on a first CUDA call
    outside a graph capture; `select_tiles`' first otherwise)."""
    R, D = hidden.shape
    tiles = select_tiles(R, hidden.dtype, hidden.device)
    if len(tiles) == 1:
        return tiles[0]
    key = (str(hidden.device), hidden.dtype, min(triton.next_power_of_2(R), 4096), weight.shape[0], D, top_k)
    return _SELECT_TUNER.choose(key, hidden.device, lambda: tune_select(key, hidden, weight, top_k, tiles),
                                lambda: tiles[0])


def tune_select(key, hidden: torch.Tensor, weight: torch.Tensor, top_k: int, tiles: list, timer=None,
                l2_bytes: int | None = None) -> dict:
    """Time a greedy selection of hidden's rows with every tile and keep the fastest under `key`
    (LaunchTuner.tune, timer included); each timed call reads the next of a few weight copies
    (`rotating_copies`), as a step reads the unembedding from memory. A tile whose top_k tokens'
    logits are not the top_k logits (`_selects_the_best`) is left out."""
    next_weight = rotating_copies(weight, l2_bytes)

    def probe(tile):
        return TokenCandidates(*_select_launch(hidden, next_weight(), 0.0, None, top_k, tile)).topk(top_k)
    return _SELECT_TUNER.tune(key, tiles, lambda tile: _select_launch(hidden, next_weight(), 0.0, None, top_k, tile),
                              timer, _selects_the_best(hidden, weight, top_k), probe)


def _token_logits(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits (R, k) of hidden (R, D) for tokens (R, k) of weight (V, D), NaN as -inf (the
    kernels' rule)."""
    return torch.einsum("rd,rkd->rk", hidden.float(), weight[tokens].float()).nan_to_num(nan=float("-inf"))


def _selects_the_best(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, rtol: float = 1e-3, rows: int = 256):
    """A selection tuner's `agrees`: whether tokens (R, top_k) have the top_k logits of their rows,
    best first, in float32 from the same inputs within rtol (so a tie may go either way, a wrong
    token may not: the kernel's float32 sums differ from these by summation order only). `rows`
    rows at a time."""
    starts = range(0, hidden.shape[0], rows)
    want = [torch.topk(reference._float32_logits(hidden[r:r + rows], weight).nan_to_num(nan=float("-inf")), top_k,
                       dim=1).values for r in starts]

    def agrees(tokens: torch.Tensor) -> bool:
        if not bool(((tokens >= 0) & (tokens < weight.shape[0])).all()):   # garbage ids: no lookup with them
            return False
        for r, best in zip(starts, want):
            got = _token_logits(hidden[r:r + rows], weight, tokens[r:r + rows])
            if not bool(((got - best).abs() <= rtol * (1 + best.abs())).logical_or(got == best).all()):
                return False
        return True
    return agrees


def _vocab_grid(n_vocab_blocks: int) -> int:
    if n_vocab_blocks > 65535:   # CUDA's limit on grid axis 1
        raise ValueError(f"linear selection: {n_vocab_blocks} vocabulary blocks exceed the 65535 a launch can "
                         "take on grid axis 1 (vocabulary too large for these tiles)")
    return n_vocab_blocks


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a head's slice of (B, T, n_heads, D) hidden states); elements may not.
    return x if x.stride(-1) == 1 else x.contiguous()


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One int64 Philox seed on `device`, drawn from `generator` on its own device (None: the
    global RNG of `device`). Stays on the device: the kernel loads it, the host never reads it."""
    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=seed_device, dtype=torch.int64)
    return seed.to(device)


@eager_under_compile
def linear_select_partials_triton(hidden: torch.Tensor, weight: torch.Tensor, temperature,
                                  keys: tuple | None, top_k: int = 1):
    """Pass 1: each row's top_k scores within each vocab block. hidden: (R, D), weight: (V, D), same
    float dtype; scores are the logits (temperature == 0, keys None) or logits / temperature + Gumbel
    noise keyed by keys = (seeds (R,), offsets (R,)) int64 on hidden's device.
    Returns (score (R, n_vocab_blocks, top_k) float32, index (R, n_vocab_blocks, top_k) int32)."""
    hidden, weight = _unit_stride_rows(hidden), _unit_stride_rows(weight)
    sample = isinstance(temperature, torch.Tensor) or temperature > 0
    tile = None if sample else _select_tile(hidden, weight, top_k)
    return _select_launch(hidden, weight, temperature, keys, top_k, tile)


def _select_launch(hidden, weight, temperature, keys: tuple | None, top_k: int, tile: SelectTile | None):
    """One launch of the selection kernel with `tile` (None: `_launch_config`'s). temperature: a
    float (0: greedy) or (R,) float32 per row on the device (0: that row greedy)."""
    R, D = hidden.shape
    V = weight.shape[0]
    row_temperature = isinstance(temperature, torch.Tensor)
    sample = row_temperature or temperature > 0
    # Up to 16 ranks add no spills at any of these tiles on sm_90 in bf16/fp16 (compile_check:
    # 106-254 registers, the most at 256 wide); float32 at 8 warps spills 8 bytes.
    cfg = _launch_config(R, hidden.dtype, hidden.device, sample) if tile is None else tile.config()
    n_vocab_blocks = triton.cdiv(V, cfg["BLOCK_V"])
    best_score = torch.empty((R, n_vocab_blocks, top_k), dtype=torch.float32, device=hidden.device)
    best_index = torch.empty((R, n_vocab_blocks, top_k), dtype=torch.int32, device=hidden.device)
    # Unused pointers when greedy. An expanded seed (a generator's one per call) has stride 0.
    seeds, offsets = keys if sample else (best_index.view(-1), best_index.view(-1))
    # Per-row temperatures are read by the kernel (float32: a no-op for the Generator's) at their
    # stride: a batch of one repeats its temperature for each tree node as a stride-0 view. A
    # scalar one is a launch argument, its inverse.
    temperatures = temperature.float() if row_temperature else best_score.view(-1)   # an unused pointer
    grid = (triton.cdiv(R, cfg["BLOCK_R"]), _vocab_grid(n_vocab_blocks))
    _linear_select_partial_kernel[grid](
        hidden, weight, seeds, offsets, temperatures, best_score, best_index,
        R, V, D, hidden.stride(0), weight.stride(0), seeds.stride(0), offsets.stride(0), temperatures.stride(0),
        n_vocab_blocks,
        1.0 / temperature if sample and not row_temperature else 1.0,
        SAMPLE=sample, ROW_TEMPERATURE=row_temperature, TOP_K=top_k, **cfg)
    return best_score, best_index


@eager_under_compile
def linear_select_triton(hidden: torch.Tensor, weight: torch.Tensor, temperature,
                         keys: tuple | None) -> torch.Tensor:
    """argmax_v of hidden @ weight.T (temperature == 0) or of logits / temperature + Gumbel noise
    keyed by keys = (seeds (R,), offsets (R,)). hidden: (R, D), weight: (V, D), same float dtype.
    Returns (R,) int64."""
    return TokenCandidates(*linear_select_partials_triton(hidden, weight, temperature, keys)).argmax()


@eager_under_compile
def linear_logits_triton(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 (R, V) logits hidden @ weight.T (float32 accumulation). For the top-p fallback."""
    hidden, weight = _unit_stride_rows(hidden), _unit_stride_rows(weight)
    R, D = hidden.shape
    V = weight.shape[0]
    cfg = _launch_config(R, hidden.dtype, hidden.device, logits=True)
    logits = torch.empty((R, V), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]), _vocab_grid(triton.cdiv(V, cfg["BLOCK_V"])))
    _linear_logits_kernel[grid](hidden, weight, logits, R, V, D, hidden.stride(0), weight.stride(0),
                                logits.stride(0), **cfg)
    return logits


@eager_under_compile
def _sample_filtered_triton(hidden, weight, temperature, top_p, top_k, max_top_k, min_p, seeds, offsets,
                            penalties) -> torch.Tensor:
    # Chunks of rows bound the float32 logits to the reference's budget (64 MiB).
    tokens = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    rows_per_chunk = max(1, reference._LOGIT_ELEMENTS_PER_CHUNK // weight.shape[0])
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits = linear_logits_triton(hidden[rows], weight)
        if penalties is not None:
            logits = penalties.apply_(logits, rows)
        tokens[rows] = reference.sample_logits(logits, reference.row_values(temperature, rows),
                                               reference.row_values(top_p, rows), seeds[rows], offsets[rows],
                                               reference.row_values(top_k, rows), max_top_k,
                                               reference.row_values(min_p, rows))
    return tokens


# ============================================================================================
# Public functions
# ============================================================================================
def _check_linear_inputs(name: str, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    for arg, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: {arg} dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden (R, D) = {tuple(hidden.shape)} and weight (V, D) = "
                         f"{tuple(weight.shape)} disagree on D")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight has no rows (V = 0): there is no token to pick")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    check_one_device(name, hidden=hidden, weight=weight)


def check_sampling_args(temperature, top_p, prefix: str = "") -> None:
    """ValueError (message after `prefix`) unless temperature is 0 or in [MIN_TEMPERATURE, inf) and
    0 < top_p <= 1, both finite real numbers (numpy's too). The generator's and linear_sample's rule."""
    if not finite_number(temperature) or temperature < 0:
        raise ValueError(f"{prefix}temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"{prefix}temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} "
                         f"(1 / temperature must be finite in float32), got {temperature}")
    if not finite_number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"{prefix}top_p must be a number in (0, 1], got {top_p!r}")


def check_top_k(top_k, prefix: str = "") -> None:
    """ValueError (message after `prefix`) unless top_k is an int >= 0 (numpy's too; 0 keeps every
    token, as does any k >= V). The generator's and linear_sample's rule."""
    if not integer(top_k) or top_k < 0:
        raise ValueError(f"{prefix}top_k must be an int >= 0 (0 = no cut), got {top_k!r}")


def check_min_p(min_p, prefix: str = "") -> None:
    """ValueError (message after `prefix`) unless min_p is a number in [0, 1] (0 keeps every token, 1
    the most likely ones alone). The generator's and linear_sample's rule."""
    if not finite_number(min_p) or not 0.0 <= min_p <= 1.0:
        raise ValueError(f"{prefix}min_p must be a number in [0, 1] (0 = no cut), got {min_p!r}")


def _sampling_keys(R: int, device: torch.device, generator, seeds, offsets, sample: bool) -> tuple | None:
    """linear_sample's noise keys, (seeds (R,), offsets (R,)) int64 on `device`: the caller's, checked,
    or, from a generator (None: the global RNG), one seed drawn on the device (no host sync) for
    every row and the row index as offset. None when not `sample` (greedy: checked, nothing drawn)."""
    if seeds is None and offsets is None:
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError("linear_sample: generator must be a torch.Generator or None, "
                                 f"got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise ValueError(f"linear_sample: generator is on {generator.device} but hidden is on {device}")
        return (_draw_seed(generator, device).expand(R), torch.arange(R, device=device)) if sample else None
    if seeds is None or offsets is None:
        raise ValueError("linear_sample: seeds and offsets go together (one per row), got only "
                         + ("seeds" if offsets is None else "offsets"))
    if generator is not None:
        raise ValueError("linear_sample: pass a generator or seeds and offsets, not both")
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (R,):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"linear_sample: {name} must be an int64 tensor of shape ({R},), one per row, got {got}")
        if t.device != device:
            raise ValueError(f"linear_sample: {name} is on {t.device} but hidden is on {device}")
    return (seeds, offsets) if sample else None


# The reference's noise runs in numpy on the CPU and counts its candidates on the host: its own eager
# call under torch.compile (Dynamo would trace numpy's uint64 into torch ops that lack it).
_reference_sample = eager_under_compile(reference.linear_sample)


def linear_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Greedy token per row without materializing logits.

    hidden: (R, D) float32/float16/bfloat16; weight: (V, D) same dtype and device.
    Returns (R,) int64: argmax_v of hidden @ weight.T accumulated in float32; ties -> smallest id.
    """
    _check_linear_inputs("linear_argmax", hidden, weight)
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=hidden.device)
    if not use_triton(hidden, weight):
        return reference.linear_argmax(hidden, weight)
    return linear_select_triton(hidden, weight, 0.0, None)


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_row_values(name: str, values: torch.Tensor, R: int, device: torch.device) -> None:
    """A per-row temperature, top_p or min_p (a floating (R,) tensor), or top_k (an integer one), on
    `device`, its values by check_sampling_args', check_min_p's or check_top_k's rule, read where
    they are on the CPU. On a GPU they are not read back (that would be a host sync in every step, and impossible
    inside a CUDA-graph capture): the caller checks them (the Generator checks its lists before they
    go to the device)."""
    kinds = _INTEGER_DTYPES if name == "top_k" else _FLOAT_DTYPES + (torch.float64,)
    if values.dtype not in kinds or values.shape != (R,):
        kind = "integer" if name == "top_k" else "floating"
        raise ValueError(f"linear_sample: {name} as a tensor must be {kind}, shape ({R},), one per row, got "
                         f"{values.dtype} {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"linear_sample: {name} is on {values.device} but hidden is on {device}")
    if values.device.type != "cpu":
        return
    for row, value in enumerate(values.tolist()):
        prefix = f"linear_sample: row {row}: "
        if name == "top_k":
            check_top_k(value, prefix)
        elif name == "min_p":
            check_min_p(value, prefix)
        else:
            check_sampling_args(*((value, 1.0) if name == "temperature" else (1.0, value)), prefix)


def linear_sample(hidden: torch.Tensor, weight: torch.Tensor, *, temperature, top_p=1.0, top_k=0,
                  generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                  offsets: torch.Tensor | None = None, max_top_k: int | None = None, min_p=0.0,
                  penalties: TokenPenalties | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(hidden @ weight.T / temperature), restricted to the
    top_k highest logits and to the tokens at least min_p times as likely as the most likely one,
    then to the top-p nucleus of what they keep (the Llama release's rule, `reference.nucleus`: a
    token is dropped when the mass sorted before it exceeds top_p), by Gumbel-max with
    counter-based (Philox) noise.

    hidden: (R, D) float32/float16/bfloat16; weight: (V, D) same dtype and device.
    temperature: >= 0, a number (0 -> `linear_argmax`) or an (R,) floating tensor on hidden's device,
    one per row (a row at 0 picks greedily). top_p in (0, 1] and top_k >= 0 (0, or V and more, keep
    every token) and min_p in [0, 1] (0 keeps every token): numbers, 1, 0 and 0 -> Gumbel-max in the
    kernel (no logits written), otherwise float32 logits for a chunk of rows at a time, the cuts and
    nucleus in torch (`reference.sample_logits`); or (R,) tensors, one per row (floating top_p and
    min_p, integer top_k), which always take that path (a row at 1, 0 and 0 keeps every token).
    The cut keeps the tokens scoring at least the k-th highest (ties with it too, as Hugging Face's
    and vLLM's do). max_top_k: None, or with a top_k tensor an int >= 1 that no row's top_k below V
    exceeds, known on the host: the k-th score then comes from torch.topk of that many instead of
    a sort of every row (the Generator passes its calls' largest top_k).
    Per-row values are checked where they are on the CPU; on a GPU they are the caller's to check
    (no host sync).
    penalties: None, or a `TokenPenalties` for the R rows (repetition, presence and frequency
    penalties against each row's sequence history, kernels/penalties.py): applied to the float32
    logits before the temperature, so the call takes the logits path; greedy rows (temperature 0,
    also a number) then pick the argmax of the penalized logits.
    The noise, one of:
      seeds, offsets: (R,) int64 on hidden's device. Row r's noise is a function of (seeds[r],
        offsets[r]) alone: a row draws the same token whatever rows share the call, so a sequence
        with its own seed and its position as offset has its own reproducible stream.
      generator: a torch.Generator on hidden's device type, or None for the global RNG: one seed
        drawn from it for the call (on the device, no host sync), offsets the row indices; the same
        generator state gives the same tokens.
    The reference path (CPU) draws the kernel's uniforms bit for bit: the same tokens up to ties
    within rounding. Returns (R,) int64.
    """
    _check_linear_inputs("linear_sample", hidden, weight)
    R = hidden.shape[0]
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p)):
        if isinstance(value, torch.Tensor):
            _check_row_values(name, value, R, hidden.device)
    check_sampling_args(0.0 if isinstance(temperature, torch.Tensor) else temperature,
                        1.0 if isinstance(top_p, torch.Tensor) else top_p, "linear_sample: ")
    if not isinstance(top_k, torch.Tensor):
        check_top_k(top_k, "linear_sample: ")
    if not isinstance(min_p, torch.Tensor):
        check_min_p(min_p, "linear_sample: ")
    if max_top_k is not None:
        if not integer(max_top_k) or max_top_k < 1:
            raise ValueError(f"linear_sample: max_top_k must be None or an int >= 1, got {max_top_k!r}")
        if isinstance(top_k, torch.Tensor) and top_k.device.type == "cpu" and R > 0:
            over = (top_k > max_top_k) & (top_k < weight.shape[0])
            if bool(over.any()):
                row = int(over.nonzero()[0, 0])
                raise ValueError(f"linear_sample: row {row}: top_k {int(top_k[row])} is above max_top_k {max_top_k}")
    if penalties is not None:
        if not isinstance(penalties, TokenPenalties):
            raise ValueError(f"linear_sample: penalties must be a TokenPenalties or None, got {type(penalties).__name__}")
        penalties.check(R, weight.shape[0], hidden.device, "linear_sample")
    greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    # No rows: nothing drawn (a generator's state stays as it was), the arguments still checked.
    sample = not greedy and R > 0
    keys = _sampling_keys(R, hidden.device, generator, seeds, offsets, sample=sample)
    if greedy and penalties is not None and R > 0:
        # The argmax of the penalized logits: the logits path, where a temperature of 0 draws no noise
        # (the keys are placeholders).
        zeros = torch.zeros(R, dtype=torch.int64, device=hidden.device)
        keys, sample = (zeros, zeros), True
    elif greedy:
        return linear_argmax(hidden, weight)
    if not sample:
        return torch.empty(0, dtype=torch.int64, device=hidden.device)
    seeds, offsets = keys
    if not isinstance(temperature, torch.Tensor):
        temperature = float(temperature)
    if not isinstance(top_p, torch.Tensor):
        top_p = float(top_p)
    if not isinstance(top_k, torch.Tensor):
        top_k = int(top_k)
    if not isinstance(min_p, torch.Tensor):
        min_p = float(min_p)
    if not use_triton(hidden, weight):
        return _reference_sample(hidden, weight, temperature=temperature, top_p=top_p, top_k=top_k, seeds=seeds,
                                 offsets=offsets, max_top_k=max_top_k, min_p=min_p, penalties=penalties)
    if penalties is not None or reference.filters_rows(top_p, top_k, weight.shape[0], min_p) is not None:
        return _sample_filtered_triton(hidden, weight, temperature, top_p, top_k, max_top_k, min_p, seeds, offsets,
                                       penalties)
    return linear_select_triton(hidden, weight, temperature, (seeds, offsets))


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits hidden @ weight.T, accumulated in float32 as the selection kernels score: for
    log-probabilities, which logits rounded to a 16-bit model's dtype would shift (or overflow in
    fp16, where the selection does not).

    hidden: (R, D) float32/float16/bfloat16; weight: (V, D) same dtype and device. Returns (R, V)
    float32; mind its size (the selection functions never write it). Inference only: the kernel has
    no backward, so a call that autograd would differentiate is refused on every device (a training
    loss is `fused_linear_cross_entropy`'s work)."""
    _check_linear_inputs("linear_logits", hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("linear_logits has no backward (it scores for log-probs at inference): call it under "
                         "torch.no_grad(), or use fused_linear_cross_entropy for a loss, hidden @ weight.T for "
                         "differentiable logits")
    if hidden.shape[0] == 0 or not use_triton(hidden, weight):
        return reference._float32_logits(hidden, weight)
    return linear_logits_triton(hidden, weight)


def _check_top_k(name: str, k, V: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"{name}: k must be an int in [1, V = {V}], got {k!r}")


def linear_candidates(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> TokenCandidates:
    """Per-block top-k candidates of hidden @ weight.T (float32 accumulation) without writing the
    (R, V) logits: one read of the weight answers both `.argmax()` (equal to `linear_argmax`) and
    `.topk(j)` for any j <= k (equal to `linear_topk`), for all rows or a subset (`rows=`).

    hidden: (R, D) float32/float16/bfloat16; weight: (V, D) same dtype and device; 1 <= k <= V."""
    _check_linear_inputs("linear_candidates", hidden, weight)
    _check_top_k("linear_candidates", k, weight.shape[0])
    R = hidden.shape[0]
    if R == 0 or not use_triton(hidden, weight):   # no rows: the reference's empty loop
        return _reference_candidates(reference._float32_logit_chunks(hidden, weight), R, k, hidden.device)
    if k <= MAX_KERNEL_TOP_K:
        return TokenCandidates(*linear_select_partials_triton(hidden, weight, 0.0, None, top_k=k))
    rows_per_chunk = max(1, reference._LOGIT_ELEMENTS_PER_CHUNK // weight.shape[0])
    chunks = ((slice(start, start + rows_per_chunk), linear_logits_triton(hidden[start:start + rows_per_chunk], weight))
              for start in range(0, R, rows_per_chunk))
    return _reference_candidates(chunks, R, k, hidden.device)


def linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely tokens per row without materializing logits (a drafter's candidates).

    hidden: (R, D) float32/float16/bfloat16; weight: (V, D) same dtype and device; 1 <= k <= V.
    Returns (R, k) int64: the ids of the k largest logits hidden @ weight.T (float32 accumulation),
    best first; equal logits go to the smaller id. k == 1 gives `linear_argmax`'s token."""
    _check_linear_inputs("linear_topk", hidden, weight)
    _check_top_k("linear_topk", k, weight.shape[0])
    if hidden.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.int64, device=hidden.device)
    if not use_triton(hidden, weight):
        return reference.linear_topk(hidden, weight, k)
    return linear_candidates(hidden, weight, k).topk(k)
