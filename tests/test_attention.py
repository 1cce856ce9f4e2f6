"""Flash attention and KV-cache attention: Triton (interpreted on CPU, fp32) vs float64 oracles."""
import dataclasses
import math
from functools import partial

import pytest
import torch
import triton
import torch.nn.functional as F

from mtp_kernels import attention as attention_module
from mtp_kernels import kv_cache_attention as kv_attention_module
from mtp_kernels.arrival import arrival_counters
from mtp_kernels import reference
from mtp_kernels.attention import flash_attention
from mtp_kernels.kv_cache_attention import PackedTreeMask, kv_cache_attention, pack_tree_mask
from mtp_kernels.launch_tuner import LaunchTuner, cuda_graph_ms


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------
def _sdpa_float64(q, k, v, causal, scale):
    """Independent oracle: torch SDPA on float64 with K/V repeated per query head."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    kh = kh.repeat_interleave(group, dim=1)
    vh = vh.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _kv_oracle(q, k_cache, v_cache, cache_seqlens, tree_mask, scale):
    """Per (sequence, query) loop over the explicitly listed visible slots, float64."""
    B, Tq, H, D = q.shape
    group = H // k_cache.shape[2]
    kv_head = torch.arange(H) // group
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(cache_seqlens[b])
        for i in range(Tq):
            seen = [j for j in range(Tq) if (bool(tree_mask[i, j]) if tree_mask is not None else j <= i)]
            slots = list(range(n)) + [n + j for j in seen]
            if not slots:
                continue
            k = k_cache[b, slots][:, kv_head].double()           # (S, H, D)
            v = v_cache[b, slots][:, kv_head].double()
            p = torch.softmax(torch.einsum("hd,shd->hs", q[b, i].double(), k) * scale, dim=-1)
            out[b, i] = torch.einsum("hs,shd->hd", p, v)
    return out


def _random_tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask of a random forest, node order shuffled (not necessarily topological)."""
    parent = [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(n):
        a = parent[i]
        while a >= 0:
            mask[i, a] = True
            a = parent[a]
    perm = torch.randperm(n, generator=gen)
    return mask[perm][:, perm]


def _qkv(B, T, H, Hkv, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda h: torch.randn(B, T, h, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


# --------------------------------------------------------------------------------------------
# Flash attention (interpreter, fp32)
# --------------------------------------------------------------------------------------------
FLASH_CASES = [
    # B, T, H, Hkv, D, causal
    (1, 1, 4, 4, 16, True),
    (2, 5, 4, 2, 32, True),
    (1, 37, 4, 1, 64, True),
    (2, 37, 4, 2, 16, True),
    (1, 64, 4, 2, 16, True),
    (1, 37, 4, 2, 32, False),
    (2, 5, 4, 1, 16, False),
    (1, 1, 4, 1, 64, False),
    # head dims that are not a power of two: a padded tile with masked columns
    (2, 37, 4, 2, 48, True),
    (1, 21, 2, 1, 24, False),
    (1, 9, 2, 2, 8, True),
    (1, 37, 4, 2, 80, True),
]


@pytest.mark.parametrize("B,T,H,Hkv,D,causal", FLASH_CASES)
def test_flash_attention_matches_float64(triton_backend, B, T, H, Hkv, D, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(B, T, H, Hkv, D, seed=T * 7 + D))
    assert attention_module._kernel_supports(q)  # the Triton kernels run, not the fallback
    out = flash_attention(q, k, v, causal=causal)
    assert out.shape == (B, T, H, D) and out.dtype == torch.float32
    dout = torch.randn_like(out)
    out.backward(dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = _sdpa_float64(q64, k64, v64, causal, 1 / math.sqrt(D))
    out64.backward(dout.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("T,Hkv,causal", [(37, 1, True), (37, 2, False), (5, 4, True)])
def test_flash_attention_single_loop_dkdv_variant(triton_backend, monkeypatch, T, Hkv, causal):
    # The GPU autotuner may pick the dK/dV kernel that masks every block in one loop.
    monkeypatch.setattr(attention_module, "_INTERP_DKDV", dict(BLOCK_M=16, BLOCK_N=32, ONE_LOOP=True, WARP_SPEC=False))
    q, k, v = (t.requires_grad_() for t in _qkv(2, T, 4, Hkv, 32, seed=T + Hkv))
    out = flash_attention(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _sdpa_float64(q64, k64, v64, causal, 1 / math.sqrt(32)).backward(dout.double())
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_forward_without_the_folded_scale(triton_backend, monkeypatch, causal):
    # The GPU autotuner may pick the forward that scales the scores before the softmax step.
    monkeypatch.setattr(attention_module, "_INTERP_FWD",
                        dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=False, WARP_SPEC=False))
    q, k, v = _qkv(1, 37, 4, 2, 48, seed=9)
    out = flash_attention(q, k, v, causal=causal, sm_scale=0.3)
    torch.testing.assert_close(out.double(), _sdpa_float64(q, k, v, causal, 0.3), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("variant", ["fold", "scale", "warp_spec"])
@pytest.mark.parametrize("T,causal", [(1, False), (16, True), (20, False), (37, False), (100, False), (64, True),
                                      (100, True), (37, True)])
def test_flash_forward_output_and_lse_against_float64(triton_backend, monkeypatch, variant, T, causal):
    # 16-key blocks: T=1 and 16 give a single block, 20 one unmasked block and a ragged one, 100
    # seven blocks; causal, the query blocks see 0 to 4 unmasked blocks before their diagonal.
    # warp_spec: the single masked loop over TMA descriptors (`_fwd_ws_loop`).
    monkeypatch.setattr(attention_module, "_INTERP_FWD",
                        dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=variant != "scale", WARP_SPEC=variant == "warp_spec"))
    q, k, v = _qkv(2, T, 4, 2, 32, seed=T)
    q = q * 4.0       # scores of tens: the running max moves from block to block
    out, lse = attention_module.flash_attention_fwd(q, k, v, causal, 0.3)
    torch.testing.assert_close(out.double(), _sdpa_float64(q, k, v, causal, 0.3), rtol=1e-4, atol=2e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * 0.3
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1) / math.log(2), rtol=1e-5, atol=1e-5)


WS_INTERP = triton.Config(dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=True, WARP_SPEC=True), num_warps=4)


@pytest.mark.parametrize("causal", [True, False])
def test_warp_specialized_forward_reads_only_its_own_sequence(triton_backend, causal):
    """The warp-specialized forward reads q through a (B*T, H*D) descriptor, whose ragged last
    query block runs into the next sequence's rows, and k, v through (B, T, Hkv*D) ones, which read
    zeros past T. With every value of sequence 1 NaN, sequence 0's output and lse stay exact, and
    the other way round; T = 37 leaves a ragged 16-key block and a ragged 32-row query block."""
    B, T, H, Hkv, D = 2, 37, 4, 2, 32
    for poisoned in (1, 0):
        q, k, v = _qkv(B, T, H, Hkv, D, seed=11)
        clean = 1 - poisoned
        want = _sdpa_float64(q[clean:clean + 1], k[clean:clean + 1], v[clean:clean + 1], causal, 0.3)
        for t in (q, k, v):
            t[poisoned] = float("nan")
        out, lse = attention_module.flash_attention_fwd(q, k, v, causal, 0.3, config=WS_INTERP)
        torch.testing.assert_close(out[clean:clean + 1].double(), want, rtol=1e-4, atol=2e-5)
        assert torch.isfinite(lse[clean]).all()


def test_warp_specialized_forward_layouts(triton_backend, monkeypatch):
    """Column slices of a fused qkv projection qualify for the descriptors (and give the float64
    result, GQA 4:1, head dim 64); a layout they cannot describe (heads not packed), a head dim
    that is not a power of two, or a row stride that is not 16-byte aligned falls back to the
    pointer loads, and asking for the warp-specialized config there is an error."""
    B, T, H, Hkv, D = 2, 21, 8, 2, 64
    fused = torch.randn(B, T, H + 2 * Hkv, D, generator=torch.Generator().manual_seed(4))
    q, k, v = fused.split([H, Hkv, Hkv], dim=2)
    assert attention_module._ws_ok(q, k, v)
    out, _ = attention_module.flash_attention_fwd(q, k, v, True, D ** -0.5, config=WS_INTERP)
    torch.testing.assert_close(out.double(), _sdpa_float64(q, k, v, True, D ** -0.5), rtol=1e-4, atol=2e-5)

    heads_apart = torch.randn(B, H, T, D).transpose(1, 2)          # (B, T, H, D) seen through (B, H, T, D)
    odd_dim = _qkv(B, T, H, Hkv, 48, seed=2)
    unaligned = torch.randn(B, T, 1, 2 * 32 + 2)[..., 2:].reshape(B, T, 2, 32)   # rows 264 bytes apart
    for bad_q, bad_k, bad_v in ((heads_apart, k, v), odd_dim, (unaligned, unaligned, unaligned)):
        assert not attention_module._ws_ok(bad_q, bad_k, bad_v)
        with pytest.raises(ValueError, match="WARP_SPEC forward config needs"):
            attention_module.flash_attention_fwd(bad_q, bad_k, bad_v, True, 0.3, config=WS_INTERP)
    # so is the interpreter's fixed config when a test makes it the warp-specialized one
    monkeypatch.setattr(attention_module, "_INTERP_FWD", dict(WS_INTERP.kwargs))
    with pytest.raises(ValueError, match="WARP_SPEC forward config needs"):
        attention_module.flash_attention_fwd(heads_apart, k, v, True, 0.3)


def test_flash_attention_backward_takes_a_strided_grad(triton_backend):
    # The gradient arriving from autograd may be any view (here (B, H, T, D) memory seen as (B, T, H, D)).
    # Its heads are not packed, so the warp-specialized dQ cannot describe it: asked for, it refuses.
    B, T, H, D = 2, 37, 4, 32
    q, k, v = _qkv(B, T, H, 2, D, seed=5)
    scale = D ** -0.5
    out, lse = attention_module.flash_attention_fwd(q, k, v, True, scale)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(6)).transpose(1, 2)
    grads = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, True, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    _sdpa_float64(q64, k64, v64, True, scale).backward(dout.double())
    for got, want in zip(grads, (q64, k64, v64)):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-3, atol=1e-4)
    assert not attention_module._ws_ok(q, k, v, dout)
    for name, kwargs in (("dQ", dict(dq_config=WS_DQ_INTERP)), ("dK/dV", dict(dkdv_config=WS_DKDV_INTERP))):
        with pytest.raises(ValueError, match=f"WARP_SPEC {name} config needs"):
            attention_module.flash_attention_bwd(dout, q, k, v, out, lse, True, scale, **kwargs)


def test_warp_specialized_backward_refuses_keys_cut_from_a_longer_buffer(triton_backend):
    """k, v as the first T slots of a (B, S > T) buffer: the forward's (B, T, Hkv*D) descriptors
    take them, but the dK/dV kernel reads them flat as (B*T, Hkv*D), where sequence 1 would start
    at sequence 0's slot T. The backward refuses the warp-specialized kernels there (asked for:
    an error naming the layout), and the pointer kernels give the float64 gradients."""
    B, T, S, H, Hkv, D = 2, 16, 24, 4, 2, 16
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(B, T, H, D, generator=gen)
    k, v = (torch.randn(B, S, Hkv, D, generator=gen)[:, :T] for _ in range(2))
    dout = torch.randn(B, T, H, D, generator=gen)
    assert attention_module._ws_ok(q, k, v) and not attention_module._ws_ok(q, k, v, dout)
    scale = D ** -0.5
    out, lse = attention_module.flash_attention_fwd(q, k, v, True, scale)
    with pytest.raises(ValueError, match="WARP_SPEC dK/dV config needs"):
        attention_module.flash_attention_bwd(dout, q, k, v, out, lse, True, scale, dkdv_config=WS_DKDV_INTERP)
    grads = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, True, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    _sdpa_float64(q64, k64, v64, True, scale).backward(dout.double())
    for got, want in zip(grads, (q64, k64, v64)):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-3, atol=1e-4)


