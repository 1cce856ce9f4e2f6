"""Training data: a corpus of source files, its tokenizer, a memory-mapped token cache, packed batches.

    corpus = prepare_corpus("data/stdlib", vocab_size=8192)       # default source: Python's own stdlib
    train = PackedTokens(corpus.train_path, seq_len=512)
    for tokens in train.batches(batch_size=16, seed=0, start=0): ...   # (B, T) int64

The split is by file and deterministic: files under a held-out folder (`test/`, `tests/`) are held
out; a folder without any gets a fixed hash-chosen share of its files held out instead (at least one
file on each side, so a corpus of two files splits). Every file
becomes `bos + tokens + eos` in one flat token stream per split, stored as a raw little-endian
array (uint16 when the vocabulary fits) and memory-mapped, so a corpus of any size costs no RAM.
`prepare_corpus` reuses a cache whose manifest matches the files and options, and rebuilds otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .tokenizer import Tokenizer, train_tokenizer

PathLike = Union[str, os.PathLike]

DEFAULT_EXTENSIONS = (".py",)
HELDOUT_DIRS = ("test", "tests")
# Folders that are not the standard library's own source, or not source at all.
SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3", "ensurepip")
# Whole-line runs of indentation are the most frequent strings in code; as single pieces they give
# the model one token for "newline + indent" instead of a newline byte and space pieces.
INDENT_SYMBOLS = ["\n" + "\u2581" * (4 * level) for level in range(9)]  # U+2581: SentencePiece's space
CACHE_VERSION = 2


def stdlib_root() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def check_extensions(extensions: Sequence[str]) -> Tuple[str, ...]:
    """The file endings a corpus reads, as a tuple; ValueError naming one that is not a string starting
    with "." (`txt` would also match `footxt`), or an empty list."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    extensions = tuple(extensions)
    bad = [e for e in extensions if not isinstance(e, str) or len(e) < 2 or not e.startswith(".")]
    if bad or not extensions:
        raise ValueError(f"file extensions must be one or more endings such as '.py' or '.txt', got "
                         f"{bad[0] if bad else 'none'!r}")
    return extensions


def find_source_files(root: PathLike, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> List[Path]:
    """Every file under `root` with one of `extensions` (in any case: `.MD` is `.md`), sorted,
    skipping SKIP_DIRS and hidden folders and names that are not readable files (a dangling or
    looping symlink). A file reached under two names (a symlink to it) is listed once, under its own
    name where the root holds it: the split hashes names, and an alias could put one text on both
    sides."""
    extensions = check_extensions(extensions)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {root}")
    files, seen, real_root = [], set(), root.resolve()
    endings = tuple(e.lower() for e in extensions)
    # Symlinked folders that lead outside the root are followed (a corpus of linked projects), each
    # real folder once (no loops); a link to a folder inside the root is not (the folder is walked
    # under its own name: an alias would rename its files, and the split hashes names).
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not _links_inside(Path(dirpath) / d, real_root))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if f.lower().endswith(endings) and (Path(dirpath) / f).is_file()]
    if not files:
        raise ValueError(f"no files ending in {tuple(extensions)} under {root}")
    by_target = {}
    for position, f in enumerate(files):
        by_target.setdefault(f.resolve(), []).append((position, f))
    # one name per file: a real file before the links to it, else the first link
    kept = {min(names, key=lambda item: (item[1].is_symlink(), item[0]))[0] for names in by_target.values()}
    return [f for position, f in enumerate(files) if position in kept]


def _links_inside(folder: Path, real_root: Path) -> bool:
    """Whether `folder` is a symlink to a folder inside real_root."""
    if not folder.is_symlink():
        return False
    target = folder.resolve()
    return target == real_root or real_root in target.parents


def check_heldout_fraction(heldout_fraction) -> None:
    """ValueError unless the held-out share is a number in (0, 1)."""
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")


def _held_by_folder(files: Sequence[Path], root: Path) -> Optional[List[bool]]:
    """Which files sit inside a HELDOUT_DIRS folder, when that rule decides the split (some do, some
    do not); None when the hash share decides it."""
    in_folder = [any(part in HELDOUT_DIRS for part in Path(f).relative_to(root).parts[:-1]) for f in files]
    return in_folder if any(in_folder) and not all(in_folder) else None


