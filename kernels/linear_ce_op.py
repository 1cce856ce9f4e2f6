"""The fused n-head loss as torch.library custom ops: how torch.compile and meta tensors see it.

Eager calls take `LinearCrossEntropyFunction` (linear_ce_driver.py), which scales the gradients it
made in the forward in place. A compiled graph cannot hold that: Dynamo would trace into launchers
that tune, check ids and synchronize on the host. So under torch.compile (and for meta tensors,
which have no data to check) the loss is two opaque ops with shape functions:

    mtp_kernels::linear_ce_forward   (loss, per_head, dH, dW): the chunk loop of the eager path;
                                     dH, dW are made here for mean/sum (empty where not wanted)
    mtp_kernels::linear_ce_backward  (dH, dW) of a reduction "none" loss, once grad_output is known

and the backward of a mean/sum loss is a plain multiply the compiler sees (dH * grad_output formed
in float32 and rounded once, as the eager path does). That multiply writes a new tensor where the
eager path scales in place: a compiled step holds dW twice for that moment.

A compiled graph runs its ops with autocast off, so the autocast dtype is read while tracing and
passed in (`compute_dtype`), and the op runs under it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import reference
from .backend import kernel_op, refuse_double_backward, use_triton
from .linear_ce_driver import (DEFAULT_SCRATCH_BYTES, autocast_dtype, check_layout, check_loss_options,
                               check_scratch_bytes, compute_layout, dw_sum_dtype, forward_pass, loss_dtype,
                               none_backward, plain_loss_options, plain_number)

Tensor = torch.Tensor


def _chunk_fn(hidden: Tensor, weight: Tensor, targets: Tensor):
    """The per-chunk softmax step: the Triton kernel where it runs, its PyTorch twin otherwise (and
    for float64, which the Triton chunk does not compute in)."""
    from .fused_linear_ce import ce_chunk   # (fused_linear_ce imports this file)

    if use_triton(hidden, weight, targets) and torch.float64 not in (hidden.dtype, weight.dtype):
        return ce_chunk
    return reference.ce_chunk


def _autocast_as(device: torch.device, dtype: Optional[torch.dtype]):
    """The caller's autocast state for the loss's device, as read while tracing."""
    if device.type == "meta":
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _nothing(like: Tensor) -> Tensor:
    """An op cannot return None: an empty tensor stands for a gradient not asked for."""
    return like.new_empty(0)


@kernel_op("linear_ce_forward")
def linear_ce_forward(hidden: Tensor, weight: Tensor, targets: Tensor, head_weights: Optional[Tensor],
                      ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                      softcap: Optional[float], accum_dtype: Optional[torch.dtype], max_scratch_bytes: int,
                      compute_dtype: Optional[torch.dtype], grad_hidden: bool,
                      grad_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, per_head, dH, dW): `fused_linear_cross_entropy`'s loss and per-head losses, and for
    mean/sum the gradients asked for (dH in hidden's shape and dtype, dW in weight's), each empty
    when not asked for or when the reduction is "none"."""
    with _autocast_as(hidden.device, compute_dtype):
        loss, per_head, _, saved = forward_pass(
            hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
            accum_dtype, max_scratch_bytes, _chunk_fn(hidden, weight, targets), grad_hidden, grad_weight)
    d_hidden, d_weight = saved if reduction != "none" else (None, None)
    d_hidden = _nothing(hidden) if d_hidden is None else d_hidden.view(hidden.shape)
    return loss, per_head, d_hidden, (_nothing(weight) if d_weight is None else d_weight)


@torch.library.register_fake(linear_ce_forward)
def _(hidden, weight, targets, head_weights, ignore_index, reduction, label_smoothing, z_loss, softcap, accum_dtype,
      max_scratch_bytes, compute_dtype, grad_hidden, grad_weight):
    # The layout was checked in the traced code before the op (traced_linear_cross_entropy).
    single = hidden.dim() == 2
    n, N = (1, hidden.shape[0]) if single else hidden.shape[:2]
    dtype = loss_dtype(compute_dtype or weight.dtype)
    loss_shape = () if reduction != "none" else ((N,) if single else (n, N))
    eager_grad = reduction != "none"
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) \
        if eager_grad and grad_hidden else _nothing(hidden)
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) \
        if eager_grad and grad_weight else _nothing(weight)
    return hidden.new_empty(loss_shape, dtype=dtype), hidden.new_empty((n,), dtype=dtype), d_hidden, d_weight


@kernel_op("linear_ce_backward")
def linear_ce_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                       head_weights: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: Optional[float], accum_dtype: Optional[torch.dtype], max_scratch_bytes: int,
                       compute_dtype: Optional[torch.dtype], grad_hidden: bool,
                       grad_weight: bool) -> tuple[Tensor, Tensor]:
    """(dH, dW) of a reduction "none" loss given its grad_loss (the loss's shape); each empty when
    not asked for. The layout is made again from the inputs (an op's outputs may not alias them)."""
    with _autocast_as(hidden.device, compute_dtype):
        rows, compute_weight, flat_t, lam_rows, _, _, _, _, opts = compute_layout(
            hidden, weight, targets, ignore_index, "none", head_weights, label_smoothing, z_loss, softcap,
            accum_dtype)
    d_hidden, d_weight = none_backward(rows, compute_weight, flat_t, lam_rows, grad_loss, opts,
                                       _chunk_fn(hidden, weight, targets), max_scratch_bytes, grad_hidden,
                                       grad_weight, hidden.dtype, weight.dtype, hidden.shape)
    return (_nothing(hidden) if d_hidden is None else d_hidden), (_nothing(weight) if d_weight is None else d_weight)


