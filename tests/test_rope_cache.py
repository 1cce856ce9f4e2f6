"""Rotary embedding + KV-cache write: the Triton kernel (interpreted on CPU) against its reference."""
import pytest
import torch

from mtp_kernels import reference, rope_cache_write
from mtp_kernels.rope_cache import rope_cache_write_triton


def _freqs(T, D, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (T, D // 2) if B is None else (B, T, D // 2)
    return torch.polar(torch.ones(shape), torch.rand(shape, generator=g) * 6.28)


def _inputs(B, T, H, Hkv, D, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q, k, v as views of one fused projection: head strides that are not D apart from each other.
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g).to(dtype)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    caches = [torch.randn(B + 1, S, Hkv, D, generator=g).to(dtype) for _ in range(2)]
    # Distinct slots per sequence, in any order (a tree's nodes go to consecutive slots; any works).
    slots = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    return q, k, v, slots, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H,Hkv,D,shared", [
    (3, 5, 4, 2, 16, False),
    (2, 1, 8, 2, 48, False),     # decode; a head dim that is not a power of two
    (1, 7, 2, 2, 6, True),       # three pairs; one rotation table for the batch
    (2, 4, 6, 3, 32, True),
])
def test_kernel_equals_reference(triton_backend, dtype, B, T, H, Hkv, D, shared):
    q, k, v, slots, (k_cache, v_cache) = _inputs(B, T, H, Hkv, D, S=11, dtype=dtype, seed=T + D)
    freqs = _freqs(T, D, None if shared else B, seed=D)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = reference.rope_cache_write(q, k, v, freqs, slots, want_k, want_v)
    got_q = rope_cache_write_triton(q, k, v, freqs, slots, k_cache, v_cache)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    # float32: same products, maybe fused differently (one ulp); fp16: the same up to one rounding
    torch.testing.assert_close(got_q, want_q, **(tol if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)))
    torch.testing.assert_close(k_cache, want_k, **(tol if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)))
    assert torch.equal(v_cache, want_v)          # v is copied, not rotated: exact
    untouched = torch.ones(B + 1, 11, dtype=torch.bool)
    untouched[torch.arange(B)[:, None], slots] = False
    assert torch.equal(k_cache[untouched], want_k[untouched])


def test_reference_writes_only_the_new_slots(monkeypatch):
    """The CPU path's cache write touches the new slots only: torch's CPU scatter_ walks the whole slot
    dim (a decode step's cost grew with max_seq_len: 15 ms a call at 64K slots), so it must not be the
    way in; the values are the rotated k and v at their slots, the rest of the cache untouched."""
    monkeypatch.setattr(torch.Tensor, "scatter_", lambda *a, **k: pytest.fail("scatter_ walks the whole cache"))
    q, k, v, slots, (k_cache, v_cache) = _inputs(2, 3, 4, 2, 8, S=4096, dtype=torch.float32)
    freqs = _freqs(3, 8, B=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    reference.rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(k_cache[rows, slots], reference.apply_rotary(k, freqs), rtol=0, atol=0)
    assert torch.equal(v_cache[rows, slots], v)
    written = torch.zeros(3, 4096, dtype=torch.bool)
    written[rows, slots] = True
    assert torch.equal(k_cache[~written], before_k[~written]) and torch.equal(v_cache[~written], before_v[~written])


def test_rotation_is_meta_interleaved_form():
    """Pair (x0, x1) rotated by angle a: (x0 cos a - x1 sin a, x0 sin a + x1 cos a), float64 by hand."""
    q, k, v, slots, (k_cache, v_cache) = _inputs(1, 2, 2, 1, 4, S=3, dtype=torch.float32)
    freqs = _freqs(2, 4, B=1, seed=1)
    out = rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)
    a = torch.angle(freqs)[0].double()                                    # (T, 2)
    x = q[0].double().reshape(2, 2, 2, 2)                                 # (T, H, pairs, 2)
    c, s = torch.cos(a)[:, None, :], torch.sin(a)[:, None, :]
    want = torch.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], -1).reshape(2, 2, 4)
    torch.testing.assert_close(out[0].double(), want, rtol=1e-6, atol=1e-6)


