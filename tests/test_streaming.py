"""Streaming: Generator.generate(on_tokens=...) hands every prompt's tokens over as each forward
produces them, and tokenizer.TextStream turns them into text pieces (`mtp complete --stream`)."""
import random
import sys
from pathlib import Path

import pytest
import torch

from mtp_engine.checkpoint import default_checkpoint
from mtp_engine.cli import main
from mtp_engine.generate import Generator
from mtp_engine.tokenizer import TextStream, Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_speculative import drafting_model  # noqa: E402

VOCAB = 32


@pytest.fixture(scope="module")
def model():
    return drafting_model(heads=3)[0]   # heads whose drafts are partly right (test_speculative.py)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(default_checkpoint() / "tokenizer.model")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _streamed(gen, prompts, **kwargs):
    """(result, {index: tokens handed over, in order}, {index: finish reasons told}, [calls])."""
    got, finished, calls = {}, {}, []

    def on_tokens(index, new_tokens, finish):
        assert isinstance(new_tokens, list) and all(isinstance(t, int) for t in new_tokens)
        assert index not in finished, "nothing comes after a prompt's finish"
        calls.append((index, list(new_tokens), finish))
        got.setdefault(index, []).extend(new_tokens)
        if finish is not None:
            finished[index] = finish
    return gen.generate(prompts, on_tokens=on_tokens, **kwargs), got, finished, calls


@pytest.mark.parametrize("speculative", [None, "chain", "tree"])
def test_streamed_tokens_add_up_to_the_result_in_the_callers_order(model, speculative):
    """A ragged batch with per-prompt lengths and an eos: each prompt's handed-over tokens, in order,
    are its result's tokens, its finish is told once, last, with the result's reason; a speculative
    forward hands over several tokens at once; a prompt with nothing to generate is told its finish."""
    prompts = _prompts([7, 2, 11, 4])
    gen = Generator(model, max_batch_size=4, max_seq_len=48)
    free = gen.generate(prompts, max_gen_len=12).tokens
    eos = [-1, free[1][4], -1, -1]
    gen_lens = [12, 12, 9, 0]
    res, got, finished, calls = _streamed(gen, prompts, max_gen_len=gen_lens, eos_id=eos, speculative=speculative)
    assert [got.get(b, []) for b in range(4)] == res.tokens
    assert [finished[b] for b in range(4)] == res.finish_reasons == ["max_gen_len", "eos", "max_gen_len",
                                                                    "max_gen_len"]
    assert res.tokens == gen.generate(prompts, max_gen_len=gen_lens, eos_id=eos, speculative=speculative).tokens
    assert (3, [], "max_gen_len") in calls   # max_gen_len 0: told at once, with no tokens
    assert all(new or finish for _, new, finish in calls)
    if speculative is None:
        assert max(len(new) for _, new, _ in calls) == 1
    else:
        assert max(len(new) for _, new, _ in calls) > 1 and res.stats["tokens_per_forward"] > 1


def test_streaming_changes_nothing_and_sampled_prompts_stream_too(model):
    prompts = _prompts([3, 9], seed=5)
    gen = Generator(model, max_batch_size=2, max_seq_len=40)
    kwargs = dict(max_gen_len=10, temperature=0.9, top_p=0.95, seed=[3, 4])
    plain = gen.generate(prompts, **kwargs)
    res, got, finished, _ = _streamed(gen, prompts, speculative="tree", **kwargs)
    assert res.tokens == plain.tokens == [got[0], got[1]]


def test_a_callback_that_raises_ends_generate_and_a_bad_one_is_refused(model):
    gen = Generator(model, max_batch_size=1, max_seq_len=32)

    class Stop(Exception):
        pass

    def stop_after_three(index, new_tokens, finish):
        stop_after_three.seen += len(new_tokens)
        if stop_after_three.seen >= 3:
            raise Stop
    stop_after_three.seen = 0
    with pytest.raises(Stop):
        gen.generate(_prompts([4]), max_gen_len=20, on_tokens=stop_after_three)
    assert stop_after_three.seen == 3
    with pytest.raises(ValueError, match="on_tokens must be a function"):
        gen.generate(_prompts([4]), max_gen_len=2, on_tokens="print")
    assert gen.generate(_prompts([4]), max_gen_len=3).tokens == gen.generate(_prompts([4]), max_gen_len=3).tokens


def test_text_stream_pieces_add_up_to_the_decoded_text(tokenizer):
    """Ids pushed a few at a time, over the whole vocabulary (byte-fallback pieces included: a
    character's bytes may arrive in separate pushes): the pieces, then finish, are decode(all ids), and
    no piece ever holds a replacement character for a character whose bytes are still coming."""
    rng = random.Random(0)
    texts = ["def f(x):\n    return x  # café, naïve, 世界, 🙂\n", "  leading spaces\tand\ttabs", "ü", ""]
    sequences = [tokenizer.encode(t, bos=False, eos=False) for t in texts]
    sequences += [[rng.randrange(tokenizer.n_words) for _ in range(rng.randrange(1, 60))] for _ in range(200)]
    for ids in sequences:
        stream, pieces, at = TextStream(tokenizer), [], 0
        while at < len(ids):
            n = rng.randrange(1, 4)
            pieces.append(stream.push(ids[at:at + n]))
            at += n
        pieces.append(stream.finish())
        assert "".join(pieces) == tokenizer.decode(ids), ids
    for text in texts[:3]:   # real text: no half character is ever printed
        stream, pieces = TextStream(tokenizer), []
        for i in tokenizer.encode(text, bos=False, eos=False):
            pieces.append(stream.push([i]))
        assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_cli_stream_prints_what_complete_prints(capsys):
    """`mtp complete --stream` on the default model: the same text as without it, printed as it came;
    several prompts are refused."""
    base = ["complete", "--prompt", "import os\n\ndef main(", "--max-gen-len", "24", "--device", "cpu"]
    for extra in ([], ["--speculative", "tree"]):
        assert main(base + extra) == 0
        whole = capsys.readouterr().out.splitlines()
        assert main(base + extra + ["--stream"]) == 0
        streamed = capsys.readouterr().out.splitlines()
        assert streamed[:-1] == whole[:-1] and streamed[-1].startswith("[stats]")
    assert main(base + ["--prompt", "x", "--stream"]) != 0
    assert "--stream prints one completion as it is generated: give one --prompt, not 2" in capsys.readouterr().err
