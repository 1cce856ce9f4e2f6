"""The engine's Transformer against an independent transcription of Meta's released MTP model.

Weights are made in the reference, saved the way Meta's release ships them and read back through
`load_checkpoint`, so these tests also pin the state-dict layout. fp32 throughout, max |diff| < 1e-4.
"""
import dataclasses
import weakref

import pytest
import torch

import meta_reference as meta
from mtp_engine.checkpoint import load_checkpoint
from mtp_engine.model import ModelArgs, Transformer, precompute_freqs_cis

ATOL = 1e-4
MAX_SEQ = 24
MAX_BATCH = 3

CONFIGS = {
    # GQA, 4 heads; n_layers counts the head blocks: 1 trunk layer + 4 heads
    "gqa_4heads": dict(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, n_future_tokens=4),
    # plain multi-head attention, next-token model only
    "mha_1head": dict(dim=64, n_layers=5, n_heads=4, n_kv_heads=None, vocab_size=101, multiple_of=16,
                      ffn_dim_multiplier=None, norm_eps=1e-6, rope_theta=10000.0, n_future_tokens=1),
    # two heads, deeper trunk, one kv head
    "mqa_2heads": dict(dim=48, n_layers=4, n_heads=6, n_kv_heads=1, vocab_size=37, multiple_of=32,
                       ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, n_future_tokens=2),
}


def _pair(name, tmp_path, seed=0):
    """(reference, engine model) with the same weights, the engine loaded from a Meta-style checkpoint."""
    cfg = CONFIGS[name]
    ref = meta.random_reference(meta.ModelArgs(**cfg, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ), seed)
    meta.save_like_meta(ref, tmp_path / name)
    ours = load_checkpoint(tmp_path / name, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH).eval()
    return ref, ours


