"""Vocabulary-parallel fused n-head linear + cross-entropy: the unembedding sharded by rows over ranks.

Rank r of a process group holds rows [start_r, start_r + V_r) of the (V, D) unembedding (Meta's
ColumnParallelLinear `output`, in rank order; shard sizes may differ, e.g. an uneven last shard).
`hidden` and `targets` are the same on every rank. Per chunk of rows (scratch bounded like
linear_ce_driver.py):

    logits_r = H_c @ W_r^T                              (GEMM, local vocabulary only)
    stats_r  = (lse_r, sum_r s, s_t if t is local)      (Triton stats kernel, per row)
    all_gather(stats) -> lse = logsumexp_r lse_r, sum s, s_t      (one small collective: 3 floats per row per rank)
    dz_r     = row_scale * (p (1 + 2 z_loss lse) - (1 - eps)[j = t] - eps / V) * softcap'   (Triton grad kernel, in place)
    dH_c    += dz_r @ W_r    (partial over the vocabulary)      dW_r += dz_r^T @ H_c   (this rank's rows: complete)

and after the last chunk one all-reduce sums the partial dH over ranks (in the compute dtype, as
Megatron does: a 16-bit dH is rounded once more per rank than in one process, within the tests'
tolerance; float32 partials would double the traffic). No rank ever holds logits
outside its own vocabulary slice, and the backward needs no gathered logits. The loss per row is
lse - (1 - eps) s_t - eps * (sum s) / V + z_loss lse^2 with s = softcap * tanh(z / softcap) (or s = z;
the eps term only where eps > 0, so a -inf score of a 16-bit logit cannot make it NaN), the same as
the single-process kernel (fused_linear_ce.py), so the results agree to rounding.

The gathered statistics are combined with a log-sum-exp rather than an all-reduce of (max, sum-exp)
so that one collective per chunk suffices (an all-reduce would need a MAX and then a SUM).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from .triton_import import tl, triton

from . import reference
from .backend import interpreting, refuse_double_backward, use_triton
from .fused_linear_ce import _grad_factors, _online_lse, _softcapped, _write_grad_row
from .linear_ce_driver import (DEFAULT_SCRATCH_BYTES, CEOptions, accumulate_dw, autocast_dtype, autocast_off,
                               cast_grad, ce_options, check_head_count, check_inputs, flatten_rows, head_factors,
                               per_head_losses, reduce_rows, rows_per_chunk, scale_forward_grads, scratch_budget,
                               to_compute_dtype)

# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _vp_stats_kernel(
    logits_ptr, stride_row, targets_ptr, stats_ptr, R,
    V_local, vocab_start, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of a local logits chunk -> stats[0, row] = log-sum-exp over the local vocabulary,
    stats[1, row] = sum of s over it, stats[2, row] = s at the target if this rank owns it, else 0."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    local_t = target - vocab_start
    offs = tl.arange(0, BLOCK_V)

    lse = 0.0
    s_total = 0.0
    s_t = 0.0
    if target != ignore_index:
        lse, s_total = _online_lse(row_ptr, V_local, offs, softcap, HAS_SOFTCAP, BLOCK_V)
        if (local_t >= 0) & (local_t < V_local):
            s_t = _softcapped(tl.load(row_ptr + local_t).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(stats_ptr + row, lse)
    tl.store(stats_ptr + R + row, s_total)
    tl.store(stats_ptr + 2 * R + row, s_t)


@triton.jit
def _vp_grad_kernel(
    logits_ptr, stride_row, targets_ptr, lse_ptr, scale_ptr,
    V_local, vocab_start, vocab_size, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: overwrite the local logits with d(total)/d(logits), given the global lse."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    local_t = target - vocab_start
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        for start in range(0, V_local, BLOCK_V):
            cols = start + offs
            tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), tl.float32).to(logits_ptr.dtype.element_ty),
                     mask=cols < V_local)
    else:
        lse = tl.load(lse_ptr + row)
        # eps is spread over the whole vocabulary, not this rank's part
        p_factor, smooth, hit = _grad_factors(tl.load(scale_ptr + row), lse, label_smoothing, z_loss, vocab_size)
        # local_t outside [0, V_local): the target lives on another rank, no hit here.
        _write_grad_row(row_ptr, V_local, offs, local_t, lse, p_factor, smooth, hit, softcap, HAS_SOFTCAP, BLOCK_V)


def _block_v(V_local: int):
    if interpreting():
        return 64, 1
    return min(triton.next_power_of_2(V_local), 4096), 16


def vp_chunk_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, stats_out: torch.Tensor,
                   opts: CEOptions) -> None:
    """Launcher; same contract as `reference.vp_chunk_stats`. logits: (R, V_local), unit column stride;
    targets: (R,) int64 global token ids; stats_out: (3, R) float32 contiguous, written."""
    R, V_local = logits.shape
    if R == 0:
        return
    block_v, num_warps = _block_v(V_local)
    _vp_stats_kernel[(R,)](
        logits, logits.stride(0), targets, stats_out, R, V_local, vocab_start, opts.ignore_index,
        1.0 if opts.softcap is None else opts.softcap,
        HAS_SOFTCAP=opts.softcap is not None, BLOCK_V=block_v, num_warps=num_warps)


def vp_chunk_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int,
                  lse: torch.Tensor, row_scale: torch.Tensor, opts: CEOptions) -> None:
    """Launcher; same contract as `reference.vp_chunk_grad`. Overwrites logits (R, V_local) with the
    gradient; lse: (R,) float32 global log-sum-exp; row_scale: (R,) float32."""
    R, V_local = logits.shape
    if R == 0:
        return
    block_v, num_warps = _block_v(V_local)
    _vp_grad_kernel[(R,)](
        logits, logits.stride(0), targets, lse, row_scale, V_local, vocab_start, vocab_size, opts.ignore_index,
        opts.label_smoothing, opts.z_loss, 1.0 if opts.softcap is None else opts.softcap,
        HAS_SOFTCAP=opts.softcap is not None, BLOCK_V=block_v, num_warps=num_warps)


# ------------------------------------------------------------------------------------ host driver
class _Shard:
    """This rank's place in the vocabulary, agreed by all ranks (see `_agree_on_layout`)."""

    def __init__(self, group, vocab_start: int, vocab_size: int, max_local: int):
        self.group = group
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.max_local = max_local


