"""Bad input across the public API is refused with an error that names it, never a silent wrong
answer (the findings of a fuzzing review: each case here used to pass, wrap or crash deep inside)."""
import numpy as np
import pytest
import torch

from mtp_engine import ModelArgs, Transformer
from mtp_engine.checkpoint import load_checkpoint, save_checkpoint
from mtp_engine.generate import Generator
from mtp_kernels import compact_kv_cache, linear_logits, rms_norm
from mtp_kernels.sampling import TokenCandidates


def tiny(seed=0, vocab=50):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=vocab, multiple_of=16, max_seq_len=32,
                                 n_future_tokens=2))


# ---------------------------------------------------------------------- the model
def test_cache_positions_past_int32_are_refused_not_wrapped_to_slot_0():
    model = tiny()
    model.setup_caches(2, 16)
    tokens = torch.randint(0, 50, (2, 5))
    for start in (2 ** 32, torch.tensor(2 ** 32 + 3), torch.tensor([2 ** 32, 0])):
        with pytest.raises(ValueError, match=r"start_pos \[4294967\d+.*do not fit the cache length 16 "
                                             r"\(each must be in \[0, 11\]\)"):
            with torch.no_grad():
                model(tokens, start_pos=start)
    with pytest.raises(ValueError, match=r"cache_seqlens \[4294967296, 0\] \+ 5 new tokens do not fit the cache "
                                         r"length 16"):
        model.forward_cached(tokens, torch.tensor([2 ** 32, 0]))


def test_tree_node_depths_are_checked():
    model = tiny()
    model.setup_caches(2, 16)
    tokens, mask = torch.randint(0, 50, (2, 5)), torch.ones(5, 5, dtype=torch.bool).tril()
    zeros = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"node_depths \[0, 1, 2, 3, -60\] must be in \[0, 5\)"):
        model.forward_cached(tokens, zeros, node_depths=torch.tensor([0, 1, 2, 3, -60]), tree_mask=mask)
    for depths, got in ((torch.tensor([0, .5, 1, 1, 1]), "torch.float32"), ([0, 1, 2, 3, 4], "list"),
                        (torch.tensor([0, 1]), r"\(2,\)")):
        with pytest.raises(ValueError, match=rf"node_depths must be a \(5,\) integer tensor .*got .*{got}"):
            model.forward_cached(tokens, zeros, node_depths=depths, tree_mask=mask)
    with pytest.raises(ValueError, match=r"node_depths \[0, 1, 5, 1, 1\] must be in \[0, 5\)"):
        model.forward_cached(tokens, zeros, node_depths=torch.tensor([0, 1, 5, 1, 1]), tree_mask=mask)
    ok = model.forward_cached(tokens, torch.tensor([11, 0], dtype=torch.int32),
                              node_depths=torch.tensor([0, 1, 1, 2, 3]), tree_mask=mask)
    assert ok.shape == (2, 5, 2, 32)


def test_tokens_that_are_not_a_tensor_or_have_no_rows():
    model = tiny()
    for call in (lambda: model([[1, 2, 3]]), lambda: model.trunk_hidden([[1]]), lambda: model.head_hidden([[1]])):
        with pytest.raises(ValueError, match="tokens must be a \\(batch, seq\\) integer tensor, got a list"):
            call()
    with pytest.raises(ValueError, match=r"tokens \(0, 3\) has no rows"):
        model(torch.zeros(0, 3, dtype=torch.long))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match=r"tokens must be \(batch, seq\), a tensor; got list"):
        model.forward_cached([[1]], torch.zeros(1, dtype=torch.int32))


# ---------------------------------------------------------------------- checkpoints
def test_save_checkpoint_refuses_what_load_would_refuse_and_keeps_the_good_one(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()}
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("extra_heads.")}
    wrong_shape = {**state, "output.weight": torch.zeros(60, 32)}
    as_ints = {**state, "norm.weight": state["norm.weight"].to(torch.int8)}
    cases = ((partial, r"missing keys \['extra_heads\."), (wrong_shape, r"output\.weight \(60, 32\) != \(50, 32\)"),
             ({**state, "junk": torch.zeros(1)}, r"unexpected keys \['junk'\]"),
             (as_ints, "norm.weight is torch.int8, not a floating tensor"), ([1, 2], "must be a dict of tensors"))
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            save_checkpoint(model, tmp_path / "good", state_dict=bad)
    for dtype in ("bfloat16", torch.int8):
        with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype"):
            save_checkpoint(model, tmp_path / "good", dtype=dtype)
    with pytest.raises(ValueError, match="save_checkpoint needs a Transformer, got OrderedDict"):
        save_checkpoint(state, tmp_path / "other")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()} == before
    assert not (tmp_path / "other").exists()
    load_checkpoint(tmp_path / "good")
    with pytest.raises(ValueError, match="ckpt_dir must be a checkpoint folder's path, got NoneType"):
        load_checkpoint(None)


