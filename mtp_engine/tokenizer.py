"""SentencePiece tokenizer compatible with Llama's `tokenizer.model`, and a trainer for small ones.

Ids follow Llama: unk 0, bos 1, eos 2, no pad (-1). `encode`/`decode` work on lists of ints.
"""
from __future__ import annotations

import collections.abc
import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

PathLike = Union[str, os.PathLike]


def find_tokenizer(ckpt_dir: PathLike, tokenizer_path: Optional[PathLike] = None) -> Path:
    """tokenizer_path when given, else `tokenizer.model` in ckpt_dir or its parent folder (Meta ships
    one tokenizer beside the 7B_* folders; `mtp demo --random-weights --out` writes it there too)."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    ckpt_dir = Path(ckpt_dir)
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.resolve().parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in {ckpt_dir} or its parent: pass --tokenizer-path")


class Tokenizer:
    """Wraps a SentencePiece model file; the same interface as Meta's llama `Tokenizer`."""

    def __init__(self, model_path: PathLike):
        if not isinstance(model_path, (str, os.PathLike)):
            raise ValueError(f"Tokenizer takes the path of a tokenizer.model, got {model_path!r}")
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path} (expected a SentencePiece "
                                    "`tokenizer.model`, e.g. the one shipped with the Llama 2 weights)")
        self.model_path = str(path)
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError unless a model of `vocab_size` words goes with this tokenizer: with another, ids
        decode to the wrong text and evaluation scores the wrong targets, silently."""
        if vocab_size != self.n_words:
            raise ValueError(f"checkpoint vocab_size {vocab_size} does not match the tokenizer's {self.n_words} "
                             f"words ({self.model_path}): wrong tokenizer for this model?")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s`, with bos prepended / eos appended when asked."""
        if not isinstance(s, str):
            raise ValueError(f"encode expects a str, got {type(s).__name__}")
        return self.add_specials([self._sp_encode(s, [s])], bos, eos)[0]

    def encode_batch(self, texts: List[str], bos: bool, eos: bool, num_threads: int = 1) -> List[List[int]]:
        """`encode` of every text, SentencePiece spreading the batch over num_threads threads."""
        if isinstance(texts, str):
            raise ValueError("encode_batch expects a list of str, got one str (it would be split into characters)")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"encode_batch expects a list of str; text {bad} is a {type(texts[bad]).__name__}")
        texts = list(texts)
        return self.add_specials(self._sp_encode(texts, texts, num_threads=num_threads) if texts else [], bos, eos)

    def _sp_encode(self, arg, texts: List[str], **options):
        """sp_model.encode(arg); text that is not valid Unicode (a lone surrogate: undecodable bytes on
        a command line) fails in its C++ binding with a cast error, named here by position instead."""
        try:
            return self.sp_model.encode(arg, **options)
        except (RuntimeError, TypeError):
            for t in texts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"text to encode is not valid Unicode at position {e.start} "
                                     f"({t[e.start]!r}): pass UTF-8 text") from None
            raise

    def add_specials(self, batch: List[List[int]], bos: bool, eos: bool) -> List[List[int]]:
        """Each id list with bos prepended / eos appended when asked; ValueError for one the model lacks."""
        for flag, name, token in ((bos, "bos", self.bos_id), (eos, "eos", self.eos_id)):
            if flag and token < 0:   # a T5-style model: -1 would go into the ids
                raise ValueError(f"{self.model_path} has no {name} token, but {name}=True asked for one")
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (bos/eos) decode to nothing."""
        # A tensor or array as Python numbers in one read (item by item, a CUDA tensor syncs per id).
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, (int, str, bytes)) or not isinstance(ids, collections.abc.Iterable):
            raise ValueError(f"decode takes a sequence of token ids, got {ids!r}")
        ids = [_token_id(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_words})")
        return self.sp_model.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, n_words={self.n_words})"


class TextStream:
    """The text a growing token sequence adds, piece by piece, for printing tokens as they arrive.

        stream = TextStream(tokenizer)
        for ids in new_ids_per_step: print(stream.push(ids), end="", flush=True)
        print(stream.finish())

    SentencePiece decodes a sequence as a whole: it strips the leading whitespace of what it decodes
    (past pieces that decode to nothing, such as control ids), and byte-fallback pieces spell one
    UTF-8 character together. So each push decodes a window of the ids, from the end of the push
    before the last one on, behind an anchor piece (a plain letter, its text then dropped) so that
    nothing is stripped at the window's start, and returns what the new ids add to the window's text.
    Until some text is out the window starts at the first id, stripped as decode(all ids) strips it. A push whose text ends in a character still missing bytes (U+FFFD) returns
    nothing (`held` has it) until the bytes arrive, or `finish` returns it (and ends the stream). The
    pieces add up to `decode(all ids)` (fuzzed with Llama-style and default SentencePiece settings,
    control ids and whitespace pieces among the ids). Each push decodes about two pushes' worth of
    ids, so the cost per token stays flat however long the text grows; not while every push ends in
    a character missing bytes (the window waits for it), nor for a tokenizer without a SentencePiece
    model to take an anchor from (decoded whole at every push)."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""          # what push and finish have returned so far
        self.held = ""          # text decoded but not returned: a character missing bytes, and what follows
        self._anchor = _anchor_piece(tokenizer)
        self._start = 0         # the window: ids from here on are decoded at each push
        self._returned = 0      # ids whose text has been returned
        self._returned_text = ""   # the window's text of ids[_start:_returned]
        self._finished = False

    def push(self, ids: Iterable[int]) -> str:
        if self._finished:
            raise ValueError("this TextStream has been finished; start a new one")
        if not isinstance(ids, collections.abc.Iterable) or isinstance(ids, (str, bytes)):
            self.tokenizer.decode(ids)   # its error names what ids is
        ids = list(ids)
        window = self._decode(self.ids[self._start:] + ids)   # checks the ids before they stay in the stream
        self.ids.extend(ids)
        if window.endswith("\ufffd") or not window.startswith(self._returned_text):
            self.held = window[len(self._returned_text):] if window.startswith(self._returned_text) else ""
            return ""
        added, self.held = window[len(self._returned_text):], ""
        self.text += added
        if self._anchor is not None and self.text:   # the window moves on once text is out (decode strips a start)
            self._start, self._returned = self._returned, len(self.ids)
        else:
            self._returned = len(self.ids)
        self._returned_text = self._decode(self.ids[self._start:self._returned])
        return added

    def finish(self) -> str:
        """What is left: a character that never got its missing bytes (as U+FFFD), with the text after it."""
        window = self._decode(self.ids[self._start:])
        added = window[len(self._returned_text):] if window.startswith(self._returned_text) else self.held
        self.held, self._finished = "", True
        self.text += added
        self._start = self._returned = len(self.ids)
        self._returned_text = ""
        return added

    def _decode(self, ids: List[int]) -> str:
        if self._start == 0 or self._anchor is None:   # the sequence's own start: stripped as decode(all) strips it
            return self.tokenizer.decode(ids)
        anchor_id, anchor_text = self._anchor
        return self.tokenizer.decode([anchor_id] + ids)[len(anchor_text):]