# dtype codes for the layout all-gather (every rank must compute in one dtype: its chunk sizes and
# collectives follow from it)
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_DTYPE_NAMES = {code: str(t).removeprefix("torch.") for t, code in _DTYPE_CODES.items()}
# The layout all-gather's fields, one int64 each per rank.
_LAYOUT = ("V_local", "rows", "D", "compute_dtype", "accum_dtype", "scratch_bytes", "grad_rows", "grad_weight",
           "target_min", "target_max", "refused")


def _gather_device(group) -> torch.device:
    """Where the layout all-gather's tensor lives: the group backend's device, not the inputs' (a
    rank whose inputs were refused may have none, or a CPU one under NCCL)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_layout(group, mine: dict, refused: Optional[Exception] = None) -> _Shard:
    """One small all-gather per rank of its _LAYOUT fields: the shard offsets (rank order), the global
    V, and checks that every rank runs the same chunks and collectives (rows, D, compute and
    accumulation dtypes, scratch budget, gradients) and that every target id lies in the global
    vocabulary. Every rank sees the same gathered values, so every rank raises the same error, also
    when only one rank's own checks refused its inputs (`refused`: that rank raises its own error;
    the others would otherwise wait in the next collective until the process group's timeout)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = {**mine, "refused": refused is not None}
    row = torch.tensor([int(mine.get(name, 0)) for name in _LAYOUT], dtype=torch.int64, device=_gather_device(group))
    parts = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(parts, row, group=group)
    ranks = [dict(zip(_LAYOUT, part)) for part in torch.stack(parts).tolist()]
    if refused is not None:
        raise refused
    name = "vocabulary-parallel cross-entropy"
    failed = [r for r, got in enumerate(ranks) if got["refused"]]
    if failed:
        raise ValueError(f"{name}: rank(s) {failed} of the group refused their inputs (their error names the problem)")

    def per_rank(*fields):
        return [tuple(got[f] for f in fields) if len(fields) > 1 else got[fields[0]] for got in ranks]
    if len(set(per_rank("rows", "D"))) != 1:
        raise ValueError(f"{name}: hidden must have the same rows and D on every rank, got (rows, D) per rank "
                         f"{per_rank('rows', 'D')}")
    for field, what in (("compute_dtype", "compute in one dtype (autocast included)"),
                        ("accum_dtype", "accumulate dW in one dtype (accum_dtype)")):
        if len(set(per_rank(field))) != 1:
            raise ValueError(f"{name}: every rank must {what}, got "
                             f"{[_DTYPE_NAMES.get(code, 'none') for code in per_rank(field)]} per rank")
    if len(set(per_rank("scratch_bytes"))) != 1:
        raise ValueError(f"{name}: every rank must give the same max_scratch_bytes (it sets the chunks), got "
                         f"{per_rank('scratch_bytes')} per rank")
    if len(set(per_rank("grad_rows", "grad_weight"))) != 1:
        raise ValueError(f"{name}: every rank must ask for the same gradients (hidden and weight requires_grad), "
                         f"got {[tuple(map(bool, g)) for g in per_rank('grad_rows', 'grad_weight')]} per rank")
    local_sizes = per_rank("V_local")
    if min(local_sizes) < 1:
        raise ValueError(f"every rank needs at least one vocabulary row, got weight rows per rank {local_sizes}")
    vocab = sum(local_sizes)
    for r, got in enumerate(ranks):
        if got["target_min"] <= got["target_max"] and (got["target_min"] < 0 or got["target_max"] >= vocab):
            bad = got["target_min"] if got["target_min"] < 0 else got["target_max"]
            raise ValueError(f"targets contain token id {bad} (on rank {r}) outside [0, {vocab}), the global "
                             "vocabulary, that is not ignore_index")
    return _Shard(group, sum(local_sizes[:rank]), vocab, max(local_sizes))