WS_DQ_INTERP = triton.Config(dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True), num_warps=4)
WS_DKDV_INTERP = triton.Config(dict(BLOCK_M=16, BLOCK_N=32, ONE_LOOP=True, WARP_SPEC=True), num_warps=4)
WS_BACKWARDS = {"dq": dict(dq_config=WS_DQ_INTERP), "dkdv": dict(dkdv_config=WS_DKDV_INTERP),
                "both": dict(dq_config=WS_DQ_INTERP, dkdv_config=WS_DKDV_INTERP)}


@pytest.mark.parametrize("which", list(WS_BACKWARDS))
@pytest.mark.parametrize("T,causal", [(1, True), (16, True), (37, True), (100, True), (37, False), (64, False)])
def test_warp_specialized_backward_against_float64(triton_backend, which, T, causal):
    """dQ and dK/dV from the warp-specialized loops (one masked loop over descriptors each; lse and
    delta read as flat vectors; dK/dV's loop runs over the GQA group's heads and the query blocks at
    once) equal float64 autograd, GQA 2:1, ragged lengths, alone and together."""
    B, H, Hkv, D = 2, 4, 2, 32
    q, k, v = _qkv(B, T, H, Hkv, D, seed=T + 3)
    q = q * 3.0
    scale = D ** -0.5
    out, lse = attention_module.flash_attention_fwd(q, k, v, causal, scale)
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(T))
    dq, dk, dv = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, causal, scale, **WS_BACKWARDS[which])
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    _sdpa_float64(q64, k64, v64, causal, scale).backward(dout.double())
    for got, want in ((dq, q64), (dk, k64), (dv, v64)):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_warp_specialized_backward_reads_only_its_own_sequence(triton_backend, causal):
    """As the forward: with every input of the other sequence NaN (q, k, v, dO, its lse and delta
    too, and the padding of lse's rows), a sequence's gradients stay exact, for a ragged T = 37.
    dK/dV sums over query rows, so rows past T must add exactly nothing, not NaN times 0."""
    B, T, H, Hkv, D = 2, 37, 4, 2, 32
    scale = D ** -0.5
    for poisoned in (1, 0):
        clean = 1 - poisoned
        q, k, v = _qkv(B, T, H, Hkv, D, seed=17)
        dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(18))
        out, lse = attention_module.flash_attention_fwd(q, k, v, causal, scale)
        q64, k64, v64 = (t[clean:clean + 1].double().requires_grad_() for t in (q, k, v))
        _sdpa_float64(q64, k64, v64, causal, scale).backward(dout[clean:clean + 1].double())
        for t in (q, k, v, dout, out, lse):
            t[poisoned] = float("nan")
        lse.as_strided((B, H, lse.stride(1)), lse.stride())[..., T:] = float("nan")   # the rows' padding
        grads = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, causal, scale, **WS_BACKWARDS["both"])
        for got, want in zip(grads, (q64, k64, v64)):
            torch.testing.assert_close(got[clean:clean + 1].double(), want.grad, rtol=1e-3, atol=1e-4)


def test_flash_attention_config_pruning(monkeypatch):
    monkeypatch.setenv("MTP_WARP_SPEC", "1")   # offered whatever this machine's Triton and GPU
    prune = attention_module._prune_dkdv
    configs = attention_module._GPU_DKDV_CONFIGS
    assert prune(configs, {"WS_OK": 1}, BLOCK_D=64) == configs
    dkdv_128 = prune(configs, {"WS_OK": 1}, BLOCK_D=128)
    assert dkdv_128 and all(c.kwargs["ONE_LOOP"] for c in dkdv_128)    # the three-loop variant spills there,
    assert not any(c.kwargs["BLOCK_M"] == 64 and not c.kwargs["WARP_SPEC"] for c in dkdv_128)   # plain 64-row too
    assert any(c.kwargs["BLOCK_M"] == 64 and not c.kwargs["WARP_SPEC"] for c in configs)        # kept at D64
    assert any(c.kwargs["WARP_SPEC"] for c in dkdv_128)
    # Where the layout does not allow descriptors (WS_OK = 0) no kernel keeps a warp-specialized config.
    for kernel_configs, kernel_prune in ((configs, prune),
                                         (attention_module._GPU_FWD_CONFIGS, partial(attention_module._prune_ws, kernel="fwd")),
                                         (attention_module._GPU_DQ_CONFIGS, partial(attention_module._prune_ws, kernel="dq"))):
        kept = kernel_prune(kernel_configs, {"WS_OK": 0}, BLOCK_D=64)
        assert kept and not any(c.kwargs["WARP_SPEC"] for c in kept)
        assert any(c.kwargs["WARP_SPEC"] for c in kernel_prune(kernel_configs, {"WS_OK": 1}, BLOCK_D=64))


