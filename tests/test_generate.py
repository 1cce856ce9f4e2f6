"""Generator (static-KV-cache batched generation), sampling, and the release-style Llama front end.

Tiny random fp32 models on CPU. The oracle for greedy decoding is a naive loop that re-runs the
uncached forward over the whole sequence every step.
"""
import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from mtp_engine import ModelArgs, Transformer
from mtp_engine.generate import Generator, GenerationResult
from mtp_engine.llama import Llama
from mtp_engine.sampling import sample_top_p
from mtp_kernels import linear_sample

VOCAB = 61


def make_model(n_future=2, vocab=VOCAB, seed=0, output_scale=4.0):
    """Random tiny MTP model. The output rows are scaled up so greedy paths vary instead of looping."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2 + n_future, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                     multiple_of=16, n_future_tokens=n_future, max_seq_len=64, max_batch_size=4)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.mul_(output_scale)
    return model


def naive_greedy(model, prompt, n):
    """Greedy continuation by full uncached forwards (no KV cache involved)."""
    ref = copy.deepcopy(model)
    ref.clear_caches()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = ref.forward(torch.tensor([seq]))  # (1, T, 1, V)
            seq.append(int(logits[0, -1, 0].argmax()))
    return seq[len(prompt):]


def random_prompts(lengths, vocab=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return make_model()


# ------------------------------------------------------------------------------ greedy correctness
@pytest.mark.parametrize("n_future", [1, 3])
def test_batched_greedy_equals_one_at_a_time(n_future):
    model = make_model(n_future=n_future, seed=n_future)
    prompts = random_prompts([1, 4, 9])
    gen = Generator(model, max_batch_size=4, max_seq_len=40)
    batched = gen.generate(prompts, max_gen_len=10).tokens
    singles = [gen.generate([p], max_gen_len=10).tokens[0] for p in prompts]
    assert batched == singles
    assert all(len(t) == 10 for t in batched)
    # the longest prompt first and a repeated prompt: order and padding must not matter either
    again = gen.generate([prompts[2], prompts[0], prompts[1], prompts[0]], max_gen_len=10).tokens
    assert again == [singles[2], singles[0], singles[1], singles[0]]


def test_prefill_groups_is_the_cheapest_split():
    """Against every split of a few sorted batches: the fewest padded tokens plus forward costs."""
    from itertools import combinations
    from mtp_engine.generate import prefill_groups

    def cost(lengths, groups, forward_tokens):
        return sum((end - start) * lengths[end - 1] + forward_tokens for start, end in groups)

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 8, (1,), generator=g))
        lengths = sorted(torch.randint(1, 300, (n,), generator=g).tolist())
        forward_tokens = int(torch.randint(0, 200, (1,), generator=g))
        groups = prefill_groups(lengths, forward_tokens)
        assert groups[0][0] == 0 and groups[-1][1] == n and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        best = min(cost(lengths, list(zip((0,) + cuts, cuts + (n,))), forward_tokens)
                   for k in range(n) for cuts in combinations(range(1, n), k))
        assert cost(lengths, groups, forward_tokens) == best
    assert prefill_groups([7] * 5, 0) == [(0, 5)]          # equal lengths: one forward
    assert prefill_groups([10, 1000], 16) == [(0, 1), (1, 2)]
    assert prefill_groups([10, 20], 16) == [(0, 2)]        # 10 padded tokens cost less than a forward
    assert prefill_groups([], 16) == []
    with pytest.raises(ValueError, match="shortest first"):
        prefill_groups([5, 3], 16)


def ragged_batch(backend, request):
    """(model, prompt lengths, prompts, Generator) of a batch of very different prompt lengths (fewer
    and shorter on the interpreted Triton path)."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = make_model(n_future=2, seed=5)
    lengths = [30, 2, 3, 29, 1] if backend == "reference" else [9, 1, 2, 8]
    prompts = random_prompts(lengths, seed=7)
    return model, lengths, prompts, Generator(model, max_batch_size=len(prompts), max_seq_len=48)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ragged_batch_prefills_in_groups(request, monkeypatch, backend):
    """Prompts of very different lengths prefill in groups of similar length, each in its own cache
    rows (forward_cached(first_row=...)), fewer tokens than padding all to the longest; the tokens,
    log-probs and finish reasons equal one-prompt-at-a-time generation, in the caller's order, for
    plain and speculative decoding."""
    model, lengths, prompts, gen = ragged_batch(backend, request)
    calls = []
    forward_cached = model.forward_cached

    def recording(tokens, cache_seqlens, **kwargs):
        calls.append((tuple(tokens.shape), kwargs.get("first_row", 0)))
        return forward_cached(tokens, cache_seqlens, **kwargs)

    monkeypatch.setattr(model, "forward_cached", recording)
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 4)
    for speculative in (None, "tree"):
        calls.clear()
        res = gen.generate(prompts, max_gen_len=6, speculative=speculative, logprobs=True)
        prefill = calls[:res.stats["prefill_forwards"]]
        short = sorted(lengths)
        assert res.stats["prefill_forwards"] == 2 and res.stats["forwards"] == len(calls) - 1
        assert [first_row for _, first_row in prefill] == [0, 3 if backend == "reference" else 2]
        assert [shape[1] for shape, _ in prefill] == [short[2] if backend == "reference" else 2, max(lengths)]
        assert sum(B * T for (B, T), _ in prefill) < len(prompts) * max(lengths)
        singles = [gen.generate([p], max_gen_len=6, speculative=speculative, logprobs=True) for p in prompts]
        assert res.tokens == [r.tokens[0] for r in singles]
        assert res.finish_reasons == [r.finish_reasons[0] for r in singles]
        for got, want in zip(res.prompt_logprobs + res.logprobs,
                             [r.prompt_logprobs[0] for r in singles] + [r.logprobs[0] for r in singles]):
            assert got == pytest.approx(want, abs=1e-4)
        assert [len(lp) for lp in res.prompt_logprobs] == lengths


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_in_chunks_equals_one_forward(backend, request, monkeypatch):
    """PREFILL_CHUNK_TOKENS bounds a prefill forward's tokens (rows x positions): a group goes through
    in chunks of positions, each attending to the cached chunks before it, and rows whose prompt has
    ended leave the later chunks. Tokens, log-probs and finish reasons equal the unchunked prefill's."""
    model, lengths, prompts, gen = ragged_batch(backend, request)
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 1 << 30)   # one group
    calls = []
    forward_cached = model.forward_cached

    def recording(tokens, cache_seqlens, **kwargs):
        calls.append((tuple(tokens.shape), int(cache_seqlens.max()), kwargs.get("first_row", 0)))
        return forward_cached(tokens, cache_seqlens, **kwargs)

    monkeypatch.setattr(model, "forward_cached", recording)
    for speculative in (None, "tree"):
        whole = gen.generate(prompts, max_gen_len=6, speculative=speculative, logprobs=True)
        assert whole.stats["prefill_forwards"] == 1
        budget = 7
        monkeypatch.setattr("mtp_engine.generate.PREFILL_CHUNK_TOKENS_DEFAULT", budget)
        calls.clear()
        chunked = gen.generate(prompts, max_gen_len=6, speculative=speculative, logprobs=True)
        monkeypatch.setattr("mtp_engine.generate.PREFILL_CHUNK_TOKENS_DEFAULT", 1 << 30)
        prefill = calls[:chunked.stats["prefill_forwards"]]
        assert len(prefill) > 2 and chunked.stats["forwards"] == whole.stats["forwards"]
        # consecutive chunks of positions from 0 to the longest prompt, each within the budget
        assert [start for _, start, _ in prefill] == [0] + list(itertools.accumulate(T for (_, T), _, _ in prefill))[:-1]
        assert sum(T for (_, T), _, _ in prefill) == max(lengths)
        assert all(B * T <= budget or T == 1 for (B, T), _, _ in prefill)
        # a row leaves once its prompt has ended: the rows of a chunk are those still reaching its start
        short = sorted(lengths)
        for (B, _), start, first_row in prefill:
            assert first_row == sum(n <= start for n in short) and first_row + B == len(lengths)
        assert chunked.tokens == whole.tokens and chunked.finish_reasons == whole.finish_reasons
        for got, want in zip(chunked.prompt_logprobs + chunked.logprobs, whole.prompt_logprobs + whole.logprobs):
            assert got == pytest.approx(want, abs=1e-4)
        assert [len(lp) for lp in chunked.prompt_logprobs] == lengths