@torch.library.register_fake(linear_ce_backward)
def _(grad_loss, hidden, weight, targets, head_weights, ignore_index, label_smoothing, z_loss, softcap, accum_dtype,
      max_scratch_bytes, compute_dtype, grad_hidden, grad_weight):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else _nothing(hidden),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else _nothing(weight))


def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, head_weights, ignore_index, reduction, label_smoothing, z_loss, softcap, accum_dtype,
     max_scratch_bytes, compute_dtype, grad_hidden, grad_weight) = inputs
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, accum_dtype, max_scratch_bytes, compute_dtype,
                   grad_hidden, grad_weight)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)   # no zero-filled gradients for per_head, dH, dW
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, *(() if head_weights is None else (head_weights,)))
    else:
        ctx.save_for_backward(output[2], output[3])


def _scaled(grad: Tensor, factor: Tensor) -> Tensor:
    """grad * factor formed in float32 (or float64) and rounded once: a 16-bit product would overflow
    (a loss scaler's 65536 is inf in fp16) or round (a 1/k of gradient accumulation in bf16)."""
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.to(wide) * factor.to(wide)).to(grad.dtype)


def _backward(ctx, grad_loss, _per_head, _d_hidden, _d_weight):
    refuse_double_backward("fused_linear_cross_entropy")
    grad_hidden, grad_weight = ctx.options[-2:]
    if grad_loss is None:
        return (None,) * 14
    if ctx.reduction != "none":
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = _scaled(d_hidden, grad_loss) if grad_hidden else None
        d_weight = _scaled(d_weight, grad_loss) if grad_weight else None
    else:
        hidden, weight, targets, *head_weights = ctx.saved_tensors
        d_hidden, d_weight = linear_ce_backward(grad_loss, hidden, weight, targets,
                                                head_weights[0] if head_weights else None, *ctx.options)
        d_hidden, d_weight = (d_hidden if grad_hidden else None), (d_weight if grad_weight else None)
    return (d_hidden, d_weight) + (None,) * 12


torch.library.register_autograd(linear_ce_forward, _backward, setup_context=_setup_context)


def traced_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", head_weights=None,
                                label_smoothing=0.0, z_loss=0.0, softcap=None, accum_dtype=torch.float32,
                                max_scratch_bytes=None, return_per_head=False):
    """`fused_linear_cross_entropy` as torch.compile traces it and as meta tensors run it: the same
    arguments and results, through the ops above. The option checks run here while tracing; the
    token-id and head-weight value checks run inside the op, on the data."""
    check_scratch_bytes(max_scratch_bytes)
    label_smoothing, z_loss, softcap, ignore_index = plain_loss_options(label_smoothing, z_loss, softcap, ignore_index)
    # Every check that needs no data runs here, in the traced code, where a failed one is the plain
    # ValueError (a graph break re-runs the call eagerly; fullgraph's error gives it as its cause);
    # raised in the op's shape function, torch would wrap it in a fake-tensor error. A head-weights
    # tensor's values are checked in the op, on its data.
    if type(head_weights).__module__ == "numpy":   # an array: its values are checked as a tensor's, in the op
        head_weights = torch.as_tensor(head_weights, dtype=torch.float64)
    elif isinstance(head_weights, (list, tuple)):
        head_weights = [plain_number(w) for w in head_weights]
    weights_tensor = isinstance(head_weights, torch.Tensor)
    check_loss_options(label_smoothing, z_loss, softcap, ignore_index,
                       head_weights if not weights_tensor or head_weights.requires_grad else None)
    if head_weights is not None and not weights_tensor:
        head_weights = torch.tensor(list(head_weights), dtype=torch.float64)
    check_layout(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap, ignore_index, None,
                 None if head_weights is None else head_weights.numel())
    compute_dtype = autocast_dtype(hidden, weight)
    dw_sum_dtype(compute_dtype or weight.dtype, weight.dtype, accum_dtype)
    needs_grad = torch.is_grad_enabled()
    grad_hidden, grad_weight = needs_grad and hidden.requires_grad, needs_grad and weight.requires_grad
    loss, per_head, _, _ = linear_ce_forward(
        hidden, weight, targets, head_weights, ignore_index, reduction, label_smoothing, z_loss, softcap, accum_dtype,
        DEFAULT_SCRATCH_BYTES if max_scratch_bytes is None else max_scratch_bytes, compute_dtype, grad_hidden,
        grad_weight)
    return (loss, per_head) if return_per_head else loss