def split_files(files: Sequence[Path], root: PathLike, heldout_fraction: float = 0.05
                ) -> Tuple[List[Path], List[Path]]:
    """(train, heldout) by file. Files inside a HELDOUT_DIRS folder are held out; if there are none,
    a file is held out when a hash of its relative path falls in the first `heldout_fraction`, and
    at least one file goes to each side (the lowest hash held out, the highest trained on)."""
    check_heldout_fraction(heldout_fraction)
    root = Path(root)
    if len(files) < 2:
        raise ValueError(f"{root} has {len(files)} corpus file(s); the held-out split is by file, so it needs "
                         "at least 2 (cut a single text into several files)")
    held = _held_by_folder(files, root)
    if held is None:
        rel = [Path(f).relative_to(root) for f in files]
        scores = [_unit_hash(r.as_posix()) for r in rel]
        held = [score < heldout_fraction for score in scores]
        if not any(held):      # a corpus of a few files: a 5% share rounds to none
            held[scores.index(min(scores))] = True
        if all(held):
            held[scores.index(max(scores))] = False
    train = [f for f, h in zip(files, held) if not h]
    heldout = [f for f, h in zip(files, held) if h]
    return train, heldout


class CorpusSplit(NamedTuple):
    """What `CorpusSource.split` found: the root folder, the training and held-out files, and what it
    left out or decided (for the log)."""

    root: Path
    train: List[Path]
    heldout: List[Path]
    unreadable: int = 0          # empty or not UTF-8: on neither side
    copies_of_heldout: int = 0   # training files with a held-out file's exact bytes: left out
    by_folder: bool = False      # held out by test/ folders, not by the share


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus's files come from and how they split: the folder (None: the stdlib), the file
    endings read, and the held-out share of a folder without held-out folders. `prepare_corpus`
    splits by it; evaluation and distillation split by the same one (`CorpusSource.of`), or take a
    run's own lists (train_files / heldout_files, relative paths, from its corpus manifest: then
    nothing is split again, and a file added since, or a training file removed, cannot move a
    training file into the held-out set)."""

    folder: Optional[str] = None
    extensions: Tuple[str, ...] = DEFAULT_EXTENSIONS
    heldout_fraction: float = 0.05
    train_files: Optional[Tuple[str, ...]] = None
    heldout_files: Optional[Tuple[str, ...]] = None

    @classmethod
    def of(cls, source: Union[None, PathLike, "CorpusSource"]) -> "CorpusSource":
        """`source` as a CorpusSource: a folder (or None, the stdlib) with the default endings and share."""
        return source if isinstance(source, CorpusSource) else cls(None if source is None else str(source))

    @property
    def root(self) -> Path:
        return stdlib_root() if self.folder is None else Path(self.folder)

    def split(self) -> CorpusSplit:
        """The training and held-out files. Files that are empty or not UTF-8 are on neither side (a
        held-out side of them would leave nothing to evaluate), and a training file with a held-out
        file's exact bytes is left out (a copy of a held-out text would be trained on)."""
        root = self.root
        if self.heldout_files is not None:   # a training file gone since is only a prompt fewer
            train = [root / name for name in self.train_files or () if (root / name).is_file()]
            return CorpusSplit(root, train, self._pinned(root, self.heldout_files))
        files, digests, unreadable = [], {}, 0
        for f in find_source_files(root, self.extensions):
            data = f.read_bytes()
            readable = _utf8_text(data)
            if readable:
                files.append(f)
                digests[f] = hashlib.sha256(data).digest()
            unreadable += not readable
        if len(files) < 2 and unreadable:
            raise ValueError(f"only {len(files)} of the {len(files) + unreadable} files ending in "
                             f"{tuple(self.extensions)} under {root} hold UTF-8 text (the others are empty or not "
                             "UTF-8), and the held-out split by file needs at least 2")
        train, heldout = split_files(files, root, self.heldout_fraction)
        held = {digests[f] for f in heldout}
        kept = [f for f in train if digests[f] not in held]
        if not kept:
            raise ValueError(f"every training file under {root} is a copy of a held-out file")
        return CorpusSplit(root, kept, heldout, unreadable, len(train) - len(kept),
                           _held_by_folder(files, root) is not None)

    @staticmethod
    def _pinned(root: Path, names: Sequence[str]) -> List[Path]:
        files = [root / name for name in names]
        missing = [name for name, f in zip(names, files) if not f.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} of the run's {len(files)} held-out files are not under {root} (e.g. "
                             f"{missing[:3]}): the corpus changed since the run; give --source, or "
                             "--extension / --heldout-fraction to split the folder anew")
        return files


def _utf8_text(data: bytes) -> bool:
    """Whether a file's bytes hold text as read_text reads it: UTF-8, not empty."""
    try:
        return bool(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return False


def _unit_hash(text: str) -> float:
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes, not as an error
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "little") / 2.0 ** 64