def test_forward_cached_in_rows_from_first_row(model):
    """forward_cached(first_row=r) reads and writes cache rows r.. only: the same hidden states as the
    rows' part of a whole-batch call, the rows before r untouched; rows past the cache are refused."""
    m = copy.deepcopy(model)
    m.setup_caches(3, 16)
    tokens = torch.tensor(random_prompts([5, 5, 5], seed=2))
    with torch.no_grad():
        whole = m.forward_cached(tokens, torch.zeros(3, dtype=torch.int32))
        k_whole = m.k_cache.clone()
        m.k_cache.zero_()
        m.v_cache.zero_()
        rows = m.forward_cached(tokens[1:], torch.zeros(2, dtype=torch.int32), first_row=1)
        torch.testing.assert_close(rows, whole[1:])
        torch.testing.assert_close(m.k_cache[:, 1:], k_whole[:, 1:])
        assert not m.k_cache[:, 0].any() and not m.v_cache[:, 0].any()
        with pytest.raises(ValueError, match="batch 2 from row 2 exceeds the cache's max_batch_size 3"):
            m.forward_cached(tokens[1:], torch.zeros(2, dtype=torch.int32), first_row=2)
        with pytest.raises(ValueError, match="first_row must be an int >= 0"):
            m.forward_cached(tokens[1:], torch.zeros(2, dtype=torch.int32), first_row=-1)


@pytest.mark.parametrize("speculative", [None, "tree"])
def test_a_prompt_that_fills_the_cache_generates_nothing(model, speculative):
    """A prompt of max_seq_len tokens is accepted, as the release accepts it: it generates nothing
    (finish reason max_seq_len) while the rest of the batch generates what it would alone."""
    prompts = random_prompts([20, 3, 20], seed=9)
    gen = Generator(model, max_batch_size=3, max_seq_len=20)
    res = gen.generate(prompts, max_gen_len=5, speculative=speculative, logprobs=True)
    alone = gen.generate([prompts[1]], max_gen_len=5, speculative=speculative)
    assert res.tokens == [[], alone.tokens[0], []] and res.logprobs[0] == []
    assert res.finish_reasons == ["max_seq_len", "max_gen_len", "max_seq_len"]
    assert res.stats["finish_counts"] == {"eos": 0, "stop": 0, "max_gen_len": 1, "max_seq_len": 2, "cancelled": 0}
    assert len(res.prompt_logprobs[0]) == 20
    nothing = gen.generate(prompts[:1], max_gen_len=0)
    assert nothing.tokens == [[]] and nothing.finish_reasons == ["max_gen_len"]


def test_greedy_equals_uncached_reference(model):
    prompts = random_prompts([1, 4, 9], seed=3)
    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    res = gen.generate(prompts, max_gen_len=8)
    for prompt, toks in zip(prompts, res.tokens):
        assert toks == naive_greedy(model, prompt, 8)
    assert len(set(res.tokens[0])) > 1, "degenerate model: greedy repeats one token, test too weak"