def _tokens(vocab, B, T, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype == torch.float32
    diff = (a - b).abs().max().item()
    assert diff < ATOL, f"max abs diff {diff}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_structure_matches_release(name, tmp_path):
    ref, ours = _pair(name, tmp_path)
    cfg = CONFIGS[name]
    assert len(ours.layers) == cfg["n_layers"] - cfg["n_future_tokens"] + 1
    assert len(ours.extra_heads) == cfg["n_future_tokens"] - 1
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for k in ref_sd:
        assert torch.equal(our_sd[k], ref_sd[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_reference(name, tmp_path):
    ref, ours = _pair(name, tmp_path)
    tokens = _tokens(ours.vocab_size, 2, 11)
    with torch.no_grad():
        for all_heads in (False, True):
            want = ref.forward(tokens, 0, return_all_heads=all_heads)
            got = ours(tokens, 0, return_all_heads=all_heads)
            assert got.shape == (2, 11, ours.n_future_tokens if all_heads else 1, ours.vocab_size)
            _close(got, want)


@pytest.mark.parametrize("all_heads", [True, False])
@pytest.mark.parametrize("name", ["gqa_4heads", "mha_1head"])
def test_incremental_decode_matches_reference(name, all_heads, tmp_path):
    """Prefill, single-token steps and a multi-token chunk at start_pos > 0, both models caching."""
    ref, ours = _pair(name, tmp_path)
    B = 2
    tokens = _tokens(ours.vocab_size, B, 13, seed=3)
    ours.setup_caches(MAX_BATCH, MAX_SEQ)
    chunks = [(0, 6), (6, 7), (7, 8), (8, 11), (11, 12), (12, 13)]  # (start, end): prefill, steps, a chunk
    with torch.no_grad():
        for start, end in chunks:
            want = ref.forward(tokens[:, start:end], start, return_all_heads=all_heads)
            got = ours(tokens[:, start:end], start, return_all_heads=all_heads)
            _close(got, want)
        # The cached path also agrees with one uncached forward over the whole sequence.
        ours.clear_caches()
        _close(ours(tokens, 0, return_all_heads=all_heads)[:, 12:], got)


@pytest.mark.parametrize("name", ["gqa_4heads", "mqa_2heads"])
def test_incremental_decode_on_triton_kernels_matches_reference(triton_backend, name, tmp_path):
    """The same check with every kernel on the Triton path (interpreted, fp32): RMSNorm, the fused
    rotary + cache write, KV-cache attention and, for the uncached forward, flash attention. Head
    dims 16 and 8 (the latter on a padded tile)."""
    from mtp_kernels.attention import _kernel_supports

    ref, ours = _pair(name, tmp_path)
    assert _kernel_supports(torch.empty(1, 1, 1, ours.params.head_dim))
    B = 2
    tokens = _tokens(ours.vocab_size, B, 13, seed=3)
    ours.setup_caches(MAX_BATCH, MAX_SEQ)
    with torch.no_grad():
        for start, end in [(0, 6), (6, 7), (7, 10), (10, 11)]:
            _close(ours(tokens[:, start:end], start, return_all_heads=True),
                   ref.forward(tokens[:, start:end], start, return_all_heads=True))
        ours.clear_caches()
        _close(ours(tokens[:, :11], 0, return_all_heads=True), ref.forward(tokens[:, :11], 0, return_all_heads=True))


def test_decode_step_launches_few_kernels_per_block(triton_backend, tmp_path, monkeypatch):
    """A decode step on the Triton path: per block, the 7 projections (cuBLAS on a GPU; 4 once
    fused; 3 with SwiGLU in the gate/up GEMM's epilogue, 2 with rotary and the cache write in the
    q/k/v GEMM's too) and 5 Triton kernels (add + norm, rotary + cache write, attention, add + norm, SwiGLU;
    the block's last residual add is done by the next norm; 3 with the adds and norms in the q/k/v
    and gate/up launches' prologues), not the ~15 small eager kernels of
    the unfused block. Counted under the interpreter: Triton launches, and aten ops that would
    launch a kernel."""
    import collections

    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    launches = collections.Counter()
    run = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    class EagerOps(TorchDispatchMode):
        """Compute ops only: views, allocations and the interpreter's own host copies left out."""
        skip = {"view", "_unsafe_view", "permute", "unsqueeze", "t", "expand", "slice", "select", "reshape",
                "as_strided", "view_as_real", "view_as_complex", "transpose", "split", "split_with_sizes",
                "squeeze", "alias", "detach", "empty", "empty_strided", "empty_like", "lift_fresh", "set_",
                "copy_", "promote_types", "new_empty"}

        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # (our own custom ops are counted by their Triton launches)
            if func.overloadpacket.__name__ not in self.skip and func.namespace != "mtp_kernels":
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("MTP_TUNE", "0")   # the step's own ops, not a first call's GEMM layout timing (cpu_linear)
    _, model = _pair("gqa_4heads", tmp_path)
    model.setup_caches(1, MAX_SEQ)
    tokens = _tokens(model.vocab_size, 1, 5)
    blocks = len(model.trunk) + 1  # the trunk and head 0: what a plain decode step runs
    with torch.no_grad():
        model.forward_cached(tokens[:, :4], torch.zeros(1, dtype=torch.int32), n_heads=1, check_lengths=False)
        eager = EagerOps()
        with eager, pytest.MonkeyPatch.context() as mp:
            mp.setattr(interpreter.GridExecutor, "__call__", counting)
            model.forward_cached(tokens[:, 4:], torch.full((1,), 4, dtype=torch.int32), n_heads=1, check_lengths=False)
    assert eager.ops["mm"] == 7 * blocks
    assert sum(launches.values()) == 5 * blocks + 1, launches          # + the final add + norm
    per_step = {"embedding", "index", "arange", "full", "stack", "_to_copy"}   # once per forward, not per block
    elementwise = {op: n for op, n in eager.ops.items() if op != "mm" and op not in per_step}
    assert elementwise == {"add": 1}, elementwise   # the step's cache slots; no residual add of its own
    # With the projections fused (what the Generator does), 4 GEMMs per block.
    model.fuse_projections()
    fused = EagerOps()
    with torch.no_grad(), fused:
        unfused_out = model.forward_cached(tokens[:, 4:], torch.full((1,), 4, dtype=torch.int32), n_heads=1,
                                           check_lengths=False)
    assert fused.ops["mm"] == 4 * blocks, fused.ops
    from mtp_kernels import skinny_fused, skinny_linear, skinny_norm

    def counted_step():
        """One decode step: (its eager ops, its Triton launches, its logits)."""
        launches.clear()
        ops = EagerOps()
        with torch.no_grad(), ops, pytest.MonkeyPatch.context() as mp:
            mp.setattr(interpreter.GridExecutor, "__call__", counting)
            out = model.forward_cached(tokens[:, 4:], torch.full((1,), 4, dtype=torch.int32), n_heads=1,
                                       check_lengths=False)
        return ops.ops, dict(launches), out

    # Where the tuner picks a gate/up launch with SwiGLU in its epilogue (a GPU, where timed faster):
    # 3 GEMMs per block left, the gate/up one ours, and no swiglu kernel; the same logits.
    launch = skinny_linear.SkinnyLaunch(16, 16, True, 1, 1, 16)
    monkeypatch.setattr(skinny_fused._SWIGLU_TUNER, "choose", lambda *args: launch)
    ops, counts, out = counted_step()
    assert ops["mm"] == 3 * blocks, ops
    assert counts["_skinny_linear_kernel"] == blocks and "_swiglu_kernel" not in counts, counts
    assert sum(counts.values()) == 5 * blocks + 1, counts
    torch.testing.assert_close(out, unfused_out, rtol=1e-5, atol=1e-5)
    # And a q/k/v launch that rotates and writes the cache in its epilogue: 2 GEMMs per block left
    # (wo, w2), no rotary kernel; the same logits.
    monkeypatch.setattr(skinny_fused._ROPE_TUNER, "choose", lambda *args: launch)
    ops, counts, out = counted_step()
    assert ops["mm"] == 2 * blocks, ops
    assert counts["_skinny_linear_kernel"] == 2 * blocks and "_rope_cache_kernel" not in counts, counts
    assert sum(counts.values()) == 5 * blocks + 1, counts
    torch.testing.assert_close(out, unfused_out, rtol=1e-5, atol=1e-5)
    # And each residual add + norm in the prologue of the launch that reads it (NormPrologue): 3
    # Triton launches per block (q/k/v, attention, gate/up), no norm kernel but the final one; the
    # logits within float32 rounding (the prologue rounds differently, not the same bits).
    for tuner in skinny_norm._NORM_TUNERS.values():
        monkeypatch.setattr(tuner, "choose", lambda *args: launch)
    ops, counts, out = counted_step()
    assert ops["mm"] == 2 * blocks, ops
    assert counts["_skinny_linear_kernel"] == 2 * blocks and sum(counts.values()) == 3 * blocks + 1, counts
    assert counts.get("_add_rms_norm_fwd_kernel", 0) + counts.get("_rms_norm_fwd_kernel", 0) == 1, counts
    torch.testing.assert_close(out, unfused_out, rtol=1e-4, atol=1e-4)


def test_fused_projections_change_no_value_and_no_gradient(tmp_path):
    """fuse_projections lays wq/wk/wv and w1/w3 out back to back: inference then runs one GEMM for
    each group; parameters, state dict, outputs, gradients and optimizer steps stay those of the
    separate weights, and a dtype cast simply returns to separate GEMMs."""
    from mtp_engine.model import rows_view

    ref, ours = _pair("gqa_4heads", tmp_path)
    _, plain = _pair("gqa_4heads", tmp_path)
    params_before = {name: id(p) for name, p in ours.named_parameters()}
    ours.fuse_projections()
    block = ours.layers[0]
    assert {name: id(p) for name, p in ours.named_parameters()} == params_before
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    tokens = _tokens(ours.vocab_size, 2, 9, seed=4)
    with torch.no_grad():
        assert rows_view(block.attention.wq, block.attention.wk, block.attention.wv) is not None
        assert rows_view(block.feed_forward.w1, block.feed_forward.w3) is not None
        _close(ours(tokens, 0, return_all_heads=True), plain(tokens, 0, return_all_heads=True))
    # Training: autograd takes the separate weights (a view through wq would send every gradient to it).
    assert rows_view(block.attention.wq, block.attention.wk, block.attention.wv) is None
    for model in (ours, plain):
        model(tokens, 0, return_all_heads=True).square().mean().backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt.step()
    with torch.no_grad():
        assert rows_view(block.attention.wq, block.attention.wk, block.attention.wv) is not None  # still fused
        ours.fuse_projections()                                   # idempotent: the same storage
        assert rows_view(block.feed_forward.w1, block.feed_forward.w3).data_ptr() == block.feed_forward.w1.weight.data_ptr()
    ours.double()
    with torch.no_grad():
        assert rows_view(block.attention.wq, block.attention.wk, block.attention.wv) is None  # moved apart
        assert ours(tokens, 0).dtype == torch.float32


def test_per_sequence_positions_match_each_sequence_alone(tmp_path):
    """Rows of one batch at different lengths (cache_seqlens differ) = each sequence decoded alone."""
    ref, ours = _pair("gqa_4heads", tmp_path)
    n = ours.n_future_tokens
    lengths = [3, 7, 5]
    seqs = _tokens(ours.vocab_size, 3, 10, seed=5)
    ours.setup_caches(MAX_BATCH, MAX_SEQ)
    with torch.no_grad():
        # One padded prefill; slots past each row's length hold junk that must never be attended.
        ours.forward_cached(seqs[:, :7], torch.zeros(3, dtype=torch.int32))
        lens = torch.tensor(lengths, dtype=torch.int32)
        nxt = torch.stack([seqs[b, lengths[b]:lengths[b] + 1] for b in range(3)])
        step1 = ours.output(ours.forward_cached(nxt, lens)).float()                # (3, 1, n, V)
        nxt2 = torch.stack([seqs[b, lengths[b] + 1:lengths[b] + 3] for b in range(3)])
        step2 = ours(nxt2, lens + 1, return_all_heads=True)                          # (3, 2, n, V)
        for b, L in enumerate(lengths):
            ref_alone = meta.random_reference(meta.ModelArgs(**CONFIGS["gqa_4heads"], max_batch_size=1,
                                                             max_seq_len=MAX_SEQ), 0)
            ref_alone.forward(seqs[b:b + 1, :L], 0, return_all_heads=True)
            _close(step1[b:b + 1], ref_alone.forward(seqs[b:b + 1, L:L + 1], L, return_all_heads=True))
            _close(step2[b:b + 1], ref_alone.forward(seqs[b:b + 1, L + 1:L + 3], L + 1, return_all_heads=True))
    assert step1.shape[2] == n


def test_head_hidden_feeds_output(tmp_path):
    ref, ours = _pair("gqa_4heads", tmp_path)
    tokens = _tokens(ours.vocab_size, 2, 9, seed=7)
    with torch.no_grad():
        hidden = ours.head_hidden(tokens)
        assert hidden.shape == (4, 2, 9, 64)
        logits = ours(tokens, 0, return_all_heads=True)            # (B, T, n, V)
        _close(ours.output(hidden).float(), logits.permute(2, 0, 1, 3))
        _close(ours.output(hidden).float(), ref.forward(tokens, 0, return_all_heads=True).permute(2, 0, 1, 3))
        assert ours.head_hidden(tokens, n_heads=2).shape == (2, 2, 9, 64)
    # Training (autograd) adds each residual once instead of passing unadded pairs: same values.
    trained = ours.head_hidden(tokens)
    assert trained.requires_grad and torch.equal(trained.detach(), hidden)
    trained.float().square().sum().backward()
    assert all(p.grad is not None for p in ours.extra_heads.parameters())


def test_heads_predict_different_offsets(tmp_path):
    """Heads are distinct blocks: their logits differ (a wiring bug that reused head 0 would not)."""
    _, ours = _pair("gqa_4heads", tmp_path)
    with torch.no_grad():
        logits = ours(_tokens(ours.vocab_size, 1, 5), 0, return_all_heads=True)
    for i in range(1, 4):
        assert (logits[:, :, i] - logits[:, :, 0]).abs().max() > 1e-2


def test_model_args_rejects_unknown_key():
    with pytest.raises(ValueError, match="n_future_tokenz"):
        ModelArgs.from_dict({"dim": 64, "n_heads": 4, "vocab_size": 10, "n_future_tokenz": 4})


@pytest.mark.parametrize("change,match", [
    ({"dim": "16"}, "dim must be a positive int, got '16'"),
    ({"n_layers": 3.0}, "n_layers must be a positive int, got 3.0"),
    ({"n_heads": 0}, "n_heads must be a positive int, got 0"),
    ({"n_kv_heads": 0}, "n_kv_heads must be null or a positive int"),
    ({"multiple_of": 0}, "multiple_of must be a positive int"),
    ({"vocab_size": None}, "vocab_size must be an int"),
    ({"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier must be null or a positive number"),
    ({"ffn_dim_multiplier": -1}, "ffn_dim_multiplier must be null or a positive number"),
    ({"norm_eps": -1}, "norm_eps must be a positive finite number"),
    ({"rope_theta": 0}, "rope_theta must be a positive finite number"),
    ({"rope_theta": float("nan")}, "rope_theta must be a positive finite number"),
    ({"max_seq_len": 0}, "max_seq_len must be a positive int"),
    ({"n_future_tokens": 2.0}, "n_future_tokens must be a positive int"),
    ({"ffn_dim_multiplier": 0.005}, r"the feed-forward width comes out 0 \(dim 64, ffn_dim_multiplier 0.005"),
])
def test_model_args_rejects_bad_values_naming_the_key(change, match):
    params = {"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 10, "n_future_tokens": 2, **change}
    with pytest.raises(ValueError, match=f"params.json: {match}"):
        ModelArgs.from_dict(params, source="params.json")


def test_model_rejects_bad_heads_positions_tokens_and_cache_sizes():
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32,
                                  n_future_tokens=2))
    tokens = torch.randint(0, 50, (1, 5))
    for bad in (0, -1, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"n_heads must be an int in \[1, n_future_tokens = 2\]"):
            model.head_hidden(tokens, n_heads=bad)
    with pytest.raises(ValueError, match="start_pos must be >= 0, got -1"):
        model(tokens, start_pos=-1)
    # Without caches a later position would run without the earlier tokens: the release's model always
    # has its cache, so code ported from it got logits without context, silently.
    with pytest.raises(ValueError, match="start_pos 4 needs the KV cache: call setup_caches"):
        model(tokens, start_pos=4)
    for bad in (True, 4.9, torch.tensor([0.0]), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"start_pos must be an int or a \(1,\) integer tensor"):
            model(tokens, start_pos=bad)
    with pytest.raises(ValueError, match="has no positions"):
        model(tokens[:, :0])
    with pytest.raises(ValueError, match=r"positions up to 65 exceed the rotary table \(64 positions: 2 x max_seq_len\)"):
        model(torch.randint(0, 50, (1, 65)))   # 2 x max_seq_len positions, and no more
    model.setup_caches(1, 100)   # a longer cache grows the table; the uncached forward's limit stays
    model.clear_caches()
    assert model.freqs_cis.shape[0] >= 100
    with pytest.raises(ValueError, match=r"positions up to 65 exceed the rotary table \(64 positions: 2 x max_seq_len\)"):
        model(torch.randint(0, 50, (1, 65)))
    for size in ((0, 8), (2, -1), (2, 8.0)):
        with pytest.raises(ValueError, match="setup_caches: max_"):
            model.setup_caches(*size)
    # more than the machine has in all: refused by name before anything is allocated (or killed)
    with pytest.raises(ValueError, match=r"the KV caches for max_batch_size 4 x max_seq_len 10000000000000 needs "
                                         r"[0-9.]+ GiB, more than the [0-9.]+ GiB this cpu device has"):
        model.setup_caches(4, 10 ** 13)
    with pytest.raises(ValueError, match=r"a rotary table of 10000000000000 positions \(2 x max_seq_len\) needs"):
        precompute_freqs_cis(8, 10 ** 13)
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        model.forward_cached(torch.tensor([[1, 50]]), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="n_heads must be an int"):
        model.forward_cached(tokens, torch.zeros(1, dtype=torch.int32), n_heads=9)
    with pytest.raises(ValueError, match="cache_seqlens must be a \\(B,\\) integer tensor"):
        model.forward_cached(tokens, torch.tensor([2.7]))   # truncated to 2 before


def test_casting_the_model_sets_its_caches_up_again():
    """.to() converted each block's cache buffer alone, cutting it loose from the stacked k_cache /
    v_cache that KV compaction and CUDA graphs use; the caches are now set up again at the new dtype."""
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                  max_seq_len=32, n_future_tokens=2))
    model.setup_caches(2, 16)
    model.to(torch.float64)
    assert model.k_cache.dtype == torch.float64 and (model.cache_batch, model.cache_len) == (2, 16)
    for i, block in enumerate(model.blocks()):
        assert block.attention.cache.k.data_ptr() == model.k_cache[i].data_ptr()
        assert block.attention.cache.v.data_ptr() == model.v_cache[i].data_ptr()
    tokens = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        model.forward_cached(tokens, torch.zeros(2, dtype=torch.int32))
    assert model.k_cache[:, :, :6].abs().sum() > 0   # the stacked cache is the one written


def test_model_args_fields_match_release():
    ours = {f.name: f.default for f in dataclasses.fields(ModelArgs)}
    theirs = {f.name: f.default for f in dataclasses.fields(meta.ModelArgs)}
    assert ours == theirs


@pytest.mark.parametrize("dim,multiple_of,mult,hidden", [
    (4096, 256, None, 11008),    # Llama 2 7B, and the MTP 7B models
    (5120, 256, None, 13824),    # Llama 2 13B
    (8192, 4096, 1.3, 28672),    # Llama 2 70B
    (4096, 1024, 1.3, 14336),    # Llama 3 8B
])
def test_ffn_hidden_size_rule(dim, multiple_of, mult, hidden):
    args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=mult, vocab_size=32000)
    assert args.ffn_hidden_dim == hidden
    with torch.device("meta"):
        ff = meta.FeedForward(dim, 4 * dim, multiple_of, mult)
    assert ff.w1.out_features == hidden


