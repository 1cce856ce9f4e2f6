"""Kernel launchers against inputs that are views: strided rows, stride-0 (expanded) per-row values,
column slices, transposes, slices of bigger buffers. A kernel whose pointer arithmetic assumes a
layout its launcher does not guarantee reads the wrong elements (or past the tensor) on a GPU,
silently; under the interpreter the same wrong reads show as wrong values. Each test compares the
view against the same values made contiguous."""
import pytest
import torch

from mtp_kernels import (add_rms_norm, compact_kv_cache, linear_argmax, linear_candidates, linear_logits,
                         linear_sample, linear_topk, rms_norm, rope_cache_write, swiglu, tree_accept_tokens)
from mtp_kernels.attention import flash_attention
from mtp_kernels.kv_cache_attention import kv_cache_attention


def _every_other(t: torch.Tensor, fill) -> torch.Tensor:
    """t's values as every other element (dim 0) of a buffer whose other elements hold `fill`."""
    buffer = torch.full((2 * t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)
    buffer[::2] = t
    return buffer[::2]


# ------------------------------------------------------------------------------------ findings
@pytest.mark.parametrize("view", ["every_other", "repeated", "column"])
def test_candidate_row_ids_as_views_pick_the_rows_they_name(triton_backend, view):
    """TokenCandidates.argmax / .topk(rows=...): the merge kernel read row id i at rows_ptr + i, as
    if the flattened ids were contiguous. `rows.reshape(-1)` keeps a 1-D view's stride (every other
    id of a buffer, a column of a (n, k) table) and an expanded id's stride 0, so the kernel read the
    buffer's other elements, or past a stride-0 view's one element: the wrong rows' tokens (a row id
    out of range on a GPU). Now the launcher passes the ids' stride."""
    g = torch.Generator().manual_seed(11)
    R, V, D, k = 6, 200, 16, 3
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g)
    candidates = linear_candidates(hidden, weight, k)
    if view == "every_other":
        rows = _every_other(torch.tensor([4, 1, 5, 0]), 2)
    elif view == "repeated":
        rows = torch.tensor([3]).expand(4)
    else:   # a column of a (n, 2) table of ids, e.g. ids[:, 0]
        rows = torch.tensor([[5, 0], [2, 1], [4, 3]])[:, 0]
    assert not rows.is_contiguous()
    dense = rows.contiguous()
    assert torch.equal(candidates.argmax(rows), candidates.argmax(dense))
    assert torch.equal(candidates.topk(k, rows), candidates.topk(k, dense))
    assert torch.equal(candidates.argmax(dense), linear_argmax(hidden, weight)[dense])


# ------------------------------------------------------------------------------------ the sweep
# The main public kernels on views of every kind their callers make (no bug known in these: the
# sweep guards the launchers' layout handling against future changes). Each op runs twice on the
# Triton path, on the views and on contiguous copies of the same values, and must give the same
# bits (a launch does not depend on the layout under the interpreter), in place updates included.
def _wide(t: torch.Tensor) -> torch.Tensor:
    """t as the first half of a last dim twice as long: rows strided, elements unit strided (a
    column slice of a fused projection)."""
    buffer = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    buffer[..., :t.shape[-1]] = t
    return buffer[..., :t.shape[-1]]


