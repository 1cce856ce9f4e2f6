"""Pointer offsets past 2^31 elements: no kernel's int32 offset arithmetic wraps.

In Triton, tl.program_id, tl.arange and integer arguments below 2^31 are int32, so `row * stride`
wraps once the product passes 2^31 - 1 and reads or writes other memory, unless one factor is cast
to int64 first. A test cannot fill a tensor of 2^31 elements on a CI box, but it can reserve one:
torch.empty does not touch a CPU tensor's pages, so one fp16 storage of about 2^32 elements (8 GiB
of address space) costs only the pages the tests write (a few MB). Each test views 3 rows (batches,
layers) of it 2^30 + 64 elements apart, the first at element 2^31: the third starts 2^31 + 128
elements past the first, which an int32 product wraps to 2^31 - 128 elements *before* it, still
inside the storage, in a region filled with MARKER, so a wrapped read gives a wrong value (not a
crash) and the comparison with the reference on a compact copy fails.

On CPU the kernels run under the interpreter, whose int32 arithmetic wraps as a GPU's does (checked:
before rmsnorm.py's int64 rows and skinny_linear.py's compact copy of such views, row 2 of their tests
read the marker; dropping the int64 cast of any other kernel tested here fails its test).
The "cuda" parameter (marked gpu) runs the same tests on the compiled kernels with a real 8 GiB
allocation.
"""
import os

import pytest
import torch

from mtp_kernels import (add_rms_norm, compact_kv_cache, linear_argmax, linear_logits, linear_topk, reference,
                         rms_norm, rope_cache_write, swiglu)
from mtp_kernels import skinny_linear as sl, skinny_norm as sn
from mtp_kernels.attention import flash_attention
from mtp_kernels.backend import interpreting
from mtp_kernels.fused_linear_ce import ce_chunk
from mtp_kernels.kv_cache_attention import kv_cache_attention
from mtp_kernels.linear_ce_driver import CEOptions
from mtp_kernels.vocab_parallel_ce import vp_chunk_grad, vp_chunk_stats