def test_result_shape_and_stats(model):
    gen = Generator(model, max_batch_size=2, max_seq_len=32)
    res = gen.generate(random_prompts([3, 5]), max_gen_len=6)
    assert isinstance(res, GenerationResult)
    assert res.text is None and res.logprobs is None
    assert res.finish_reasons == ["max_gen_len", "max_gen_len"]
    s = res.stats
    assert s["generated_tokens"] == 12 and s["prompt_tokens"] == 8 and s["batch_size"] == 2
    assert s["forwards"] == 6  # one prefill producing token 1, then five single-token decode steps
    assert s["tokens_per_forward"] == 1.0
    assert s["wall_time_s"] > 0 and s["tokens_per_s"] > 0


def test_max_gen_len_zero_returns_nothing(model):
    gen = Generator(model, max_batch_size=2, max_seq_len=16)
    prompts = random_prompts([2, 3])
    res = gen.generate(prompts, max_gen_len=0)
    assert res.tokens == [[], []] and res.stats["forwards"] == 0 and res.prompt_logprobs is None
    # Asked for log-probs: the prompts' still come (one prefill), for plain and speculative alike.
    want = gen.generate(prompts, max_gen_len=1, logprobs=True).prompt_logprobs
    for speculative in (None, "tree"):
        res = gen.generate(prompts, max_gen_len=0, logprobs=True, speculative=speculative)
        assert res.tokens == [[], []] and res.logprobs == [[], []]
        assert [len(lp) for lp in res.prompt_logprobs] == [2, 3]
        for got, expected in zip(res.prompt_logprobs, want):
            assert got == pytest.approx(expected, abs=1e-5)


def test_max_gen_len_clipped_to_cache_room(model):
    prompts = random_prompts([10, 3], seed=4)
    small = Generator(model, max_batch_size=2, max_seq_len=14).generate(prompts, max_gen_len=8)
    assert [len(t) for t in small.tokens] == [4, 8]  # 14 - 10 = 4 slots left for the first prompt
    assert small.finish_reasons == ["max_seq_len", "max_gen_len"]
    big = Generator(model, max_batch_size=2, max_seq_len=40).generate(prompts, max_gen_len=8)
    assert small.tokens[0] == big.tokens[0][:4] and small.tokens[1] == big.tokens[1]


def test_eos_stops_one_sequence_while_others_continue(model):
    prompts = random_prompts([2, 5, 7], seed=5)
    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    free = gen.generate(prompts, max_gen_len=10).tokens
    # eos = a token one sequence first produces at step 3 and another sequence never produces
    candidates = [(b, other) for b in range(3) for other in range(3)
                  if other != b and free[b][3] not in free[b][:3] and free[b][3] not in free[other]]
    assert candidates, f"no usable eos in {free}"
    b, other = candidates[0]
    eos = free[b][3]
    res = gen.generate(prompts, max_gen_len=10, eos_id=eos)
    expected = [t[: t.index(eos)] if eos in t else t for t in free]
    assert res.tokens == expected
    assert res.tokens[b] == free[b][:3] and res.finish_reasons[b] == "eos"
    assert res.tokens[other] == free[other] and res.finish_reasons[other] == "max_gen_len"
    # eos ids < 0 (SentencePiece's "none") disable stopping
    assert gen.generate(prompts, max_gen_len=10, eos_id=-1).tokens == free


@pytest.mark.parametrize("chunk_bytes", [None, 4 * VOCAB * 3])   # 3 positions at a time
def test_a_prompt_filling_max_seq_len_can_be_scored(model, monkeypatch, chunk_bytes):
    """max_gen_len=0 with logprobs scores a prompt of max_seq_len tokens (the release allows it), also
    a few positions at a time (PROMPT_LOGPROB_BYTES bounds the float32 log-softmax); one token more is
    an error."""
    if chunk_bytes is not None:
        monkeypatch.setattr("mtp_engine.generate.PROMPT_LOGPROB_BYTES", chunk_bytes)
    prompt = random_prompts([16], seed=9)[0]
    gen = Generator(model, max_batch_size=1, max_seq_len=16)
    res = gen.generate([prompt], max_gen_len=0, logprobs=True)
    ref = copy.deepcopy(model)
    ref.clear_caches()
    with torch.no_grad():
        logp = torch.log_softmax(ref.forward(torch.tensor([prompt]))[0, :, 0], dim=-1)
    want = [0.0] + [float(logp[t - 1, prompt[t]]) for t in range(1, 16)]
    assert res.tokens == [[]] and res.prompt_logprobs[0] == pytest.approx(want, abs=1e-4)
    for max_gen_len in (0, 1):
        with pytest.raises(ValueError, match="prompt 0 has 17 tokens, more than max_seq_len 16"):
            gen.generate([prompt + [1]], max_gen_len=max_gen_len)


def test_logprobs_match_uncached_forward(model):
    prompt = random_prompts([5], seed=6)[0]
    res = Generator(model, max_batch_size=1, max_seq_len=32).generate([prompt], max_gen_len=4, logprobs=True)
    ref = copy.deepcopy(model)
    ref.clear_caches()
    seq = prompt + res.tokens[0]
    with torch.no_grad():
        logp = torch.log_softmax(ref.forward(torch.tensor([seq]))[0, :, 0], dim=-1)
    want = [float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]
    got = res.prompt_logprobs[0][1:] + res.logprobs[0]
    assert res.prompt_logprobs[0][0] == 0.0
    assert got == pytest.approx(want, abs=1e-4)


