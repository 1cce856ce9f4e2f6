"""Plain PyTorch twins of every Triton kernel in this package.

Each function has the same signature as its Triton counterpart. They are the CPU path
(dispatch picks them for CPU tensors) and the oracle in the tests.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------------------------
# RMSNorm (Meta's Llama definition: normalize in float32, cast back, then scale)
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., D) any float dtype; weight: (D,). Returns promote(x.dtype, weight.dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


# --------------------------------------------------------------------------------------------
# Fused n-head linear cross-entropy: the per-chunk step and the whole CPU path
# --------------------------------------------------------------------------------------------
def ce_chunk(logits, targets, row_scale, loss_out, opts, compute_grad: bool) -> None:
    """Twin of the Triton chunk kernel in fused_linear_ce.py.

    logits: (R, V) any float dtype, overwritten with d(total)/d(logits) when compute_grad;
    targets: (R,) int64; row_scale: (R,) float32 gradient factor per row;
    loss_out: (R,) float32, written (per-row loss without row_scale; 0 where ignored).
    Loss per row, with s = softcap * tanh(z / softcap) (or s = z):
        lse(s) - (1 - eps) * s[t] - eps * mean(s) + z_loss * lse^2
    """
    V = logits.shape[1]
    z = logits.float()
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


def fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean",
                               head_weights=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                               max_scratch_bytes=None, return_per_head=False):
    """CPU path of `mtp_kernels.fused_linear_cross_entropy`: the same chunked driver, torch per chunk.

    Memory is bounded like the GPU path: logits exist one chunk of rows at a time.
    """
    from .linear_ce_driver import DEFAULT_SCRATCH_BYTES, linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, ce_chunk, ignore_index=ignore_index, reduction=reduction,
                                head_weights=head_weights, label_smoothing=label_smoothing, z_loss=z_loss,
                                softcap=softcap, max_scratch_bytes=max_scratch_bytes or DEFAULT_SCRATCH_BYTES,
                                return_per_head=return_per_head)


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
    causal j <= i). Eager with an explicit boolean mask, float32 softmax; a row that sees nothing gives 0.
    Returns (B, Tq, H, Dh) in q.dtype."""
    B, Tq, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    ct = _attention_compute_dtype(q)
    new_idx = (torch.arange(S, device=q.device).view(1, 1, S)
               - cache_seqlens.to(device=q.device, dtype=torch.long).view(B, 1, 1))   # (B, 1, S)
    query_idx = torch.arange(Tq, device=q.device).view(1, Tq, 1)
    if tree_mask is None:
        sees_new = new_idx <= query_idx
    else:
        sees_new = tree_mask.to(device=q.device, dtype=torch.bool)[query_idx, new_idx.clamp(0, Tq - 1)]
    visible = (new_idx < 0) | ((new_idx < Tq) & sees_new)                            # (B, Tq, S)
    qf = q.to(ct).view(B, Tq, Hkv, group, D).permute(0, 2, 3, 1, 4)                 # (B, Hkv, G, Tq, D)
    kf = k_cache.to(ct).permute(0, 2, 1, 3)                                          # (B, Hkv, S, D)
    vf = v_cache.to(ct).permute(0, 2, 1, 3)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, kf) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, vf)                               # (B, Hkv, G, Tq, D)
    return out.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D).to(q.dtype)
