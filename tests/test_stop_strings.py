"""Stop strings: generate(stop=...) ends a completion once its text holds one (finish "stop"), its
tokens ending with the one that completed the string and its text before it; the same in every
decoding mode, streamed, through Llama.text_completion and `mtp complete --stop`."""
import pytest
import torch

from mtp_engine.checkpoint import default_checkpoint, load_checkpoint
from mtp_engine.cli import _unescape, main
from mtp_engine.generate import Generator
from mtp_engine.llama import Llama
from mtp_engine.tokenizer import Tokenizer

PROMPTS = ["import os\n\ndef main(", "class Foo:\n    def __init__(self", "for i in range(", "x = ["]


@pytest.fixture(scope="module")
def default_model():
    ckpt = default_checkpoint()
    return load_checkpoint(ckpt, device="cpu", dtype=torch.float32).eval(), Tokenizer(str(ckpt / "tokenizer.model"))


@pytest.fixture(scope="module")
def gen(default_model):
    model, tok = default_model
    return Generator(model, tok, max_batch_size=4, max_seq_len=160)


def _encoded(tok):
    return [tok.encode(p, bos=True, eos=False) for p in PROMPTS]


@pytest.mark.parametrize("speculative", [None, "chain", "tree"])
def test_stop_strings_cut_tokens_and_text(gen, speculative):
    """Every prompt whose free completion holds a stop string ends with the token that completed the
    first one; its text is the free text up to that string; the others are untouched. Speculative
    steps accept past the string and drop the rest: the same tokens as plain decoding."""
    tok = gen.tokenizer
    prompts = _encoded(tok)
    free = gen.generate(prompts, max_gen_len=48)
    stops = ["):", "\n\n", "self."]
    res = gen.generate(prompts, max_gen_len=48, stop=stops, speculative=speculative)
    stopped = 0
    for b in range(len(prompts)):
        hits = [at for at in (free.text[b].find(s) for s in stops) if at >= 0]
        if not hits:
            assert res.tokens[b] == free.tokens[b] and res.finish_reasons[b] == free.finish_reasons[b]
            continue
        stopped += 1
        assert res.finish_reasons[b] == "stop" and res.text[b] == free.text[b][:min(hits)]
        n = len(res.tokens[b])
        assert res.tokens[b] == free.tokens[b][:n]
        assert any(s in tok.decode(res.tokens[b]) for s in stops)
        assert not any(s in tok.decode(res.tokens[b][:n - 1]) for s in stops)
    assert stopped >= 2 and res.stats["finish_counts"]["stop"] == stopped
    if speculative is None:
        plain = res
    else:
        plain = gen.generate(prompts, max_gen_len=48, stop=stops)
        assert res.tokens == plain.tokens and res.finish_reasons == plain.finish_reasons


def test_stop_per_prompt_streamed_and_with_logprobs(gen):
    """One list of stop strings per prompt (None: none); streamed tokens are the kept ones (handed
    over after the check: none past the cut); log-probs are cut with the tokens."""
    tok = gen.tokenizer
    prompts = _encoded(tok)[:2]
    free = gen.generate(prompts, max_gen_len=40)
    stop_0 = free.text[0][5:8]   # a string the first completion reaches
    handed, handed_lps = {}, {}

    def on_tokens(i, new, finish, new_logprobs):
        handed.setdefault(i, []).extend(new)
        handed_lps.setdefault(i, []).extend(new_logprobs)
    res = gen.generate(prompts, max_gen_len=40, stop=[[stop_0], None], logprobs=True, speculative="tree",
                       on_tokens=on_tokens)
    assert res.finish_reasons == ["stop", free.finish_reasons[1]] and res.tokens[1] == free.tokens[1]
    assert res.text[0] == free.text[0][:free.text[0].find(stop_0)]
    assert handed == {0: res.tokens[0], 1: res.tokens[1]}
    assert [len(lp) for lp in res.logprobs] == [len(t) for t in res.tokens]
    assert handed_lps == {0: res.logprobs[0], 1: res.logprobs[1]}
    plain_lps = gen.generate(prompts, max_gen_len=40, logprobs=True).logprobs
    torch.testing.assert_close(res.logprobs[0], plain_lps[0][:len(res.tokens[0])], rtol=1e-4, atol=1e-4)


