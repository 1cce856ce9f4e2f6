"""Continuous batching: Generator.generate takes more prompts than max_batch_size; the first ones
start in the cache rows and every row whose sequence finishes takes the next waiting prompt (a
prefill of it alone into that row), in plain and self-speculative decoding alike."""
import random
import sys
from pathlib import Path

import pytest
import torch

from mtp_engine.generate import Generator
from mtp_engine.llama import Llama

sys.path.insert(0, str(Path(__file__).parent))
from test_speculative import VOCAB, drafting_model, emulate_cuda_graphs  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return drafting_model(heads=3)[0]   # heads whose drafts are partly right: speculation accepts some


def _prompts(rng, n, longest=9):
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def _same(got, want, context):
    assert got.tokens == want.tokens, context
    assert got.finish_reasons == want.finish_reasons, context
    for name in ("logprobs", "prompt_logprobs"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), context
        for x, y in zip(a or [], b or []):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-5), (name, context)


def test_random_queues_equal_one_batch_with_room_for_all(model):
    """Random calls (2-3 rows for 3-8 prompts of random lengths, per-prompt max_gen_len including 0,
    an eos, greedy or seeded sampling with top_p / top_k / min_p, plain, chain or tree, log-probs or not):
    tokens, finish reasons and log-probs equal those of one batch that holds every prompt, since a
    prompt's completion depends on its own arguments alone (keyed noise)."""
    rng = random.Random(2028)
    for case in range(12):
        n, rows = rng.randint(3, 8), rng.randint(2, 3)
        prompts = _prompts(rng, n)
        mode = [None, "chain", "tree"][case % 3]
        kwargs = dict(max_gen_len=[rng.choice([0, 1, 3, 8, 14]) for _ in range(n)], speculative=mode,
                      eos_id=rng.choice([-1, 5]), logprobs=rng.random() < 0.5)
        if rng.random() < 0.6:
            kwargs.update(temperature=[rng.choice([0.0, 0.7, 1.3]) for _ in range(n)], seed=rng.randrange(2 ** 40),
                          top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 4]), min_p=rng.choice([0.0, 0.1]))
        got = Generator(model, max_batch_size=rows, max_seq_len=40).generate(prompts, **kwargs)
        want = Generator(model, max_batch_size=n, max_seq_len=40).generate(prompts, **kwargs)
        _same(got, want, f"case {case}: {rows} rows, lens {[len(p) for p in prompts]}, {kwargs}")
        assert got.stats["batch_size"] == n
        assert got.stats["generated_tokens"] == want.stats["generated_tokens"]
        if mode is not None and "temperature" not in kwargs and got.stats["generated_tokens"] > 2 * n:
            assert got.stats["tokens_per_forward"] > 1, (got.stats, kwargs)


def test_a_finished_row_takes_the_next_prompt_at_once(model, monkeypatch):
    """2 rows, 4 prompts, shortest first: a long generation in row 0 and three short ones. The short
    ones pass through row 1 one after the other while the long one runs (not in static batches of
    2): they finish before it; no forward ever runs more than 2 rows, and each waiting prompt is
    prefilled alone into the free row."""
    prompts = [[3], [1, 5], [9, 2], [6, 5, 1]]
    lens = [16, 2, 2, 2]
    rows_seen, prefills = [], []
    forward_cached, prefill_rows = type(model).forward_cached, Generator._prefill_rows

    def spy_forward(self, tokens, *args, **kwargs):
        rows_seen.append(tokens.shape[0])
        return forward_cached(self, tokens, *args, **kwargs)

    def spy_prefill(self, group, first_row, *args):
        prefills.append((group, first_row))
        return prefill_rows(self, group, first_row, *args)
    monkeypatch.setattr(type(model), "forward_cached", spy_forward)
    monkeypatch.setattr(Generator, "_prefill_rows", spy_prefill)
    for mode in (None, "tree"):
        finished = []
        rows_seen.clear(), prefills.clear()
        res = Generator(model, max_batch_size=2, max_seq_len=40).generate(
            prompts, max_gen_len=lens, speculative=mode,
            on_tokens=lambda index, new, finish: finished.append(index) if finish else None)
        assert [len(t) for t in res.tokens] == lens and res.finish_reasons == ["max_gen_len"] * 4
        assert finished == [1, 2, 3, 0], mode
        assert max(rows_seen) == 2
        assert prefills[-2:] == [([[9, 2]], 1), ([[6, 5, 1]], 1)], (mode, prefills)
        assert res.stats["forwards"] > res.stats["prefill_forwards"] >= 3


