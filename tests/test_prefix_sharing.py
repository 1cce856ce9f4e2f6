"""Shared prompt prefixes (mtp_engine/prefix_sharing.py): rows of a call whose prompts begin alike
compute the common beginning once and copy its K/V (Transformer.copy_cache_prefix), at the first
prefill and when a row takes a waiting prompt. The results must equal share_prefixes=False:
tokens, finish reasons, log-probs, in plain, chain and tree decoding, greedy and sampled."""
import random
import sys
from pathlib import Path

import pytest
import torch

from mtp_engine.generate import Generator
from mtp_engine.prefix_sharing import best_source, cached_tokens, common_prefix_len, share_plan, usable_prefix

sys.path.insert(0, str(Path(__file__).parent))
from test_continuous_batching import _same  # noqa: E402
from test_generate import make_model, naive_greedy  # noqa: E402
from test_speculative import VOCAB, drafting_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return drafting_model(heads=3)[0]   # drafts partly right: speculation accepts some


def _both(model, prompts, rows, **kwargs):
    """generate with prefix sharing and without: (shared result, unshared result)."""
    shared = Generator(model, max_batch_size=rows, max_seq_len=48).generate(prompts, **kwargs)
    alone = Generator(model, max_batch_size=rows, max_seq_len=48, share_prefixes=False).generate(prompts, **kwargs)
    assert alone.stats["shared_prompt_tokens"] == 0
    return shared, alone