def _anchor_piece(tokenizer) -> Optional[tuple]:
    """(id, text) of a piece that decodes to one plain letter, from the tokenizer's SentencePiece
    model, or None: TextStream's window starts behind it."""
    sp = getattr(tokenizer, "sp_model", None)
    if sp is None:
        return None
    for piece in ("a", "e", "x", "\u2581a", "\u2581e"):
        i = sp.piece_to_id(piece)
        if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == piece and not sp.is_control(i) \
                and not sp.is_unknown(i) and not sp.is_byte(i):
            text = tokenizer.decode([i])
            if len(text) == 1 and text.isalpha():
                return i, text
    return None


def _token_id(value) -> int:
    """A token id as a Python int: ints, numpy and torch integer scalars; a float or a bool is a
    ValueError (int() would truncate 300.9 to another token, silently)."""
    plain = value.item() if hasattr(value, "item") else value   # numpy / torch scalars in a list
    if isinstance(plain, bool) or not isinstance(plain, int):
        raise ValueError(f"token ids must be ints, got {value!r}")
    return plain


def train_tokenizer(files: Iterable[PathLike], vocab_size: int, prefix: PathLike, *,
                    input_sentence_size: int = 200_000, num_threads: int = 2,
                    character_coverage: float = 1.0, user_defined_symbols: Optional[List[str]] = None,
                    ) -> Tokenizer:
    """Train a Llama-style byte-fallback BPE SentencePiece model and return its `Tokenizer`.

    files: text files, one sentence per line. Writes `{prefix}.model` and `{prefix}.vocab`.
    Normalization is the identity and whitespace-only pieces are allowed, so source code (indentation,
    runs of spaces, newlines inside a line are not seen: lines are the unit) round-trips exactly;
    byte_fallback makes every string encodable, which needs vocab_size >= 259 (3 specials + 256 bytes).
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("train_tokenizer needs at least one text file")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"training text not found: {missing}")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids "
                         "(unk, bos, eos and 256 bytes) plus at least one merge")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece logs its progress to stderr; minloglevel keeps warnings and errors only.
    try:
        _train_sentencepiece(files, vocab_size, prefix, input_sentence_size, num_threads, character_coverage,
                             user_defined_symbols)
    except RuntimeError as e:
        # SentencePiece reports a vocabulary that cannot hold every character (or too few pieces) this way.
        raise ValueError(f"cannot train a {vocab_size}-word tokenizer on {files}: "
                         f"{str(e).split(']')[-1].strip()}") from None
    return Tokenizer(f"{prefix}.model")


def _train_sentencepiece(files, vocab_size, prefix, input_sentence_size, num_threads, character_coverage,
                         user_defined_symbols) -> None:
    if any("," in f for f in files):   # SentencePiece splits `input` at commas
        raise ValueError(f"SentencePiece cannot read a training file whose path has a comma: {files}")
    SentencePieceTrainer.train(
        input=",".join(files),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        character_coverage=character_coverage,
        max_sentence_length=1 << 16,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        user_defined_symbols=user_defined_symbols or [],
        minloglevel=1,
    )
