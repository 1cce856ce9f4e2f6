"""Tokenizer: train a small byte-fallback BPE model on stdlib source, check exact round trips."""
import os
import sysconfig

import pytest

from mtp_engine.tokenizer import Tokenizer, train_tokenizer

CODE_SAMPLE = (
    "class Stack:\n"
    "    def push(self, x):\n"
    "\tif x is None:  # tabs, then two spaces\n"
    "            raise ValueError('x')\n"
    "\n"
    "\n"
    "        self.items.append(x)   \n"
    "x = [1234567, 0.5e-3]\r\n"
)
UNICODE_SAMPLE = "naïve café — 日本語テキスト, emoji 🙂🚀, Ελληνικά, \u00a0nbsp, zero\u200bwidth"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    stdlib = sysconfig.get_paths()["stdlib"]
    text = "".join(open(os.path.join(stdlib, name), encoding="utf-8").read()
                   for name in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py"))
    tmp = tmp_path_factory.mktemp("tok")
    corpus = tmp / "corpus.txt"
    corpus.write_text(text + "\nunicode: café 日本語\n", encoding="utf-8")
    return train_tokenizer([corpus], vocab_size=411, prefix=tmp / "code")


def test_llama_special_ids(tokenizer):
    assert tokenizer.n_words == 411
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer.sp_model.unk_id() == 0


@pytest.mark.parametrize("text", [CODE_SAMPLE, UNICODE_SAMPLE, "", " leading space", "trailing  ", "\n\n\t"])
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.n_words for i in ids)
    assert tokenizer.decode(ids) == text


def test_bos_eos_wrap_the_ids(tokenizer):
    plain = tokenizer.encode("def f():", bos=False, eos=False)
    assert tokenizer.encode("def f():", bos=True, eos=False) == [1] + plain
    assert tokenizer.encode("def f():", bos=False, eos=True) == plain + [2]
    both = tokenizer.encode("def f():", bos=True, eos=True)
    assert both == [1] + plain + [2]
    assert tokenizer.decode(both) == "def f():"


def test_merges_learned_from_code(tokenizer):
    # Trained merges must compress the corpus' own vocabulary clearly below one id per byte (about 150 merges here).
    text = "    def __init__(self):\n        return self"
    assert len(tokenizer.encode(text, bos=False, eos=False)) < len(text.encode()) * 0.75


def test_unseen_bytes_fall_back_to_byte_pieces(tokenizer):
    ids = tokenizer.encode("🙂", bos=False, eos=False)
    assert len(ids) == 4  # four UTF-8 bytes, none merged: no emoji in the corpus
    assert [tokenizer.sp_model.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_reload_from_file_gives_same_ids(tokenizer):
    again = Tokenizer(tokenizer.model_path)
    assert again.encode(CODE_SAMPLE, bos=True, eos=False) == tokenizer.encode(CODE_SAMPLE, bos=True, eos=False)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)


def test_decode_rejects_out_of_range_ids(tokenizer):
    with pytest.raises(ValueError, match="411"):
        tokenizer.decode([5, 411])


def test_ids_and_texts_of_the_wrong_type_are_refused(tokenizer):
    import numpy as np
    import torch

    ids = tokenizer.encode("def f(x):", bos=False, eos=False)
    text = tokenizer.decode(ids)
    assert tokenizer.decode(np.array(ids)) == tokenizer.decode(torch.tensor(ids)) == text
    for bad in ([ids[0] + 0.9], [True]):   # 300.9 decoded as 300 before
        with pytest.raises(ValueError, match="token ids must be ints"):
            tokenizer.decode(bad)
    for bad in (5, torch.tensor(5), "abc"):   # one id, not a sequence of them
        with pytest.raises(ValueError, match="decode takes a sequence of token ids"):
            tokenizer.decode(bad)
    with pytest.raises(ValueError, match="Tokenizer takes the path of a tokenizer.model, got None"):
        Tokenizer(None)
    with pytest.raises(ValueError, match="encode_batch expects a list of str"):
        tokenizer.encode_batch("ab", bos=False, eos=False)   # split into characters before
    tokenizer.check_vocab(tokenizer.n_words)
    with pytest.raises(ValueError, match=f"vocab_size 8 does not match the tokenizer's {tokenizer.n_words}"):
        tokenizer.check_vocab(8)


def test_train_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300, prefix=tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc\n")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([corpus], vocab_size=100, prefix=tmp_path / "m")


def test_train_tokenizer_vocab_smaller_than_the_characters_is_a_clear_error(tmp_path):
    text = tmp_path / "chars.txt"
    text.write_text("".join(chr(0x4E00 + i) for i in range(400)) + "\n")
    with pytest.raises(ValueError, match="cannot train a 300-word tokenizer.*Vocabulary size is smaller"):
        train_tokenizer([text], 300, tmp_path / "tok")


def test_text_that_cannot_be_encoded_is_refused_by_name(tokenizer, tmp_path):
    """A lone surrogate (undecodable bytes of a command line) and a bos/eos the model lacks (T5-style,
    id -1) are refused with a message, not a pybind11 cast error or an id of -1; SentencePiece cannot
    read a training file whose path has a comma (it splits its input there)."""
    with pytest.raises(ValueError, match=r"not valid Unicode at position 2 \('\\udcff'\)"):
        tokenizer.encode("ab\udcff", bos=True, eos=False)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.encode_batch(["ok", "\ud800"], bos=False, eos=False)
    no_bos = Tokenizer(tokenizer.model_path)
    no_bos.bos_id = -1
    with pytest.raises(ValueError, match="has no bos token, but bos=True asked for one"):
        no_bos.encode("x", bos=True, eos=False)
    assert no_bos.encode("x", bos=False, eos=True)[-1] == tokenizer.eos_id
    from mtp_engine.data import _write_tokens   # a corpus's token files wrap every file in bos/eos
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no bos token"):
        _write_tokens(no_bos, [tmp_path / "a.py"], tmp_path / "a.bin")
    comma = tmp_path / "a,b"
    comma.mkdir()
    (comma / "text.txt").write_text("x = 1\n" * 50)
    with pytest.raises(ValueError, match="path has a comma"):
        train_tokenizer([comma / "text.txt"], vocab_size=300, prefix=tmp_path / "t")