# ------------------------------------------------------------------------------ host helpers
def test_common_prefix_len():
    assert common_prefix_len([], [1, 2]) == 0
    assert common_prefix_len([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_len([1, 2, 3], [1, 2]) == 2
    assert common_prefix_len([4, 2], [1, 2]) == 0
    assert common_prefix_len([1, 2, 3, 9], [1, 2, 3, 8, 9]) == 3
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randint(0, 12))]
        b = [rng.randrange(3) for _ in range(rng.randint(0, 12))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix_len(a, b) == n, (a, b)


def test_usable_prefix_keeps_the_last_token_and_the_log_prob_context():
    assert usable_prefix(common=5, length=5, logprobs=False) == 4   # the last token gives the first new one
    assert usable_prefix(common=5, length=9, logprobs=False) == 5
    assert usable_prefix(common=5, length=9, logprobs=True) == 4    # token 5's log-prob needs hidden 4
    assert usable_prefix(common=0, length=9, logprobs=True) == 0
    assert usable_prefix(common=3, length=1, logprobs=False) == 0


def test_cached_tokens_and_best_source():
    assert cached_tokens([1, 2], []) == [1, 2]
    assert cached_tokens([1, 2], [7, 8, 9]) == [1, 2, 7, 8]   # the last kept token has no K/V yet
    for limit in range(7):   # the first `limit` only, never the last kept token
        assert cached_tokens([1, 2], [7, 8, 9], limit) == [1, 2, 7, 8][:limit], limit
        assert cached_tokens([1, 2], [], limit) == [1, 2][:limit], limit
    rows = [[1, 2, 3, 4], None, [1, 2, 3, 4], [1, 2]]
    assert best_source([1, 2, 3, 4, 5], rows, prefer=3, logprobs=False) == (0, 4)
    assert best_source([1, 2, 3, 4, 5], rows, prefer=2, logprobs=False) == (2, 4)   # a tie: no copy
    assert best_source([1, 2, 3, 4, 5], rows, logprobs=False) == (0, 4)   # no preference: the first
    assert best_source([1, 2, 3, 4, 5], rows, prefer=1, logprobs=True) == (0, 3)
    assert best_source([9, 2], rows, prefer=1, logprobs=False) == (1, 0)
    assert best_source([9, 2], rows, logprobs=False) == (None, 0)
    assert best_source([1, 2, 3, 4, 5], [None, None], prefer=0, logprobs=False) == (0, 0)


def test_share_plan():
    few_shot = list(range(10))
    prompts = [[50, 51], few_shot + [20], few_shot + [21, 22], few_shot + [23, 24, 25], few_shot + [20]]
    order, shares = share_plan(prompts, logprobs=False, forward_tokens=8)
    assert order == [0, 1, 4, 2, 3]   # the sources, then the dependents by what is left to compute
    assert shares == [None, None, (1, 10), (1, 10), (1, 10)]
    # the last one equals its source: everything but its last token comes from it
    order, shares = share_plan([few_shot, few_shot, few_shot], logprobs=False, forward_tokens=8)
    assert order == [0, 1, 2] and shares == [None, (0, 9), (0, 9)]
    order, shares = share_plan([few_shot, few_shot, few_shot], logprobs=True, forward_tokens=8)
    assert shares == [None, (0, 9), (0, 9)]   # with log-probs the last shared token is computed anew
    order, shares = share_plan([few_shot + [1], few_shot + [2]], logprobs=True, forward_tokens=8)
    assert shares == [None, (0, 9)]
    # not worth one more forward: no sharing
    order, shares = share_plan([few_shot + [1], few_shot + [2]], logprobs=False, forward_tokens=11)
    assert order == [0, 1] and shares == [None, None]
    assert share_plan([[1], [1]], logprobs=False, forward_tokens=1) == ([0, 1], [None, None])
    assert share_plan([], logprobs=False, forward_tokens=1) == ([], [])


# ------------------------------------------------------------------------------ the model's copy
def test_copy_cache_prefix_copies_every_block_and_nothing_else():
    model = make_model(n_future=2, seed=3)
    model.setup_caches(3, 16)
    torch.manual_seed(0)
    model.k_cache.normal_()
    model.v_cache.normal_()
    k, v = model.k_cache.clone(), model.v_cache.clone()
    model.copy_cache_prefix(2, 0, 5)
    assert torch.equal(model.k_cache[:, 0, :5], k[:, 2, :5]) and torch.equal(model.v_cache[:, 0, :5], v[:, 2, :5])
    assert torch.equal(model.k_cache[:, 0, 5:], k[:, 0, 5:]) and torch.equal(model.v_cache[:, 0, 5:], v[:, 0, 5:])
    assert torch.equal(model.k_cache[:, 1:], k[:, 1:]) and torch.equal(model.v_cache[:, 1:], v[:, 1:])
    for args, message in (((3, 0, 1), "src_row"), ((0, -1, 1), "dst_row"), ((0, 1, 17), "length"),
                          ((0, 1, 2.0), "length"), ((True, 1, 2), "src_row")):
        with pytest.raises(ValueError, match=message):
            model.copy_cache_prefix(*args)
    model.clear_caches()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.copy_cache_prefix(0, 1, 1)


def test_share_prefixes_must_be_a_bool(model):
    with pytest.raises(ValueError, match="share_prefixes"):
        Generator(model, max_batch_size=2, max_seq_len=16, share_prefixes="yes")


# ------------------------------------------------------------------------------ generation
def _few_shot_prompts(rng, n, prefix_len=12):
    """Prompts that share a prefix, some of them alike, one a prefix of the others."""
    prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))] for _ in range(n - 2)]
    return prompts + [list(prompts[0]), prefix[:rng.randint(1, prefix_len)]]


def test_random_calls_equal_unshared_prefills(model, monkeypatch):
    """Random calls (few-shot-like prompts, 2-5 rows for 4-8 prompts, per-prompt max_gen_len, plain,
    chain or tree, greedy or seeded sampling with penalties, log-probs or not): every result equals
    share_prefixes=False, and prefixes were shared."""
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 4)
    rng = random.Random(2029)
    for case in range(9):
        n, rows = rng.randint(4, 8), rng.randint(2, 5)
        prompts = _few_shot_prompts(rng, n)
        rng.shuffle(prompts)
        kwargs = dict(max_gen_len=[rng.choice([0, 1, 4, 9]) for _ in range(n)], speculative=[None, "chain", "tree"][case % 3],
                      eos_id=rng.choice([-1, 5]), logprobs=case % 2 == 0)
        if rng.random() < 0.6:
            kwargs.update(temperature=rng.choice([0.7, 1.3]), seed=rng.randrange(2 ** 40), top_k=rng.choice([0, 4]),
                          repetition_penalty=rng.choice([1.0, 1.3]), frequency_penalty=rng.choice([0.0, 0.5]))
        got, want = _both(model, prompts, rows, **kwargs)
        _same(got, want, f"case {case}: {rows} rows, {kwargs}")
        assert got.stats["shared_prompt_tokens"] > 0, (case, kwargs)
        assert got.stats["generated_tokens"] == want.stats["generated_tokens"]