def test_bad_stop_is_a_clear_error(gen, default_model):
    prompts = _encoded(gen.tokenizer)[:2]
    for stop, match in (("", "stop must be a non-empty str"), ([1], "stop must be a non-empty str"),
                        ([["a"]], "one entry per prompt, got 1 for 2"), ([["a"], [""]], r"stop\[1\] must be")):
        with pytest.raises(ValueError, match=match):
            gen.generate(prompts, max_gen_len=2, stop=stop)
    with pytest.raises(ValueError, match="stop strings need the Generator's tokenizer"):
        Generator(default_model[0], max_batch_size=1, max_seq_len=32).generate([[1, 2]], max_gen_len=2, stop="x")


def test_llama_text_completion_with_stop_and_echo(default_model):
    model, tok = default_model
    llama = Llama(model, tok, max_seq_len=160, max_batch_size=2)
    free = llama.text_completion(PROMPTS[:2], temperature=0.0, max_gen_len=40)
    got = llama.text_completion(PROMPTS[:2], temperature=0.0, max_gen_len=40, stop=["):", "\n\n"])
    for f, g in zip(free, got):
        hits = [at for at in (f["generation"].find(s) for s in ("):", "\n\n")) if at >= 0]
        assert g["generation"] == f["generation"][:min(hits)] if hits else g["generation"] == f["generation"]
    echoed = llama.text_completion(PROMPTS[:1], temperature=0.0, max_gen_len=40, stop=["):"], echo=True)
    assert echoed[0]["generation"].startswith(PROMPTS[0]) and "):" not in echoed[0]["generation"][len(PROMPTS[0]):]


def test_echo_cuts_where_generate_cut_with_a_tokenizer_that_drops_a_leading_space(tmp_path):
    """With Llama 2's SentencePiece settings a completion's own text drops its first piece's leading
    space, which the echoed text (prompt + completion decoded together) keeps: a stop string that
    generate never matched (" " + the first word) must not cut the echoed generation, and a stop
    that generate did match cuts it at the same place."""
    import sysconfig
    from sentencepiece import SentencePieceTrainer
    from mtp_engine import ModelArgs, Transformer

    corpus = tmp_path / "corpus.txt"
    stdlib = sysconfig.get_paths()["stdlib"]
    corpus.write_text(open(f"{stdlib}/json/decoder.py", encoding="utf-8").read(), encoding="utf-8")
    SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "llama"), model_type="bpe",
                               vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
                               remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
                               pad_id=-1, minloglevel=2)
    tok = Tokenizer(str(tmp_path / "llama.model"))
    prompt = ["def decode(self, s):"]
    for seed in range(40):   # a random model whose completion starts with a word piece ("\u2581word")
        torch.manual_seed(seed)
        model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=tok.n_words, multiple_of=16,
                                      n_future_tokens=2, max_seq_len=64)).eval()
        llama = Llama(model, tok, max_seq_len=64, max_batch_size=1)
        free = llama.text_completion(prompt, temperature=0.0, max_gen_len=12)[0]["generation"]
        first = tok.sp_model.id_to_piece(llama.last_result.tokens[0][0])
        if first.startswith("\u2581") and len(first) > 1 and len(free) > 6:
            break
    assert first.startswith("\u2581") and not free.startswith(" ")   # the case at hand
    unseen = " " + first[1:]
    echoed = llama.text_completion(prompt, temperature=0.0, max_gen_len=12, stop=[unseen], echo=True)[0]
    assert llama.last_result.finish_reasons == ["max_gen_len"]
    assert echoed["generation"] == tok.decode(tok.encode(prompt[0], bos=True, eos=False) + llama.last_result.tokens[0])
    seen = free[2:5]
    plain = llama.text_completion(prompt, temperature=0.0, max_gen_len=12, stop=[seen])[0]["generation"]
    echoed = llama.text_completion(prompt, temperature=0.0, max_gen_len=12, stop=[seen], echo=True)[0]["generation"]
    assert llama.last_result.finish_reasons == ["stop"] and plain == free[:free.find(seen)]
    assert echoed.endswith(plain) and seen not in echoed[len(echoed) - len(plain) - 1:]