def test_public_function_dispatches_and_keeps_autograd_on_the_reference(triton_backend, monkeypatch):
    """Without autograd the public function launches the kernel; with a q that needs a gradient it
    runs the differentiable reference. Both write the caches and rotate q as float64 does."""
    import mtp_kernels.rope_cache as rope_module

    launched = []
    monkeypatch.setattr(rope_module, "rope_cache_write_triton",
                        lambda *a: launched.append(1) or rope_cache_write_triton(*a))
    q, k, v, slots, (k_cache, v_cache) = _inputs(2, 3, 4, 2, 16, S=8, dtype=torch.float32)
    freqs = _freqs(3, 16, B=2)
    want_k, want_v = k_cache.double(), v_cache.double()
    want_q = reference.rope_cache_write(q.double(), k.double(), v.double(), freqs.to(torch.complex128), slots,
                                        want_k, want_v)
    with torch.no_grad():
        got = rope_cache_write(q, k, v, freqs, slots, k_cache.clone(), v_cache.clone())
    assert launched == [1]
    torch.testing.assert_close(got.double(), want_q, rtol=1e-6, atol=1e-6)
    q = q.clone().requires_grad_()
    out = rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)
    assert launched == [1] and out.requires_grad   # the kernel has no backward: the reference ran
    torch.testing.assert_close(out.detach().double(), want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache.double(), want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache.double(), want_v)
    (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    q64 = q.detach().double().requires_grad_()
    ref = reference.rope_cache_write(q64, k.double(), v.double(), freqs.to(torch.complex128), slots,
                                     k_cache.double(), v_cache.double())
    (ref * torch.arange(ref.numel()).view(ref.shape)).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("case,match", [
    ("odd_dim", "even head dim"),
    ("freqs_shape", "freqs_cis must be complex"),
    ("freqs_real", "freqs_cis must be complex"),
    ("slots", "slots must be an integer"),
    ("cache", "caches"),
    ("device", "one device"),
    ("slot_past_end", r"slots must be in \[0, S = 8\), got 0..8"),
    ("slot_negative", r"slots must be in \[0, S = 8\), got -1"),
    ("int_q", "q must be a floating tensor"),
    ("freqs_list", "freqs_cis must be a complex tensor, got list"),
    ("slot_twice", r"the slots of sequence 1 must be distinct \(two tokens would write one slot\), got \[4, 6, 4\]"),
    ("one_cache", "k_cache and v_cache are the same memory"),
])
def test_bad_input_is_a_clear_error(case, match):
    q, k, v, slots, (k_cache, v_cache) = _inputs(2, 3, 4, 2, 16, S=8, dtype=torch.float32)
    freqs = _freqs(3, 16, B=2)
    if case == "odd_dim":
        q, k, v = q[..., :15], k[..., :15], v[..., :15]
    elif case == "freqs_shape":
        freqs = freqs[:, :2]
    elif case == "freqs_real":
        freqs = torch.view_as_real(freqs)[..., 0]
    elif case == "slots":
        slots = slots.float()
    elif case == "cache":
        k_cache = k_cache[..., :8]
    elif case == "device":
        slots = slots.to("meta")
    elif case == "slot_past_end":   # the cache may be a view of a longer buffer: nothing else stops it
        slots = slots.clone()
        slots[0, 0], slots[1, -1] = 0, 8
    elif case == "slot_negative":
        slots = slots.clone()
        slots[1, 1] = -1
    elif case == "int_q":
        q = q.long()
    elif case == "freqs_list":
        freqs = freqs.tolist()
    elif case == "slot_twice":
        slots = torch.tensor([[0, 1, 2], [4, 6, 4]])
    elif case == "one_cache":
        v_cache = k_cache
    with pytest.raises(ValueError, match=match):
        rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("D,T", [(128, 1), (128, 64), (48, 3)])
def test_gpu_bf16_equals_reference(D, T):
    q, k, v, slots, (k_cache, v_cache) = _inputs(4, T, 32 if D == 128 else 4, 8 if D == 128 else 2, D, S=80,
                                                 dtype=torch.bfloat16)
    q, k, v, slots, k_cache, v_cache = (t.cuda() for t in (q, k, v, slots, k_cache, v_cache))
    freqs = _freqs(T, D, B=4).cuda()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = reference.rope_cache_write(q, k, v, freqs, slots, want_k, want_v)
    got_q = rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)
    # float32 rotation, one bf16 rounding: at most one bf16 ulp apart from the complex-multiply path
    torch.testing.assert_close(got_q, want_q, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(k_cache, want_k, rtol=8e-3, atol=8e-3)
    assert torch.equal(v_cache, want_v)