def test_flash_launch_keeps_the_autotuners_choice(monkeypatch):
    """After the autotuner's first launch for a key, `_launch` launches its choice directly (the
    autotuner's host work at every call: host_overhead_*.md); a new key (length band, dtype, causal)
    is tuned again."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(attention_module, "_CHOSEN_CONFIGS", {})
    tuned_calls, kernel_calls = [], []

    class FakeAutotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                FakeAutotuner.best_config = triton.Config(dict(BLOCK_M=64, tag=len(tuned_calls)), num_warps=4)
                tuned_calls.append((grid({"BLOCK_M": 64}), args, kwargs))
            return run

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: kernel_calls.append((grid, args, kwargs))

    monkeypatch.setattr(attention_module, "_tuned", lambda which: FakeAutotuner())
    monkeypatch.setattr(attention_module, "_flash_kernel", lambda which: FakeKernel())
    x = torch.zeros(2, 3)

    def launch(T, dtype=torch.bfloat16, causal=True):
        attention_module._launch("fwd", (x.to(dtype), 7), T, "BLOCK_M", 5, 64, causal, None, False)
    launch(1000)
    launch(1000)
    launch(900)   # the same length band as 1000
    assert len(tuned_calls) == 1 and len(kernel_calls) == 2
    grid, args, kwargs = kernel_calls[-1]
    assert grid == (triton.cdiv(900, 64), 5) and args[1] == 7
    assert kwargs["tag"] == 0 and kwargs["CAUSAL"] and kwargs["HEAD_DIM"] == 64 and kwargs["num_warps"] == 4
    launch(3000)
    launch(900, torch.float16)
    launch(900, causal=False)
    assert len(tuned_calls) == 4 and len(kernel_calls) == 2


@pytest.mark.parametrize("setting,version,major,offered", [
    (None, "3.6.0", 9, {"dkdv"}),   # checked on an H100 and an H200 with Triton 3.6; only dK/dV's paid
    (None, "3.9.0", 9, set()),      # a Triton no GPU has run them with
    (None, "3.6.0", 8, set()),      # not Hopper
    (None, "3.6.0", None, set()),   # no GPU
    ("yes", "3.6.0", 9, {"dkdv"}),  # neither 0 nor 1: the default
    ("0", "3.6.0", 9, set()),
    ("1", "3.9.0", None, {"fwd", "dq", "dkdv"}),
])
def test_warp_specialized_configs_default(monkeypatch, setting, version, major, offered):
    """MTP_WARP_SPEC=1 or 0 decides for all three kernels; otherwise the kernels of
    WARP_SPEC_DEFAULT_KERNELS (here dK/dV's, the one measured to pay; the shipped tuple is empty until
    a GPU checks its dV) are offered on Hopper with a Triton version they were checked with on a GPU
    (configs that passed every interpreter test gave NaN rows on an H100)."""
    monkeypatch.setattr(attention_module, "WARP_SPEC_DEFAULT_KERNELS", ("dkdv",))
    if setting is None:
        monkeypatch.delenv("MTP_WARP_SPEC", raising=False)
    else:
        monkeypatch.setenv("MTP_WARP_SPEC", setting)
    monkeypatch.setattr(attention_module.triton, "__version__", version)
    monkeypatch.setattr(attention_module.torch.cuda, "is_available", lambda: major is not None)
    monkeypatch.setattr(attention_module.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(attention_module, "compute_major", lambda index: major)
    assert {k for k in ("fwd", "dq", "dkdv") if attention_module.warp_spec_allowed(k)} == offered
    for kernel, configs in (("fwd", attention_module._GPU_FWD_CONFIGS), ("dq", attention_module._GPU_DQ_CONFIGS)):
        kept = attention_module._prune_ws(configs, {"WS_OK": 1}, kernel=kernel)
        assert kept and any(c.kwargs["WARP_SPEC"] for c in kept) is (kernel in offered)
        assert not any(c.kwargs["WARP_SPEC"] for c in attention_module._prune_ws(configs, {"WS_OK": 0}, kernel=kernel))
    kept = attention_module._prune_dkdv(attention_module._GPU_DKDV_CONFIGS, {"WS_OK": 1}, BLOCK_D=128)
    assert kept and any(c.kwargs["WARP_SPEC"] for c in kept) is ("dkdv" in offered)
    with pytest.raises(ValueError, match="kernel must be"):
        attention_module.warp_spec_allowed("bwd")
    # by default only at the head dims checked on a GPU; MTP_WARP_SPEC=1 at any
    for head_dim in (16, 32, 64, 128):
        checked = head_dim in attention_module.WARP_SPEC_CHECKED_HEAD_DIMS
        assert attention_module.warp_spec_allowed("dkdv", head_dim=head_dim) is ("dkdv" in offered and
                                                                                 (checked or setting == "1"))
        kept = attention_module._prune_dkdv(attention_module._GPU_DKDV_CONFIGS, {"WS_OK": 1}, BLOCK_D=head_dim,
                                            HEAD_DIM=head_dim)
        assert any(c.kwargs["WARP_SPEC"] for c in kept) is ("dkdv" in offered and (checked or setting == "1"))


def test_warp_specialized_default_asks_the_tensors_gpu(monkeypatch):
    """The default looks at the GPU the call runs on (Q's device in the autotuner's prune), not the
    current one: a Hopper and an older GPU in one machine each get their own answer; a CPU tensor none."""
    from types import SimpleNamespace

    monkeypatch.delenv("MTP_WARP_SPEC", raising=False)
    monkeypatch.setattr(attention_module, "WARP_SPEC_DEFAULT_KERNELS", ("dkdv",))
    monkeypatch.setattr(attention_module.triton, "__version__", "3.6.0")
    monkeypatch.setattr(attention_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention_module.torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(attention_module, "compute_major", {0: 9, 1: 8}.__getitem__)
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    assert attention_module.warp_spec_allowed("dkdv", hopper)
    assert not attention_module.warp_spec_allowed("dkdv", ampere)
    assert not attention_module.warp_spec_allowed("dkdv")                  # the current device: 1
    assert not attention_module.warp_spec_allowed("dkdv", torch.device("cpu"))
    ws = lambda configs: any(c.kwargs["WARP_SPEC"] for c in configs)      # noqa: E731
    configs = attention_module._GPU_DKDV_CONFIGS
    assert ws(attention_module._prune_dkdv(configs, {"WS_OK": 1, "Q": SimpleNamespace(device=hopper)}, BLOCK_D=128))
    assert not ws(attention_module._prune_dkdv(configs, {"WS_OK": 1, "Q": SimpleNamespace(device=ampere)}, BLOCK_D=128))


def test_flash_launchers_ask_about_their_own_kernels_device_and_head_dim(triton_backend, monkeypatch):
    """The forward asks about "fwd", the backward about "dkdv" and "dq", each with q's device and head
    dim (what sets WS_OK, the autotuner's key for whether warp-specialized configs may be tried)."""
    asked = []
    monkeypatch.setattr(attention_module, "warp_spec_allowed",
                        lambda kernel, device=None, head_dim=None: asked.append((kernel, device, head_dim)) or False)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 20, 2, 1, 32, seed=3))
    out = flash_attention(q, k, v)
    assert asked == [("fwd", q.device, 32)]
    asked.clear()
    out.sum().backward()
    assert sorted(kernel for kernel, _, _ in asked) == ["dkdv", "dq"]
    assert all(device == q.device and head_dim == 32 for _, device, head_dim in asked)


def test_warp_specialized_configs_left_are_the_ones_the_gpu_passed():
    """On an H100 with Triton 3.6 the forward with num_stages=3 gave NaN rows in every probed case,
    and so did dK/dV with 32-row query blocks (probe_warp_spec.py): neither is offered."""
    ws = lambda configs: [c for c in configs if c.kwargs["WARP_SPEC"]]   # noqa: E731
    assert ws(attention_module._GPU_FWD_CONFIGS) and all(c.num_stages == 2 for c in ws(attention_module._GPU_FWD_CONFIGS))
    assert [c.kwargs["BLOCK_M"] for c in ws(attention_module._GPU_DKDV_CONFIGS)] == [64]