def _combine_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """stats (3, R) local -> (3, R) global: log-sum-exp of the lse's, sum of sum-s, sum of s_t."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(parts, stats, group=group)
    gathered = torch.stack(parts)  # (world, 3, R)
    return torch.stack([torch.logsumexp(gathered[:, 0], dim=0), gathered[:, 1].sum(0), gathered[:, 2].sum(0)])


def vp_linear_ce_chunks(rows, weight, targets, row_scale, opts: CEOptions, shard: _Shard, kernels, *,
                        lse: Optional[torch.Tensor], grad_rows: bool, grad_weight: bool, max_scratch_bytes: int):
    """One pass over all rows with this rank's vocabulary shard.

    rows: (M, D); weight: (V_local, D); targets: (M,) int64 global ids; row_scale: (M,) float32.
    lse: None in a forward (computed here, one all-gather per chunk), or the saved (M,) global lse
    in the backward of reduction "none" (no collective per chunk then).
    Returns (loss (M,) fp32 per-row loss or None when lse was given, lse (M,), dH (M, D) summed over
    ranks or None, dW (V_local, D) or None).
    """
    stats_fn, grad_fn = kernels
    M, D = rows.shape
    compute_grad = grad_rows or grad_weight
    forward = lse is None
    if forward:
        lse = torch.empty(M, dtype=torch.float32, device=rows.device)
        loss = torch.empty(M, dtype=torch.float32, device=rows.device)
    d_rows = torch.empty_like(rows) if grad_rows else None
    d_weight = None
    if M:
        # Same chunk size on every rank (from the largest shard): same number of collectives.
        budget = scratch_budget(max_scratch_bytes, shard.max_local, D, weight.element_size(),
                                wide_dw_sum=grad_weight and opts.dw_cast)
        chunk = rows_per_chunk(M, shard.max_local, weight.element_size(), budget)
        scratch = torch.empty((chunk, weight.shape[0]), dtype=weight.dtype, device=rows.device)
        for start in range(0, M, chunk):
            stop = min(start + chunk, M)
            h, t = rows[start:stop], targets[start:stop]
            logits = torch.mm(h, weight.t(), out=scratch[: stop - start])
            if forward:
                local = torch.empty((3, stop - start), dtype=torch.float32, device=rows.device)
                stats_fn(logits, t, shard.vocab_start, local, opts)
                row_lse, s_sum, s_t = _combine_stats(local, shard.group)
                lse[start:stop] = row_lse
                eps = opts.label_smoothing
                row_loss = row_lse - (1.0 - eps) * s_t + opts.z_loss * row_lse * row_lse
                if eps:
                    row_loss = row_loss - eps * s_sum / shard.vocab_size
                loss[start:stop] = torch.where(t != opts.ignore_index, row_loss, torch.zeros_like(row_loss))
            if compute_grad:
                grad_fn(logits, t, shard.vocab_start, shard.vocab_size, lse[start:stop], row_scale[start:stop], opts)
                if grad_rows:
                    torch.mm(logits, weight, out=d_rows[start:stop])
                if grad_weight:
                    d_weight = accumulate_dw(d_weight, logits.t(), h, weight, opts.accum_dtype, chunk >= M)
    if grad_weight and d_weight is None:
        d_weight = torch.zeros_like(weight)
    if grad_rows and M:
        dist.all_reduce(d_rows, op=dist.ReduceOp.SUM, group=shard.group)  # partial over the vocabulary
    return (loss if forward else None), lse, d_rows, d_weight


def _prepare(hidden, weight, targets, group, ignore_index, reduction, head_weights, label_smoothing, z_loss,
             softcap, grads=(False, False), accum_dtype=None, max_scratch_bytes=0):
    """Validate, agree on the layout, flatten to rows: the single-process checks, with token ids checked
    against the global vocabulary. Every check that one rank alone could fail runs before the layout
    all-gather, and a rank that fails one still joins it, so that every rank raises (_agree_on_layout)."""
    try:
        h3, single = check_inputs(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap, ignore_index,
                                  head_weights, weight_name="weight (this rank's shard)",
                                  op="vocab_parallel_cross_entropy")
        n, N, D = h3.shape
        if head_weights is not None:
            check_head_count(torch.as_tensor(head_weights).numel(), n)
        flat_t = targets.reshape(-1).to(torch.int64)
        counted = flat_t != ignore_index   # their id range, read in one host sync (none: min > max)
        target_min, target_max = torch.stack([torch.where(counted, flat_t, torch.iinfo(torch.int64).max).min(),
                                              torch.where(counted, flat_t, -1).max()]).tolist() \
            if flat_t.numel() else (0, -1)
        compute = autocast_dtype(hidden, weight) or weight.dtype
        accum = weight.dtype if accum_dtype is None else accum_dtype
        mine = {"V_local": weight.shape[0], "rows": n * N, "D": D, "compute_dtype": _DTYPE_CODES.get(compute, 0),
                "accum_dtype": _DTYPE_CODES.get(accum, 0), "scratch_bytes": max_scratch_bytes,
                "grad_rows": grads[0], "grad_weight": grads[1],
                "target_min": target_min, "target_max": target_max}
    except ValueError as error:
        _agree_on_layout(group, {}, refused=error)
    shard = _agree_on_layout(group, mine)
    return flatten_rows(h3, targets, head_weights, None, ignore_index) + (single, shard)


def _forward_pass(hidden, weight, targets, group, ignore_index, reduction, head_weights, label_smoothing, z_loss,
                  softcap, accum_dtype, max_scratch_bytes, kernels, grad_rows, grad_weight):
    rows, flat_t, lam_rows, lam, n, N, single, shard = _prepare(
        hidden, weight, targets, group, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
        grads=(grad_rows, grad_weight), accum_dtype=accum_dtype, max_scratch_bytes=max_scratch_bytes)
    rows, compute_weight, accum = to_compute_dtype(rows, weight, accum_dtype)
    opts = ce_options(ignore_index, label_smoothing, z_loss, softcap, accum, weight.dtype)
    # mean/sum: the gradient factor is known now, so the gradients come out of the same pass.
    eager_grad = reduction != "none"
    scale = head_factors(flat_t, lam, n, N, ignore_index, reduction) if eager_grad else lam_rows
    with autocast_off(rows.device):
        loss_rows, lse, d_rows, d_weight = vp_linear_ce_chunks(
            rows, compute_weight, flat_t, scale, opts, shard, kernels, lse=None, grad_rows=eager_grad and grad_rows,
            grad_weight=eager_grad and grad_weight, max_scratch_bytes=max_scratch_bytes)
    loss = reduce_rows(loss_rows, lam_rows, scale, reduction, n, N, single)
    per_head = per_head_losses(loss_rows, flat_t, n, N, ignore_index, reduction)
    if eager_grad:
        saved = (cast_grad(d_rows, hidden.dtype), cast_grad(d_weight, weight.dtype))
    else:
        saved = (rows, compute_weight, flat_t, lam_rows, lse)
    return loss, per_head, opts, shard, saved


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for hidden (summed over ranks) and for this rank's weight shard."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, ignore_index, reduction, head_weights, label_smoothing,
                z_loss, softcap, accum_dtype, max_scratch_bytes, kernels):
        grad_rows, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, per_head, opts, shard, saved = _forward_pass(
            hidden, weight, targets, group, ignore_index, reduction, head_weights, label_smoothing, z_loss,
            softcap, accum_dtype, max_scratch_bytes, kernels, grad_rows, grad_weight)
        ctx.meta = (reduction, opts, shard, kernels, max_scratch_bytes, hidden.shape, grad_rows, grad_weight,
                    hidden.dtype, weight.dtype)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(per_head)
        return loss, per_head

    @staticmethod
    def backward(ctx, grad_out, _grad_per_head=None):
        refuse_double_backward("vocab_parallel_cross_entropy")
        (reduction, opts, shard, kernels, budget, hidden_shape, grad_rows, grad_weight, hidden_dtype,
         weight_dtype) = ctx.meta
        if reduction != "none":
            d_rows, d_weight = scale_forward_grads(ctx, grad_out, hidden_shape)
        else:
            # grad_out must be the same on every rank (the loss is replicated): true for any loss
            # built from this output the same way on every rank.
            rows, weight, flat_t, lam_rows, lse = ctx.saved_tensors
            scale = (grad_out.reshape(-1).to(torch.float32) * lam_rows).contiguous()
            with autocast_off(rows.device):
                _, _, d_rows, d_weight = vp_linear_ce_chunks(
                    rows, weight, flat_t, scale, opts, shard, kernels, lse=lse,
                    grad_rows=grad_rows, grad_weight=grad_weight, max_scratch_bytes=budget)
            d_weight = cast_grad(d_weight, weight_dtype)
            if d_rows is not None:
                d_rows = cast_grad(d_rows, hidden_dtype).view(hidden_shape)
        return d_rows, d_weight, *([None] * 11)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 process_group, ignore_index: int = -100, reduction: str = "mean",
                                 head_weights: Union[None, Sequence[float], torch.Tensor] = None,
                                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                                 accum_dtype: Optional[torch.dtype] = torch.float32,
                                 max_scratch_bytes: Optional[int] = None, return_per_head: bool = False):
    """`fused_linear_cross_entropy` with `weight` sharded by rows over `process_group`.

    hidden: (n, N, D) or (N, D), and targets: (n, N) or (N,) global token ids, identical on every
    rank; weight: (V_local, D), this rank's rows of the unembedding, rank r's shard following rank
    r-1's (any sizes >= 1; V = the sum). Returns the same loss (and per_head) on every rank as the
    single-process function on the full weight; hidden's gradient is the full one (summed over
    ranks), weight's is this shard's. Every option of the single-process function is supported.
    Collective: every rank of the group must call it with the same options and shapes.
    """
    if process_group is None:
        raise ValueError("vocab_parallel_cross_entropy needs a process_group (dist.group.WORLD for the default)")
    if not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialized")
    budget = DEFAULT_SCRATCH_BYTES if max_scratch_bytes is None else int(max_scratch_bytes)
    if budget <= 0:
        raise ValueError(f"max_scratch_bytes must be > 0, got {max_scratch_bytes}")
    tensors_given = all(isinstance(t, torch.Tensor) for t in (hidden, weight, targets))
    kernels = ((vp_chunk_stats, vp_chunk_grad) if tensors_given and use_triton(hidden, weight, targets)
               else (reference.vp_chunk_stats, reference.vp_chunk_grad))
    args = (hidden, weight, targets, process_group, ignore_index, reduction, head_weights, label_smoothing, z_loss,
            softcap, accum_dtype, budget, kernels)
    if torch.is_grad_enabled() and (getattr(hidden, "requires_grad", False) or getattr(weight, "requires_grad", False)):
        loss, per_head = VocabParallelCrossEntropyFunction.apply(*args)
    else:
        loss, per_head, _, _, _ = _forward_pass(*args, grad_rows=False, grad_weight=False)
    return (loss, per_head) if return_per_head else loss