def test_greedy_with_shared_prefixes_equals_uncached_decoding():
    model = make_model(n_future=2, seed=11)
    rng = random.Random(5)
    prefix = [rng.randrange(61) for _ in range(20)]
    prompts = [prefix + [rng.randrange(61) for _ in range(k)] for k in (0, 3, 1, 5)] + [list(prefix)]
    res = Generator(model, max_batch_size=len(prompts), max_seq_len=40).generate(prompts, max_gen_len=8)
    # the other rows copy the first prompt's 20 tokens (its twin all but its last one): 79 tokens are
    # worth one more forward at the CPU's PREFILL_FORWARD_TOKENS
    assert res.stats["shared_prompt_tokens"] == 19 + 20 + 20 + 20
    for prompt, tokens in zip(prompts, res.tokens):
        assert tokens == naive_greedy(model, prompt, 8)


@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("speculative", [None, "tree"])
def test_n_samples_of_one_prompt_prefill_it_once(model, speculative, logprobs):
    """n seeded samples of one prompt through 3 rows: the first prefill computes it once (two rows
    copy all of it but the last token, whose hidden state gives the first new token and the last
    shared one's log-prob), and every row taking the next sample keeps its own prompt slots (no
    copy at all). Same samples as without sharing."""
    rng = random.Random(7)
    prompt = [rng.randrange(VOCAB) for _ in range(40)]
    n = 7
    kwargs = dict(max_gen_len=[3, 6, 2, 5, 4, 6, 1], temperature=0.9, seed=[11 * i for i in range(n)],
                  speculative=speculative, logprobs=logprobs)
    got, want = _both(model, [prompt] * n, rows=3, **kwargs)
    _same(got, want, kwargs)
    assert got.stats["shared_prompt_tokens"] == (n - 1) * (len(prompt) - 1)
    assert len(set(map(tuple, got.tokens))) > 1   # the seeds give different samples


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_refill_copies_the_prefix_a_live_row_holds_generated_tokens_included(model, logprobs):
    """Row 0 finishes first and takes a prompt that is the live row 1's prompt plus the first 6 tokens
    row 1 generated. Row 1 has fed back 4 of them by then (its 5th is the next step's input, with no
    K/V yet): row 0 copies the prompt and those 4 from row 1 and computes its last 2 tokens (with
    log-probs the last 3, the log-probs of the others taken from row 1's prompt and generated ones)."""
    rng = random.Random(3)
    short, long = [rng.randrange(VOCAB) for _ in range(2)], [rng.randrange(VOCAB) for _ in range(6)]
    first = Generator(model, max_batch_size=1, max_seq_len=48).generate([long], max_gen_len=12).tokens[0]
    follow = long + first[:6]
    prompts = [short, long, follow]
    kwargs = dict(max_gen_len=[5, 12, 4], logprobs=logprobs)   # short finishes after the prefill and 4 steps
    got, want = _both(model, prompts, rows=2, **kwargs)
    _same(got, want, kwargs)
    assert got.tokens[1] == first
    assert got.stats["shared_prompt_tokens"] == len(long) + 4 - logprobs