def test_tokens_cut_by_a_stop_are_not_counted_as_produced(gen):
    """tokens_per_forward counts what a forward produced for the output: when one step accepted past
    the stop string (more tokens, then an eos), the dropped tokens and the eos do not count."""
    from mtp_engine.generate import SequenceState
    from mtp_engine.tokenizer import TextStream

    tok = gen.tokenizer
    head, tail = tok.encode("x = 1", bos=False, eos=False), tok.encode("\n\ny = 2", bos=False, eos=False)
    seq = SequenceState(prompt=[1], limit=50, eos_id=tok.eos_id, stop=("\n\n",), stop_text=TextStream(tok))
    for i in head:   # an earlier step
        seq.accept(i)
    seq.check_stop()
    for i in tail + [tok.eos_id]:   # one step: the stop string, more, then eos
        seq.accept(i)
    assert seq.finish == "eos" and seq.produced == len(head) + len(tail) + 1
    seq.check_stop()
    assert seq.finish == "stop" and tok.decode(seq.tokens)[:seq.stop_char] == "x = 1"
    assert seq.produced == len(seq.tokens) and "\n\n" in tok.decode(seq.tokens)


def test_a_finished_text_stream_takes_no_more(gen):
    from mtp_engine.tokenizer import TextStream

    stream = TextStream(gen.tokenizer)
    stream.push(gen.tokenizer.encode("x", bos=False, eos=False))
    stream.finish()
    with pytest.raises(ValueError, match="this TextStream has been finished"):
        stream.push([5])


def test_cli_stop_with_and_without_stream(capsys):
    assert _unescape(r"\n\tdef \\n\r") == "\n\tdef \\n\r"
    base = ["complete", "--prompt", PROMPTS[0], "--max-gen-len", "40", "--device", "cpu", "--stop", r"\n\n",
            "--stop", "):"]
    assert main(base) == 0
    whole = capsys.readouterr().out
    assert main(base + ["--stream", "--speculative", "tree"]) == 0
    streamed = capsys.readouterr().out
    assert whole.splitlines()[:-1] == streamed.splitlines()[:-1]
    assert "):" not in whole.split("> ", 1)[1].rsplit("[stats]", 1)[0]


def test_the_stream_printer_holds_back_what_may_begin_a_stop_string(capsys):
    """--stream --stop: a stop string split over two forwards ("\\n" then "\\n") prints none of it, and
    text that only looked like its beginning is printed once the next piece shows it was not."""
    from mtp_engine.cli import _stream_printer

    class Pieces:   # a tokenizer whose ids are pieces of text
        pieces = ["a = 1", "\n", "b = 2", "\n", "\n", "c"]

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)
    on_tokens = _stream_printer(Pieces(), "prompt", ["\n\n"])
    assert capsys.readouterr().out == ""   # the prompt comes with the first tokens, once generate checked it
    printed = []
    for ids, finish in (([0, 1], None), ([2, 3], None), ([4], "stop")):
        on_tokens(0, ids, finish)
        printed.append(capsys.readouterr().out)
    assert printed == ["prompt\n> a = 1", "\nb = 2", ""]


def test_a_stop_string_before_a_character_still_missing_bytes_is_found(gen):
    """A forward whose last token leaves a character unfinished (a byte piece) still has its stop
    string found, though the text stream holds that forward's text back; the row ends there."""
    from mtp_engine.generate import SequenceState
    from mtp_engine.tokenizer import TextStream

    tok = gen.tokenizer
    ids = tok.encode("x = 1", bos=False, eos=False) + tok.encode("\n\n", bos=False, eos=False)
    ids += [tok.sp_model.piece_to_id("<0xE2>")]
    seq = SequenceState(prompt=[1], limit=len(ids), stop=("\n\n",), stop_text=TextStream(tok))
    for i in ids:
        seq.accept(i)
    assert seq.finish == "max_gen_len"
    seq.check_stop()
    assert seq.finish == "stop" and tok.decode(seq.tokens)[:seq.stop_char] == "x = 1"