def test_greedy_choice_does_not_depend_on_logprobs(model, monkeypatch):
    # Plain greedy picks its token with `linear_argmax` (float32 scores) whether or not log-probs are
    # asked for; only the log-probs need the logits. Here the "kernel" disagrees with the logits'
    # argmax on purpose: the flag must not switch which one decides.
    import mtp_engine.speculative as speculative_module
    vocab = model.output.weight.shape[0]
    monkeypatch.setattr(speculative_module, "linear_argmax",   # verify_tokens': every step's choice
                        lambda hidden, weight: torch.full((hidden.shape[0],), vocab - 1, dtype=torch.long))
    gen = Generator(model, max_batch_size=1, max_seq_len=32)
    prompt = random_prompts([5], seed=6)[0]
    plain = gen.generate([prompt], max_gen_len=3).tokens[0]
    with_lp = gen.generate([prompt], max_gen_len=3, logprobs=True)
    assert plain == with_lp.tokens[0] == [vocab - 1] * 3
    assert len(with_lp.logprobs[0]) == 3 and all(lp <= 0 for lp in with_lp.logprobs[0])


def test_fp16_logits_past_fp16_range_sample_and_score(model):
    """A fp16 model whose logits pass fp16's 65504: plain sampling draws (it took softmax of fp16
    logits, inf - inf = NaN, and torch.multinomial failed), as greedy and speculative sampling do,
    and log-probs are finite and equal float64's (they were NaN)."""
    fp16 = copy.deepcopy(model)
    with torch.no_grad():
        fp16.output.weight.mul_(3e4)
    fp16 = fp16.half()
    gen = Generator(fp16, max_batch_size=2, max_seq_len=24)
    prompts = random_prompts([3, 5], seed=4)
    for kwargs in ({}, {"temperature": 0.7, "seed": 0}, {"temperature": 0.7, "seed": 0, "speculative": "tree"}):
        res = gen.generate(prompts, max_gen_len=4, logprobs=True, **kwargs)
        assert all(len(t) == 4 for t in res.tokens)
        for lps in res.logprobs + res.prompt_logprobs:
            assert all(math.isfinite(lp) and lp <= 0 for lp in lps), (kwargs, lps)
    greedy = gen.generate(prompts[:1], max_gen_len=1, logprobs=True)
    with torch.no_grad():
        hidden = fp16.head_hidden(torch.tensor([prompts[0]]))[0, 0, -1]   # head 0's normed hidden, last position
    want = torch.log_softmax(hidden.double() @ fp16.output.weight.double().T, dim=-1)
    assert greedy.logprobs[0][0] == pytest.approx(want[greedy.tokens[0][0]].item(), abs=2e-2)
    assert want.max() > -1e-3 and torch.isfinite(want).all()


# ------------------------------------------------------------------------------ sampling
def test_sampling_reproducible_with_seed(model):
    gen = Generator(model, max_batch_size=2, max_seq_len=32)
    prompts = random_prompts([3, 6], seed=7)
    a = gen.generate(prompts, max_gen_len=12, temperature=1.5, top_p=0.95, seed=123).tokens
    b = gen.generate(prompts, max_gen_len=12, temperature=1.5, top_p=0.95, seed=123).tokens
    c = gen.generate(prompts, max_gen_len=12, temperature=1.5, top_p=0.95, seed=124).tokens
    assert a == b
    assert a != c


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_seeded_prompt_samples_the_same_alone_or_in_any_batch(request, model, backend):
    """Noise keyed by (the prompt's seed, the token's position): a prompt's sample does not depend on
    the prompts beside it, their order, their lengths, nor on when they finish."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    prompts = random_prompts([1, 4, 9, 4], seed=12)
    seeds = [7, 8, 2 ** 40 + 9, 10]
    n = 10 if backend == "reference" else 5
    gen = Generator(model, max_batch_size=4, max_seq_len=32)
    kwargs = dict(max_gen_len=n, temperature=1.2, top_p=0.95)
    batched = gen.generate(prompts, seed=seeds, **kwargs).tokens
    eos = batched[1][2]   # row 1 stops early; the others go on drawing
    batched = gen.generate(prompts, seed=seeds, eos_id=eos, **kwargs).tokens
    assert 0 < len(batched[1]) < n
    alone = [gen.generate([p], seed=[s], eos_id=eos, **kwargs).tokens[0] for p, s in zip(prompts, seeds)]
    assert batched == alone
    swapped = gen.generate(prompts[::-1], seed=seeds[::-1], eos_id=eos, **kwargs).tokens
    assert swapped == batched[::-1]
    # Power: other seeds draw otherwise, and so do four copies of one prompt under one int seed.
    assert gen.generate(prompts, seed=[s + 1 for s in seeds], eos_id=eos, **kwargs).tokens != batched
    copies = gen.generate([prompts[2]] * 4, seed=5, **kwargs).tokens
    assert len({tuple(t) for t in copies}) > 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_prompt_temperature_and_top_p(request, model, backend):
    """A batch mixing greedy and sampled prompts, nuclei or not: each prompt gives what it gives
    alone with its own temperature, top_p and seed, and speculation changes nothing."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    prompts = random_prompts([3, 6, 2, 5], seed=15)
    temperatures, top_ps, seeds = [0.0, 0.8, 1.5, 1.0], [1.0, 0.9, 1.0, 0.6], [1, 2, 3, 4]
    n = 8 if backend == "reference" else 4
    gen = Generator(model, max_batch_size=4, max_seq_len=32)
    batched = gen.generate(prompts, max_gen_len=n, temperature=temperatures, top_p=top_ps, seed=seeds).tokens
    for p, t, tp, sd, got in zip(prompts, temperatures, top_ps, seeds, batched):
        assert got == gen.generate([p], max_gen_len=n, temperature=t, top_p=tp, seed=[sd]).tokens[0]
    assert batched[0] == gen.generate(prompts[:1], max_gen_len=n).tokens[0]   # the greedy prompt
    assert gen.generate(prompts, max_gen_len=n, temperature=np.array(temperatures), top_p=torch.tensor(top_ps),
                        seed=seeds, speculative="tree").tokens == batched
    assert gen.generate(prompts, max_gen_len=n, temperature=1.5, seed=seeds).tokens != batched   # power
    # 0-d arrays are numbers; a top_p below float32's range still means "the most likely token".
    assert gen.generate(prompts[:2], max_gen_len=3, temperature=np.array(0.0)).tokens == \
        gen.generate(prompts[:2], max_gen_len=3, temperature=torch.tensor(1.0), top_p=[1e-300, 1e-300], seed=1).tokens