def test_shared_prefixes_on_the_triton_path(triton_backend, monkeypatch):
    """The suffix prefill (forward_cached from a shared prefix's end) on the interpreted kernels."""
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 2)
    model = make_model(n_future=2, seed=5)
    prefix = [3, 14, 15, 9, 26, 5]
    prompts = [prefix + [1], prefix + [2, 7], list(prefix)]
    for speculative in (None, "tree"):
        got, want = _both(model, prompts, rows=3, max_gen_len=4, speculative=speculative, logprobs=True)
        _same(got, want, speculative)
        assert got.stats["shared_prompt_tokens"] == 5 + 5


@pytest.mark.gpu
def test_gpu_shared_prefixes_equal_unshared_prefills():
    """On CUDA (Triton kernels, CUDA graphs), float32 so that no near-tie can split the two: few-shot
    prompts and repeated samples through 3 rows, plain and tree, sampled with log-probs."""
    model = make_model(n_future=3, seed=8).to("cuda")
    rng = random.Random(9)
    prompts = _few_shot_prompts(rng, 6, prefix_len=24) + [[rng.randrange(61) for _ in range(30)]] * 3
    for speculative in (None, "tree"):
        kwargs = dict(max_gen_len=6, temperature=0.8, seed=4, speculative=speculative, logprobs=True)
        got, want = _both(model, prompts, rows=3, **kwargs)
        _same(got, want, speculative)
        assert got.stats["shared_prompt_tokens"] > 0


@pytest.mark.parametrize("rows", [3, 5])
def test_scoring_choices_after_one_context_shares_it(model, rows, monkeypatch):
    """max_gen_len=0 with log-probs (scoring: a context and its candidate continuations): each batch
    of rows computes the context once; the log-probs equal those computed whole, in the caller's order."""
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 8)
    rng = random.Random(12)
    context = [rng.randrange(VOCAB) for _ in range(30)]
    choices = [context + [rng.randrange(VOCAB) for _ in range(n)] for n in (1, 3, 1, 3, 1)]
    # shares nothing: with 3 rows, the second batch computes it before the shorter prompt that shares
    other = [(context[0] + 1) % VOCAB] + context[1:] + [1, 2, 3, 4]
    prompts = [other] + choices
    got, want = _both(model, prompts, rows, max_gen_len=0, logprobs=True)
    _same(got, want, rows)
    assert [len(lp) for lp in got.prompt_logprobs] == [len(p) for p in prompts]
    assert got.stats["forwards"] == -(-len(prompts) // rows)
    # in a batch, every prompt but one that starts with the context copies it (with log-probs, all
    # of it but its last token)
    by_length = sorted(prompts, key=len)
    batches = [by_length[b:b + rows] for b in range(0, len(prompts), rows)]
    assert got.stats["shared_prompt_tokens"] == sum(max(0, sum(p[0] == context[0] for p in batch) - 1)
                                                    for batch in batches) * (len(context) - 1)


def test_a_long_shared_prefix_padded_to_a_longer_rest_stays_in_the_cache(model, monkeypatch):
    """Sharing rows prefill together, right-padded to the longest rest: a row that shares 61 of its
    62 tokens beside one that computes 40 would write pad slots past a 64-slot cache; the chunk
    stops at the room of its rows instead (a helper's review found the overflow)."""
    # a forward's price high enough for the two sharing rows to go in one group, low enough for sharing
    monkeypatch.setattr("mtp_engine.generate.PREFILL_FORWARD_TOKENS_DEFAULT", 60)
    rng = random.Random(0)
    long_source = [1] + [rng.randrange(VOCAB) for _ in range(60)]
    short_source = [9] * 5
    prompts = [short_source, short_source[:4] + [rng.randrange(1, 9) for _ in range(40)], long_source,
               long_source + [5]]
    got = Generator(model, max_batch_size=4, max_seq_len=64).generate(prompts, max_gen_len=2, logprobs=True)
    want = Generator(model, max_batch_size=4, max_seq_len=64, share_prefixes=False).generate(
        prompts, max_gen_len=2, logprobs=True)
    _same(got, want, "overflow")
    assert got.stats["shared_prompt_tokens"] == 3 + 60
    assert got.stats["prefill_forwards"] == 1 + 2   # the sources; the sharing rows in two chunks