@pytest.mark.parametrize("D", [32, 24])
def test_flash_attention_strided_views_and_custom_scale(triton_backend, D):
    # q, k, v as views of one fused projection (head stride != D) and a last-dim-transposed q.
    B, T, H, Hkv = 2, 21, 4, 2
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(B, T, H + 2 * Hkv, D, generator=g).requires_grad_()
    q, k, v = fused.split([H, Hkv, Hkv], dim=2)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)     # same values, last dim strided
    assert q_t.stride(-1) != 1
    out = flash_attention(q_t, k, v, causal=True, sm_scale=0.3)
    dout = torch.randn_like(out)
    out.backward(dout)

    fused64 = fused.detach().double().requires_grad_()
    q64, k64, v64 = fused64.split([H, Hkv, Hkv], dim=2)
    out64 = _sdpa_float64(q64, k64, v64, True, 0.3)
    out64.backward(dout.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(fused.grad.double(), fused64.grad, rtol=1e-3, atol=1e-4)


def test_flash_attention_gqa_backward_is_deterministic(triton_backend):
    q, k, v = _qkv(1, 37, 4, 1, 16, seed=5)
    dout = torch.randn(1, 37, 4, 16, generator=torch.Generator().manual_seed(6))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attention(*leaves, causal=True).backward(dout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_flash_attention_fp16_interpreted(triton_backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 19, 4, 2, 32, dtype=torch.float16, seed=8))
    out = flash_attention(q, k, v)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = _sdpa_float64(q64, k64, v64, True, 1 / math.sqrt(32))
    out64.sum().backward()
    torch.testing.assert_close(out.double(), out64, rtol=1e-2, atol=3e-3)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_matches_sdpa(causal):
    q, k, v = _qkv(2, 13, 4, 2, 16, dtype=torch.float64, seed=9)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal, sm_scale=0.2),
                               _sdpa_float64(q, k, v, causal, 0.2))


def test_flash_attention_cpu_default_is_sdpa_and_matches_reference(monkeypatch):
    """On CPU the model runs torch's SDPA (no T x T matrix); it must agree with the eager oracle,
    forward and gradients, with GQA and causal/non-causal."""
    monkeypatch.delenv("MTP_BACKEND", raising=False)
    for causal in (True, False):
        q, k, v = (t.requires_grad_() for t in _qkv(2, 37, 4, 2, 16, seed=10))
        out = flash_attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference.attention(q64, k64, v64, causal=causal, sm_scale=0.25)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
    # float64 keeps the exact eager oracle
    q, k, v = (t.double() for t in _qkv(1, 9, 4, 2, 16, seed=11))
    assert torch.equal(flash_attention(q, k, v), reference.attention(q, k, v, causal=True, sm_scale=0.25))


# --------------------------------------------------------------------------------------------
# KV-cache attention (interpreter, fp32)
# --------------------------------------------------------------------------------------------
KV_CASES = [
    # H, Hkv, D, Tq, mask kind
    (4, 2, 16, 1, "causal"),
    (4, 1, 32, 1, "causal"),
    (4, 2, 16, 6, "causal"),
    (4, 1, 32, 7, "tree"),
    (4, 4, 64, 9, "tree"),
    (4, 2, 16, 5, "tree"),
    (4, 2, 48, 9, "tree"),      # head dims that are not a power of two
    (4, 1, 24, 1, "causal"),
    (2, 2, 80, 6, "causal"),
]


def _kv_inputs(H, Hkv, D, Tq, S_max, seqlens, seed):
    g = torch.Generator().manual_seed(seed)
    B = len(seqlens)
    q = torch.randn(B, Tq, H, D, generator=g)
    k_cache = torch.randn(B, S_max, Hkv, D, generator=g)
    v_cache = torch.randn(B, S_max, Hkv, D, generator=g)
    return q, k_cache, v_cache, torch.tensor(seqlens, dtype=torch.int32)


@pytest.mark.parametrize("split_size", [None, 16])
@pytest.mark.parametrize("H,Hkv,D,Tq,kind", KV_CASES)
def test_kv_cache_attention_matches_oracle(triton_backend, monkeypatch, split_size, H, Hkv, D, Tq, kind):
    monkeypatch.setattr(kv_attention_module, "FORCE_KV_SPLIT_SIZE", split_size)
    S_max = 53
    seqlens = [0, 17, S_max - Tq, 32]             # empty, ragged, full cache, block-aligned
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(H, Hkv, D, Tq, S_max, seqlens, seed=Tq * 11 + D)
    tree_mask = _random_tree_mask(Tq, torch.Generator().manual_seed(Tq)) if kind == "tree" else None
    assert attention_module._kernel_supports(q)
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = _kv_oracle(q, k_cache, v_cache, cache_seqlens, tree_mask, 1 / math.sqrt(D))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=2e-5)
    ref = reference.kv_cache_attention(q.double(), k_cache.double(), v_cache.double(), cache_seqlens.long(),
                                       tree_mask, 1 / math.sqrt(D))
    torch.testing.assert_close(ref, expected)


@pytest.mark.parametrize("H,Hkv,D,Tq,kind", KV_CASES)
def test_kv_splits_merged_by_the_last_split_program(triton_backend, H, Hkv, D, Tq, kind):
    """combine_last: the last split program of each row tile merges the partials (no combine kernel).
    Same result as the combine kernel, with 2 and 4 splits, one or several row tiles (GQA x Tq rows
    over 16-row tiles), empty splits (the empty and short sequences); the counters end at zero."""
    S_max = 53
    seqlens = [0, 17, S_max - Tq, 32]
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(H, Hkv, D, Tq, S_max, seqlens, seed=Tq * 7 + D)
    mask = _random_tree_mask(Tq, torch.Generator().manual_seed(Tq + 1)) if kind == "tree" else None
    packed = pack_tree_mask(mask) if mask is not None else None
    expected = _kv_oracle(q, k_cache, v_cache, cache_seqlens, mask, 0.3)
    for blocks_per_split in (1, 2):            # 16-key blocks: 4 or 2 splits of the 53 slots
        split = kv_attention_module._kv_launch(16, S_max, blocks_per_split, gpu=False)
        assert split.n_splits == 4 // blocks_per_split and not split.combine_last
        for launch in (split, dataclasses.replace(split, combine_last=True)):
            out = kv_attention_module._kv_run(q, k_cache, v_cache, cache_seqlens, packed, 0.3, launch)
            torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=2e-5,
                                       msg=lambda m: f"{launch}: {m}")
    assert int(arrival_counters(q.device, 1).abs().sum()) == 0


