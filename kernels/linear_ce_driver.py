"""The host side of the fused n-head linear cross-entropy, shared by the Triton and CPU paths.

All n heads share the unembedding, so the heads are one (n*N, D) problem: one pass over the
vocabulary serves every head. Rows are processed in chunks whose logits fit a fixed scratch
budget; for each chunk:

    logits = H_c @ W^T                 (GEMM, written into the reused scratch buffer)
    ce_chunk(logits)                   (per row: lse, loss, and dlogits written over the logits)
    dH_c   = dlogits @ W               (GEMM, complete per chunk: one rounding)
    dW    += dlogits^T @ H_c           (GEMM into a float32 accumulator; the first chunk overwrites it)

That is the floor of three matmuls; the full (n*N, V) logits never exist. When the gradient
is needed the forward computes it right away (the backward only scales it by grad_output), so
logits are computed once. `ce_chunk` is the only piece that differs between paths: a Triton
kernel on GPU, `reference.ce_chunk` on CPU. Everything here is plain PyTorch.

dH is complete per chunk, so cuBLAS's float32 accumulator rounds it once. dW sums over every
chunk: adding each chunk into a 16-bit dW would round the running sum once per chunk (Liger's
default), so 16-bit weights get a float32 accumulator (V x D x 4 bytes, beyond the gradient
itself) and one cast at the end. `accum_dtype=None` keeps the lighter 16-bit accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .backend import as_rows, check_one_device, finite_number, integer, refuse_double_backward

DEFAULT_SCRATCH_BYTES = 256 * 1024 * 1024
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    accum_dtype: Optional[torch.dtype] = None  # what dW sums the row chunks in; None: the weight's dtype
    dw_cast: bool = False   # the sum is cast to a narrower dtype at the end (a new V x D tensor): `ce_options`


def ce_options(ignore_index, label_smoothing, z_loss, softcap, accum: Optional[torch.dtype],
               weight_dtype: torch.dtype) -> CEOptions:
    """The chunk loop's options. accum: `to_compute_dtype`'s accumulator dtype; weight_dtype: the
    caller's weight's, which dW is returned in (under autocast, float32 master weights sum in float32
    and are never cast)."""
    return CEOptions(ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
                     accum, accum is not None and accum != weight_dtype)


def scratch_budget(max_scratch_bytes: int, V: int, D: int, element_size: int, wide_dw_sum: bool) -> int:
    """Bytes the logits chunk may take. When dW is summed wider and cast at the end (wide_dw_sum:
    `CEOptions.dw_cast` and dW wanted), the cast (`cast_grad`) allocates V x D in weight's dtype after
    the scratch is freed, so a scratch up to that size leaves the peak unchanged, and fewer chunks
    mean fewer read-modify-writes of the float32 accumulator (at N=8192, n=4, V=128256, D=4096 in
    bf16: 8 chunks instead of 32)."""
    return max(max_scratch_bytes, V * D * element_size) if wide_dw_sum else max_scratch_bytes


def rows_per_chunk(M: int, V: int, element_size: int, max_scratch_bytes: int) -> int:
    """Rows of logits per chunk: as few chunks as the budget allows, split evenly (no small last
    chunk), a multiple of 64 rows when that still fits (GEMM tiles)."""
    fit = max(1, min(M, int(max_scratch_bytes) // (V * element_size)))
    n_chunks = -(-M // fit)
    rows = -(-M // n_chunks)
    if rows > 64 and -(-rows // 64) * 64 <= fit:
        rows = -(-rows // 64) * 64
    return rows


def linear_ce_chunks(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     row_scale: torch.Tensor, opts: CEOptions, ce_chunk: Callable, *,
                     grad_rows: bool, grad_weight: bool, max_scratch_bytes: int):
    """One pass over all rows.

    rows: (M, D); weight: (V, D), same dtype; targets: (M,) int64; row_scale: (M,) in
    `loss_dtype(weight.dtype)`, the factor d(total)/d(row loss) used for the gradient;
    opts.accum_dtype: what dW sums the chunks in (None: weight's dtype). Returns (loss (M,) unscaled
    per-row losses in `loss_dtype`, 0 where ignored; dH (M, D) or None; dW (V, D) in the accumulator's
    dtype, or None: `cast_grad` casts it).
    """
    M, D = rows.shape
    V = weight.shape[0]
    loss = torch.empty(M, dtype=loss_dtype(weight.dtype), device=rows.device)
    compute_grad = grad_rows or grad_weight
    d_rows = torch.empty_like(rows) if grad_rows else None
    d_weight = None
    if M == 0:
        return loss, d_rows, (torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if grad_weight
                              else None)   # (contiguous, as every other dW: zeros_like would keep a view's strides)
    budget = scratch_budget(max_scratch_bytes, V, D, weight.element_size(),
                            wide_dw_sum=grad_weight and opts.dw_cast)
    chunk = rows_per_chunk(M, V, weight.element_size(), budget)
    scratch = torch.empty((chunk, V), dtype=weight.dtype, device=rows.device)
    w_t = weight.t()
    single_chunk = chunk >= M
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        h = rows[start:stop]
        logits = torch.mm(h, w_t, out=scratch[: stop - start])
        ce_chunk(logits, targets[start:stop], row_scale[start:stop], loss[start:stop], opts, compute_grad)
        if grad_rows:
            torch.mm(logits, weight, out=d_rows[start:stop])
        if grad_weight:
            d_weight = accumulate_dw(d_weight, logits.t(), h, weight, opts.accum_dtype, single_chunk)
    return loss, d_rows, d_weight


def accumulate_dw(d_weight: Optional[torch.Tensor], g_t: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                  accum_dtype: Optional[torch.dtype], single_chunk: bool) -> torch.Tensor:
    """d_weight += g_t @ h (g_t: (V, R) dlogits^T, h: (R, D)); d_weight is None before the first chunk.
    The sum lives in accum_dtype (None: weight's dtype) until `cast_grad`."""
    if single_chunk:  # one GEMM rounds once: no accumulator needed
        return torch.mm(g_t, h)
    first = d_weight is None   # the first chunk overwrites it: no zero fill, no read of zeros
    if first:
        d_weight = torch.empty(weight.shape, dtype=accum_dtype or weight.dtype, device=weight.device)
    add_matmul(d_weight, g_t, h, overwrite=first)
    return d_weight


def cast_grad(grad: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A gradient (the accumulated dW, or dH made in the compute dtype) cast once to its input's dtype."""
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast would run `hidden @ weight.T` in on this device, or None when autocast
    is off there (float64 inputs are left alone, as autocast leaves them)."""
    device_type = hidden.device.type
    if device_type == "meta":   # (autocast knows no meta device: shapes only, in the inputs' dtypes)
        return None
    if hidden.dtype in _AUTOCAST_ELIGIBLE and weight.dtype in _AUTOCAST_ELIGIBLE and \
            torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def to_compute_dtype(rows: torch.Tensor, weight: torch.Tensor, accum_dtype: Optional[torch.dtype]):
    """(rows, weight, accum) for the chunk loop: rows and weight in the dtype the GEMMs run in (the
    inputs' own, or under torch.autocast the autocast dtype, as a Linear's would), and the dtype dW
    sums the chunks in: accum_dtype, or weight's own dtype when None (so float32 master weights under
    autocast sum straight into their float32 gradient). accum is None when it is the compute dtype."""
    compute = autocast_dtype(rows, weight) or weight.dtype
    return rows.to(compute), weight.to(compute), dw_sum_dtype(compute, weight.dtype, accum_dtype)


def dw_sum_dtype(compute: torch.dtype, weight_dtype: torch.dtype, accum_dtype) -> Optional[torch.dtype]:
    """What dW sums the chunks in when it is not the compute dtype (else None), checked."""
    accum = weight_dtype if accum_dtype is None else accum_dtype
    if accum == torch.float32 and compute == torch.float64:
        accum = compute  # float32 (the default) means "at least float32": float64 stays float64
    if accum != compute and (accum not in (torch.float32, torch.float64) or accum.itemsize < compute.itemsize):
        raise ValueError(f"accum_dtype must be None or a float dtype at least as wide as the {compute} the "
                         f"matmuls run in (weight {weight_dtype}), got {accum_dtype}")
    return None if accum == compute else accum


def loss_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of the softmax math, the per-row losses and their factors: float32 at least, float64
    for float64 inputs (which run on the reference chunk, so that gradcheck sees float64 throughout)."""
    return torch.float64 if compute == torch.float64 else torch.float32


def autocast_off(device: torch.device):
    """The chunk loop picks its own dtypes; autocast must not recast its GEMMs."""
    return torch.autocast(device.type, enabled=False)


_FP32_OUT_GEMM = {}  # (device, dtype, overwrite) -> whether torch.addmm(..., out_dtype=float32) works there


def add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool = False) -> None:
    """acc += a @ b (overwrite: acc = a @ b, acc's old values, even NaN, never read), where acc may
    be wider than a and b (a float32 accumulator for 16-bit operands).

    On CUDA with torch >= 2.8 cuBLAS adds its float32 result straight into acc. A CPU BLAS has no
    16-bit speed to lose, so it multiplies float32 copies. A GPU without the out_dtype GEMM makes
    each product in the operands' dtype (float32 inside cuBLAS, one rounding) and adds it in
    float32. The last two go a slab of rows at a time, so temporaries stay below a quarter of acc.
    """
    beta = 0.0 if overwrite else 1.0
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=beta)
        return
    if _fp32_out_gemm_works(acc.device, a.dtype, acc.dtype, overwrite):
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
        return
    on_cpu = acc.device.type == "cpu"
    b_wide = b.to(acc.dtype) if on_cpu else b
    step = max(1, -(-a.shape[0] // 4))
    for start in range(0, a.shape[0], step):
        a_slab = a[start:start + step]
        if on_cpu:
            acc[start:start + step].addmm_(a_slab.to(acc.dtype), b_wide, beta=beta)
        elif overwrite:
            acc[start:start + step] = torch.mm(a_slab, b)
        else:
            acc[start:start + step] += torch.mm(a_slab, b)


def _fp32_out_gemm_works(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype,
                         overwrite: bool = False) -> bool:
    """Probe once per (device, dtypes, beta) on tiny tensors; any failure means the generic path."""
    if device.type != "cuda" or out_dtype != torch.float32:
        return False
    key = (str(device), in_dtype, overwrite)
    if key not in _FP32_OUT_GEMM:
        try:
            a = torch.ones(8, 16, dtype=in_dtype, device=device)
            # beta=1: 2^24 + 16 is exact in float32 but not in any 16-bit float, so a 16-bit detour
            # would show. beta=0: NaN in acc must not leak into the product.
            acc = torch.full((8, 8), float("nan") if overwrite else 2.0 ** 24, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a.t(), beta=0.0 if overwrite else 1.0, out_dtype=torch.float32, out=acc)
            _FP32_OUT_GEMM[key] = bool((acc == (16.0 if overwrite else 2.0 ** 24 + 16)).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_GEMM[key] = False
    return _FP32_OUT_GEMM[key]


# ------------------------------------------------------------------------------------------
# Input checks and the per-row factors
# ------------------------------------------------------------------------------------------
def prepare(hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap):
    """Validate, flatten to rows, and return (rows, targets (M,), lambda per row (M,), lambda per head
    (n,), n, N, single_head)."""
    h3, single_head = check_layout(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap,
                                   ignore_index, head_weights)
    return flatten_rows(h3, targets, head_weights, weight.shape[0], ignore_index) + (single_head,)


def check_layout(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap, ignore_index, head_weights,
                 head_count=None):
    """`check_inputs`, a vocabulary of at least one token, and, when head_count is given (the
    entries of a head-weights tensor whose values are read later), that count against the heads.
    Every check that needs no data. Returns (hidden as (n, N, D), single_head)."""
    h3, single_head = check_inputs(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap,
                                   ignore_index, head_weights)
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    if head_count is not None:
        check_head_count(head_count, h3.shape[0])
    return h3, single_head


def check_head_count(count: int, n: int) -> None:
    if count != n:
        raise ValueError(f"head_weights has {count} entries but there are {n} heads")


def check_scratch_bytes(max_scratch_bytes) -> None:
    if max_scratch_bytes is not None and (not integer(max_scratch_bytes) or max_scratch_bytes < 1):
        raise ValueError(f"max_scratch_bytes must be None or a positive int, got {max_scratch_bytes!r}")


def check_inputs(hidden, weight, targets, reduction, label_smoothing, z_loss, softcap, ignore_index, head_weights,
                 weight_name="weight", op="fused_linear_cross_entropy"):
    """Every check that needs no vocabulary size: types, shapes, dtypes, devices, options.
    Returns (hidden as (n, N, D), single_head)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError(f"{op}: hidden, weight and targets must be tensors")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    single_head = hidden.dim() == 2
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (n, N, D) or (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be (V, D), got shape {tuple(weight.shape)}")
    h3 = hidden.unsqueeze(0) if single_head else hidden
    n, N, D = h3.shape
    if D == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} and {weight_name} {tuple(weight.shape)} have no features (D=0)")
    if weight.shape[1] != D:
        raise ValueError(f"{weight_name} has D={weight.shape[1]} but hidden has D={D} "
                         f"(hidden {tuple(hidden.shape)}, {weight_name} {tuple(weight.shape)})")
    expected_t = (N,) if single_head else (n, N)
    if tuple(targets.shape) != expected_t:
        raise ValueError(f"targets must have shape {expected_t} to match hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")
    if not is_token_dtype(targets.dtype):
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point() or \
            (hidden.dtype != weight.dtype and autocast_dtype(hidden, weight) is None):
        raise ValueError(f"hidden ({hidden.dtype}) and {weight_name} ({weight.dtype}) must share one floating dtype "
                         "(or be float32/float16/bfloat16 under torch.autocast, which runs both in its dtype)")
    check_one_device(op, hidden=hidden, **{weight_name: weight}, targets=targets)
    check_loss_options(label_smoothing, z_loss, softcap, ignore_index, head_weights)
    return h3, single_head


def plain_loss_options(label_smoothing, z_loss, softcap, ignore_index):
    """The loss options with numpy's scalars (which `check_loss_options` accepts) as Python numbers:
    under torch.compile float() of a numpy scalar is a tensor, which no kernel argument takes.
    Anything else as it is, for the checks to name (torch.compile's SymInt/SymFloat included)."""
    return tuple(plain_number(v) for v in (label_smoothing, z_loss, softcap, ignore_index))


def plain_number(value):
    """A numpy scalar as the Python number it holds; anything else as it is. (Under torch.compile
    isinstance sees no numpy type, and only .item() gives a number: its module tells it apart.)"""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def is_token_dtype(dtype: torch.dtype) -> bool:
    """Any integer dtype holds token ids (uint16: the corpus's own token streams); bool does not."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_loss_options(label_smoothing, z_loss, softcap, ignore_index: int = -100, head_weights=None) -> None:
    """The loss options' types and ranges (finite numbers: a NaN would pass every comparison and give
    a NaN loss); also run where a loss module is built, before any data."""
    number = finite_number   # numpy's numbers and torch.compile's symbolic ones included
    if not number(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if not number(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (not number(softcap) or not softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not integer(ignore_index):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if isinstance(head_weights, torch.Tensor) and head_weights.requires_grad:
        raise ValueError("head_weights are constant loss factors and get no gradient: pass a tensor that does not "
                         "require grad (head_weights.detach())")
    if head_weights is not None:
        # a tensor or a numpy array as the numbers it holds
        values = head_weights.tolist() if hasattr(head_weights, "tolist") else head_weights
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(
                number(w) and w >= 0 for w in values):
            raise ValueError(f"head_weights must be a sequence of finite numbers >= 0, got {head_weights!r}")


def flatten_rows(h3: torch.Tensor, targets: torch.Tensor, head_weights, vocab_size: Optional[int],
                 ignore_index: int):
    """Check token ids against [0, vocab_size) and flatten: (rows (M, D), targets (M,), lambda per row (M,),
    lambda (n,), n, N). vocab_size None: the caller checked the ids (the vocabulary-parallel layout
    gather, against the global vocabulary, in its own host read)."""
    n, N, _ = h3.shape
    flat_t = targets.reshape(-1).to(torch.int64)
    bad = None if vocab_size is None else ((flat_t < 0) | (flat_t >= vocab_size)) & (flat_t != ignore_index)
    if bad is not None and flat_t.numel() and bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets contain token id {int(flat_t[idx])} (at flat index {idx}) outside "
                         f"[0, {vocab_size}) that is not ignore_index={ignore_index}")
    lam_dtype = torch.float64 if h3.dtype == torch.float64 else torch.float32   # float64 stays float64 throughout
    if head_weights is None:
        lam = torch.ones(n, dtype=lam_dtype, device=h3.device)
    else:
        lam = torch.as_tensor(head_weights, dtype=lam_dtype).to(h3.device).reshape(-1)
        check_head_count(lam.numel(), n)
    rows = as_rows(h3)
    lam_rows = lam[:, None].expand(n, N).reshape(-1).contiguous()
    return rows, flat_t.contiguous(), lam_rows, lam, n, N


def head_factors(targets: torch.Tensor, lam: torch.Tensor, n: int, N: int, ignore_index: int, reduction: str):
    """d(total loss)/d(row loss) per row for mean/sum: lambda_i / valid_count_i, or lambda_i."""
    if reduction == "sum":
        per_head = lam
    else:
        valid = (targets.view(n, N) != ignore_index).sum(1).to(lam.dtype)
        per_head = lam / valid.clamp(min=1.0)
    return per_head[:, None].expand(n, N).reshape(-1).contiguous()


def reduce_rows(loss_rows, lam_rows, scale, reduction, n, N, single):
    """The returned loss: a scalar (mean/sum: rows times their factor), or (n, N) / (N,) for none."""
    if reduction == "none":
        out = loss_rows * lam_rows
        return out.view(N) if single else out.view(n, N)
    return (loss_rows * scale).sum()


def per_head_losses(loss_rows, targets, n, N, ignore_index, reduction):
    """(n,) unweighted loss of each head (mean over its valid tokens, or sum) in loss_rows' dtype, for logging."""
    totals = loss_rows.view(n, N).sum(1)
    if reduction == "sum":
        return totals
    return totals / (targets.view(n, N) != ignore_index).sum(1).clamp(min=1).to(totals.dtype)


def compute_layout(hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
                   accum_dtype):
    """Validate and lay the heads out for the chunk loop: (rows (M, D) and weight in the compute dtype,
    targets (M,) int64, lambda per row (M,) and per head (n,) in the loss dtype, n, N, single_head,
    the chunk options)."""
    rows, flat_t, lam_rows, lam, n, N, single = prepare(
        hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap)
    rows, compute_weight, accum = to_compute_dtype(rows, weight, accum_dtype)
    lam, lam_rows = lam.to(loss_dtype(compute_weight.dtype)), lam_rows.to(loss_dtype(compute_weight.dtype))
    opts = ce_options(ignore_index, label_smoothing, z_loss, softcap, accum, weight.dtype)
    return rows, compute_weight, flat_t, lam_rows, lam, n, N, single, opts


def forward_pass(hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
                 accum_dtype, max_scratch_bytes, ce_chunk, grad_rows: bool, grad_weight: bool):
    """Validate, run the chunks, reduce. For mean/sum the gradient factor is known now, so the
    requested gradients are computed in the same pass; for "none" they wait for grad_output.
    Returns (loss, per_head, opts, saved): opts the chunk options, saved (dH, dW) or, for "none",
    what `none_backward` needs."""
    rows, compute_weight, flat_t, lam_rows, lam, n, N, single, opts = compute_layout(
        hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap, accum_dtype)
    eager_grad = reduction != "none"
    scale = head_factors(flat_t, lam, n, N, ignore_index, reduction) if eager_grad else lam_rows
    with autocast_off(rows.device):
        loss_rows, d_rows, d_weight = linear_ce_chunks(
            rows, compute_weight, flat_t, scale, opts, ce_chunk, grad_rows=eager_grad and grad_rows,
            grad_weight=eager_grad and grad_weight, max_scratch_bytes=max_scratch_bytes)
    loss = reduce_rows(loss_rows, lam_rows, scale, reduction, n, N, single)
    per_head = per_head_losses(loss_rows, flat_t, n, N, ignore_index, reduction)
    if eager_grad:
        saved = (cast_grad(d_rows, hidden.dtype), cast_grad(d_weight, weight.dtype))
    else:
        saved = (rows, compute_weight, flat_t, lam_rows)
    return loss, per_head, opts, saved


def none_backward(rows, weight, flat_t, lam_rows, grad_out, opts, ce_chunk, max_scratch_bytes, grad_rows: bool,
                  grad_weight: bool, hidden_dtype, weight_dtype, hidden_shape):
    """The gradients of a reduction "none" loss, made once grad_out (one factor per token) is known:
    another pass over the chunks. rows, weight, flat_t, lam_rows: as `compute_layout` gives them.
    Returns (dH in hidden's shape and dtype or None, dW in weight_dtype or None)."""
    scale = grad_out.reshape(-1).to(lam_rows.dtype) * lam_rows
    with autocast_off(rows.device):
        _, d_rows, d_weight = linear_ce_chunks(
            rows, weight, flat_t, scale.contiguous(), opts, ce_chunk,
            grad_rows=grad_rows, grad_weight=grad_weight, max_scratch_bytes=max_scratch_bytes)
    d_weight = cast_grad(d_weight, weight_dtype)
    if d_rows is not None:
        d_rows = cast_grad(d_rows, hidden_dtype).view(hidden_shape)
    return d_rows, d_weight


def scale_forward_grads(ctx, grad_out, hidden_shape):
    """Backward of a mean/sum loss whose gradients were made in the forward (saved as d_rows, d_weight):
    scale them in place by grad_out (they are ours, no copies). Only one backward can consume them."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("fused_linear_cross_entropy: a second backward through the same loss "
                           "(retain_graph=True) is not supported for reduction mean/sum: the "
                           "gradients were computed in the forward and handed out by the first one")
    ctx.consumed = True
    d_rows, d_weight = ctx.saved_tensors
    if d_rows is not None:
        d_rows = scale_in_place(d_rows, grad_out).view(hidden_shape)
    if d_weight is not None:
        d_weight = scale_in_place(d_weight, grad_out)
    return d_rows, d_weight


def scale_in_place(t: torch.Tensor, scale: torch.Tensor, chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """t *= scale (a 0-dim tensor) in place, the product formed in float32 or wider and rounded once:
    a 16-bit scale would overflow first (a loss scaler's 65536 is inf in fp16) or round (a 1/k of
    gradient accumulation in bf16). Rows of at most chunk_bytes of float32 at a time."""
    if t.dtype in (torch.float32, torch.float64):
        return t.mul_(scale.to(t.dtype))
    scale = scale.to(device=t.device, dtype=torch.float32)
    if not t.is_contiguous():
        return t.copy_(t.float().mul_(scale))
    flat = t.view(-1)
    step = max(1, chunk_bytes // 4)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        part.copy_(part.float().mul_(scale))
    return t


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper around `linear_ce_chunks`, generic over the per-chunk kernel."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing,
                z_loss, softcap, accum_dtype, max_scratch_bytes, ce_chunk):
        grad_rows, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, per_head, opts, saved = forward_pass(
            hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
            accum_dtype, max_scratch_bytes, ce_chunk, grad_rows, grad_weight)
        ctx.meta = (reduction, opts, ce_chunk, max_scratch_bytes, hidden.shape, grad_rows, grad_weight,
                    hidden.dtype, weight.dtype)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(per_head)
        return loss, per_head

    @staticmethod
    def backward(ctx, grad_out, _grad_per_head=None):
        refuse_double_backward("fused_linear_cross_entropy")
        reduction, opts, ce_chunk, budget, hidden_shape, grad_rows, grad_weight, hidden_dtype, weight_dtype = ctx.meta
        if reduction != "none":
            d_rows, d_weight = scale_forward_grads(ctx, grad_out, hidden_shape)
        else:
            rows, weight, flat_t, lam_rows = ctx.saved_tensors
            d_rows, d_weight = none_backward(rows, weight, flat_t, lam_rows, grad_out, opts, ce_chunk, budget,
                                             grad_rows, grad_weight, hidden_dtype, weight_dtype, hidden_shape)
        return d_rows, d_weight, None, None, None, None, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, ce_chunk, *, ignore_index=-100, reduction="mean",
                         head_weights: Union[None, Sequence[float], torch.Tensor] = None,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, accum_dtype=torch.float32,
                         max_scratch_bytes=DEFAULT_SCRATCH_BYTES, return_per_head=False):
    """Shared body of the public function (see fused_linear_ce.fused_linear_cross_entropy)."""
    if int(max_scratch_bytes) <= 0:
        raise ValueError(f"max_scratch_bytes must be > 0, got {max_scratch_bytes}")
    args = (hidden, weight, targets, ignore_index, reduction, head_weights, label_smoothing, z_loss, softcap,
            accum_dtype, int(max_scratch_bytes), ce_chunk)
    if torch.is_grad_enabled() and (getattr(hidden, "requires_grad", False) or getattr(weight, "requires_grad", False)):
        loss, per_head = LinearCrossEntropyFunction.apply(*args)
    else:
        # Evaluation: loss only (one GEMM per chunk), nothing kept for a backward.
        loss, per_head, _, _ = forward_pass(*args, grad_rows=False, grad_weight=False)
    return (loss, per_head) if return_per_head else loss
