"""Fused n-head linear + cross-entropy: the Triton chunk kernel and the public function.

The GEMMs run on cuBLAS (see linear_ce_driver.py for the chunk loop and why); this file holds
the one step between them that PyTorch would do in many passes: per row of a logits chunk,
log-sum-exp, loss, and the gradient d(total)/d(logits) written over the logits in place.

Per row (all in float32, s = softcap * tanh(z / softcap) or s = z, eps = label smoothing):
    lse  = log(sum_j exp(s_j))
    loss = lse - (1 - eps) s_t - eps mean(s) + z_loss lse^2
    dz_j = row_scale * (p_j (1 + 2 z_loss lse) - (1 - eps) [j = t] - eps / V) * (1 - (s_j/softcap)^2)
Pass 1 streams the row once for an online max / sum-exp and the sum of s; pass 2 streams it
again and writes dz in the logits' own dtype. When the row fits one tile (V <= 32768 on a GPU: 64
values per thread at 16 warps, 128 registers without a spill on sm_90; 16384 with a softcap) it is
read once and kept in registers for both (ONE_PASS): with the gradient, a third less DRAM traffic
by count, though on the H100 the streamed second read mostly hit L2 and the one-pass kernel saved
only 2% of its time (benchmarks/results/NOTES.md). The target's logit is a scalar load (no reduction
over the tile), and label smoothing's sum runs only when asked (HAS_SMOOTHING). Each element is read
and written by the same thread, so writing in place is race-free.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from .triton_import import tl, triton

from . import reference
from .backend import eager_under_compile, interpreting, use_triton
from .linear_ce_driver import (DEFAULT_SCRATCH_BYTES, CEOptions, check_scratch_bytes, linear_cross_entropy,
                               plain_loss_options)
from .linear_ce_op import traced_linear_cross_entropy

_LOG2E = tl.constexpr(1.4426950408889634)  # a jit global must be a tl.constexpr


@triton.jit
def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); |x| is clamped where tanh is already 1 in fp32.
        x = z / softcap
        t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * tl.abs(x), 60.0)) + 1.0)
        return softcap * tl.where(x < 0, -t, t)
    else:
        return z


@triton.jit
def _online_lse(row_ptr, V, offs, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of V logits in BLOCK_V lanes. Returns (log-sum-exp of s, sum of s), s =
    the softcapped logits (float32). Per-lane running max and sum of exp (base 2), merged at the end;
    a finite floor instead of -inf keeps (m - m_new) free of inf - inf in masked lanes. Shared with
    vocab_parallel_ce.py."""
    m = tl.full((BLOCK_V,), -1.0e38, tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    s_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        s = tl.where(mask, _softcapped(z, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, s)
        acc = acc * tl.exp2((m - m_new) * _LOG2E) + tl.exp2((s - m_new) * _LOG2E)
        m = m_new
        s_sum += tl.where(mask, s, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(acc * tl.exp2((m - m_row) * _LOG2E), axis=0))
    return lse, tl.sum(s_sum, axis=0)


@triton.jit
def _row_loss(lse, s_t, s_total, V, label_smoothing, z_loss, HAS_SMOOTHING: tl.constexpr):
    """A row's loss from its log-sum-exp, target score and sum of scores (see the module docstring)."""
    loss = lse - (1.0 - label_smoothing) * s_t + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss = loss - label_smoothing * s_total / V
    return loss


@triton.jit
def _grad_factors(scale, lse, label_smoothing, z_loss, vocab_size):
    """(p_factor, smooth, hit) of a row's gradient: dz_j = p_j * p_factor - smooth - hit [j = t].
    Shared with vocab_parallel_ce.py (where vocab_size is the whole vocabulary's)."""
    return scale * (1.0 + 2.0 * z_loss * lse), scale * label_smoothing / vocab_size, scale * (1.0 - label_smoothing)


@triton.jit
def _grad_values(s, cols, target_col, lse, p_factor, smooth, hit, softcap, HAS_SOFTCAP: tl.constexpr):
    """d(loss)/d(logits) at columns `cols` from their scores s (float32), through the softcap's derivative."""
    grad = tl.exp2((s - lse) * _LOG2E) * p_factor - smooth
    grad = tl.where(cols == target_col, grad - hit, grad)
    if HAS_SOFTCAP:
        grad = grad * (1.0 - (s / softcap) * (s / softcap))
    return grad


@triton.jit
def _write_grad_row(row_ptr, V, offs, target_col, lse, p_factor, smooth, hit, softcap,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite a row of V logits with its gradient (`_grad_values`; a target_col outside [0, V)
    gets no hit), streamed in BLOCK_V tiles. Shared with vocab_parallel_ce.py."""
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s = _softcapped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        grad = _grad_values(s, cols, target_col, lse, p_factor, smooth, hit, softcap, HAS_SOFTCAP)
        tl.store(row_ptr + cols, grad.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_row_one_pass(row_ptr, V, offs, target, scale, label_smoothing, z_loss, softcap,
                     HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    """A whole row in one tile (BLOCK_V >= V): loaded once, lse and the gradient from registers.
    Returns the row's loss."""
    mask = offs < V
    z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _softcapped(z, softcap, HAS_SOFTCAP)
    s_max = tl.max(tl.where(mask, s, float("-inf")), axis=0)
    lse = s_max + tl.log(tl.sum(tl.where(mask, tl.exp2((s - s_max) * _LOG2E), 0.0), axis=0))
    # The target's logit by a scalar load, not a reduction over the tile: fewer live registers.
    s_t = _softcapped(tl.load(row_ptr + target).to(tl.float32), softcap, HAS_SOFTCAP)
    s_total = 0.0
    if HAS_SMOOTHING:
        s_total = tl.sum(tl.where(mask, s, 0.0), axis=0)
    loss = _row_loss(lse, s_t, s_total, V, label_smoothing, z_loss, HAS_SMOOTHING)
    if COMPUTE_GRAD:
        p_factor, smooth, hit = _grad_factors(scale, lse, label_smoothing, z_loss, V)
        # The exponentials again rather than kept: only s stays live across the reductions.
        grad = _grad_values(s, offs, target, lse, p_factor, smooth, hit, softcap, HAS_SOFTCAP)
        tl.store(row_ptr + offs, grad.to(row_ptr.dtype.element_ty), mask=mask)
    return loss


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, stride_row, targets_ptr, scale_ptr, loss_ptr,
    V, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < V)
    elif ONE_PASS:
        scale = tl.load(scale_ptr + row)
        loss = _ce_row_one_pass(row_ptr, V, offs, target, scale, label_smoothing, z_loss, softcap,
                                HAS_SOFTCAP, HAS_SMOOTHING, COMPUTE_GRAD)
        tl.store(loss_ptr + row, loss)
    else:
        # Pass 1: log-sum-exp, and the plain sum of s for label smoothing.
        lse, s_total = _online_lse(row_ptr, V, offs, softcap, HAS_SOFTCAP, BLOCK_V)
        s_t = _softcapped(tl.load(row_ptr + target).to(tl.float32), softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, _row_loss(lse, s_t, s_total, V, label_smoothing, z_loss, HAS_SMOOTHING))

        if COMPUTE_GRAD:
            p_factor, smooth, hit = _grad_factors(tl.load(scale_ptr + row), lse, label_smoothing, z_loss, V)
            _write_grad_row(row_ptr, V, offs, target, lse, p_factor, smooth, hit, softcap, HAS_SOFTCAP, BLOCK_V)


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, loss_out: torch.Tensor,
             opts: CEOptions, compute_grad: bool) -> None:
    """Launcher; same contract as `reference.ce_chunk`. logits: (R, V) with unit column stride."""
    R, V = logits.shape
    if R == 0:
        return
    # One pass when the row fits a tile: at most 64 values per thread at 16 warps on a GPU (sm_90:
    # 128 registers, the most 512 threads may take, and no spill), 32 with a softcap, whose tanh
    # spills at 64 (compile_check.py); a smaller limit under the interpreter, so that its tests run
    # both variants.
    one_pass_limit = 256 if interpreting() else 16384 if opts.softcap is not None else 32768
    if triton.next_power_of_2(V) <= one_pass_limit:
        block_v, one_pass = triton.next_power_of_2(V), True
        num_warps = 1 if interpreting() else min(16, max(1, block_v // 1024))
    else:
        block_v, one_pass = (64, False) if interpreting() else (4096, False)
        num_warps = 1 if interpreting() else 16
    _ce_chunk_kernel[(R,)](
        logits, logits.stride(0), targets, row_scale, loss_out,
        V, opts.ignore_index, opts.label_smoothing, opts.z_loss,
        1.0 if opts.softcap is None else opts.softcap,
        HAS_SOFTCAP=opts.softcap is not None, HAS_SMOOTHING=opts.label_smoothing != 0.0,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, ONE_PASS=one_pass, num_warps=num_warps)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               head_weights: Union[None, Sequence[float], torch.Tensor] = None,
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                               accum_dtype: Optional[torch.dtype] = torch.float32,
                               max_scratch_bytes: Optional[int] = None, return_per_head: bool = False,
                               process_group=None):
    """Cross-entropy of `hidden @ weight.T` for n heads at once, without materializing the logits.

    hidden: (n, N, D) or (N, D), fp32/fp16/bf16; weight: (V, D), same dtype; targets: (n, N) or
    (N,) integer, entries equal to ignore_index are skipped. Under torch.autocast the matmuls run in
    the autocast dtype whatever the inputs' float dtypes (float32 master weights included), and the
    gradients come back in each input's own dtype.
    reduction "mean": sum_i lambda_i * mean over head i's valid tokens (a head with none gives 0);
    "sum": sum_i lambda_i * sum_t; "none": (n, N) (or (N,)) per-token losses times lambda_i, 0 where
    ignored. head_weights: lambda_i, default 1. z_loss adds z_loss * lse^2 per token; softcap
    applies softcap * tanh(logits / softcap). Scratch memory is at most `max_scratch_bytes`
    (default 256 MiB) of logits at a time, whatever N is; with the float32 dW accumulator, at most
    the size of dW itself (V x D in weight's dtype, which its final cast allocates once the scratch
    is freed, so the peak does not grow) when that is larger. accum_dtype: what weight's gradient sums
    the row chunks in before its one cast to weight's dtype; the float32 default costs V * D * 4
    bytes beyond the gradient for 16-bit weights (none when one chunk holds every row; float64
    inputs keep float64), None sums in weight's own dtype (lighter, one rounding per chunk). With
    return_per_head=True, returns (loss, per_head) where per_head is the detached (n,) float32
    unweighted loss of each head. Float64 inputs run in float64 throughout (loss, per_head and the
    softmax math, on the chunk's PyTorch twin), so torch.autograd.gradcheck applies; not with a
    process_group, whose vocabulary-parallel statistics stay float32.
    fp16: the logits' gradient (softmax - onehot) times each row's factor (1 / valid tokens for a
    mean) is stored in fp16 before the dH and dW matmuls, so entries under fp16's range flush to
    zero. For mean and sum that gradient is made in the forward, before grad_output is known, so a
    loss scaler's factor arrives only afterwards and does not prevent it (it multiplies the finished
    gradients in float32, rounded once: a GradScaler's 65536 does not overflow fp16 on the way); with
    reduction "none" the gradient waits for grad_output, which then multiplies in before the cast.
    bf16 has the range.
    process_group: `weight` is this rank's row shard of the unembedding over that group (rank
    order, any shard sizes); the vocabulary-parallel path (vocab_parallel_ce.py) then returns on
    every rank the loss of the full weight, hidden's full gradient and this shard's gradient.
    Under torch.compile (fullgraph too) and on meta tensors the loss is the custom ops of
    linear_ce_op.py: the same results; a compiled backward scales copies of the gradients.
    """
    if process_group is None and (torch.compiler.is_compiling() or any(
            isinstance(t, torch.Tensor) and t.is_meta for t in (hidden, weight, targets))):
        return traced_linear_cross_entropy(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, head_weights=head_weights,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, accum_dtype=accum_dtype,
            max_scratch_bytes=max_scratch_bytes, return_per_head=return_per_head)
    return _fused_loss(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction,
                       head_weights=head_weights, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                       accum_dtype=accum_dtype, max_scratch_bytes=max_scratch_bytes, return_per_head=return_per_head,
                       process_group=process_group)


# Under torch.compile the loss is the custom ops of linear_ce_op.py; the vocabulary-parallel path
# (whose process group an op cannot take) runs as its own eager call (eager_under_compile).
@eager_under_compile
def _fused_loss(hidden, weight, targets, *, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
                accum_dtype, max_scratch_bytes, return_per_head, process_group):
    check_scratch_bytes(max_scratch_bytes)
    label_smoothing, z_loss, softcap, ignore_index = plain_loss_options(label_smoothing, z_loss, softcap, ignore_index)
    if process_group is not None:
        from .vocab_parallel_ce import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(
            hidden, weight, targets, process_group=process_group, ignore_index=ignore_index, reduction=reduction,
            head_weights=head_weights, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            accum_dtype=accum_dtype, max_scratch_bytes=max_scratch_bytes, return_per_head=return_per_head)
    budget = DEFAULT_SCRATCH_BYTES if max_scratch_bytes is None else max_scratch_bytes
    # Non-tensor arguments fall through to the reference, whose input checks name the problem.
    tensors_given = all(isinstance(t, torch.Tensor) for t in (hidden, weight, targets))
    # The Triton chunk does its softmax in float32: float64 inputs (gradcheck, oracles) take the twin.
    chunk_fn = (ce_chunk if tensors_given and use_triton(hidden, weight, targets)
                and torch.float64 not in (hidden.dtype, weight.dtype) else reference.ce_chunk)
    return linear_cross_entropy(hidden, weight, targets, chunk_fn, ignore_index=ignore_index, reduction=reduction,
                                head_weights=head_weights, label_smoothing=label_smoothing, z_loss=z_loss,
                                softcap=softcap, accum_dtype=accum_dtype, max_scratch_bytes=budget,
                                return_per_head=return_per_head)