def test_kv_launch_tuner_runs_every_candidate_and_keeps_the_fastest(triton_backend, monkeypatch):
    """Every launch the tuner may pick (row tiles x split counts) gives the oracle's result on a full
    cache; the fastest by the timer is kept for the shape and later calls use it. (The tuner itself:
    test_launch_tuner.py.)"""
    monkeypatch.setattr(kv_attention_module, "_KV_TUNER", LaunchTuner("kv_cache_attention"))
    B, H, Hkv, D, Tq, S_max = 3, 4, 2, 16, 9, 70
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(H, Hkv, D, Tq, S_max, [5, 40, 61], seed=31)
    packed = pack_tree_mask(_random_tree_mask(Tq, torch.Generator().manual_seed(32)))
    full = torch.full((B,), S_max - Tq, dtype=torch.int32)
    want = _kv_oracle(q, k_cache, v_cache, full, packed.mask, 0.3)
    assert kv_attention_module.kv_problem(q, k_cache) == (B, Hkv, (H // Hkv) * Tq, S_max)
    candidates = kv_attention_module.kv_launch_candidates(*kv_attention_module.kv_problem(q, k_cache), q.device)
    assert len({c.block_m for c in candidates}) == 2 and len({c.n_splits for c in candidates}) >= 2
    split_launches = [c for c in candidates if c.n_splits > 1]
    assert {dataclasses.replace(c, combine_last=True) for c in split_launches} == {c for c in split_launches
                                                                                  if c.combine_last}
    ran = []

    def timer(fn):
        torch.testing.assert_close(fn().double(), want, rtol=1e-4, atol=2e-5)
        ran.append(fn)
        return 0.5 if len(ran) == 2 else 1.0 + len(ran)   # the 2nd candidate is the fastest
    times = kv_attention_module.tune_kv_launch(q, k_cache, v_cache, cache_seqlens, packed, 0.3, timer=timer)
    assert list(times) == candidates and len(ran) == len(candidates)
    chosen = min(times, key=times.get)
    assert chosen == candidates[1]
    used = []
    run = kv_attention_module._kv_run
    monkeypatch.setattr(kv_attention_module, "_kv_run", lambda *a: used.append(a[-1]) or run(*a))
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens, packed, sm_scale=0.3)
    assert used == [chosen]
    torch.testing.assert_close(out.double(), _kv_oracle(q, k_cache, v_cache, cache_seqlens, packed.mask, 0.3),
                               rtol=1e-4, atol=2e-5)


def test_kv_launch_tuning_leaves_out_a_launch_that_disagrees(triton_backend, monkeypatch):
    """A split launch whose combine drops one sequence's output (as a race in it would) never wins,
    however fast it times: every candidate is checked against the eager reference first."""
    monkeypatch.setattr(kv_attention_module, "_KV_TUNER", LaunchTuner("kv_cache_attention"))
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(4, 2, 16, 3, 70, [5, 40], seed=33)
    packed = pack_tree_mask(_random_tree_mask(3, torch.Generator().manual_seed(34)))
    candidates = kv_attention_module.kv_launch_candidates(*kv_attention_module.kv_problem(q, k_cache), q.device)
    bad = next(c for c in candidates if c.n_splits > 1 and c.combine_last)
    run = kv_attention_module._kv_run

    def faulty(*args):
        out = run(*args)
        if args[-1] == bad:
            out[1] = 0
        return out
    monkeypatch.setattr(kv_attention_module, "_kv_run", faulty)
    with pytest.warns(UserWarning, match="disagree with the reference"):
        times = kv_attention_module.tune_kv_launch(q, k_cache, v_cache, cache_seqlens, packed, 0.3,
                                                timer=lambda fn: (fn(), 1.0)[1])
    assert times[bad] == float("inf") and all(t == 1.0 for c, t in times.items() if c != bad)


def test_cpu_kv_attention_reads_each_sequence_s_own_slots_through_the_fused_kernel(monkeypatch):
    """The CPU path (kernels/reference.py) attends each cache length's sequences over their live slots only,
    with 4-D inputs and no mask where none is needed (decode; a prefill from an empty cache is
    is_causal), so torch takes its fused CPU kernel: a 4096-token prefill of the default model
    went from 1.6 s and +880 MB of float32 scores to 0.25-0.29 s and +80-90 MB (hand timings)."""
    from mtp_kernels import reference

    calls, held = [], []
    sdpa = reference.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, scale=None, is_causal=False, **kw):
        calls.append((q.dim(), k.shape[2], attn_mask is None, is_causal))
        held.append(k.untyped_storage().nbytes() // k.element_size())   # elements behind k: a copy's size
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal, **kw)
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", spy)
    q, k_cache, v_cache, seqlens = _kv_inputs(4, 2, 16, 1, 40, [5, 30], seed=36)
    got = reference.kv_cache_attention(q, k_cache, v_cache, seqlens, sm_scale=0.3)
    assert calls == [(4, 6, True, False), (4, 31, True, False)]          # decode: its own slots, no mask
    torch.testing.assert_close(got.double(), _kv_oracle(q, k_cache, v_cache, seqlens, None, 0.3), rtol=1e-4,
                               atol=2e-5)
    calls.clear()
    q, k_cache, v_cache, seqlens = _kv_inputs(4, 2, 16, 9, 40, [0, 12], seed=37)
    got = reference.kv_cache_attention(q, k_cache, v_cache, seqlens, sm_scale=0.3)
    assert calls == [(4, 9, True, True), (4, 21, False, False)]          # from empty: causal; after 12: a mask
    torch.testing.assert_close(got.double(), _kv_oracle(q, k_cache, v_cache, seqlens, None, 0.3), rtol=1e-4,
                               atol=2e-5)
    calls.clear()   # sequences of one length share a call (rows 0 and 2 gathered, row 1 alone)
    held.clear()
    q, k_cache, v_cache, seqlens = _kv_inputs(4, 2, 16, 3, 40, [7, 11, 7], seed=38)
    packed = pack_tree_mask(_random_tree_mask(3, torch.Generator().manual_seed(39)))
    got = reference.kv_cache_attention(q, k_cache, v_cache, seqlens, packed.mask, sm_scale=0.3)
    assert calls == [(4, 10, False, False), (4, 14, False, False)]
    # rows 0 and 2 are gathered: only their 10 live slots are copied, not all 40 (a CPU decode step
    # with an eos-finished row between equal-length ones ran 2-5x slower copying every slot)
    assert held[0] == 2 * 2 * 10 * 16
    torch.testing.assert_close(got.double(), _kv_oracle(q, k_cache, v_cache, seqlens, packed.mask, 0.3), rtol=1e-4,
                               atol=2e-5)


def test_kv_tuner_reference_in_query_chunks_equals_the_whole_call():
    """The KV tuner's eager reference for a long prefill runs in query chunks (scores bounded); each
    chunk, counted as i0 more cached tokens, sees what its queries see in the whole call."""
    q, k_cache, v_cache, _ = _kv_inputs(4, 2, 16, 13, 40, [0, 20], seed=35)
    full = torch.tensor([40 - 13, 40 - 13], dtype=torch.int32)
    whole = kv_attention_module._kv_reference_in_pieces(q, k_cache, v_cache, full, None, 0.3)
    one_query_per_chunk = 4 * 2 * 4 * 40    # score_bytes for a step of 1 query (2 sequences): 13 chunks
    chunked = kv_attention_module._kv_reference_in_pieces(q, k_cache, v_cache, full, None, 0.3,
                                                       score_bytes=one_query_per_chunk)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.double(), _kv_oracle(q, k_cache, v_cache, full, None, 0.3), rtol=1e-4, atol=2e-5)


def test_prefill_lengths_share_a_tuning_key(triton_backend, monkeypatch):
    """Prefill chunks (no tree) of lengths in one power-of-two band share a key, so a server does not
    tune again at every prompt length; the launch tuned at one length gives the right result at
    another. Decode and tree calls keep their exact length."""
    monkeypatch.setattr(kv_attention_module, "_KV_TUNER", LaunchTuner("kv_cache_attention"))
    H, Hkv, D, S_max = 4, 2, 16, 80
    keys = {}
    for Tq in (1, 9, 13, 16, 17):
        q, k_cache, _, _ = _kv_inputs(H, Hkv, D, Tq, S_max, [0, 3], seed=Tq)
        keys[Tq] = (kv_attention_module._kv_key(q, k_cache, False), kv_attention_module._kv_key(q, k_cache, True))
    assert keys[9][0] == keys[13][0] == keys[16][0] != keys[17][0] and keys[1][0] != keys[9][0]
    assert len({tree_key for _, tree_key in keys.values()}) == 5
    batch_keys = {}
    for B in (1, 3, 4, 5):
        q, k_cache, _, _ = _kv_inputs(H, Hkv, D, 9, S_max, [0] * B, seed=B)
        batch_keys[B] = (kv_attention_module._kv_key(q, k_cache, False), kv_attention_module._kv_key(q, k_cache, True),
                         kv_attention_module._kv_key(q[:, :1], k_cache, False))
    assert batch_keys[3][0] == batch_keys[4][0] != batch_keys[5][0] != batch_keys[1][0]   # prefill: B banded
    assert len({k[1] for k in batch_keys.values()}) == len({k[2] for k in batch_keys.values()}) == 4   # exact B
    q, k_cache, v_cache, seqlens = _kv_inputs(H, Hkv, D, 13, S_max, [0, 40], seed=3)
    q9 = q[:, :9].contiguous()
    candidates = kv_attention_module.kv_launch_candidates(*kv_attention_module.kv_problem(q9, k_cache), q.device)
    kv_attention_module._KV_TUNER.chosen[kv_attention_module._kv_key(q9, k_cache, False)] = \
        candidates[-1]   # "tuned at 9"
    used = []
    run = kv_attention_module._kv_run
    monkeypatch.setattr(kv_attention_module, "_kv_run", lambda *a: used.append(a[-1]) or run(*a))
    out = kv_cache_attention(q, k_cache, v_cache, seqlens, sm_scale=0.3)
    assert used == [candidates[-1]]
    torch.testing.assert_close(out.double(), _kv_oracle(q, k_cache, v_cache, seqlens, None, 0.3), rtol=1e-4, atol=2e-5)