@pytest.mark.parametrize("speculative", [None, "tree"])
def test_per_prompt_max_gen_len_and_eos(model, speculative):
    """max_gen_len and eos_id per prompt: each prompt stops by its own rules, and its tokens are
    what it gives alone with them (the others going on around it)."""
    prompts = random_prompts([4, 2, 7], seed=16)
    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    free = gen.generate(prompts, max_gen_len=12).tokens
    eos = [free[0][3], -1, free[2][5]]          # prompt 1 never stops early
    gen_lens = [12, 2, 9]
    res = gen.generate(prompts, max_gen_len=gen_lens, eos_id=eos, speculative=speculative)
    for b in range(3):
        alone = gen.generate([prompts[b]], max_gen_len=gen_lens[b], eos_id=eos[b], speculative=speculative)
        assert res.tokens[b] == alone.tokens[0] and res.finish_reasons[b] == alone.finish_reasons[0]
    assert res.finish_reasons[1] == "max_gen_len" and len(res.tokens[1]) == 2
    assert res.finish_reasons[0] == "eos" and res.tokens[0] == free[0][:free[0].index(eos[0])]
    assert gen.generate(prompts, max_gen_len=np.array(gen_lens), eos_id=eos).tokens == \
        gen.generate(prompts, max_gen_len=gen_lens, eos_id=eos).tokens