def read_text(path: Path) -> Optional[str]:
    """File text as UTF-8 (a byte-order mark dropped), or None for files that are not (a few stdlib
    test files are Latin-1 on purpose)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError):
        return None


# ---------------------------------------------------------------------- the token cache
@dataclass
class Corpus:
    """A prepared corpus folder: tokenizer.model, train.bin, heldout.bin, manifest.json."""

    dir: Path
    tokenizer: Tokenizer
    train_path: Path
    heldout_path: Path
    heldout_files: List[str]
    manifest: dict


def prepare_corpus(out_dir: PathLike, source: Optional[PathLike] = None, vocab_size: int = 8192, *,
                   extensions: Sequence[str] = DEFAULT_EXTENSIONS, heldout_fraction: float = 0.05,
                   max_train_files: Optional[int] = None, tokenizer_sentences: int = 300_000,
                   extra_sources: Sequence[PathLike] = (), extra_max_mb: Optional[float] = None,
                   tokenizer_path: Optional[PathLike] = None, log=print) -> Corpus:
    """Tokenizer + memory-mapped token streams for the files under `source` (default: the stdlib).

    The tokenizer is trained on `source`'s training files only, unless `tokenizer_path` names an
    existing SentencePiece model to use as is (its vocabulary must be `vocab_size`).
    `max_train_files` keeps the first k of a deterministic shuffle (for quick runs).
    `extra_sources`: more folders whose files all go to training (e.g. a site-packages folder,
    for a model that needs more tokens than the stdlib has), in a deterministic order, up to
    `extra_max_mb` megabytes of text; a file whose text equals a held-out file's is dropped, so
    the held-out set stays unseen. A matching cache in `out_dir` is reused.
    """
    if max_train_files is not None and (isinstance(max_train_files, bool) or not isinstance(max_train_files, int)
                                        or max_train_files < 1):
        raise ValueError(f"max_train_files must be None or a positive int, got {max_train_files!r}")
    extensions = check_extensions(extensions)
    out = Path(out_dir)
    split = CorpusSource(None if source is None else str(source), extensions, heldout_fraction).split()
    source, train_files, heldout_files = split.root, split.train, split.heldout
    found = len(train_files)
    if max_train_files is not None:
        order = sorted(train_files, key=lambda f: _unit_hash("order:" + f.relative_to(source).as_posix()))
        train_files = sorted(order[:max_train_files])
    extra_files = _extra_files(extra_sources, extensions, extra_max_mb, heldout_files, train_files)
    tokenizer_digest = None
    if tokenizer_path is not None:
        given = Tokenizer(tokenizer_path)
        if given.n_words != vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {given.n_words} pieces but vocab_size is {vocab_size}")
        tokenizer_digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    manifest = {
        "version": CACHE_VERSION, "source": str(source), "vocab_size": vocab_size,
        "extensions": list(extensions), "heldout_fraction": heldout_fraction,
        "train_files": [f.relative_to(source).as_posix() for f in train_files],
        "heldout_files": [f.relative_to(source).as_posix() for f in heldout_files],
        "fingerprint": _fingerprint(train_files + heldout_files),
        "extra_sources": [str(Path(x)) for x in extra_sources], "extra_max_mb": extra_max_mb,
        "extra_files": len(extra_files), "extra_fingerprint": _fingerprint(extra_files),
        "tokenizer_sha256": tokenizer_digest,
        # what the trained tokenizer depends on besides the files: another setting, another cache
        "tokenizer_sentences": None if tokenizer_path is not None else tokenizer_sentences,
    }
    manifest_path = out / "manifest.json"
    old = _intact_cache(out)
    if old is not None:
        same = {k: old.get(k) for k in manifest} == manifest
        if not same and tokenizer_digest is not None and (out / "tokenizer.model").is_file():
            # a cache that trained the very tokenizer given (a resumed run pins its own) is as good
            loose = ("tokenizer_sha256", "tokenizer_sentences")
            same = all(old.get(k) == v for k, v in manifest.items() if k not in loose) and \
                hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest() == tokenizer_digest
        if same:
            log(f"corpus: reusing the cache in {out}")
            return _open(out, old)
    out.mkdir(parents=True, exist_ok=True)
    # No manifest while the files change: a rebuild cut short must not leave the old manifest
    # vouching for a new tokenizer beside old token files.
    manifest_path.unlink(missing_ok=True)
    log(f"corpus: {len(train_files)} train"
        + (f" (of {found}: max_train_files {max_train_files})" if len(train_files) < found else "")
        + f" / {len(heldout_files)} held-out files under {source}"
        + (" (the files under test/ or tests/ folders; heldout_fraction unused)" if split.by_folder else "")
        + (f", {len(extra_files)} more training files under {', '.join(map(str, extra_sources))}"
           if extra_sources else ""))
    if split.unreadable or split.copies_of_heldout:
        log(f"corpus: left out {split.unreadable} file(s) empty or not UTF-8 and {split.copies_of_heldout} "
            "training file(s) with a held-out file's exact text")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
        tokenizer = Tokenizer(out / "tokenizer.model")
    else:
        texts_file = out / "tokenizer_train.txt"
        with texts_file.open("w", encoding="utf-8") as fh:   # the split kept only files of UTF-8 text
            for f in train_files:
                text = read_text(f) or ""
                fh.write(text if text.endswith("\n") else text + "\n")
        try:
            tokenizer = train_tokenizer([texts_file], vocab_size, out / "tokenizer",
                                        input_sentence_size=tokenizer_sentences, user_defined_symbols=INDENT_SYMBOLS)
        finally:   # a failed training (a vocabulary too large for the text) leaves no copy of the corpus behind
            texts_file.unlink()
    manifest["train_tokens"] = _write_tokens(tokenizer, train_files + extra_files, out / "train.bin")
    manifest["heldout_tokens"] = _write_tokens(tokenizer, heldout_files, out / "heldout.bin")
    log(f"corpus: {manifest['train_tokens']:,} train / {manifest['heldout_tokens']:,} held-out tokens, "
        f"vocabulary {tokenizer.n_words}")
    tmp = manifest_path.with_suffix(".tmp")   # written whole or not at all: a cut write is no cache
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    return _open(out, manifest)


def _intact_cache(out: Path) -> Optional[dict]:
    """The manifest of a prepared corpus in `out` whose files are all there, readable and of the sizes
    it records; None otherwise (no cache, or one an interrupted write or a truncation damaged: it is
    rebuilt rather than failing later in a memory map)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        Tokenizer(out / "tokenizer.model")
        for split in ("train", "heldout"):
            meta = json.loads((out / f"{split}.bin.json").read_text())
            expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
            if meta["tokens"] != manifest[f"{split}_tokens"] or (out / f"{split}.bin").stat().st_size != expected:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def _open(out: Path, manifest: dict) -> Corpus:
    return Corpus(dir=out, tokenizer=Tokenizer(out / "tokenizer.model"), train_path=out / "train.bin",
                  heldout_path=out / "heldout.bin", heldout_files=manifest["heldout_files"], manifest=manifest)