# ------------------------------------------------------------------------------ stop token ids
@pytest.mark.parametrize("speculative", [None, "chain", "tree"])
def test_stop_token_ids_end_as_eos_does(gen, speculative):
    """stop_token_ids end a completion exactly where an eos of that id would (not kept, the same
    tokens, log-probs and tokens per forward), with finish "stop"; per prompt, or one list for all."""
    prompts = _encoded(gen.tokenizer)
    free = gen.generate(prompts, max_gen_len=30)
    # per prompt, a token it generates on its way (its 6th), and one it never generates
    ids = [[t[5], gen.tokenizer.eos_id] for t in free.tokens]
    ids[1] = None
    res = gen.generate(prompts, max_gen_len=30, stop_token_ids=ids, speculative=speculative, logprobs=True)
    for b, (tokens, stop) in enumerate(zip(free.tokens, ids)):
        if stop is None:
            assert res.tokens[b] == tokens and res.finish_reasons[b] == free.finish_reasons[b]
            continue
        assert res.finish_reasons[b] == "stop"
        assert res.tokens[b] == tokens[:tokens.index(tokens[5])] and len(res.logprobs[b]) == len(res.tokens[b])
        as_eos = gen.generate([prompts[b]], max_gen_len=30, eos_id=tokens[5], speculative=speculative)
        assert as_eos.tokens[0] == res.tokens[b] and as_eos.finish_reasons == ["eos"]
        assert res.text[b] == gen.tokenizer.decode(res.tokens[b])
    one = gen.generate(prompts, max_gen_len=30, stop_token_ids=[free.tokens[0][5]], speculative=speculative)
    for b, tokens in enumerate(free.tokens):
        cut = tokens.index(free.tokens[0][5]) if free.tokens[0][5] in tokens else len(tokens)
        assert one.tokens[b] == tokens[:cut]
        assert one.finish_reasons[b] == ("stop" if cut < len(tokens) else free.finish_reasons[b])


def test_a_stop_token_after_a_stop_string_in_one_step_is_not_counted():
    """As for eos: when one step accepts past a stop string and then draws a stop id, neither the
    tokens after the string nor the stop id count as produced."""
    from mtp_engine.generate import SequenceState
    from mtp_engine.tokenizer import TextStream

    tok = Tokenizer(str(default_checkpoint() / "tokenizer.model"))
    head, tail = tok.encode("x = 1", bos=False, eos=False), tok.encode("\n\ny = 2", bos=False, eos=False)
    seq = SequenceState(prompt=[1], limit=50, stop_ids=frozenset({7}), stop=("\n\n",), stop_text=TextStream(tok))
    for i in head + tail + [7]:
        seq.accept(i)
    assert seq.finish == "stop" and seq.produced == len(head) + len(tail) + 1
    seq.check_stop()
    assert seq.finish == "stop" and tok.decode(seq.tokens)[:seq.stop_char] == "x = 1"
    assert seq.produced == len(seq.tokens)


@pytest.mark.parametrize("value, match", [
    ("x", "stop_token_ids must be a list of int token ids, got 'x'"),
    (5, "stop_token_ids must be a list of int token ids, got 5"),
    ([1.5], "stop_token_ids: 1.5 is not a token id of this model (an int in [0, 8192))"),
    ([8192], "stop_token_ids: 8192 is not a token id"),
    ([True], "stop_token_ids: True is not a token id"),
    ([[1], None], "stop_token_ids: a list of lists needs one entry per prompt, got 2 for 4 prompt(s)"),
    ([[1], None, [-1], [2]], "stop_token_ids[2]: -1 is not a token id"),
])
def test_bad_stop_token_ids_are_clear_errors(gen, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gen.generate(_encoded(gen.tokenizer), max_gen_len=2, stop_token_ids=value)


def test_cli_stop_token_id(gen, capsys):
    tokens = gen.generate(_encoded(gen.tokenizer)[:1], max_gen_len=20).tokens[0]
    stop = tokens[3]
    assert main(["complete", "--prompt", PROMPTS[0], "--max-gen-len", "20", "--device", "cpu",
                 "--stop-token-id", str(stop)]) == 0
    printed = capsys.readouterr().out.split("> ", 1)[1].rsplit("\n\n[stats]", 1)[0]
    assert printed == gen.tokenizer.decode(tokens[:tokens.index(stop)])