def test_kv_launch_tuning_reads_a_new_cache_copy_at_each_call(triton_backend, monkeypatch):
    """With an L2 of twice the cache, each timed call reads another copy of K and V (the same copy
    of both), so no launch is timed on a cache held in L2; the copies hold the cache's values."""
    monkeypatch.setattr(kv_attention_module, "_KV_TUNER", LaunchTuner("kv_cache_attention"))
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(4, 2, 16, 1, 40, [5, 30], seed=3)
    seen = []
    run = kv_attention_module._kv_run

    def spy(q_, k, v, *rest):
        seen.append((k.data_ptr(), v.data_ptr()))
        assert torch.equal(k, k_cache) and torch.equal(v, v_cache)
        return run(q_, k, v, *rest)
    monkeypatch.setattr(kv_attention_module, "_kv_run", spy)
    nbytes = k_cache.numel() * k_cache.element_size()
    kv_attention_module.tune_kv_launch(q, k_cache, v_cache, cache_seqlens, None, 0.3,
                                    timer=lambda fn: [fn(), fn()] and 1.0, l2_bytes=2 * nbytes)
    assert len(seen) >= 4
    assert all(a != b for a, b in zip(seen, seen[1:]))                      # never the same copy twice in a row
    assert len({k for k, _ in seen}) == len({pair for pair in seen}) >= 2   # K and V copies move together


def test_kv_split_heuristic_bounds_the_partials(monkeypatch):
    """The untuned GPU launch (cross-compile stands in for an H100's 132 SMs): splits fill the GPU
    to about one program per SM (as the tuner's picks on the H100 did), the float32 partials'
    traffic stays within twice the cache bytes, and decode tiles merge in their last split."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    cpu = torch.device("cpu")
    heuristic = kv_attention_module._kv_heuristic
    # these five are the H100 tuner's picks (attention_nvidia-h100-80gb-hbm3.md, tenth session)
    assert heuristic(1, 8, 4, 1088, cpu).label() == "M16 x9+last"     # decode, batch 1
    assert heuristic(1, 8, 4, 8256, cpu).label() == "M16 x15+last"
    assert heuristic(8, 8, 4, 1088, cpu).label() == "M16 x2+last"
    assert heuristic(1, 8, 64, 1088, cpu).label() == "M64 x9"          # 16-node tree, GQA 4: 64 rows
    assert heuristic(1, 8, 256, 8256, cpu).label() == "M128 x8"        # 64 nodes
    # the tuner took M64 x4 here (1.18x faster); the cap on the partials' traffic (twice the cache) holds
    assert heuristic(1, 8, 256, 1088, cpu).label() == "M128 x4"
    assert heuristic(64, 8, 4, 8192, cpu).n_splits == 1                # enough programs without splitting
    for B in (1, 2, 8, 64):
        for rows in (1, 4, 16, 64, 256):
            for S_max in (64, 1000, 1088, 8256):
                launch = heuristic(B, 8, rows, S_max, cpu)
                assert launch.n_splits == 1 or rows * launch.n_splits <= S_max
                assert launch.combine_last == (launch.n_splits > 1 and launch.block_m == 16)
                assert launch.n_splits == -(-S_max // launch.split_size) and launch.split_size % 64 == 0
                cands = kv_attention_module.kv_launch_candidates(B, 8, rows, S_max, cpu)
                assert cands[0] == launch and len(set(cands)) == len(cands)


def test_kv_cache_attention_more_than_64_tree_nodes_with_splits(triton_backend, monkeypatch):
    # 70 nodes: the packed mask spans two int64 words (bit 63 included).
    monkeypatch.setattr(kv_attention_module, "FORCE_KV_SPLIT_SIZE", 32)
    Tq, S_max = 70, 100
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(2, 1, 16, Tq, S_max, [3, 30], seed=12)
    tree_mask = _random_tree_mask(Tq, torch.Generator().manual_seed(13))
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens.long(), tree_mask, sm_scale=0.4)
    torch.testing.assert_close(out.double(), _kv_oracle(q, k_cache, v_cache, cache_seqlens, tree_mask, 0.4),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("use_triton_path", [True, False])
def test_packed_tree_mask_gives_the_same_attention(monkeypatch, use_triton_path):
    """A mask packed once (what the model passes to every layer) equals the bool mask, both paths."""
    if use_triton_path:
        monkeypatch.setenv("MTP_BACKEND", "triton")
    Tq, S_max = 70, 100
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(2, 1, 16, Tq, S_max, [3, 30], seed=15)
    tree_mask = _random_tree_mask(Tq, torch.Generator().manual_seed(16))
    packed = pack_tree_mask(tree_mask)
    assert packed.words.shape == (Tq, 2) and packed.words.dtype == torch.int64
    bits = (packed.words[:, :, None] >> torch.arange(64)) & 1                   # (Tq, 2, 64)
    assert torch.equal(bits.reshape(Tq, 128)[:, :Tq].bool(), tree_mask)
    assert not bits.reshape(Tq, 128)[:, Tq:].any()
    torch.testing.assert_close(kv_cache_attention(q, k_cache, v_cache, cache_seqlens, packed),
                               kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask), rtol=0, atol=0)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(3, 4, dtype=torch.bool), "square"),
    (torch.ones(3, 3, dtype=torch.int64), "torch.bool"),
    ([[True]], "square"),
])
def test_pack_tree_mask_bad_input(mask, match):
    with pytest.raises(ValueError, match=match):
        pack_tree_mask(mask)


def test_kv_cache_attention_checks_a_packed_mask_shape():
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(2, 1, 16, 3, 8, [0, 2], seed=17)
    with pytest.raises(ValueError, match=r"tree_mask must have shape \(Tq, Tq\) = \(3, 3\)"):
        kv_cache_attention(q, k_cache, v_cache, cache_seqlens, pack_tree_mask(torch.eye(4, dtype=torch.bool)))
    mask = torch.eye(3, dtype=torch.bool)
    words = pack_tree_mask(mask).words
    strided = torch.zeros(3, 2, dtype=torch.int64)[:, :1]
    for bad in (words[:1], words.int(), words.float(), strided):   # the kernel would read past them, or misread them
        with pytest.raises(ValueError, match=r"PackedTreeMask: words must be a contiguous \(3, 1\) int64 tensor "
                                             r"for a \(3, 3\) mask"):
            PackedTreeMask(mask, bad)


def test_second_order_gradients_are_a_clear_error(triton_backend):
    """The Triton backward kernels run outside autograd: a gradient of their gradients would silently be
    wrong, so create_graph=True through them is refused by name."""
    from mtp_kernels import rms_norm

    q, k, v = (t.requires_grad_() for t in _qkv(1, 5, 2, 2, 16, seed=3))
    with pytest.raises(RuntimeError, match=r"flash_attention: double backward \(create_graph=True\)"):
        torch.autograd.grad(attention_module.flash_attention(q, k, v).sum(), q, create_graph=True)
    x, w = torch.randn(3, 16, requires_grad=True), torch.rand(16) + 0.5
    with pytest.raises(RuntimeError, match=r"rms_norm: double backward \(create_graph=True\)"):
        torch.autograd.grad(rms_norm(x, w).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_stale_slots_past_a_sequence_do_not_reach_its_output(request, monkeypatch, path):
    """Slots past a sequence's own length hold what earlier, longer steps left there (an overflowed
    rejected draft: inf). The CPU path attends to the batch's longest live range: the shorter
    sequence's stale slots must still not turn its output into NaN through 0 * inf."""
    if path == "triton":
        request.getfixturevalue("triton_backend")
    else:
        monkeypatch.setenv("MTP_BACKEND", "reference")
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(2, 1, 16, 1, 8, [1, 6], seed=21)
    clean = kv_cache_attention(q, k_cache, v_cache, cache_seqlens)
    v_cache[0, 2:] = float("inf")    # sequence 0 sees slots 0 and 1 (its new token) only
    k_cache[0, 2:] = float("nan")
    torch.testing.assert_close(kv_cache_attention(q, k_cache, v_cache, cache_seqlens), clean, rtol=0, atol=0)


def test_kv_cache_attention_row_that_sees_nothing_is_zero(triton_backend):
    Tq = 3
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(2, 1, 16, Tq, 8, [0, 2], seed=14)
    tree_mask = torch.eye(Tq, dtype=torch.bool)
    tree_mask[1, 1] = False
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert out[1, 1].abs().sum() > 0                               # sequence 1 still sees its cache
    ref = reference.kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