STRIDE = 2 ** 30 + 64     # between the views' rows: row 2 starts 2^31 + 128 elements past row 0
BASE = 2 ** 31            # storage element of row 0's region
LOW = 2 ** 20             # elements [0, LOW) hold MARKER: where a wrapped row-2 offset lands
MARKER = 7.0


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class HugeStorage:
    """One fp16 storage of BASE + 2 * STRIDE + LOW elements; `rows` hands out disjoint views."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        before = _resident_bytes()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False   # deterministic mode would write 8 GiB
        try:
            self.store = torch.empty(BASE + 2 * STRIDE + LOW, dtype=torch.float16, device=self.device)
        except RuntimeError as e:   # no overcommit, an address-space limit, or a small GPU
            pytest.skip(f"cannot reserve an 8 GiB fp16 storage: {e}")
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill
        after = _resident_bytes()
        if self.device.type == "cpu" and before is not None and after is not None and after - before > 2 ** 30:
            del self.store
            pytest.skip("torch.empty committed the 8 GiB storage's pages here")
        self.store[:LOW].fill_(MARKER)
        self.next = 0
        self.gen = torch.Generator().manual_seed(0)

    def rows(self, *tail: int, n: int = 3, values: bool = True) -> torch.Tensor:
        """A (n, *tail) fp16 view, dim 0 STRIDE apart (the rest contiguous), filled with randn
        values (values=False: zeros). Its wrapped images (storage element offset + 128 on) lie in
        the marker region."""
        size = 1
        for d in tail:
            size *= d
        offset = self.next
        self.next += -(-(size + 256) // 64) * 64      # 128-byte aligned regions (TMA descriptors)
        assert self.next + 128 < LOW and n <= 3
        strides, step = [], 1
        for d in reversed(tail):
            strides.insert(0, step)
            step *= d
        view = self.store.as_strided((n, *tail), (STRIDE, *strides), BASE + offset)
        data = torch.randn(n, *tail, generator=self.gen) if values else torch.zeros(n, *tail)
        view.copy_(data.to(torch.float16))
        return view


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def huge_storage(request):
    if request.param == "cpu" and not interpreting():
        pytest.skip("Triton path on CPU tensors needs TRITON_INTERPRET=1")
    storage = HugeStorage(request.param)
    yield storage
    del storage.store
    if request.param == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture
def huge(huge_storage, monkeypatch):
    """The storage, with the Triton path forced for CPU tensors (CUDA tensors take it anyway)."""
    if huge_storage.device.type == "cpu":
        monkeypatch.setenv("MTP_BACKEND", "triton")
    return huge_storage


def _small(huge, *shape, dtype=torch.float16):
    return torch.randn(*shape, generator=huge.gen).to(dtype).to(huge.device)


def _close(got, want, tol=2e-2):
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------------- row kernels (fixed: rmsnorm.py)
def test_rms_norm_forward_and_backward(huge):
    x = huge.rows(64).detach().requires_grad_()
    dy = huge.rows(64)
    w = _small(huge, 64).requires_grad_()
    rms_norm(x, w, 1e-6).backward(dy)
    xc, wc = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = reference.rms_norm(xc, wc, 1e-6)
    want.backward(dy.clone())
    _close(rms_norm(x.detach(), w.detach(), 1e-6), want.detach())
    _close(x.grad, xc.grad, tol=5e-2)
    _close(w.grad, wc.grad, tol=5e-2)


def test_add_rms_norm(huge):
    x, r = huge.rows(64), huge.rows(64)
    w = _small(huge, 64)
    h, y = add_rms_norm(x, r, w, 1e-6)
    h_want, y_want = reference.add_rms_norm(x.clone(), r.clone(), w, 1e-6)
    _close(h, h_want)
    _close(y, y_want)


def test_swiglu(huge):
    gate, up = huge.rows(96), huge.rows(96)
    _close(swiglu(gate, up), reference.swiglu(gate.clone(), up.clone()))


# ------------------------------------------- skinny GEMM (fixed: skinny_linear.py's _int32_rows)
def test_skinny_linear_every_tile(huge):
    x = huge.rows(64)
    w = _small(huge, 48, 64)
    want = x.clone().float() @ w.float().T
    launches = [c for c in sl.skinny_candidates(3, huge.device)[1:] if c.use_dot]
    assert any(c.split_k > 1 for c in launches) and any(c.stream_k for c in launches)
    for launch in launches:
        _close(sl.skinny_linear_run(x, w, launch), want, tol=5e-2)


def test_skinny_norm_prologue_with_a_delta(huge):
    x, delta = huge.rows(64), huge.rows(64)
    w, g = _small(huge, 48, 64), _small(huge, 64)
    launch = next(c for c in sl.skinny_candidates(3, huge.device)[1:]
                  if c.use_dot and c.split_k == 1 and not c.stream_k and not c.ws)
    h_out = torch.empty(3, 64, dtype=torch.float16, device=huge.device)
    y = sl.skinny_linear_run(x, w, launch, norm=sn.NormPrologue(g, 1e-5, delta), h_out=h_out)
    h_want, normed = reference.add_rms_norm(x.clone(), delta.clone(), g, 1e-5)
    _close(h_out, h_want)
    _close(y, normed.float() @ w.float().T, tol=5e-2)


# ---------------------------------------------------- kernels already casting (regression guards)
@pytest.mark.parametrize("V", [300, 40])   # streamed in tiles, and one tile (ONE_PASS) under the interpreter
def test_cross_entropy_chunk(huge, V):
    logits = huge.rows(V)
    targets = torch.tensor([3, V - 1, 7], device=huge.device)
    scale = torch.full((3,), 0.5, device=huge.device)
    opts = CEOptions(label_smoothing=0.1, z_loss=1e-4)
    want_logits, want_loss = logits.clone(), torch.empty(3, device=huge.device)
    reference.ce_chunk(want_logits, targets, scale, want_loss, opts, True)
    loss = torch.empty(3, device=huge.device)
    ce_chunk(logits, targets, scale, loss, opts, True)
    _close(loss, want_loss, tol=1e-3)
    _close(logits, want_logits, tol=1e-3)


def test_vocab_parallel_chunk(huge):
    logits = huge.rows(200)
    targets = torch.tensor([5, 250, 199], device=huge.device)      # 250 lives on another rank
    opts = CEOptions(label_smoothing=0.1, softcap=30.0)
    stats, want = (torch.empty(3, 3, device=huge.device) for _ in range(2))
    reference.vp_chunk_stats(logits.clone(), targets, 0, want, opts)
    vp_chunk_stats(logits, targets, 0, stats, opts)
    _close(stats, want, tol=1e-3)
    lse, scale = want[0] + 0.5, torch.ones(3, device=huge.device)
    want_grad = logits.clone()
    reference.vp_chunk_grad(want_grad, targets, 0, 400, lse, scale, opts)
    vp_chunk_grad(logits, targets, 0, 400, lse, scale, opts)
    _close(logits, want_grad, tol=1e-3)


def test_selection_and_logits_of_hidden_rows(huge):
    hidden = huge.rows(64)
    weight = _small(huge, 200, 64)
    logits = hidden.clone().float() @ weight.float().T
    assert torch.equal(linear_argmax(hidden, weight), logits.argmax(-1))
    assert torch.equal(linear_topk(hidden, weight, 4), logits.topk(4).indices)
    _close(linear_logits(hidden, weight), logits, tol=1e-2)


def test_flash_attention_batches(huge):
    q, k, v = (huge.rows(48, h, 16).detach().requires_grad_() for h in (4, 2, 2))
    do = huge.rows(48, 4, 16)
    out = flash_attention(q, k, v, causal=True)
    out.backward(do)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = reference.attention(qc, kc, vc, causal=True)
    want.backward(do.clone())
    _close(out, want)
    for got, ref in ((q.grad, qc.grad), (k.grad, kc.grad), (v.grad, vc.grad)):
        _close(got, ref, tol=5e-2)


@pytest.mark.parametrize("tree", [False, True])
def test_kv_cache_attention_batches(huge, tree):
    k_cache, v_cache = huge.rows(40, 2, 16), huge.rows(40, 2, 16)
    q = _small(huge, 3, 3, 4, 16)
    seqlens = torch.tensor([30, 5, 37], dtype=torch.int32, device=huge.device)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=huge.device) if tree else None
    want = reference.kv_cache_attention(q, k_cache.clone(), v_cache.clone(), seqlens, mask)
    _close(kv_cache_attention(q, k_cache, v_cache, seqlens, mask), want)


def test_rope_cache_write_batches(huge):
    k_cache, v_cache = huge.rows(24, 2, 16, values=False), huge.rows(24, 2, 16, values=False)
    q, k, v = (_small(huge, 3, 2, h, 16) for h in (4, 2, 2))
    freqs = torch.polar(torch.ones(3, 2, 8), torch.rand(3, 2, 8, generator=huge.gen)).to(huge.device)
    slots = torch.tensor([[3, 4], [20, 21], [22, 23]], device=huge.device)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_want = reference.rope_cache_write(q, k, v, freqs, slots, k_want, v_want)
    _close(rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache), q_want)
    _close(k_cache, k_want)
    _close(v_cache, v_want)


def test_compact_kv_cache_layers(huge):
    k_cache, v_cache = huge.rows(2, 16, 2, 8), huge.rows(2, 16, 2, 8)     # (layers, B, S, Hkv, Dh)
    seqlens = torch.tensor([4, 9], dtype=torch.int32, device=huge.device)
    nodes = torch.tensor([[0, 2, 5], [0, 1, 3]], device=huge.device)
    accept = torch.tensor([3, 2], device=huge.device)
    k_want, v_want, seq_want = k_cache.clone(), v_cache.clone(), seqlens.clone()
    reference.compact_kv_cache(k_want, v_want, seq_want, nodes, accept)
    compact_kv_cache(k_cache, v_cache, seqlens, nodes, accept)
    assert torch.equal(seqlens, seq_want)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