def test_done_rows_are_parked_and_the_bookkeeping_visits_the_rows_alone(model, monkeypatch):
    """A done row that stays inside the forward (a live row after it) sits at cache length 0, so
    it attends to nothing and re-writes slot 0 alone, in plain and speculative decoding; and after
    a forward only the sequences in the rows are visited (stop strings, streaming), not the whole
    queue: the host's work per forward does not grow with the number of waiting prompts."""
    from mtp_engine.generate import SequenceState
    decode_lengths, visits = [], []
    forward_cached, check_stop = type(model).forward_cached, SequenceState.check_stop

    def spy_forward(self, tokens, cache_seqlens, *args, **kwargs):
        if kwargs.get("first_row", 0) == 0 and tokens.shape[0] == 2:
            decode_lengths.append(cache_seqlens.tolist())
            visits.append(0)
        return forward_cached(self, tokens, cache_seqlens, *args, **kwargs)

    def spy_check_stop(self):
        if visits:
            visits[-1] += 1
        return check_stop(self)
    monkeypatch.setattr(type(model), "forward_cached", spy_forward)
    monkeypatch.setattr(SequenceState, "check_stop", spy_check_stop)
    for mode in (None, "tree"):
        decode_lengths.clear(), visits.clear()
        # rows: [3] (2 tokens) then [1, 5] (14): row 0 is done while row 1 decodes on
        res = Generator(model, max_batch_size=2, max_seq_len=40).generate([[3], [1, 5]], max_gen_len=[2, 14],
                                                                          speculative=mode)
        assert [len(t) for t in res.tokens] == [2, 14]
        assert decode_lengths[-1][0] == 0 and decode_lengths[-1][1] > 2, (mode, decode_lengths)
        assert all(lengths[0] in (0, 1) for lengths in decode_lengths), (mode, decode_lengths)
        # 40 prompts through 2 rows: each forward visits the 2 rows' sequences (a refill's too)
        visits.clear()
        Generator(model, max_batch_size=2, max_seq_len=40).generate([[1, 5]] * 40, max_gen_len=3, speculative=mode)
        assert 0 < max(visits) <= 4, (mode, visits)


def test_cancelling_frees_the_row_for_the_next_prompt(model):
    """on_tokens returning True for a prompt ends it and its row takes the next waiting prompt; the
    others complete as they would have."""
    rng = random.Random(5)
    prompts = _prompts(rng, 5)
    gen = Generator(model, max_batch_size=2, max_seq_len=40)
    full = gen.generate(prompts, max_gen_len=10)
    res = gen.generate(prompts, max_gen_len=10, on_tokens=lambda index, new, finish: index in (0, 3))
    assert [res.finish_reasons[b] for b in (0, 3)] == ["cancelled", "cancelled"]
    assert all(res.tokens[b] == full.tokens[b] for b in (1, 2, 4))
    assert all(res.tokens[b] == full.tokens[b][:1] for b in (0, 3))   # cancelled at their first token


def test_prompt_log_probs_of_prompts_with_nothing_to_generate(model):
    """max_gen_len 0 for every prompt, logprobs=True: the prompts' log-probs still come, batch after
    batch of max_batch_size; with one prompt generating, the others' come from their own prefills."""
    rng = random.Random(6)
    prompts = _prompts(rng, 5)
    want = Generator(model, max_batch_size=5, max_seq_len=40).generate(prompts, max_gen_len=0, logprobs=True)
    small = Generator(model, max_batch_size=2, max_seq_len=40)
    _same(small.generate(prompts, max_gen_len=0, logprobs=True), want, "all done")
    lens = [0, 0, 0, 0, 4]
    _same(small.generate(prompts, max_gen_len=lens, logprobs=True),
          Generator(model, max_batch_size=5, max_seq_len=40).generate(prompts, max_gen_len=lens, logprobs=True),
          "one generating")
    # A prompt that fills the cache (no room: nothing to generate) taken into a row for its log-probs
    # while a row after it still decodes: its row stays inside the forward, writing nothing past the cache.
    full = [[1, 2], [3, 4, 5], [6, 7, 8, 9], [5] * 12, [2, 3]]
    for mode in (None, "tree"):
        got = Generator(model, max_batch_size=2, max_seq_len=12).generate(full, max_gen_len=[1, 1, 1, 9, 9],
                                                                          logprobs=True, speculative=mode)
        _same(got, Generator(model, max_batch_size=5, max_seq_len=12).generate(
            full, max_gen_len=[1, 1, 1, 9, 9], logprobs=True, speculative=mode), f"a full prompt, {mode}")
        assert got.finish_reasons[3] == "max_seq_len" and got.tokens[3] == []