# ---------------------------------------------------------------------- kernels
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_logits_refuses_a_call_autograd_would_differentiate(backend, request):
    """Its Triton kernel has no backward: the reference path used to keep the graph and the Triton one
    to drop it, silently, so the same code trained on a CPU and not on a GPU."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    hidden, weight = torch.randn(3, 16, requires_grad=True), torch.randn(37, 16)
    with pytest.raises(ValueError, match="linear_logits has no backward"):
        linear_logits(hidden, weight)
    with torch.no_grad():
        assert torch.allclose(linear_logits(hidden, weight), hidden @ weight.T, atol=1e-5)


def test_token_candidates_check_their_fields():
    with pytest.raises(ValueError, match=r"score .*\(2, 1, 3\).* and index .*\(2, 1, 2\).* must match"):
        TokenCandidates(torch.randn(2, 1, 3), torch.zeros(2, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"score must be a \(rows, n_blocks, k\) tensor, got shape \(2, 3\)"):
        TokenCandidates(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="score must be float32 and index int32/int64"):
        TokenCandidates(torch.randn(2, 1, 3), torch.zeros(2, 1, 3))
    assert TokenCandidates(torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[7, 2]]])).argmax().tolist() == [7]


def test_compact_kv_cache_refuses_one_tensor_for_k_and_v():
    cache = torch.randn(1, 1, 8, 1, 4)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        compact_kv_cache(cache, cache, torch.zeros(1, dtype=torch.int32), torch.tensor([[0, 2, 3]]),
                         torch.tensor([3]))


def test_rms_norm_names_a_0d_weight():
    with pytest.raises(ValueError, match=r"rms_norm: weight shape \(\) does not match x's last dim 4"):
        rms_norm(torch.randn(2, 4), torch.tensor(1.0))


# ---------------------------------------------------------------------- generation
def test_generator_arguments_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="Generator needs a Transformer .* got str"):
        Generator("model")
    with pytest.raises(ValueError, match="tokenizer must be None or a Tokenizer .* got str"):
        Generator(model, tokenizer="tokenizer.model")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on CUDA, but it is on cpu"):
        Generator(model, cuda_graphs=True)
    gen = Generator(model, max_batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match="logprobs must be True or False, got 'no'"):
        gen.generate([[1, 2]], max_gen_len=2, logprobs="no")
    # numpy scalars are numbers: accepted, and the same draws as Python floats
    a = gen.generate([[1, 2]], max_gen_len=4, temperature=np.float32(0.5), top_p=np.float64(0.9), seed=3)
    b = gen.generate([[1, 2]], max_gen_len=4, temperature=0.5, top_p=0.9, seed=3)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("speculative", [None, "chain"])
def test_a_model_with_nan_weights_is_named_not_decoded_to_token_0(speculative):
    model = tiny()
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = float("nan")
    gen = Generator(model, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match=r"hidden state at the end of 2 of 2 prompt\(s\) is not finite"):
        gen.generate([[1, 2, 3], [4]], max_gen_len=4, speculative=speculative)


def test_rope_cache_write_takes_strided_heads_and_no_tokens():
    from mtp_kernels import rope_cache_write
    from mtp_engine.model import precompute_freqs_cis

    B, T, H, D, S = 2, 3, 2, 8, 6
    q, k, v = (torch.randn(B, T, H, 2 * D)[..., ::2] for _ in range(3))   # last stride 2
    freqs = precompute_freqs_cis(D, 16)[:T]
    slots = torch.arange(T).expand(B, T)
    k_cache, v_cache = torch.zeros(B, S, H, D), torch.zeros(B, S, H, D)
    out = rope_cache_write(q, k, v, freqs, slots, k_cache, v_cache)
    k_ref, v_ref = torch.zeros(B, S, H, D), torch.zeros(B, S, H, D)
    want = rope_cache_write(q.contiguous(), k.contiguous(), v.contiguous(), freqs, slots, k_ref, v_ref)
    assert torch.equal(out, want) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    empty = rope_cache_write(q[:, :0], k[:, :0], v[:, :0], freqs[:0], slots[:, :0], k_cache, v_cache)
    assert empty.shape == (B, 0, H, D) and torch.equal(k_cache, k_ref)


def test_small_integer_cache_lengths_are_compared_as_numbers():
    """The range check runs before the int32 cast, in int64: in uint8, 100 > 300 would be True."""
    model = tiny()
    model.setup_caches(1, 300)
    tokens = torch.randint(0, 50, (1, 1))
    for dtype in (torch.uint8, torch.int16):
        assert model.forward_cached(tokens, torch.tensor([100], dtype=dtype)).shape == (1, 1, 2, 32)
        with torch.no_grad():
            assert model(tokens, start_pos=torch.tensor([100], dtype=dtype)).shape == (1, 1, 1, 50)


def test_the_triton_path_imports_dynamo_only_when_compiling():
    """Outside a compile the launchers are called directly, both those registered as custom ops
    (backend.kernel_op: torch.library.custom_op would wrap them in torch._disable_dynamo) and those
    left as graph breaks (backend.eager_under_compile): torch._disable_dynamo's wrapper imports Dynamo
    at its first call, about 0.6 s in a hand timing that code which never compiles would pay."""
    import os
    import subprocess
    import sys

    script = ("import sys, torch\nfrom mtp_kernels import fused_linear_cross_entropy, linear_argmax, rms_norm\n"
              "x = torch.randn(2, 8, requires_grad=True)\n"
              "rms_norm(x, torch.ones(8)).sum().backward()\n"
              "fused_linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([1, 4])).backward()\n"
              "linear_argmax(torch.randn(2, 8), torch.randn(5, 8))\n"
              "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n")
    env = {**os.environ, "MTP_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "no dynamo", out.stderr[-2000:]