def _extra_files(folders: Sequence[PathLike], extensions: Sequence[str], max_mb: Optional[float],
                 heldout_files: Sequence[Path], train_files: Sequence[Path] = ()) -> List[Path]:
    """Training files from `folders`: all of them (no held-out split), in a fixed hash order, the
    first ones up to max_mb megabytes; a file with the text of a held-out file is left out, and so
    is a training file of the source itself (a folder given twice would count its files twice)."""
    if not folders:
        return []
    heldout_digests = {hashlib.sha256(f.read_bytes()).digest() for f in heldout_files}
    already = {f.resolve() for f in train_files}
    candidates = []
    for folder in folders:
        root = Path(folder)
        candidates += [(_unit_hash("extra:" + f.relative_to(root).as_posix()), f)
                       for f in find_source_files(root, extensions)]
    chosen, total = [], 0
    for _, f in sorted(candidates):
        if f.resolve() in already:
            continue
        already.add(f.resolve())   # also a file reached through two extra folders
        size = f.stat().st_size
        if max_mb is not None and total + size > max_mb * 1e6:
            continue
        data = f.read_bytes()
        if hashlib.sha256(data).digest() in heldout_digests or not _utf8_text(data):
            continue
        chosen.append(f)
        total += size
    return chosen


def _fingerprint(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


# Characters of text SentencePiece encodes per batch: its ids come back as Python ints (36 bytes a
# token: a pointer and an int object, about 10x the text), so a batch of 256 files of 10 MB would
# hold tens of GB; 16M characters keep a batch's ids under 1 GB.
BATCH_CHARS = 1 << 24


def _write_tokens(tokenizer: Tokenizer, files: Sequence[Path], path: Path, batch_files: int = 256,
                  batch_chars: int = BATCH_CHARS) -> int:
    """Each file's bos + tokens + eos, appended to `path` in file order. Returns the token count. A
    file longer than batch_chars is encoded in pieces cut after blank lines (bos before the first,
    eos after the last), which decode to its exact text."""
    dtype = token_dtype(tokenizer.n_words)
    total = 0
    tmp = path.with_suffix(".tmp")
    # SentencePiece encodes a batch of texts on all cores (a large extra source is ~100M tokens).
    threads = max(os.cpu_count() or 1, 1)
    batch, flags, chars = [], [], 0

    def flush(fh):
        nonlocal total, batch, flags, chars
        for (bos, eos), ids in zip(flags, tokenizer.encode_batch(batch, bos=False, eos=False, num_threads=threads)):
            ids = np.asarray(tokenizer.add_specials([ids], bos, eos)[0], dtype=dtype)
            fh.write(ids.tobytes())
            total += ids.size
        batch, flags, chars = [], [], 0

    with tmp.open("wb") as fh:
        for f in files:
            text = read_text(f)
            if not text:
                continue
            pieces = _pieces(text, batch_chars)
            for i, piece in enumerate(pieces):
                batch.append(piece)
                flags.append((i == 0, i == len(pieces) - 1))
                chars += len(piece)
                if chars >= batch_chars or len(batch) >= batch_files:
                    flush(fh)
        flush(fh)
    os.replace(tmp, path)
    (path.parent / (path.name + ".json")).write_text(json.dumps({"dtype": dtype.str, "tokens": total}) + "\n")
    return total


def _pieces(text: str, size: int) -> List[str]:
    """text cut into pieces of about `size` characters, each cut after a blank line where there is
    one (a cut inside an indented block would tokenize its indentation otherwise), else after a line."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = text.rfind("\n\n", start, start + size)
        end = end + 2 if end > start else text.rfind("\n", start, start + size) + 1
        if end <= start:   # one line longer than `size`
            end = start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def load_tokens(path: PathLike) -> np.memmap:
    """The flat token stream of a split, memory-mapped read-only."""
    path = Path(path)
    meta_path = path.parent / (path.name + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"token file {path} (and its {meta_path.name}) not found: run prepare_corpus")
    meta = json.loads(meta_path.read_text())
    if meta["tokens"] == 0:
        raise ValueError(f"token file {path} is empty")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))


# ---------------------------------------------------------------------- packed batches
class PackedTokens:
    """A token stream cut into consecutive windows of `seq_len` tokens (files packed back to back,
    bos/eos between them; the tail shorter than a window is dropped).

    Windows are drawn from a seeded permutation of the windows, one permutation per epoch, so the
    p-th window a run reads is a pure function of (seed, p) (`windows`): a resumed run continues the
    same sequence, and rank r of `world_size` takes batches r, r + world_size, ... of the same global
    order.
    """

    def __init__(self, path: PathLike, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.tokens = load_tokens(path)
        self.seq_len = seq_len
        self.n_windows = len(self.tokens) // seq_len
        if self.n_windows == 0:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of {seq_len}")

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))

    def windows(self, start: int, count: int, seed: int) -> torch.Tensor:
        """Windows start .. start + count - 1 of the run's global order: (count, seq_len) int64.
        Position p is window perm_e[p % n] of epoch e = p // n (n windows, one seeded permutation
        per epoch), so what a run reads depends only on how many windows it has read, not on how it
        cuts them into batches: world_size ranks of B windows read what one process of
        world_size x B reads, k micro-batches what one batch k times larger reads, across epochs
        and across a resume on another number of ranks."""
        if count > self.n_windows:
            raise ValueError(f"batch_size {count} exceeds the {self.n_windows} windows of the data")
        rows = []
        for p in range(start, start + count):
            epoch, k = divmod(p, self.n_windows)
            rows.append(self.window(int(self._permutation(seed, epoch)[k])))
        return torch.stack(rows)

    def batch(self, batch_size: int, seed: int, index: int) -> torch.Tensor:
        """Global batch number `index`, windows index x batch_size onwards (`windows`): (batch_size,
        seq_len) int64."""
        return self.windows(index * batch_size, batch_size, seed)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless batches start + rank, start + rank + world_size, ... of the global order."""
        index = start + rank
        while True:
            yield self.batch(batch_size, seed, index)
            index += world_size

    def fixed_windows(self, count: int, seed: int = 1234) -> torch.Tensor:
        """`count` windows spread over the stream by a fixed permutation (for evaluation): (count, seq_len)."""
        count = min(count, self.n_windows)
        perm = self._permutation(seed, 0)[:count]
        return torch.stack([self.window(int(i)) for i in sorted(perm)])

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_key", None) != (seed, epoch):
            self._perm = np.random.default_rng([seed, epoch]).permutation(self.n_windows)
            self._perm_key = (seed, epoch)
        return self._perm
