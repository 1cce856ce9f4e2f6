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
    assert calls[0] == (3, [], "max_gen_len")   # max_gen_len 0: told at once, with no tokens
    assert [index for index, _, _ in calls[1:4]] == [0, 1, 2]   # the prefill's tokens, in the caller's order
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


@pytest.mark.parametrize("speculative", [None, "chain", "tree"])
def test_returning_true_cancels_that_prompt_alone(model, speculative):
    """Prompt 1 is cancelled once it has 3 tokens: it keeps what was handed over (a prefix of its
    uncancelled completion), finishes "cancelled" and is not called again; the others complete as if
    alone. Only the bool True cancels (a write's count does not); cancelling every prompt at its
    first call ends generate after the prefill."""
    prompts = _prompts([5, 3, 8])
    gen = Generator(model, max_batch_size=3, max_seq_len=48)
    kwargs = dict(max_gen_len=14, speculative=speculative)
    full = gen.generate(prompts, **kwargs)
    got, calls = {}, []

    def on_tokens(index, new_tokens, finish):
        calls.append(index)
        got.setdefault(index, []).extend(new_tokens)
        if index == 1:
            return len(got[1]) >= 3   # True once it has 3
        return 1   # truthy, but not True: goes on
    res = gen.generate(prompts, on_tokens=on_tokens, **kwargs)
    assert res.finish_reasons == ["max_gen_len", "cancelled", "max_gen_len"]
    assert res.stats["finish_counts"]["cancelled"] == 1
    assert res.tokens[0] == full.tokens[0] and res.tokens[2] == full.tokens[2]
    assert res.tokens[1] == got[1] and len(got[1]) >= 3 and got[1] == full.tokens[1][:len(got[1])]
    if speculative is None:
        assert len(got[1]) == 3
    last_one = max(i for i, index in enumerate(calls) if index == 1)
    assert calls[last_one:].count(1) == 1 and len(got[1]) < 14
    res = gen.generate(prompts, on_tokens=lambda index, new, finish: True, **kwargs)
    assert res.finish_reasons == ["cancelled"] * 3 and res.stats["forwards"] == 1
    assert res.tokens == [t[:1] for t in full.tokens]   # the prefill's token


@pytest.mark.parametrize("speculative", [None, "tree"])
def test_with_logprobs_on_tokens_gets_the_new_tokens_log_probs(model, speculative):
    prompts = _prompts([6, 2], seed=3)
    gen = Generator(model, max_batch_size=2, max_seq_len=40)
    got = {}

    def on_tokens(index, new_tokens, finish, new_logprobs):
        assert len(new_logprobs) == len(new_tokens) and all(isinstance(x, float) for x in new_logprobs)
        got.setdefault(index, []).extend(new_logprobs)
    res = gen.generate(prompts, max_gen_len=9, temperature=0.8, seed=[1, 2], logprobs=True,
                       speculative=speculative, on_tokens=on_tokens)
    assert [got[0], got[1]] == res.logprobs and all(len(lp) == 9 for lp in res.logprobs)
    # any function that takes the arguments will do; one that cannot is refused before any forward
    res = gen.generate(prompts, max_gen_len=2, logprobs=True, on_tokens=lambda *args: None)
    assert len(res.tokens[0]) == 2
    for bad, logprobs, says in ((lambda index, new, finish: None, True, r"on_tokens\(index, new, finish\) cannot "
                                 r"be called as on_tokens\(index, new_tokens, finish, new_logprobs\) "
                                 r"\(generate\(logprobs=True\)"),
                                (lambda index, new: None, False, r"cannot be called as on_tokens\(index, "
                                 r"new_tokens, finish\)$"),
                                (lambda index, new, finish, lps: None, False, r"on_tokens\(index, new_tokens, "
                                 r"finish\) \(a fourth argument, the new tokens' log-probs, comes only with "
                                 r"generate\(logprobs=True\)\)")):
        with pytest.raises(ValueError, match=says):
            gen.generate(prompts, max_gen_len=2, logprobs=logprobs, on_tokens=bad)
    assert gen.generate(prompts, max_gen_len=2, on_tokens=print).tokens == res.tokens   # a builtin: not read


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
    # generate again from inside on_tokens (any Generator on this model) would overwrite the running
    # call's caches: refused, and the model stays usable
    other = Generator(model, max_batch_size=1, max_seq_len=32)
    for again in (gen, other):
        def reenter(index, new_tokens, finish, again=again):
            again.generate(_prompts([3]), max_gen_len=2)
        with pytest.raises(RuntimeError, match="a generate call is already running on this model"):
            gen.generate(_prompts([4]), max_gen_len=5, on_tokens=reenter)
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