def test_kv_cache_attention_cpu_default_uses_reference(monkeypatch):
    monkeypatch.delenv("MTP_BACKEND", raising=False)
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(4, 2, 16, 2, 9, [1, 7], seed=15)
    assert torch.equal(kv_cache_attention(q, k_cache, v_cache, cache_seqlens),
                       reference.kv_cache_attention(q, k_cache, v_cache, cache_seqlens, None, 0.25))


@pytest.mark.parametrize("kind", ["causal", "tree"])
def test_kv_cache_attention_cpu_reads_only_the_slots_in_use(monkeypatch, kind):
    """On the CPU the reference gets the cache up to the longest sequence's last new slot, not S_max
    (its cost grew with S_max): NaN in every slot past that changes nothing."""
    monkeypatch.delenv("MTP_BACKEND", raising=False)
    Tq, S_max = 3, 40
    q, k_cache, v_cache, cache_seqlens = _kv_inputs(4, 2, 16, Tq, S_max, [0, 11, 5], seed=17)
    tree_mask = _random_tree_mask(Tq, torch.Generator().manual_seed(3)) if kind == "tree" else None
    expected = _kv_oracle(q, k_cache, v_cache, cache_seqlens, tree_mask, 0.25)
    k_cache[:, 11 + Tq:], v_cache[:, 11 + Tq:] = float("nan"), float("nan")
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def _flash_bad_inputs():
    q, k, v = _qkv(1, 5, 4, 2, 16)
    return [
        ((q[0], k, v), "4-D"),
        ((q, k[:, :, :1].expand(1, 5, 3, 16), v[:, :, :1].expand(1, 5, 3, 16)), "multiple"),
        ((q, k.half(), v.half()), "dtype"),
        ((q, k, v[..., :8]), "shape"),
        ((q, k[:, :4], v[:, :4]), "length"),
        ((q, k[..., :8], v[..., :8]), "head_dim"),
        ((q.long(), k.long(), v.long()), "dtype"),
        ((q, k, v.to("meta")), "q, k and v must be on one device, got q on cpu, k on cpu, v on meta"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_flash_attention_rejects_bad_input(case):
    args, match = _flash_bad_inputs()[case]
    with pytest.raises(ValueError, match=match):
        flash_attention(*args)


def _kv_bad_inputs():
    q, k_cache, v_cache, seqlens = _kv_inputs(4, 2, 16, 3, 10, [2, 7], seed=16)
    return [
        ((q, k_cache, v_cache, seqlens[:1]), "cache_seqlens must be a tensor of shape"),
        ((q, k_cache, v_cache, seqlens.float()), "int32 or int64"),
        ((q, k_cache, v_cache, torch.tensor([2, 8], dtype=torch.int32)), r"\[0, S_max - Tq\]"),
        ((q, k_cache, v_cache, torch.tensor([-1, 0], dtype=torch.int32)), r"\[0, S_max - Tq\]"),
        ((q, k_cache, v_cache, seqlens, torch.ones(3, 4, dtype=torch.bool)), "tree_mask must have shape"),
        ((q, k_cache, v_cache, seqlens, torch.ones(3, 3)), "torch.bool"),
        ((q, k_cache[:, :2], v_cache[:, :2], seqlens), "cannot fit"),
        ((q, k_cache[:, :, :1], v_cache[:, :, :1].expand(2, 10, 3, 16), seqlens), "shape"),
        ((q, k_cache.half(), v_cache.half(), seqlens), "dtype"),
        ((q[:1], k_cache, v_cache, seqlens), "batch"),
        ((q, k_cache, v_cache.to("meta"), seqlens), "v_cache on meta"),
        ((q, k_cache, v_cache, seqlens.to("meta")), "q and cache_seqlens must be on one device"),
        ((q, k_cache, v_cache, seqlens, torch.ones(3, 3, dtype=torch.bool, device="meta")), "tree_mask on meta"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_kv_cache_attention_rejects_bad_input(case):
    args, match = _kv_bad_inputs()[case]
    with pytest.raises(ValueError, match=match):
        kv_cache_attention(*args)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan"), "a"])
def test_non_positive_or_non_finite_softmax_scale_is_rejected(scale):
    q, k_cache, v_cache, seqlens = _kv_inputs(4, 2, 16, 3, 10, [2, 7], seed=16)
    with pytest.raises(ValueError, match="sm_scale must be None or a finite number > 0"):
        kv_cache_attention(q, k_cache, v_cache, seqlens, sm_scale=scale)
    with pytest.raises(ValueError, match="sm_scale must be None or a finite number > 0"):
        flash_attention(q, k_cache[:, :3], v_cache[:, :3], sm_scale=scale)


def test_flash_attention_causal_must_be_a_bool():
    q, k_cache, v_cache, _ = _kv_inputs(4, 2, 16, 3, 10, [2, 7], seed=17)
    with pytest.raises(ValueError, match="causal must be True or False, got 'no'"):
        flash_attention(q, k_cache[:, :3], v_cache[:, :3], causal="no")


# --------------------------------------------------------------------------------------------
# GPU (bf16 at realistic sizes)
# --------------------------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("T,causal", [(1000, True), (1000, False), (4096, True)])
def test_flash_attention_gpu_bf16(T, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(1, T, 32, 8, 128, dtype=torch.bfloat16, seed=20, device="cuda"))
    out = flash_attention(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = reference.attention(q32, k32, v32, causal=causal)
    out32.backward(dout.float())
    torch.testing.assert_close(out.float(), out32, rtol=2e-2, atol=2e-2)
    assert _rel_err(out, out32) < 1e-2
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert _rel_err(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("D,causal", [(64, True), (128, True), (128, False)])
def test_flash_attention_gpu_every_config(D, causal):
    # The autotuner may pick any config that survives pruning (the warp-specialized ones only where
    # `warp_spec_allowed`), each tile, in all three kernels. Two sequences of a ragged length, q, k and v
    # as views of a fused qkv projection (as the model runs them).
    B, T, H, Hkv = 2, 1000, 8, 2
    g = torch.Generator().manual_seed(22)
    fused = torch.randn(B, T, H + 2 * Hkv, D, generator=g).to("cuda", torch.bfloat16)
    q, k, v = fused.split([H, Hkv, Hkv], dim=2)
    scale = D ** -0.5
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = reference.attention(q32, k32, v32, causal=causal)
    # dO contiguous, as autograd hands it over from the next layer's matmul: the reference's output
    # is a transposed view, and a dO of its strides is a layout `_ws_ok` refuses
    dout = torch.randn(want.shape, generator=g).to("cuda", torch.bfloat16)
    want.backward(dout.float())
    for config in attention_module._prune_ws(attention_module._GPU_FWD_CONFIGS, {"WS_OK": 1}, kernel="fwd"):
        out, lse = attention_module.flash_attention_fwd(q, k, v, causal, scale, config=config)
        assert _rel_err(out, want) < 1e-2, config
    dkdv_configs = attention_module._prune_dkdv(attention_module._GPU_DKDV_CONFIGS, {"WS_OK": 1}, BLOCK_D=D, HEAD_DIM=D)
    dq_configs = attention_module._prune_ws(attention_module._GPU_DQ_CONFIGS, {"WS_OK": 1}, kernel="dq")
    for i in range(max(len(dkdv_configs), len(dq_configs))):   # every config of both kernels, paired
        dkdv_config, dq_config = dkdv_configs[i % len(dkdv_configs)], dq_configs[i % len(dq_configs)]
        dq, dk, dv = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, causal, scale,
                                                          dkdv_config=dkdv_config, dq_config=dq_config)
        for got, ref in ((dq, q32.grad), (dk, k32.grad), (dv, v32.grad)):
            assert _rel_err(got, ref) < 2e-2, (dkdv_config, dq_config)


@pytest.mark.gpu
def test_flash_attention_gpu_launches_the_kept_config():
    """Calls after the first launch the autotuner's kept choice: the same bits as the tuned call."""
    attention_module._CHOSEN_CONFIGS.clear()
    q, k, v = _qkv(2, 300, 4, 2, 64, dtype=torch.bfloat16, seed=5, device="cuda")
    first = flash_attention(q, k, v)
    assert [key for key in attention_module._CHOSEN_CONFIGS if key[0] == "fwd"]
    assert torch.equal(flash_attention(q, k, v), first)


# Only where the autotuner may pick them (`warp_spec_allowed`: MTP_WARP_SPEC=1, which gpu_check.sh's
# tests stage sets, or a kernel of WARP_SPEC_DEFAULT_KERNELS on Hopper with a checked Triton).
_needs_warp_spec = pytest.mark.skipif(not attention_module.warp_spec_allowed("dkdv"),
                                      reason="warp-specialized kernels not offered here (see warp_spec_allowed)")


@pytest.mark.gpu
@_needs_warp_spec
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_gpu_warp_specialized_sequences_stay_apart(causal):
    """The warp-specialized configs on the real TMA engine: with every input of sequence 1 NaN, the
    forward and all three gradients of sequence 0 stay finite and right (T = 1000: ragged 64- and
    128-row blocks read past the sequence's end, where the descriptors must give zeros or rows that
    reach nothing stored)."""
    B, T, H, Hkv, D = 2, 1000, 8, 2, 128
    q, k, v = _qkv(B, T, H, Hkv, D, dtype=torch.bfloat16, seed=31, device="cuda")
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(32)).to("cuda", torch.bfloat16)
    scale = D ** -0.5
    q32, k32, v32 = (t[:1].detach().float().requires_grad_() for t in (q, k, v))
    want = reference.attention(q32, k32, v32, causal=causal)
    want.backward(dout[:1].float())
    for t in (q, k, v, dout):
        t[1] = float("nan")
    ws = lambda configs: [c for c in configs if c.kwargs["WARP_SPEC"]]   # noqa: E731
    assert attention_module._ws_ok(q, k, v, dout)
    for fwd_config in ws(attention_module._GPU_FWD_CONFIGS):
        out, lse = attention_module.flash_attention_fwd(q, k, v, causal, scale, config=fwd_config)
        assert torch.isfinite(out[0]).all() and _rel_err(out[:1], want) < 1e-2, fwd_config
    dkdv_configs, dq_configs = ws(attention_module._GPU_DKDV_CONFIGS), ws(attention_module._GPU_DQ_CONFIGS)
    for i in range(max(len(dkdv_configs), len(dq_configs))):
        dkdv_config, dq_config = dkdv_configs[i % len(dkdv_configs)], dq_configs[i % len(dq_configs)]
        grads = attention_module.flash_attention_bwd(dout, q, k, v, out, lse, causal, scale,
                                                     dkdv_config=dkdv_config, dq_config=dq_config)
        for got, ref in zip(grads, (q32.grad, k32.grad, v32.grad)):
            assert torch.isfinite(got[0]).all() and _rel_err(got[:1], ref) < 2e-2, (dkdv_config, dq_config)


@pytest.mark.gpu
def test_flash_attention_gpu_fp16_head_dim_64():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 777, 16, 16, 64, dtype=torch.float16, seed=21, device="cuda"))
    out = flash_attention(q, k, v)
    out.float().square().sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = reference.attention(q32, k32, v32)
    out32.square().sum().backward()
    assert _rel_err(out, out32) < 5e-3
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert _rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B,Tq", [(1, 1), (2, 64)])
def test_kv_launch_tuning_gpu_bf16(monkeypatch, B, Tq):
    """On the GPU every candidate launch (row tiles x split counts, real CUDA-graph timing) matches
    the reference; the tuned launch is kept; a shape first seen inside a graph capture is not tuned
    there (no timing in a capture) but runs the heuristic's launch."""
    tuner = LaunchTuner("kv_cache_attention")
    monkeypatch.setattr(kv_attention_module, "_KV_TUNER", tuner)
    S_max = 1024 + 64
    g = torch.Generator().manual_seed(40 + Tq)
    q = torch.randn(B, Tq, 32, 128, generator=g).to("cuda", torch.bfloat16)
    k_cache, v_cache = (torch.randn(B, S_max, 8, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([700, 1024][:B], dtype=torch.int32, device="cuda")
    mask = _random_tree_mask(Tq, torch.Generator().manual_seed(41)).cuda() if Tq > 1 else None
    packed = pack_tree_mask(mask) if mask is not None else None
    full = torch.full_like(seqlens, S_max - Tq)
    want = reference.kv_cache_attention(q.float(), k_cache.float(), v_cache.float(), full, mask)
    errors = []

    def checked_timer(fn):
        errors.append(_rel_err(fn(), want))
        return cuda_graph_ms(fn)
    times = kv_attention_module.tune_kv_launch(q, k_cache, v_cache, seqlens, packed, 128 ** -0.5, timer=checked_timer)
    assert len(times) >= 3 and all(0 < t < 1.0 for t in times.values()), times
    assert len(errors) == len(times) and max(errors) < 1e-2, errors
    out = kv_cache_attention(q, k_cache, v_cache, seqlens, mask)
    want_real = reference.kv_cache_attention(q.float(), k_cache.float(), v_cache.float(), seqlens, mask)
    assert _rel_err(out, want_real) < 1e-2
    # untuned shape under capture: the heuristic's launch, compiled beforehand with tuning off
    q2 = q[:, :, :16].contiguous()
    k2, v2 = k_cache[:, :, :4].contiguous(), v_cache[:, :, :4].contiguous()
    monkeypatch.setenv("MTP_TUNE", "0")
    kv_cache_attention(q2, k2, v2, seqlens, mask, check_seqlens=False)
    monkeypatch.setenv("MTP_TUNE", "1")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kv_cache_attention(q2, k2, v2, seqlens, mask, check_seqlens=False)
    graph.replay()
    torch.cuda.synchronize()
    assert len(tuner.chosen) == 1
    want2 = reference.kv_cache_attention(q2.float(), k2.float(), v2.float(), seqlens, mask)
    assert _rel_err(captured, want2) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B,Tq,block_m", [(1, 1, 16), (2, 64, 64)])
def test_kv_combine_last_gpu_race_free_and_deterministic(B, Tq, block_m):
    """combine_last on the GPU: many row tiles and splits arriving at once (B=2, 64 nodes: 4 row tiles
    x 17 splits x 16 (sequence, kv head) pairs) give the combine kernel's result, bit-identical in
    every run, and leave the arrival counters at zero."""
    S_max = 4096 + 64
    g = torch.Generator().manual_seed(50 + Tq)
    q = torch.randn(B, Tq, 32, 128, generator=g).to("cuda", torch.bfloat16)
    k_cache, v_cache = (torch.randn(B, S_max, 8, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([S_max - Tq, 1500][:B], dtype=torch.int32, device="cuda")
    mask = _random_tree_mask(Tq, torch.Generator().manual_seed(51)).cuda() if Tq > 1 else None
    packed = pack_tree_mask(mask) if mask is not None else None
    split = kv_attention_module._kv_launch(block_m, S_max, 4, gpu=True)
    assert split.n_splits == 17
    by_kernel = kv_attention_module._kv_run(q, k_cache, v_cache, seqlens, packed, 128 ** -0.5, split)
    last = dataclasses.replace(split, combine_last=True)
    first = kv_attention_module._kv_run(q, k_cache, v_cache, seqlens, packed, 128 ** -0.5, last)
    assert _rel_err(first, by_kernel) < 5e-3   # bf16 rounding of two float32 summation orders
    for _ in range(10):
        assert torch.equal(kv_attention_module._kv_run(q, k_cache, v_cache, seqlens, packed, 128 ** -0.5, last), first)
    assert int(arrival_counters(q.device, 1).abs().sum()) == 0
    want = reference.kv_cache_attention(q.float(), k_cache.float(), v_cache.float(), seqlens, mask)
    assert _rel_err(first, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("Tq,kind", [(1, "causal"), (16, "causal"), (64, "tree")])
def test_kv_cache_attention_gpu_bf16(Tq, kind):
    S_max = 4096 + 64
    seqlens = [0, 1000, S_max - Tq, 4000]
    g = torch.Generator().manual_seed(22)
    q = torch.randn(4, Tq, 32, 128, generator=g).to("cuda", torch.bfloat16)
    k_cache = torch.randn(4, S_max, 8, 128, generator=g).to("cuda", torch.bfloat16)
    v_cache = torch.randn(4, S_max, 8, 128, generator=g).to("cuda", torch.bfloat16)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    tree_mask = _random_tree_mask(Tq, torch.Generator().manual_seed(23)).cuda() if kind == "tree" else None
    out = kv_cache_attention(q, k_cache, v_cache, cache_seqlens, tree_mask)
    want = reference.kv_cache_attention(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, tree_mask)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    assert _rel_err(out, want) < 1e-2