def test_int_seed_gives_prompt_i_a_hashed_seed(model):
    from mtp_engine.sampling import prompt_seed

    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    prompts = random_prompts([2, 5, 3], seed=13)
    kwargs = dict(max_gen_len=8, temperature=1.0)
    by_int = gen.generate(prompts, seed=5, **kwargs).tokens
    assert by_int == gen.generate(prompts, seed=[prompt_seed(5, i) for i in range(3)], **kwargs).tokens
    # A tensor or array of seeds is the list it holds.
    assert gen.generate(prompts, seed=torch.tensor([1, 2, 3]), **kwargs).tokens == \
        gen.generate(prompts, seed=np.array([1, 2, 3]), **kwargs).tokens == gen.generate(prompts, seed=[1, 2, 3], **kwargs).tokens
    with pytest.raises(ValueError, match="seed: a list needs one value per prompt, got 1 for 3"):
        gen.generate(prompts, seed=torch.tensor([3]), **kwargs)
    seeds = {prompt_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500 and all(0 <= v < 2 ** 63 for v in seeds)   # seeds s and s + 1 share no stream


def test_unseeded_sampling_draws_from_torch_global_rng_and_greedy_leaves_it(model):
    gen = Generator(model, max_batch_size=2, max_seq_len=32)
    prompts = random_prompts([3, 6], seed=14)
    torch.manual_seed(3)
    first = gen.generate(prompts, max_gen_len=8, temperature=1.0).tokens
    torch.manual_seed(3)
    assert gen.generate(prompts, max_gen_len=8, temperature=1.0).tokens == first
    state = torch.get_rng_state()
    gen.generate(prompts, max_gen_len=3)
    gen.generate(prompts, max_gen_len=3, seed=4)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_prompt_top_k(request, model, backend):
    """top_k per prompt beside top_p and a greedy prompt: each prompt gives what it gives alone, and
    every sampled token is among its context's k most likely; a top_k of 1 is greedy at any
    temperature, and one of the vocabulary or more cuts nothing (the Gumbel-max kernel's draws).
    (The interpreter, being slow, runs the first and the last.)"""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    prompts = random_prompts([3, 6, 2, 5], seed=17)
    temperatures, top_ps, top_ks, seeds = [0.0, 1.5, 2.0, 1.0], [1.0, 0.9, 1.0, 1.0], [0, 2, 3, 0], [5, 6, 7, 8]
    n = 8 if backend == "reference" else 4
    gen = Generator(model, max_batch_size=4, max_seq_len=32)
    res = gen.generate(prompts, max_gen_len=n, temperature=temperatures, top_p=top_ps, top_k=top_ks, seed=seeds,
                       logprobs=True, eos_id=-1)
    for b in range(4) if backend == "reference" else (1,):
        assert res.tokens[b] == gen.generate([prompts[b]], max_gen_len=n, temperature=temperatures[b], top_p=top_ps[b],
                                             top_k=top_ks[b], seed=[seeds[b]]).tokens[0]
    vocab = model.params.vocab_size
    free = gen.generate(prompts, max_gen_len=n, temperature=1.5, seed=seeds).tokens
    assert gen.generate(prompts, max_gen_len=n, temperature=1.5, top_k=vocab, seed=seeds).tokens == free
    if backend == "triton":
        return
    uncached = copy.deepcopy(model)
    uncached.clear_caches()
    for b in (1, 2):   # each sampled token ranks among its context's top_k under an uncached forward
        with torch.no_grad():
            logits = uncached.forward(torch.tensor([prompts[b] + res.tokens[b]]))[0, len(prompts[b]) - 1:-1, 0]
        ranks = (logits > logits.gather(1, torch.tensor(res.tokens[b])[:, None])).sum(1)
        assert (ranks < top_ks[b]).all(), (b, ranks)
        torch.testing.assert_close(torch.tensor(res.logprobs[b]), torch.log_softmax(logits, -1).gather(
            1, torch.tensor(res.tokens[b])[:, None])[:, 0], rtol=1e-4, atol=1e-4)
    greedy = gen.generate(prompts, max_gen_len=n).tokens
    assert gen.generate(prompts, max_gen_len=n, temperature=3.0, top_k=1, seed=seeds).tokens == greedy
    assert gen.generate(prompts, max_gen_len=n, temperature=1.5, top_k=np.array(vocab + 1), seed=seeds).tokens == free
    for top_k, match in ((-1, r"top_k must be an int >= 0 \(0 = no cut\), got -1"), (2.5, "top_k must be an int"),
                         ([1, 2], "top_k: a list needs one value per prompt, got 2 for 4"),
                         ([1, 2, -3, 0], r"top_k\[2\]: top_k must be an int >= 0")):
        with pytest.raises(ValueError, match=match):
            gen.generate(prompts, max_gen_len=2, temperature=1.0, top_k=top_k)


def test_per_prompt_min_p(model):
    """min_p per prompt beside top_k, top_p and a greedy prompt: each prompt gives what it gives alone,
    every sampled token is at least min_p times as likely as its context's best (at the temperature,
    under an uncached forward); min_p 1 is greedy at any temperature, 0 cuts nothing."""
    prompts = random_prompts([3, 6, 2, 5], seed=18)
    temperatures, min_ps, top_ks, seeds = [0.0, 1.5, 2.0, 1.0], [0.5, 0.2, 0.05, 0.0], [0, 0, 3, 0], [5, 6, 7, 8]
    n = 8
    gen = Generator(model, max_batch_size=4, max_seq_len=32)
    res = gen.generate(prompts, max_gen_len=n, temperature=temperatures, min_p=min_ps, top_k=top_ks, seed=seeds,
                       eos_id=-1)
    for b in range(4):
        assert res.tokens[b] == gen.generate([prompts[b]], max_gen_len=n, temperature=temperatures[b],
                                             min_p=min_ps[b], top_k=top_ks[b], seed=[seeds[b]], eos_id=-1).tokens[0]
    uncached = copy.deepcopy(model)
    uncached.clear_caches()
    with torch.no_grad():
        logits = uncached.forward(torch.tensor([prompts[1] + res.tokens[1]]))[0, len(prompts[1]) - 1:-1, 0]
    probs = torch.softmax(logits.double() / temperatures[1], -1)
    chosen = probs.gather(1, torch.tensor(res.tokens[1])[:, None])[:, 0]
    assert (chosen >= min_ps[1] * probs.max(1).values * (1 - 1e-6)).all()
    free = gen.generate(prompts, max_gen_len=n, temperature=1.5, seed=seeds, eos_id=-1).tokens
    assert gen.generate(prompts, max_gen_len=n, temperature=1.5, min_p=0.0, seed=seeds, eos_id=-1).tokens == free
    assert gen.generate(prompts, max_gen_len=n, temperature=1.5, min_p=0.3, seed=seeds, eos_id=-1).tokens != free
    greedy = gen.generate(prompts, max_gen_len=n, eos_id=-1).tokens
    assert gen.generate(prompts, max_gen_len=n, temperature=3.0, min_p=1.0, seed=seeds, eos_id=-1).tokens == greedy
    for min_p, match in ((-0.1, r"min_p must be a number in \[0, 1\] \(0 = no cut\), got -0.1"),
                         ("a", "min_p must be a number"), ([0.1, 0.2], "min_p: a list needs one value per prompt"),
                         ([0.1, 0.2, 1.5, 0.0], r"min_p\[2\]: min_p must be a number in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            gen.generate(prompts, max_gen_len=2, temperature=1.0, min_p=min_p)


def test_tiny_top_p_equals_greedy(model):
    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    prompts = random_prompts([1, 4, 9], seed=8)
    greedy = gen.generate(prompts, max_gen_len=8).tokens
    nucleus_of_one = gen.generate(prompts, max_gen_len=8, temperature=1.0, top_p=1e-6, seed=0).tokens
    assert nucleus_of_one == greedy


def test_sample_top_p_keeps_the_release_nucleus():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(4000, 1)
    rng = torch.Generator().manual_seed(0)
    only_top = sample_top_p(probs, 0.45, rng)
    assert set(only_top.tolist()) == {1}
    two = sample_top_p(probs, 0.7, rng)
    assert set(two.tolist()) == {1, 2}
    assert (two == 1).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    # The mass before token 2 is exactly 0.5: the release's `probs_sum - probs_sort > p` keeps it.
    assert set(sample_top_p(probs, 0.5, rng).tolist()) == {1, 2}
    equal = torch.full((4000, 4), 0.25)
    assert set(sample_top_p(equal, 0.25, rng).tolist()) == {0, 1}
    everything = sample_top_p(probs, 1.0, rng)
    assert set(everything.tolist()) == {0, 1, 2}


def test_sampling_at_the_limits_is_greedy():
    """linear_sample, which plain and speculative decoding both draw with: temperature 0, a very low
    temperature, and a nucleus too small for float32 (the most likely token always survives) pick
    the argmax. hidden @ eye = the logits."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]])
    eye = torch.eye(3)
    rng = torch.Generator().manual_seed(0)
    assert linear_sample(logits, eye, temperature=0.0).tolist() == [1, 0]
    assert linear_sample(logits, eye, temperature=1e-3, generator=rng).tolist() == [1, 0]
    assert linear_sample(logits, eye, temperature=1.0, top_p=1e-300, generator=rng).tolist() == [1, 0]


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([list(range(17))], {}, "17 tokens, more than max_seq_len 16"),
    ([[1, VOCAB]], {}, f"token id {VOCAB} outside"),
    ([[1, -1]], {}, "token id -1 outside"),
    ([[1, 2.5]], {}, "non-integer"),
    ("hello", {}, "list of token-id lists"),
    ([[1]], {"temperature": -0.1}, "temperature"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"top_p": 1.5}, "top_p"),
    ([[1]], {"max_gen_len": -1}, "max_gen_len"),
    ([[1]], {"speculative": "beam"}, "speculative"),
    ([[1]], {"heads": 2}, "heads and tree"),
    ([[1, True]], {}, "non-integer token id"),
    ([[1]], {"temperature": 1e-40}, "at least 1e-30"),
    ([[1]], {"eos_id": VOCAB}, f"eos_id {VOCAB} is not a token id"),
    ([[1]], {"eos_id": 2.0}, "eos_id must be an int"),
    ([[1]], {"temperature": 0.5, "seed": 1.7}, "seed must be None or an int"),
    ([[1]], {"seed": True}, "seed must be None or an int"),
    ([[1]], {"max_gen_len": np.bool_(True)}, "max_gen_len must be an int"),
    ([[1]], {"max_gen_len": True}, "max_gen_len must be an int"),
    ([[1]], {"eos_id": True}, "eos_id must be an int"),
    ([[1]], {"seed": 2 ** 70}, "seed must be None or an int"),
    ([[1]], {"seed": "7"}, "seed must be None or an int"),
    ([[1], [2]], {"temperature": 0.5, "seed": [1]}, "seed: a list needs one value per prompt, got 1 for 2"),
    ([[1]], {"seed": [-1]}, r"seed\[0\] must be an int in \[0, 2\*\*63\), got -1"),
    ([[1]], {"temperature": 0.5, "seed": [1.5]}, r"seed\[0\] must be an int"),
    ([[1], [2]], {"temperature": [0.5]}, "temperature: a list needs one value per prompt, got 1 for 2"),
    ([[1], [2]], {"temperature": [0.5, -1.0]}, r"temperature\[1\]: temperature must be a finite number >= 0"),
    ([[1], [2]], {"top_p": [0.5, 0.0]}, r"top_p\[1\]: top_p must be a number in \(0, 1\]"),
    ([[1]], {"temperature": "0.5"}, "temperature must be a finite number"),
    ([[1]], {"temperature": 1e39}, "temperature must be at most float32's largest value"),
    ([[1], [2]], {"max_gen_len": [3]}, "max_gen_len: a list needs one value per prompt, got 1 for 2"),
    ([[1], [2]], {"max_gen_len": [3, -1]}, r"max_gen_len\[1\] must be an int >= 0, got -1"),
    ([[1], [2]], {"eos_id": [3, VOCAB]}, rf"eos_id\[1\] {VOCAB} is not a token id"),
    ([[1], [2]], {"eos_id": [3, 2.5]}, r"eos_id\[1\] must be an int token id or None"),
])
def test_bad_input_raises_value_error(model, prompts, kwargs, match):
    gen = Generator(model, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match=match):
        gen.generate(prompts, **kwargs)


@pytest.mark.parametrize("build", ["generator_in_inference_mode", "measure_acceptance_rates"])
def test_building_a_generator_in_inference_mode_leaves_the_model_trainable(build):
    """A Generator made inside inference mode (a sampling function in a training loop, or
    measure_acceptance_rates, itself in inference mode) must not turn the fused weights or the caches
    into inference tensors: the next training step would fail."""
    from mtp_engine.speculative import measure_acceptance_rates

    model = make_model(n_future=2)
    if build == "measure_acceptance_rates":
        measure_acceptance_rates(model, [[1, 2, 3]], top_k=2, max_gen_len=4)
    else:
        with torch.inference_mode():
            Generator(model, max_batch_size=1, max_seq_len=16).generate([[1, 2]], max_gen_len=3)
    attention = model.layers[0].attention
    assert not any(t.is_inference() for t in (attention.wq.weight, model.k_cache, model.v_cache))
    model.train()
    loss = model.head_hidden(torch.tensor([[1, 2, 3, 4]])).square().mean()
    loss.backward()
    assert attention.wq.weight.grad is not None


def test_forward_with_caches_refuses_autograd_and_generation_refuses_other_dtypes(model):
    """model(tokens) after a Generator set the caches up is the release's cached inference path: it
    builds no autograd graph (its in-place cache writes would give wrong gradients), says so once
    where autograd was on, and a backward through it fails instead of training wrongly; without the
    caches it trains. A float64 model is refused by name at generate()."""
    trained = make_model(n_future=2, seed=3)
    Generator(trained, max_batch_size=2, max_seq_len=16)
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=r"release's inference path and builds no autograd graph; call "
                                         r"model.clear_caches\(\)"):
        logits = trained(tokens)
    assert logits.shape == (1, 3, 1, VOCAB) and not logits.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        logits.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained(tokens, start_pos=3)                        # said once
    trained.clear_caches()
    trained(tokens).sum().backward()
    assert trained.layers[0].attention.wq.weight.grad is not None
    gen = Generator(make_model(n_future=2, seed=4).double(), max_batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match=r"the model is torch.float64; generation runs in torch.float32"):
        gen.generate([[1, 2]], max_gen_len=2)


def test_numpy_integers_are_ints(model):
    """Sizes and ids read from numpy arrays (a config, a dataset) work as the Python ints they are."""
    gen = Generator(model, max_batch_size=2, max_seq_len=16)
    as_int = gen.generate([[1, 2]], max_gen_len=4, temperature=0.8, seed=5, eos_id=3)
    as_numpy = gen.generate([[np.int64(1), np.int32(2)]], max_gen_len=np.int64(4), temperature=0.8,
                            seed=np.uint32(5), eos_id=np.int16(3))
    assert as_numpy.tokens == as_int.tokens


def test_prompt_plus_gen_len_over_cache_is_clipped_not_an_error(model):
    res = Generator(model, max_batch_size=1, max_seq_len=16).generate([list(range(15))], max_gen_len=50)
    assert len(res.tokens[0]) == 1 and res.finish_reasons == ["max_seq_len"]


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_speculative_greedy_equals_plain(model, mode):
    # thorough tests in test_speculative.py; here: the Generator's speculative modes run and are exact
    gen = Generator(model, max_batch_size=3, max_seq_len=32)
    prompts = random_prompts([1, 4, 9], seed=10)
    res = gen.generate(prompts, max_gen_len=8, speculative=mode)
    assert res.tokens == gen.generate(prompts, max_gen_len=8).tokens
    assert res.stats["speculative"] == mode and res.stats["heads"] == 2


def test_bad_generator_sizes(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        Generator(model, max_batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        Generator(model, max_seq_len=-3)


def test_two_generators_share_one_model(model):
    prompts = random_prompts([4], seed=9)
    a = Generator(model, max_batch_size=1, max_seq_len=24)
    first = a.generate(prompts, max_gen_len=6).tokens
    Generator(model, max_batch_size=2, max_seq_len=12)  # re-sizes the model's caches
    assert a.generate(prompts, max_gen_len=6).tokens == first


# ------------------------------------------------------------------------------ Llama front end
@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A tokenizer trained on a few stdlib files and a matching random checkpoint in Meta's layout."""
    from mtp_engine.checkpoint import save_checkpoint
    from mtp_engine.demo import stdlib_sources
    from mtp_engine.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("release")
    tok = train_tokenizer(stdlib_sources(2), 512, root / "tokenizer")
    model = make_model(n_future=2, vocab=tok.n_words, seed=11)
    save_checkpoint(model, root / "ckpt")
    return root / "ckpt", root / "tokenizer.model", model


def test_llama_text_completion(tiny_release):
    ckpt, tok_path, model = tiny_release
    llama = Llama.build(ckpt, tok_path, max_seq_len=48, max_batch_size=2, device="cpu")
    prompts = ["def add(a, b):", "import"]
    out = llama.text_completion(prompts, temperature=0.0, max_gen_len=10)
    assert len(out) == 2 and all(isinstance(r["generation"], str) for r in out)
    # the same greedy tokens as a Generator on the in-memory model the checkpoint came from
    enc = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    direct = Generator(model, max_batch_size=2, max_seq_len=48).generate(enc, max_gen_len=10,
                                                                         eos_id=llama.tokenizer.eos_id)
    assert [r["generation"] for r in out] == [llama.tokenizer.decode(t) for t in direct.tokens]
    assert llama.last_stats["batch_size"] == 2

    echoed = llama.text_completion(prompts[:1], temperature=0.0, max_gen_len=10, echo=True, logprobs=True)[0]
    assert echoed["generation"].startswith(prompts[0])
    assert len(echoed["tokens"]) == len(echoed["logprobs"]) == len(enc[0]) + len(direct.tokens[0])
    assert all(lp <= 0 for lp in echoed["logprobs"])

    sampled = llama.text_completion(prompts, temperature=0.8, top_p=0.9, max_gen_len=5)
    assert all(isinstance(r["generation"], str) for r in sampled)

    # An eos inside an echoed prompt stays, with what follows it (the release cuts there): only
    # generated tokens stop at eos.
    with_eos = enc[0][:2] + [llama.tokenizer.eos_id] + enc[0][2:]
    tokens, _ = llama.generate([with_eos], max_gen_len=3, temperature=0.0, echo=True)
    assert tokens[0][:len(with_eos)] == with_eos and len(tokens[0]) > len(with_eos)


def test_llama_build_errors(tiny_release, tmp_path):
    ckpt, tok_path, model = tiny_release
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        Llama.build(tmp_path / "nope", tok_path, 32, 1)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Llama.build(ckpt, tmp_path / "nope.model", 32, 1)
    from mtp_engine.checkpoint import save_checkpoint
    save_checkpoint(make_model(vocab=VOCAB), tmp_path / "other")
    with pytest.raises(ValueError, match="vocab_size 61 does not match"):
        Llama.build(tmp_path / "other", tok_path, 32, 1, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        Llama.build(ckpt, tok_path, 32, 1, device="cpu", dtype="float64x")
    with pytest.raises(ValueError, match="ckpt_dir must be a path, got None"):
        Llama.build(None, tok_path, 32, 1)
    with pytest.raises(ValueError, match="model_parallel_size=2: Llama.build runs the whole model"):
        Llama.build(ckpt, tok_path, 32, 1, model_parallel_size=2)
    assert Llama.build(ckpt, tok_path, 32, 1, device="cpu", model_parallel_size=1).model is not None
    # The release's positional order: (..., max_batch_size, model_parallel_size, seed).
    torch.manual_seed(0)
    Llama.build(ckpt, tok_path, 32, 1, None, 7, device="cpu")
    seeded = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(seeded, torch.rand(1))


EXAMPLE_COMPLETION = '''
from mtp_engine import Llama  # the release's script, with only this import changed


def main(ckpt_dir, tokenizer_path, temperature=0.6, top_p=0.9, max_seq_len=128, max_gen_len=64, max_batch_size=4):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    prompts = ["I believe the meaning of life is", "def fibonacci(n):"]
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\\n==================================\\n")
'''


def test_release_example_completion_script_runs(tiny_release, capsys):
    ckpt, tok_path, _ = tiny_release
    namespace = {}
    exec(compile(EXAMPLE_COMPLETION, "example_completion.py", "exec"), namespace)
    namespace["main"](str(ckpt), str(tok_path), max_seq_len=48, max_gen_len=8, max_batch_size=2)
    out = capsys.readouterr().out
    assert out.count("> ") == 2 and "def fibonacci(n):" in out