@pytest.fixture(scope="module")
def other_tokenizers(tmp_path_factory):
    """Two SentencePiece models unlike the default one: Llama 2's settings (a dummy prefix, byte
    fallback, whitespace kept as it is) and SentencePiece's defaults (extra whitespace removed)."""
    import sysconfig
    from sentencepiece import SentencePieceTrainer

    folder = tmp_path_factory.mktemp("tokenizers")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = folder / "corpus.txt"
    corpus.write_text("".join((stdlib / "json" / name).read_text(encoding="utf-8")
                              for name in ("decoder.py", "encoder.py", "scanner.py"))
                      + "café naïve 世界 🙂 Ünïcödé ∑ → \n" * 3, encoding="utf-8")
    settings = {"llama": dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                              remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                              allow_whitespace_only_pieces=True),
                "defaults": dict(model_type="unigram")}
    tokenizers = []
    for name, options in settings.items():
        SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / name), vocab_size=400, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99, minloglevel=2,
                                   **options)
        tokenizers.append(Tokenizer(str(folder / f"{name}.model")))
    return tokenizers


def test_text_stream_with_other_sentencepiece_settings(other_tokenizers):
    """Whitespace-only pieces, control ids (bos/eos/unk) and characters split over byte pieces in the
    middle of the text: with a dummy prefix, or extra whitespace removed, decode strips the leading
    whitespace of what it decodes, past pieces that decode to nothing (a window decoded without its
    anchor lost a space: 'he[' for 'he ['). The pieces add up to decode(all ids)."""
    rng = random.Random(2)
    for tok in other_tokenizers:
        sp = tok.sp_model
        byte_ids = [i for i in range(tok.n_words) if sp.is_byte(i)]
        blank = [i for i in range(tok.n_words) if not sp.is_byte(i) and not sp.id_to_piece(i).replace("\u2581", "").strip()]
        for _ in range(400):
            ids, n_ids = [], rng.randrange(1, 40)
            while len(ids) < n_ids:
                r = rng.random()
                if r < 0.2 and byte_ids:   # a whole character in byte pieces
                    char = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800)]))
                    ids += [sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode()]
                elif r < 0.3 and byte_ids:
                    ids.append(rng.choice(byte_ids))
                elif r < 0.45 and blank:
                    ids.append(rng.choice(blank))
                elif r < 0.5:
                    ids.append(rng.choice([0, 1, 2]))
                else:
                    ids.append(rng.randrange(tok.n_words))
            stream, pieces, at = TextStream(tok), [], 0
            while at < len(ids):
                n = rng.choice([1, 1, 2, 3])
                pieces.append(stream.push(ids[at:at + n]))
                at += n
            pieces.append(stream.finish())
            assert "".join(pieces) == tok.decode(ids), [sp.id_to_piece(i) for i in ids]


def test_text_stream_decodes_a_window_not_the_whole_text(tokenizer):
    """The ids decoded per push stay bounded however long the text grows (a whole decode per push made
    streaming quadratic): counted, not timed, for code and for a completion of blank lines alike."""
    class Counting:
        def __init__(self, tok):
            self.tok, self.sp_model, self.decoded = tok, tok.sp_model, 0

        def decode(self, ids):
            ids = list(ids) if not isinstance(ids, int) else ids
            self.decoded += len(ids)
            return self.tok.decode(ids)
    code = tokenizer.encode("def f(x):\n    return x + 1\n" * 200, bos=False, eos=False)
    blank = tokenizer.encode("\n" * 3000, bos=False, eos=False)
    for ids in (code, blank):
        counting = Counting(tokenizer)
        stream = TextStream(counting)
        pieces = [stream.push(ids[at:at + 2]) for at in range(0, len(ids), 2)] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids) and len(ids) > 1000
        assert counting.decoded < 12 * len(ids), (counting.decoded, len(ids))


def test_a_bad_id_is_refused_before_it_enters_the_stream(tokenizer):
    stream = TextStream(tokenizer)
    assert stream.push(tokenizer.encode("x = 1", bos=False, eos=False)) == "x = 1"
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        stream.push([99999])
    with pytest.raises(ValueError, match="decode takes a sequence of token ids, got 5"):
        stream.push(5)
    assert stream.push(tokenizer.encode(" + 2", bos=False, eos=False)).strip() == "+ 2"


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
    assert main(base + ["--max-seq-len", "4", "--stream"]) != 0   # refused by generate: nothing printed before
    out = capsys.readouterr()
    assert out.out == "" and "error" in out.err


def test_a_reader_that_leaves_ends_the_stream_quietly():
    """`mtp complete --stream ... | head -c 12`: once the reader has gone, the writer stops with a
    SIGPIPE death's status and no error message (it said "error: [Errno 32] Broken pipe", status 2)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "mtp_engine", "complete", "--prompt", "def main(", "--max-gen-len",
                             "300", "--stream", "--device", "cpu", "--stop", "no such text"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(12) == b"def main(\n> "
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == b"", err