def _laid_out(t: torch.Tensor, order) -> torch.Tensor:
    """t's values in memory laid out with dims in `order` (outermost first): a transposed view."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(*order).contiguous().permute(*inverse)


def _column(t: torch.Tensor, fill) -> torch.Tensor:
    """t's values as column 1 of a (*t.shape, 3) buffer whose other columns hold `fill`: every
    dim strided, the last one included."""
    buffer = torch.full((*t.shape, 3), fill, dtype=t.dtype)
    buffer[..., 1] = t
    return buffer[..., 1]


def _dense(*tensors):
    return [t.clone(memory_format=torch.contiguous_format) for t in tensors]


def _same(got, want):
    got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _sweep_norms(g):
    x, r, w = torch.randn(3, 4, 24, generator=g), torch.randn(3, 4, 24, generator=g), torch.randn(24, generator=g)
    for xs, rs, ws in ((_wide(x), _column(r, 0.0), _every_other(w, 9.0)),
                       (_laid_out(x, (2, 0, 1)), _laid_out(r, (1, 0, 2)), torch.tensor([0.7]).expand(24)),   # weight: stride 0
                       (x.transpose(0, 1).contiguous().transpose(0, 1), _wide(r), _column(w, 0.0))):
        _same(rms_norm(xs, ws), rms_norm(*_dense(xs, ws)))
        _same(add_rms_norm(xs, rs, ws), add_rms_norm(*_dense(xs, rs, ws)))
        # the backward: x, weight and the incoming gradient as views
        xv, wv = xs.clone().requires_grad_(), ws.clone().requires_grad_()
        dy = _laid_out(torch.randn(3, 4, 24, generator=g), (2, 1, 0))
        rms_norm(xv, wv).backward(dy)
        xd, wd = (t.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for t in (xs, ws))
        rms_norm(xd, wd).backward(dy.contiguous())
        _same((xv.grad, wv.grad), (xd.grad, wd.grad))


def _sweep_swiglu(g):
    fused = torch.randn(5, 2, 40, generator=g)
    for gate, up in ((fused[:, 0], fused[:, 1]), (_laid_out(fused[:, 0], (1, 0)), _column(fused[:, 1], 1.0))):
        _same(swiglu(gate, up), swiglu(*_dense(gate, up)))


def _sweep_rope_cache(g):
    B, T, H, Hkv, D, S = 2, 3, 4, 2, 8, 7
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    table = torch.polar(torch.ones(2 * T + 1, D // 2), torch.rand(2 * T + 1, D // 2, generator=g) * 6.28)
    slots = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    caches = [torch.randn(B + 2, S, Hkv, D, generator=g) for _ in range(2)]
    views = (_laid_out(q, (3, 0, 1, 2)), k, _column(v, 0.0), table[1::2], _laid_out(slots, (1, 0)),
             *(_laid_out(c, (0, 2, 1, 3))[1:B + 1] for c in caches))   # caches: (B, Hkv, S, D) memory, rows 1..B
    dense = _dense(*views)
    _same(rope_cache_write(*views), rope_cache_write(*dense))
    _same(views[-2:], dense[-2:])
    per_sequence = torch.polar(torch.ones(B, T, D // 2), torch.rand(B, T, D // 2, generator=g))
    views = (q, k, v, _column(per_sequence, 0), _column(slots, -1), *(c[:B] for c in caches))
    dense = _dense(*views)
    _same(rope_cache_write(*views), rope_cache_write(*dense))
    _same(views[-2:], dense[-2:])


def _sweep_attention(g):
    B, T, H, Hkv, D, S = 2, 5, 4, 2, 16, 12
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    views = (_laid_out(q, (2, 0, 1, 3)), k, v.transpose(0, 1).contiguous().transpose(0, 1))
    leaves = [t.detach().clone().requires_grad_() for t in views]
    dense = [t.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for t in views]
    grad = _laid_out(torch.randn(B, T, H, D, generator=g), (3, 1, 2, 0))
    out = flash_attention(*leaves, causal=True)
    expected = flash_attention(*dense, causal=True)
    _same(out, expected)
    out.backward(grad)
    expected.backward(grad.contiguous())
    _same([t.grad for t in leaves], [t.grad for t in dense])
    # KV-cache attention: q a view, the caches rows of a bigger buffer laid out heads-first,
    # cache_seqlens every other element of a buffer; causal and with a tree mask
    caches = [_laid_out(torch.randn(B + 1, S, Hkv, D, generator=g), (0, 2, 1, 3))[1:] for _ in range(2)]
    seqlens = _every_other(torch.tensor([3, 7], dtype=torch.int32), 0)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask[3, 1] = False
    for tree_mask in (None, mask):
        got = kv_cache_attention(views[0], *caches, seqlens, tree_mask)
        _same(got, kv_cache_attention(*_dense(views[0], *caches, seqlens), tree_mask))


def _sweep_selection(g):
    R, V, D, heads = 5, 150, 16, 3
    hidden = torch.randn(R, heads, D, generator=g)[:, 1]              # one head's rows of (R, heads, D)
    weight = _wide(torch.randn(V, D, generator=g))                      # a column slice of a wider table
    dense = _dense(hidden, weight)
    for views in ((hidden, weight), (_laid_out(hidden, (1, 0)), _laid_out(weight, (1, 0)))):   # transposed: copied
        _same(linear_argmax(*views), linear_argmax(*dense))
        _same(linear_topk(*views, 4), linear_topk(*dense, 4))
        _same(linear_logits(*views), linear_logits(*dense))
    seeds, offsets = torch.randint(0, 2**40, (R,), generator=g), torch.arange(R) * 7
    temperature, top_p, top_k = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.7]), torch.tensor([1.0, 0.8, 1.0, 0.5, 0.9]), \
        torch.tensor([0, 3, 9, 0, 5])
    for kwargs in (dict(temperature=0.8), dict(temperature=temperature), dict(temperature=temperature, top_p=top_p),
                   dict(temperature=0.9, top_k=top_k), dict(temperature=1.1, top_p=0.7)):
        views = {name: _every_other(value, 0) if isinstance(value, torch.Tensor) else value
                 for name, value in kwargs.items()}
        got = linear_sample(hidden, weight, seeds=_column(seeds, 1), offsets=_every_other(offsets, 3), **views)
        _same(got, linear_sample(*dense, seeds=seeds, offsets=offsets, **kwargs))


def _sweep_tree(g):
    B, T, L, S, Hkv, Dh = 3, 6, 2, 14, 2, 4
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    candidates = torch.randint(0, 4, (B, T), generator=g)
    verifier = torch.randint(0, 4, (B, T), generator=g)
    views = (_laid_out(candidates, (1, 0)), _column(verifier, -5), _every_other(parents, 99))
    outputs = tree_accept_tokens(*views)
    _same(outputs, tree_accept_tokens(candidates, verifier, parents))
    accepted_nodes, packed = outputs[0], outputs[1]
    accept_len = packed[:, 0]                                           # a column of packed: strided
    caches = [_laid_out(torch.randn(L, B + 1, S, Hkv, Dh, generator=g), (0, 3, 1, 2, 4)) for _ in range(2)]
    dense_caches = _dense(*caches)
    seqlens = _every_other(torch.tensor([2, 0, 5, 1], dtype=torch.int32), 7)
    dense_seqlens = seqlens.contiguous()
    compact_kv_cache(*caches, seqlens, _laid_out(accepted_nodes, (1, 0)), accept_len)
    compact_kv_cache(*dense_caches, dense_seqlens, accepted_nodes.contiguous(), accept_len.contiguous())
    _same([*caches, seqlens], [*dense_caches, dense_seqlens])


def _sweep_cross_entropy(g):
    from mtp_kernels import fused_linear_cross_entropy

    n, N, D, V = 2, 5, 16, 40
    hidden = torch.randn(N, n, D, generator=g).transpose(0, 1)          # (n, N, D), rows strided by head
    weight = _wide(torch.randn(V, D, generator=g))
    targets = _column(torch.randint(0, V, (n, N), generator=g), -100)
    targets[0, 2] = -100
    for reduction, hidden in (("mean", hidden), ("none", hidden), ("mean", _laid_out(hidden, (2, 0, 1)))):
        views = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        dense = [t.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for t in (hidden, weight)]
        got = fused_linear_cross_entropy(*views, targets, reduction=reduction, label_smoothing=0.1)
        want = fused_linear_cross_entropy(*dense, targets.contiguous(), reduction=reduction, label_smoothing=0.1)
        _same(got, want)
        grad = torch.randn(want.shape, generator=g)
        got.backward(grad)
        want.backward(grad)
        _same([t.grad for t in views], [t.grad for t in dense])


@pytest.mark.parametrize("sweep", [_sweep_norms, _sweep_swiglu, _sweep_rope_cache, _sweep_attention,
                                   _sweep_selection, _sweep_tree, _sweep_cross_entropy],
                         ids=lambda fn: fn.__name__.removeprefix("_sweep_"))
def test_public_kernels_on_views_give_what_contiguous_inputs_give(triton_backend, sweep):
    """Every kind of view the engine or a user makes (column slices of fused projections, one head
    of stacked heads, transposed memory, rows of a bigger cache, every other element of a per-row
    buffer, stride-0 values) through the main public kernels: the same bits as contiguous copies,
    and in-place results (caches, lengths) written where the views point."""
    sweep(torch.Generator().manual_seed(7))
