"""Rotary embedding and KV-cache write in one Triton kernel, for the cached (inference) forward.

Between the q/k/v projections and attention, the eager path rotates q and k (a float32 copy, a
complex multiply and a cast back, for each) and scatters k and v into the caches: about eight
small kernels per layer, each a separate launch beside the layer's projections. Here three
programs per new token do it all, in parallel: one rotates the token's q heads into the output,
one its k heads into the cache slot, one copies its v heads there.

Meta's interleaved form: the pairs (x[2i], x[2i+1]) of a head are rotated by the angle of
freqs_cis[..., i], in float32, then cast back (what `reference.apply_rotary` does).
"""
from __future__ import annotations

import torch
from .triton_import import tl, triton

from . import reference
from .backend import check_one_device, interpreting, refuse_shared_caches, use_triton
from .dependent_launch import await_prior_grid, launch_programmatic


@triton.jit
def rotate(x0, x1, cos, sin):
    """The pairs (x0, x1) rotated by the angles whose cos and sin are given, in float32. Shared with
    the q/k/v GEMM's rotary epilogue (skinny_linear.py), so both do the same arithmetic (the same
    bits under the interpreter, tested; on a GPU the compiler may contract differently per kernel)."""
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def _rotate_heads(src, stride_src_h, dst, stride_dst_h, n_heads, cos, sin, offs_d, d_ok,
                  ROTATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Heads [0, n_heads) of one token: src[h, 2i], src[h, 2i+1] -> dst (rotated when ROTATE).
    Whole head rows are loaded and stored (coalesced); the pairs are split in registers."""
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        ok = (offs_h < n_heads)[:, None] & d_ok[None, :]
        x = tl.load(src + offs_h[:, None].to(tl.int64) * stride_src_h + offs_d[None, :], mask=ok, other=0.0)
        if ROTATE:
            x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_P, 2)))
            y0, y1 = rotate(x0, x1, cos[None, :], sin[None, :])
            y = tl.reshape(tl.join(y0, y1), (BLOCK_H, 2 * BLOCK_P)).to(dst.dtype.element_ty)
        else:
            y = x.to(dst.dtype.element_ty)
        tl.store(dst + offs_h[:, None].to(tl.int64) * stride_dst_h + offs_d[None, :], y, mask=ok)


@triton.jit
def _rope_cache_kernel(
    Q, K, V, FREQS, SLOTS, Q_OUT, K_CACHE, V_CACHE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_fb, stride_ft,
    stride_sb, stride_st,
    stride_ob, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    T, H, HKV, HALF,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    await_prior_grid(PDL)   # PDL: a programmatic dependent launch (dependent_launch.py)
    token = tl.program_id(0)
    which = tl.program_id(1)              # 0: q, 1: k, 2: v
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    offs_d = tl.arange(0, 2 * BLOCK_P)    # a head's dims, as BLOCK_P (even, odd) pairs
    d_ok = offs_d < 2 * HALF
    # freqs as float32 (cos, sin) pairs: view_as_real of the complex table.
    f = tl.load(FREQS + b * stride_fb + t * stride_ft + offs_d, mask=d_ok, other=0.0)
    cos, sin = tl.split(tl.reshape(f, (BLOCK_P, 2)))
    slot = tl.load(SLOTS + b * stride_sb + t * stride_st).to(tl.int64)

    if which == 0:
        _rotate_heads(Q + b * stride_qb + t * stride_qt, stride_qh, Q_OUT + b * stride_ob + t * stride_ot,
                      stride_oh, H, cos, sin, offs_d, d_ok, True, BLOCK_H, BLOCK_P)
    elif which == 1:
        _rotate_heads(K + b * stride_kb + t * stride_kt, stride_kh, K_CACHE + b * stride_kcb + slot * stride_kcs,
                      stride_kch, HKV, cos, sin, offs_d, d_ok, True, BLOCK_H, BLOCK_P)
    else:
        _rotate_heads(V + b * stride_vb + t * stride_vt, stride_vh, V_CACHE + b * stride_vcb + slot * stride_vcs,
                      stride_vch, HKV, cos, sin, offs_d, d_ok, False, BLOCK_H, BLOCK_P)


def rope_cache_write_triton(q, k, v, freqs_cis, slots, k_cache, v_cache) -> torch.Tensor:
    """Launcher (inputs already validated); same contract as `reference.rope_cache_write`."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    if freqs_cis.stride(-1) != 1:
        freqs_cis = freqs_cis.contiguous()
    freqs = torch.view_as_real(freqs_cis)                      # (..., D/2, 2) float32, no copy
    if freqs.dim() == 3:                                       # (T, D/2, 2): shared by the batch
        stride_fb, stride_ft = 0, freqs.stride(0)
    else:
        stride_fb, stride_ft = freqs.stride(0), freqs.stride(1)
    half = D // 2
    block_p = triton.next_power_of_2(half)
    # Heads per step: a (BLOCK_H, 2 * BLOCK_P) tile of at most 4K elements (64 under the interpreter).
    block_h = max(1, min(triton.next_power_of_2(max(H, Hkv)), (64 if interpreting() else 4096) // (2 * block_p)))
    pdl = launch_programmatic(q.device)
    _rope_cache_kernel[(B * T, 3)](
        q, k, v, freqs, slots, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_fb, stride_ft,
        slots.stride(0), slots.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        T, H, Hkv, half,
        BLOCK_P=block_p, BLOCK_H=block_h, PDL=pdl, num_warps=1 if interpreting() else 4, launch_pdl=pdl)
    return q_out


def check_cache_write(name: str, B: int, T: int, Hkv: int, D: int, freqs_cis, slots, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, check_slots: bool, **inputs: torch.Tensor) -> None:
    """The rules for writing B x T new tokens' rotated k and v (Hkv heads of D) into the caches at
    `slots`, with `rope_cache_write`'s messages (`name` first): caches that fit, freqs_cis and slots
    of the tokens' shape, slots in [0, S) (read on the host only for CPU tensors, with check_slots:
    on CUDA it would synchronize), and everything, `inputs` (by name) included, on one device. Shared by
    `rope_cache_write` and the q/k/v GEMM's rotary epilogue (`skinny_fused.skinny_linear_rope`)."""
    if not isinstance(v_cache, torch.Tensor) or k_cache.shape != v_cache.shape or k_cache.dim() != 4 \
            or k_cache.shape[0] < B or k_cache.shape[2:] != (Hkv, D) or D % 2:
        raise ValueError(f"{name}: caches {tuple(k_cache.shape)} / {tuple(getattr(v_cache, 'shape', ()))} do not fit "
                         f"{B} sequences of {Hkv} heads of an even head dim {D}")
    if not isinstance(freqs_cis, torch.Tensor):
        raise ValueError(f"{name}: freqs_cis must be a complex tensor, got {type(freqs_cis).__name__}")
    expected_f = [(B, T, D // 2), (T, D // 2)]
    if not freqs_cis.is_complex() or tuple(freqs_cis.shape) not in expected_f:
        raise ValueError(f"{name}: freqs_cis must be complex with shape {expected_f[0]} or {expected_f[1]}, "
                         f"got {tuple(freqs_cis.shape)} {freqs_cis.dtype}")
    if not isinstance(slots, torch.Tensor) or tuple(slots.shape) != (B, T) or slots.dtype not in (torch.int64,
                                                                                                 torch.int32):
        got = f"{tuple(slots.shape)} {slots.dtype}" if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise ValueError(f"{name}: slots must be an integer ({B}, {T}) tensor, got {got}")
    if check_slots and slots.device.type == "cpu" and slots.numel():
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= k_cache.shape[1]:
            raise ValueError(f"{name}: slots must be in [0, S = {k_cache.shape[1]}), got {low}..{high}")
        repeated = (slots.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
        if bool(repeated.any()):
            b = int(repeated.nonzero()[0, 0])
            raise ValueError(f"{name}: the slots of sequence {b} must be distinct (two tokens would write one "
                             f"slot), got {slots[b].tolist()}")
    refuse_shared_caches(name, k_cache, v_cache, "v would overwrite k")
    check_one_device(name, **inputs, freqs_cis=freqs_cis, slots=slots, k_cache=k_cache, v_cache=v_cache)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs_cis: torch.Tensor,
                     slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     check_slots: bool = True) -> torch.Tensor:
    """Rotate q and k (Meta's interleaved rotary form, in float32), write rotated k and v into the
    caches at `slots`, and return rotated q (B, T, H, Dh) in q's dtype. No autograd (inference).

    q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh) (any strides, e.g. views of one projection; one whose
    last stride is not 1 is copied first); freqs_cis: complex64 (B, T, Dh/2) per token, or (T, Dh/2)
    shared by the batch; slots: (B, T) int64 or int32, the cache slot of each new token (distinct within a sequence), in
    [0, S); k_cache, v_cache: (>= B, S, Hkv, Dh), written in place. q, k, v, caches:
    float32/float16/bfloat16 (float64 runs the reference).
    Slots are range-checked on the host for CPU tensors (check_slots); on CUDA reading them would
    synchronize, so there the caller keeps them in range. The model derives them from lengths it
    has checked and turns the check off: it would cost every block of a CPU decode step two
    reductions and two reads.
    """
    name = "rope_cache_write"
    for t, n in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {n} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D or D % 2:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
                         "(B, T) and an even head dim")
    for t, n in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"{name}: {n} must be a floating tensor, got {t.dtype}")
    check_cache_write(name, B, T, k.shape[2], D, freqs_cis, slots, k_cache, v_cache, check_slots, q=q, k=k, v=v)
    if q.numel() == 0 or k.numel() == 0:   # no token to rotate or write
        return q.clone()
    # Complex views of the rotary pairs need a unit last stride: a strided q/k/v is copied once.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tensors = (q, k, v, freqs_cis, slots, k_cache, v_cache)
    unit_last = all(t.stride(-1) == 1 for t in (k_cache, v_cache))
    if not use_triton(*tensors) or not unit_last or freqs_cis.dtype != torch.complex64 or \
            q.dtype == torch.float64 or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return reference.rope_cache_write(*tensors)
    return rope_cache_write_triton(*tensors)