def test_dtype_cast_keeps_rotary_table():
    # `.to(dtype)` must not touch the complex rotary table (a buffer would lose its imaginary part).
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=50, multiple_of=16,
                                  n_future_tokens=2, max_seq_len=32))
    tokens = torch.randint(0, 50, (2, 7))
    ref = model(tokens, return_all_heads=True)
    model64 = model.to(torch.float64)
    assert model64.freqs_cis.is_complex()
    torch.testing.assert_close(model64(tokens, return_all_heads=True), ref, rtol=1e-4, atol=1e-4)


def test_forward_cached_rejects_1d_tokens():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32))
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match=r"tokens must be \(batch, seq\)"):
        model.forward_cached(torch.tensor([1, 2]), torch.zeros(1, dtype=torch.int32))


def test_forward_cached_checks_lengths_once_with_a_clear_error():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32))
    model.setup_caches(2, 8)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="do not fit the cache length 8"):
        model.forward_cached(tokens, torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        model.forward_cached(tokens, torch.tensor([-1, 0], dtype=torch.int32))
    model.forward_cached(tokens, torch.tensor([0, 5], dtype=torch.int32))  # exactly fills the cache


def test_tree_mask_is_packed_once_per_forward_not_per_layer(monkeypatch):
    """Under a CUDA graph every packing op would replay per layer; the model packs once and the
    generator passes its tree's mask pre-packed (no packing at all per step)."""
    import mtp_engine.model as model_module
    from mtp_engine.speculative import token_tree

    calls = []
    original = model_module.pack_tree_mask
    monkeypatch.setattr(model_module, "pack_tree_mask", lambda mask: calls.append(mask) or original(mask))
    model = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32,
                                  n_future_tokens=2))
    model.setup_caches(2, 16)
    tree = token_tree("heads2", 2)
    tokens = torch.randint(0, 50, (2, tree.size), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([0, 3], dtype=torch.int32)
    from_bool = model.forward_cached(tokens, lens, node_depths=tree.depths, tree_mask=tree.tree_mask)
    assert len(calls) == 1
    from_packed = model.forward_cached(tokens, lens, node_depths=tree.depths, tree_mask=tree.packed_mask)
    assert len(calls) == 1 and tree.packed_mask is tree.packed_mask
    torch.testing.assert_close(from_packed, from_bool, rtol=0, atol=0)


def test_setup_caches_frees_the_old_cache_before_allocating(monkeypatch):
    # A generator grows the cache for a speculative tree: holding both caches would double its memory.
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32))
    model.setup_caches(2, 16)
    old = [weakref.ref(model.k_cache), weakref.ref(model.v_cache)]   # alive while the model holds them
    held = []
    zeros = torch.zeros

    def recording_zeros(*args, **kwargs):
        held.append(any(ref() is not None for ref in old))
        return zeros(*args, **kwargs)
    monkeypatch.setattr(torch, "zeros", recording_zeros)
    model.setup_caches(2, 24)
    assert held == [False, False] and model.k_cache.shape[2] == 24 and model.cache_len == 24