@pytest.mark.parametrize("mode", [None, "tree"])
def test_graphed_steps_take_the_refilled_rows_sampling(model, monkeypatch, mode):
    """The CUDA-graph path emulated on the CPU (test_speculative's emulate_cuda_graphs): a row's sampling
    values are step inputs that a refill overwrites in place, so the graphs captured for the first
    prompts serve the next ones with their own temperature, top_p, top_k, min_p and seed."""
    emulate_cuda_graphs(monkeypatch)
    rng = random.Random(7)
    prompts = _prompts(rng, 6)
    kwargs = dict(max_gen_len=[3, 9, 2, 7, 5, 4], temperature=[0.0, 1.1, 0.8, 1.5, 0.0, 1.0],
                  top_p=[1.0, 0.9, 1.0, 1.0, 1.0, 0.8], top_k=[0, 0, 3, 5, 0, 0], seed=list(range(6)),
                  min_p=[0.0, 0.0, 0.1, 0.0, 0.3, 0.05], speculative=mode)
    graphed = Generator(model, max_batch_size=2, max_seq_len=40, cuda_graphs=False)
    monkeypatch.setattr(graphed, "_use_cuda_graphs", lambda: True)
    got = graphed.generate(prompts, **kwargs)
    assert graphed._graphs is not None and graphed._graphs._graphs
    _same(got, Generator(model, max_batch_size=6, max_seq_len=40, cuda_graphs=False).generate(prompts, **kwargs),
          mode)


def test_llama_text_completion_takes_more_prompts_than_its_batch(tmp_path):
    from mtp_engine.checkpoint import default_checkpoint

    ckpt = default_checkpoint()
    llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=48, max_batch_size=2, device="cpu")
    prompts = ["import os", "def f(x):", "class A:", "for i in range(3):", "x = "]
    got = llama.text_completion(prompts, temperature=0.0, max_gen_len=6)
    wide = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=48, max_batch_size=5, device="cpu")
    assert got == wide.text_completion(prompts, temperature=0.0, max_gen_len=6)
    assert llama.last_stats["batch_size"] == 5


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "tree"])
def test_gpu_graphed_queue_equals_eager(mode):
    """On CUDA in bf16 with the Triton kernels: 6 prompts through 2 rows, graphed (the step graphs
    captured for the first prompts replayed for the next, their sampling copied into the rows) and
    eager, greedy and sampled with per-row top_p, top_k and min_p, and with penalties (each row's
    history a graph input): the same tokens."""
    model, _ = drafting_model(heads=3, seed=6, attention_heads=2)
    model = model.to("cuda", torch.bfloat16)
    rng = random.Random(8)
    prompts = _prompts(rng, 6, longest=12)
    eager = Generator(model, max_batch_size=2, max_seq_len=64, cuda_graphs=False)
    graphed = Generator(model, max_batch_size=2, max_seq_len=64, cuda_graphs=True)
    for kwargs in (dict(max_gen_len=[4, 20, 7, 12, 2, 9]),
                   dict(max_gen_len=16, temperature=[0.0, 1.1, 0.8, 1.5, 0.0, 1.0], top_p=[1.0, 0.9, 1.0, 1.0, 1.0, 0.8],
                        top_k=[0, 0, 3, 5, 0, 0], min_p=[0.0, 0.0, 0.1, 0.0, 0.3, 0.05], seed=list(range(6))),
                   dict(max_gen_len=16, temperature=[0.0, 1.1, 0.0, 0.9, 1.2, 0.0], seed=list(range(6)),
                        repetition_penalty=[1.3, 1.0, 0.8, 1.5, 1.0, 2.0], presence_penalty=[0.0, 0.5, 0.0, 0.0, 0.3, 0.0],
                        frequency_penalty=[0.2, 0.0, 0.0, 0.4, 0.0, 0.0])):
        want = eager.generate(prompts, speculative=mode, **kwargs)
        for _ in range(2):   # captured, then replayed
            assert graphed.generate(prompts, speculative=mode, **kwargs).tokens == want.tokens
    assert graphed._graphs is not None and graphed._graphs._graphs
