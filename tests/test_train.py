"""Training: data pipeline, loss going down, the sequential head schedule, resume, `mtp eval`."""
import argparse
import dataclasses
import json
import os
import shutil
from collections import Counter
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_engine.data import (INDENT_SYMBOLS, PackedTokens, find_source_files, load_tokens, prepare_corpus,
                             split_files)
from mtp_engine.model import ModelArgs, Transformer
from mtp_engine.train import (MTPTrainModel, TrainConfig, absolute_paths, add_arguments, config_from_args,
                              evaluate, init_weights, lr_at, preset_config, resumed_config, run, train)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ("heapq.py", "bisect.py", "textwrap.py", "string.py", "functools.py", "colorsys.py")


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A tiny source folder: a few stdlib modules, a package, and a test/ folder (held out)."""
    root = tmp_path_factory.mktemp("src")
    (root / "pkg").mkdir()
    (root / "test").mkdir()
    for i, name in enumerate(SOURCES):
        text = (STDLIB / name).read_text(encoding="utf-8")
        (root / ("pkg" if i % 2 else ".") / name).write_text(text, encoding="utf-8")
    (root / "test" / "test_heapq.py").write_text((STDLIB / "test" / "test_heapq.py").read_text(encoding="utf-8"))
    (root / "notes.txt").write_text("not python")
    (root / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))   # not UTF-8: skipped, not a crash
    return root


@pytest.fixture(scope="module")
def corpus(source_tree, tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), source_tree, vocab_size=400, log=lambda *a: None)


def tiny_config(source_tree, corpus, out_dir, **overrides) -> TrainConfig:
    return preset_config("tiny", source=str(source_tree), corpus_dir=str(corpus.dir), vocab_size=400,
                         out_dir=str(out_dir), progress=False, max_train_files=None, seq_len=48, **overrides)


# ---------------------------------------------------------------------- data
def test_split_is_by_file_and_deterministic(source_tree):
    files = find_source_files(source_tree)
    assert all(f.suffix == ".py" for f in files)
    train_files, heldout = split_files(files, source_tree)
    assert [f.name for f in heldout] == ["test_heapq.py"]
    assert set(train_files) | set(heldout) == set(files) and not set(train_files) & set(heldout)
    assert split_files(files, source_tree) == (train_files, heldout)


def test_split_without_test_folder_uses_a_fixed_hash_share(tmp_path):
    for i in range(60):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    files = find_source_files(tmp_path)
    train_files, heldout = split_files(files, tmp_path, heldout_fraction=0.2)
    assert 0 < len(heldout) < 30 and len(train_files) + len(heldout) == 60
    assert split_files(files, tmp_path, heldout_fraction=0.2)[1] == heldout


def test_a_small_corpus_keeps_a_file_on_each_side_and_one_file_is_refused(tmp_path):
    """A 5% share of a few files rounds to none held out (the split used to refuse the corpus): the
    lowest-hash file is held out then, and the highest-hash one trained on when the share takes all."""
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"{name}\n")
    files = find_source_files(tmp_path, [".txt"])
    for fraction, held in ((1e-9, 1), (0.999999, 2)):
        train_files, heldout = split_files(files, tmp_path, heldout_fraction=fraction)
        assert len(heldout) == held and len(train_files) == 3 - held
        assert split_files(files, tmp_path, heldout_fraction=fraction) == (train_files, heldout)
    with pytest.raises(ValueError, match=r"has 1 corpus file\(s\); the held-out split is by file, so it needs at least 2"):
        split_files(files[:1], tmp_path)
    for bad in (0, 1, True, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="heldout_fraction must be in"):
            split_files(files, tmp_path, heldout_fraction=bad)
    for bad in (["txt"], [], [""], [".txt", 3]):
        with pytest.raises(ValueError, match="file extensions must be one or more endings such as"):
            find_source_files(tmp_path, bad)
    with pytest.raises(ValueError, match="file extensions must be"):
        preset_config("tiny", extensions=("md",)).validate()
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        preset_config("tiny", heldout_fraction=1.5).validate()


def test_corpus_round_trips_and_is_cached(corpus, source_tree):
    tok = corpus.tokenizer
    assert tok.n_words == 400
    stream = load_tokens(corpus.train_path)
    assert stream.dtype == np.uint16 and int(stream.max()) < 400
    # Files are bos + text + eos, back to back: the first file decodes exactly.
    ids = stream.tolist()
    first = ids[1:ids.index(tok.eos_id)]
    assert ids[0] == tok.bos_id
    texts = {p.read_text(encoding="utf-8") for p in source_tree.rglob("*.py") if "test" not in p.parts
             and p.name != "latin1.py"}
    assert tok.decode(first) in texts
    # Indentation is one piece per level.
    code = "def f(x):\n    if x:\n        return 1\n"
    pieces = [tok.sp_model.id_to_piece(i) for i in tok.encode(code, bos=False, eos=False)]
    assert "\n\u2581\u2581\u2581\u2581\u2581\u2581\u2581\u2581" in pieces and INDENT_SYMBOLS[2] in pieces
    assert tok.decode(tok.encode(code, bos=False, eos=False)) == code
    again = prepare_corpus(corpus.dir, source_tree, vocab_size=400, log=lambda *a: None)
    assert again.manifest == corpus.manifest
    assert corpus.manifest["heldout_files"] == ["test/test_heapq.py"]


def test_corpus_rebuilds_when_files_change(source_tree, tmp_path):
    messages = []
    first = prepare_corpus(tmp_path, source_tree, vocab_size=400, log=messages.append)
    extra = source_tree / "pkg" / "added.py"
    extra.write_text("def added():\n    return 42\n")
    try:
        second = prepare_corpus(tmp_path, source_tree, vocab_size=400, log=messages.append)
    finally:
        extra.unlink()
    assert "pkg/added.py" in second.manifest["train_files"]
    assert second.manifest["train_tokens"] > first.manifest["train_tokens"]
    assert not any("reusing" in m for m in messages)


def test_extra_sources_add_training_files_only_and_never_a_heldout_text(source_tree, corpus, tmp_path):
    """A second folder (a GPU run's site-packages) only adds training tokens; a file whose text is a
    held-out file's is left out; the size cap keeps a deterministic subset; a given tokenizer is reused."""
    extra = tmp_path / "site"
    (extra / "lib").mkdir(parents=True)
    for i in range(6):
        (extra / "lib" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    leaked = (source_tree / "test" / "test_heapq.py").read_text(encoding="utf-8")
    (extra / "tests").mkdir()
    (extra / "tests" / "copy_of_heldout.py").write_text(leaked, encoding="utf-8")
    tokenizer = corpus.dir / "tokenizer.model"
    messages = []
    bigger = prepare_corpus(tmp_path / "c1", source_tree, vocab_size=400, extra_sources=[extra],
                            tokenizer_path=tokenizer, log=messages.append)
    assert bigger.manifest["extra_files"] == 6                     # the held-out copy is not among them
    assert bigger.manifest["heldout_files"] == corpus.manifest["heldout_files"]
    assert bigger.manifest["heldout_tokens"] == corpus.manifest["heldout_tokens"]
    assert (bigger.dir / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    extra_tokens = sum(len(corpus.tokenizer.encode((extra / "lib" / f"mod{i}.py").read_text(), True, True))
                       for i in range(6))
    assert bigger.manifest["train_tokens"] == corpus.manifest["train_tokens"] + extra_tokens
    capped = prepare_corpus(tmp_path / "c2", source_tree, vocab_size=400, extra_sources=[extra],
                            extra_max_mb=2.5 * len((extra / "lib" / "mod1.py").read_bytes()) / 1e6,
                            tokenizer_path=tokenizer, log=messages.append)
    assert capped.manifest["extra_files"] == 2
    again = prepare_corpus(tmp_path / "c1", source_tree, vocab_size=400, extra_sources=[extra],
                           tokenizer_path=tokenizer, log=messages.append)
    assert again.manifest == bigger.manifest and any("reusing" in m for m in messages)
    with pytest.raises(ValueError, match="has 400 pieces but vocab_size is 512"):
        prepare_corpus(tmp_path / "c3", source_tree, vocab_size=512, tokenizer_path=tokenizer, log=messages.append)
    # the source given again as an extra folder adds nothing: its training files are in already
    twice = prepare_corpus(tmp_path / "c4", source_tree, vocab_size=400, extra_sources=[source_tree, extra],
                           tokenizer_path=tokenizer, log=messages.append)
    assert twice.manifest["extra_files"] == 6 and twice.manifest["train_tokens"] == bigger.manifest["train_tokens"]


def test_corpus_folders_as_users_have_them(tmp_path):
    """Symlinked project folders are followed (each real folder once, a loop included); a byte-order
    mark is not text; a file name that is not UTF-8 is hashed, not a crash; a training side with no
    UTF-8 text is refused by name before SentencePiece; a damaged cache (a truncated token file, an
    empty manifest) is rebuilt, not reused into an mmap error."""
    src, other = tmp_path / "src", tmp_path / "other"
    (src / "test").mkdir(parents=True)
    other.mkdir()
    for name in SOURCES[:2]:
        (src / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    (other / "with_bom.py").write_bytes(b"\xef\xbb\xbf" + (STDLIB / SOURCES[2]).read_bytes())
    (src / "linked").symlink_to(other, target_is_directory=True)
    (other / "back").symlink_to(src, target_is_directory=True)          # a loop
    (src / "test" / "test_heapq.py").write_text((STDLIB / "test" / "test_heapq.py").read_text(encoding="utf-8"))
    (src / os.fsdecode(b"caf\xe9.py")).write_text("y = 2\n" * 40)
    (src / "alias").symlink_to(src / "test", target_is_directory=True)   # inside the root: not followed
    found = [f.relative_to(src).as_posix() for f in find_source_files(src)]
    assert "linked/with_bom.py" in found and len(found) == len(set(found)) == 5
    assert "test/test_heapq.py" in found and not any(f.startswith("alias/") for f in found)
    corpus = prepare_corpus(tmp_path / "c", src, vocab_size=400, log=lambda *a: None)
    stream = corpus.tokenizer.decode(load_tokens(corpus.train_path).tolist())
    assert "\ufeff" not in stream and (STDLIB / SOURCES[2]).read_text(encoding="utf-8")[:200] in stream
    (tmp_path / "c" / "train.bin").write_bytes((tmp_path / "c" / "train.bin").read_bytes()[:100])
    messages = []
    again = prepare_corpus(tmp_path / "c", src, vocab_size=400, log=messages.append)
    assert not any("reusing" in m for m in messages) and len(load_tokens(again.train_path)) > 50
    (tmp_path / "c" / "manifest.json").write_text("")
    messages.clear()
    prepare_corpus(tmp_path / "c", src, vocab_size=400, log=messages.append)
    assert not any("reusing" in m for m in messages)
    # A rebuild (another vocabulary) cut short while writing tokens leaves no manifest vouching for
    # its new tokenizer beside the old token files: the next call rebuilds, it does not reuse them.
    from mtp_engine import data as data_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    write_tokens = data_module._write_tokens
    data_module._write_tokens = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(tmp_path / "c", src, vocab_size=420, log=lambda *a: None)
    finally:
        data_module._write_tokens = write_tokens
    messages.clear()
    rebuilt = prepare_corpus(tmp_path / "c", src, vocab_size=400, log=messages.append)
    assert not any("reusing" in m for m in messages) and rebuilt.tokenizer.n_words == 400
    latin = tmp_path / "latin"
    (latin / "test").mkdir(parents=True)
    for i in range(3):
        (latin / f"m{i}.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1") * 50)
    (latin / "test" / "test_m.py").write_text("x = 1\n" * 50)
    with pytest.raises(ValueError, match=r"only 1 of the 4 files ending in \('\.py',\) under .* hold UTF-8 text"):
        prepare_corpus(tmp_path / "c4", latin, vocab_size=400, log=lambda *a: None)


def test_token_files_are_written_in_batches_of_bounded_text(corpus, tmp_path, monkeypatch):
    """_write_tokens hands SentencePiece about batch_chars of text at a time (256 files of 10 MB took
    ~100 GB as Python ints), a long file in pieces cut after blank lines; the stream decodes to each
    file's exact text between bos and eos."""
    from mtp_engine import data as data_module

    files = [STDLIB / name for name in SOURCES[:3]] + [tmp_path / "one_line.py"]
    (tmp_path / "one_line.py").write_text("x = 1; " * 400)
    tokenizer = corpus.tokenizer
    batches = []
    encode_batch = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda texts, **kw: batches.append(texts) or encode_batch(texts, **kw))
    total = data_module._write_tokens(tokenizer, files, tmp_path / "t.bin", batch_chars=1000)
    assert max(sum(map(len, b)) for b in batches) < 2000 and len(batches) > 4
    ids = np.fromfile(tmp_path / "t.bin", dtype=data_module.token_dtype(tokenizer.n_words)).tolist()
    assert len(ids) == total and ids.count(tokenizer.bos_id) == ids.count(tokenizer.eos_id) == len(files)
    texts, current = [], None
    for i in ids:
        if i == tokenizer.bos_id:
            current = []
        elif i == tokenizer.eos_id:
            texts.append(tokenizer.decode(current))
        else:
            current.append(i)
    assert texts == [f.read_text(encoding="utf-8") for f in files]


def test_unreadable_names_are_skipped_and_a_heldout_side_without_text_is_split_anew(tmp_path):
    """A dangling or looping symlink is not a source file (it crashed the cache's fingerprint); held-out
    files that are all empty or not UTF-8 would leave nothing to evaluate: such files are on neither
    side of the split."""
    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    for name in SOURCES[:3]:
        (src / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    (src / "test" / "test_heapq.py").write_text((STDLIB / "test" / "test_heapq.py").read_text(encoding="utf-8"))
    (src / "dangling.py").symlink_to(src / "nowhere.py")
    (src / "loop.py").symlink_to(src / "loop.py")
    assert [f.name for f in find_source_files(src)] == sorted(SOURCES[:3]) + ["test_heapq.py"]
    corpus = prepare_corpus(tmp_path / "c", src, vocab_size=400, log=lambda *a: None)
    assert corpus.manifest["heldout_tokens"] > 0
    (src / "test" / "test_heapq.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    # its only held-out file not UTF-8: on neither side, and the share holds out one of the others
    messages = []
    again = prepare_corpus(tmp_path / "c2", src, vocab_size=400, log=messages.append)
    assert len(again.manifest["heldout_files"]) == 1 and "test/test_heapq.py" not in again.manifest["heldout_files"]
    assert again.manifest["heldout_tokens"] > 0 and any("left out 1 file(s) empty or not UTF-8" in m for m in messages)
    for bad in (0, -1, 2.5):   # -1 silently dropped one file (order[:-1])
        with pytest.raises(ValueError, match="max_train_files must be None or a positive int"):
            prepare_corpus(tmp_path / "c3", src, vocab_size=400, max_train_files=bad, log=lambda *a: None)


def test_packed_batches_are_deterministic_and_cover_windows(corpus):
    data = PackedTokens(corpus.train_path, 32)
    a = data.batch(4, seed=3, index=5)
    assert a.shape == (4, 32) and a.dtype == torch.int64
    assert torch.equal(a, data.batch(4, seed=3, index=5))
    assert not torch.equal(a, data.batch(4, seed=4, index=5))
    # One epoch visits each window at most once.
    per_epoch = len(data) // 4
    seen = torch.cat([data.batch(4, 0, i) for i in range(per_epoch)])
    all_windows = Counter(tuple(data.window(i).tolist()) for i in range(len(data)))
    drawn = Counter(tuple(r.tolist()) for r in seen)
    assert all(all_windows[w] >= c for w, c in drawn.items()) and sum(drawn.values()) == per_epoch * 4
    # Rank r of 2 takes every other global batch.
    it = data.batches(4, seed=0, start=2, rank=1, world_size=2)
    assert torch.equal(next(it), data.batch(4, 0, 3)) and torch.equal(next(it), data.batch(4, 0, 5))


def test_data_errors_name_the_problem(tmp_path, corpus, source_tree):
    with pytest.raises(FileNotFoundError, match="corpus folder not found"):
        find_source_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files ending in"):
        find_source_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedTokens(corpus.heldout_path, 10 ** 7)
    with pytest.raises(ValueError, match="batch_size"):
        PackedTokens(corpus.heldout_path, 32).batch(10 ** 6, 0, 0)
    with pytest.raises(ValueError, match="vocab"):   # more pieces than the text has
        prepare_corpus(tmp_path / "big_vocab", source_tree, vocab_size=60000, log=lambda *a: None)
    assert not (tmp_path / "big_vocab" / "tokenizer_train.txt").exists()   # no copy of the corpus left behind


# ---------------------------------------------------------------------- the training step
def _tiny_model(n_future=4, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=n_future + 2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                  multiple_of=16, n_future_tokens=n_future, max_seq_len=64))
    init_weights(model)
    return model


@pytest.mark.parametrize("n_future", [1, 4])
def test_sequential_head_schedule_gives_the_batched_gradients(n_future):
    model = _tiny_model(n_future)
    tokens = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    weights = [1.0, 0.5, 0.25, 2.0][:n_future]
    batched = MTPTrainModel(model, head_weights=weights)
    out = batched(tokens)
    (out.loss * 0.5).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seq = batched.forward_backward_sequential(tokens, loss_scale=0.5)
    torch.testing.assert_close(seq.loss, out.loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seq.per_head, out.per_head, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match=r"tokens must be a \(batch, seq\) tensor, got \(21,\)"):
        batched.forward_backward_sequential(tokens[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_and_eval_run_under_bf16_autocast(device):
    """`mtp train` runs its steps and evals under bf16 autocast on CUDA: a block's output then comes back
    in bfloat16 while the residual stream stays float32, and the fused add + norm must take the pair.
    CPU autocast runs the same model code."""
    model = _tiny_model(4).to(device)
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3)).to(device)
    trainer = MTPTrainModel(model)
    ref = trainer(tokens)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = trainer(tokens)
        out.loss.backward()
    torch.testing.assert_close(out.per_head, ref.per_head, rtol=2e-2, atol=2e-2)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert torch.linalg.vector_norm(p.grad - ref_grads[name]) <= 0.1 * torch.linalg.vector_norm(ref_grads[name]), name
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        seq = trainer.forward_backward_sequential(tokens)
    torch.testing.assert_close(seq.per_head, out.per_head.detach(), rtol=1e-2, atol=1e-2)
    result = evaluate(model, tokens, autocast=lambda: torch.autocast(device, dtype=torch.bfloat16))
    plain = evaluate(model, tokens)
    np.testing.assert_allclose(result["loss"], plain["loss"], rtol=2e-2)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        logits = model(tokens, return_all_heads=True)
    assert logits.shape == (2, 19, 4, 97) and torch.isfinite(logits).all()


def test_fitted_schedule_keeps_the_warmup_unless_the_budget_is_shorter():
    from mtp_engine.train import _fit_schedule

    cfg = TrainConfig(max_steps=100_000, warmup_steps=40, time_budget_s=100.0, schedule_to_budget=True)
    long_run, fit = _fit_schedule(cfg, step=25, step_time_s=0.1, elapsed_s=5.0)
    assert long_run.warmup_steps == 40 and long_run.max_steps == fit["max_steps"] > 40
    short_run, fit = _fit_schedule(cfg, step=25, step_time_s=10.0, elapsed_s=5.0)   # 9 steps left: 34 in all
    assert short_run.max_steps == fit["max_steps"] < 40 and short_run.warmup_steps == short_run.max_steps


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_a_few_steps_lower_the_loss_and_write_a_meta_checkpoint(source_tree, corpus, tmp_path):
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=30, eval_every=30, save_every=30,
                      lr=1e-2, log_every=1)
    log = train(cfg, log=lambda *a: None)
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    out = tmp_path / "run"
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model", "optimizer.pt", "train_log.json",
                 "resume/consolidated.00.pth"):
        assert (out / name).is_file(), name
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert shard["output.weight"].dtype == torch.bfloat16                    # release copy in bf16
    assert torch.load(out / "resume" / "consolidated.00.pth", weights_only=True)["output.weight"].dtype == torch.float32
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["summary"]["steps"] == 30 and len(saved["evals"][-1]["loss"]) == 4
    assert 0 <= saved["evals"][-1]["acc"][0] <= 1


def test_resume_takes_the_same_next_step(source_tree, corpus, tmp_path):
    """Run 6 steps; separately run 3, stop, resume to 6: identical weights (data order, optimizer state,
    schedule all restored)."""
    full_cfg = tiny_config(source_tree, corpus, tmp_path / "full", max_steps=6, save_every=3, eval_every=3)
    train(full_cfg, log=lambda *a: None)
    part_cfg = tiny_config(source_tree, corpus, tmp_path / "part", max_steps=6, save_every=3, eval_every=3,
                           time_budget_s=0.0)                                   # stops (and saves) after step 1
    train(part_cfg, log=lambda *a: None)
    state = json.loads((tmp_path / "part" / "trainer_state.json").read_text())
    assert state["step"] == 1
    part_cfg.time_budget_s = None
    log = train(part_cfg, resume=True, log=lambda *a: None)
    assert log["summary"]["steps"] == 6
    a = torch.load(tmp_path / "full" / "resume" / "consolidated.00.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "resume" / "consolidated.00.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_save_cut_short_leaves_the_previous_save_whole(source_tree, corpus, tmp_path, monkeypatch):
    """A full disk while the step-4 save writes its weights (after its optimizer state): the step-2
    save stays whole (weights, optimizer state, trainer state), so --resume takes step 2's next step.
    Files of two saves (a rename cut short) are refused at resume, by AdamW's step count."""
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=6, save_every=2, eval_every=100)
    real_save, written = torch.save, []   # (file name, object) of every torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).name == "consolidated.00.pth.tmp" and len(written) == 3:   # the step-4 save's weights
            raise OSError(28, "No space left on device")
        written.append((Path(path).name, obj))
        real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, log=lambda *a: None)
    monkeypatch.setattr(torch, "save", real_save)
    out = tmp_path / "run"
    assert [name for name, _ in written] == ["optimizer.pt.tmp", "consolidated.00.pth.tmp", "optimizer.pt.tmp"]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2 and not list(out.glob("*.tmp"))
    assert all(int(s["step"]) == 2 for s in torch.load(out / "optimizer.pt", weights_only=True)["state"].values())
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(shard[k], v) for k, v in written[1][1].items())   # step 2's weights
    # A trainer state from another save than the optimizer's is refused by name.
    state = json.loads((out / "trainer_state.json").read_text())
    (out / "trainer_state.json").write_text(json.dumps({**state, "step": 4}))
    with pytest.raises(ValueError, match=r"optimizer.pt has taken 2 steps but .*trainer_state.json says step 4"):
        train(cfg, resume=True, log=lambda *a: None)


def test_data_order_depends_only_on_the_windows_read(corpus):
    """Two ranks of B windows read what one process of 2B reads, and two micro-batches what one
    batch twice as large reads, across the epoch boundary too (a batch there takes the last windows
    of one epoch's permutation and the first of the next's)."""
    data = PackedTokens(corpus.train_path, 32)
    n = len(data)
    for start in (0, 8, n - 6, 2 * n - 3):
        two_ranks = torch.cat([data.windows(start + r * 4, 4, seed=5) for r in range(2)])
        assert torch.equal(two_ranks, data.windows(start, 8, seed=5)), start
    epoch_one = data.windows(n, n, seed=5)
    assert sorted(map(tuple, epoch_one.tolist())) == sorted(map(tuple, data.windows(0, n, seed=5).tolist()))
    assert not torch.equal(epoch_one, data.windows(0, n, seed=5))       # another permutation


def test_resume_reads_on_from_the_windows_read(source_tree, corpus, tmp_path, monkeypatch):
    """A resumed run starts at the window count trainer_state.json holds (as a run on another number
    of ranks left it), not at its own step x batch."""
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=4, save_every=2, eval_every=100,
                      time_budget_s=0.0)
    train(cfg, log=lambda *a: None)                                   # stops after step 1
    path = tmp_path / "run" / "trainer_state.json"
    state = json.loads(path.read_text())
    assert state["step"] == 1 and state["windows_read"] == cfg.batch_size
    path.write_text(json.dumps({**state, "windows_read": 40}))         # as 2 ranks of 20 windows left it
    starts = []
    windows = PackedTokens.windows
    monkeypatch.setattr(PackedTokens, "windows", lambda self, start, count, seed: starts.append(start)
                        or windows(self, start, count, seed))
    cfg.time_budget_s = None
    train(cfg, resume=True, log=lambda *a: None)
    assert starts == [40, 44, 48]
    assert json.loads(path.read_text())["windows_read"] == 52
    # A save from before the count was kept: its token count says how many windows were read.
    state = json.loads(path.read_text())
    del state["windows_read"]
    path.write_text(json.dumps({**state, "tokens": 20 * cfg.seq_len}))
    starts.clear()
    cfg.max_steps = 5
    train(cfg, resume=True, log=lambda *a: None)
    assert starts == [20]


def test_a_final_save_cut_short_never_leaves_the_release_copy_as_master_weights(source_tree, corpus, tmp_path,
                                                                               monkeypatch):
    """The final save's renames cut short at trainer_state.json: `out` must still hold the float32
    weights of the periodic save a resume reads (the bf16 release copy is renamed last)."""
    from mtp_engine import checkpoint

    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=2, save_every=2, eval_every=100)
    renames, real_replace = [], os.replace

    def cut(src, dst):
        renames.append(Path(dst).name)
        if Path(dst).name == "trainer_state.json" and renames.count("trainer_state.json") == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *a: None)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    out = tmp_path / "run"
    assert json.loads((out / "trainer_state.json").read_text())["final"] is False
    assert torch.load(out / "consolidated.00.pth", weights_only=True)["output.weight"].dtype == torch.float32
    cfg.max_steps = 3
    assert train(cfg, resume=True, log=lambda *a: None)["summary"]["steps"] == 3


@pytest.fixture
def step_clock(monkeypatch):
    """The training loop's clock, moved 1/16 s by each optimizer step and by nothing else: the
    schedule fit and the budget then read the same times however busy the machine is (with the real
    clock a loaded 2-core box ran out of a 4 s budget before the fit at step 25, as the fit was then)."""
    import mtp_engine.train as train_module

    clock = {"now": 1024.0}   # (1/16 s steps add up exactly)
    real_step = train_module._optimizer_step

    def timed_step(*args, **kwargs):
        clock["now"] += 0.0625
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", timed_step)
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    return clock


@pytest.mark.parametrize("by_share,at_step", [(0.2, 7), (1.0, 25)])
def test_schedule_fitted_to_the_time_budget(source_tree, corpus, tmp_path, step_clock, monkeypatch, by_share,
                                            at_step):
    """A fresh run with schedule_to_budget times steps 5..25 and sets max_steps from that, or fits
    earlier (at least 2 steps timed) once a fifth of the budget is gone; the cosine then ends (lr at its
    floor) on the last step, and the fitted value is in the log for a resume."""
    import mtp_engine.train as train_module

    monkeypatch.setattr(train_module, "_FIT_BY_SHARE", by_share)
    cfg = tiny_config(source_tree, corpus, tmp_path / "fit", max_steps=100_000, warmup_steps=2, log_every=1,
                      eval_every=100_000, save_every=100_000, time_budget_s=2.0, schedule_to_budget=True)
    log = train(cfg, log=lambda *a: None)
    fitted = log["schedule_fit"]
    # 1/16 s a step: a fifth of 2 s is gone at step 7 (or 1.5625 s at step 25), and 95% of 2 s leaves
    # 23 more steps (5): 30 either way.
    assert fitted["at_step"] == at_step and fitted["step_time_s"] == 0.0625
    assert fitted["max_steps"] == 30
    assert log["config"]["max_steps"] == fitted["max_steps"] == log["summary"]["steps"]
    fitted_cfg = TrainConfig(**log["config"])
    last = log["steps"][-1]
    assert last["lr"] == pytest.approx(lr_at(last["step"] - 1, fitted_cfg))
    assert lr_at(fitted["max_steps"], fitted_cfg) == pytest.approx(cfg.min_lr_ratio * cfg.lr)   # ends at the floor
    with pytest.raises(ValueError, match="schedule_to_budget needs time_budget_s"):
        tiny_config(source_tree, corpus, tmp_path, schedule_to_budget=True).validate()


def test_resumed_run_keeps_the_fitted_schedule(source_tree, corpus, tmp_path, monkeypatch, step_clock):
    """A run stopped after its schedule fit (step 7: a fifth of the budget) resumes on the fitted max_steps and warmup, from
    trainer_state.json: `train(cfg, resume=True)` with the original cfg, as the CLI's path does."""
    import mtp_engine.train as train_module

    class Stop(Exception):
        pass

    save = train_module._save

    def save_then_stop(out, module, wrapped, optimizer, state, run_log, cfg, env, final):
        save(out, module, wrapped, optimizer, state, run_log, cfg, env, final)
        if state["step"] == 26 and not final:
            raise Stop

    cfg = tiny_config(source_tree, corpus, tmp_path / "fit", max_steps=100_000, warmup_steps=20, log_every=1,
                      eval_every=100_000, save_every=26, time_budget_s=2.0, schedule_to_budget=True)
    monkeypatch.setattr(train_module, "_save", save_then_stop)
    with pytest.raises(Stop):
        train(dataclasses.replace(cfg), log=lambda *a: None)
    monkeypatch.setattr(train_module, "_save", save)
    fitted = json.loads((tmp_path / "fit" / "trainer_state.json").read_text())["schedule_fit"]
    assert fitted["at_step"] == 7 and fitted["warmup_steps"] == 20 < fitted["max_steps"]   # warmup kept
    log = train(dataclasses.replace(cfg), resume=True, log=lambda *a: None)
    fitted_cfg = dataclasses.replace(cfg, max_steps=fitted["max_steps"], warmup_steps=fitted["warmup_steps"])
    assert log["config"]["max_steps"] == fitted["max_steps"] and log["schedule_fit"] == fitted
    assert log["summary"]["steps"] == fitted["max_steps"]
    for entry in log["steps"]:
        assert entry["lr"] == pytest.approx(lr_at(entry["step"] - 1, fitted_cfg)), entry["step"]


def test_logged_loss_is_the_head_weighted_objective(source_tree, corpus, tmp_path):
    weights = [1.0, 0.5, 0.0, 2.0]
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=2, log_every=1, eval_every=2, save_every=2,
                      head_weights=weights)
    log = train(cfg, log=lambda *a: None)
    for entry in log["steps"]:
        assert entry["loss"] == pytest.approx(sum(w * x for w, x in zip(weights, entry["per_head"])))
    assert log["summary"]["final_loss"] == log["steps"][-1]["loss"]


def test_cli_resume_continues_the_given_folder_and_refuses_changed_flags(source_tree, corpus, tmp_path, monkeypatch):
    """`mtp train --resume --out-dir D` continues the run in D even when D is a copy made elsewhere
    (the log's paths are absolute, so another working folder finds the corpus), takes the resumable
    knobs (--max-steps), and names any other flag whose value differs from the run's instead of
    dropping it. A damaged run folder is an error naming the file."""
    cfg = tiny_config(source_tree, corpus, tmp_path / "first", max_steps=2, save_every=2, eval_every=2)
    train(absolute_paths(cfg), log=lambda *a: None)
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(tmp_path / "copy")
    base = ["--preset", "tiny", "--resume", "--out-dir", ".", "--no-progress"]
    with pytest.raises(ValueError, match=r"flags differ from it: --batch-size 2 \(the run has 4\); --lr 1e-05 "
                                         r"\(the run has 0\.003\)\. Leave them out"):
        run(parser.parse_args(base + ["--max-steps", "3", "--lr", "1e-5", "--batch-size", "2"]))
    # the same values as the run's are no clash (paths compared as folders, relative or not)
    assert run(parser.parse_args(base + ["--max-steps", "3", "--lr", "0.003", "--seq-len", "48",
                                         "--corpus-dir", os.path.relpath(corpus.dir)])) == 0
    assert json.loads((tmp_path / "copy" / "trainer_state.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "first" / "trainer_state.json").read_text())["step"] == 2
    # A log older than a field ran with the field's default: repeating the default is no clash.
    log = json.loads((tmp_path / "copy" / "train_log.json").read_text())
    del log["config"]["extensions"], log["config"]["heldout_fraction"]
    (tmp_path / "copy" / "train_log.json").write_text(json.dumps(log))
    resumed = resumed_config(dataclasses.replace(cfg, out_dir=str(tmp_path / "copy"), extensions=[".py"],
                                                 heldout_fraction=0.05), {"extensions", "heldout_fraction"})
    assert tuple(resumed.extensions) == (".py",) and resumed.heldout_fraction == 0.05
    assert resumed_config(dataclasses.replace(cfg, out_dir=str(tmp_path / "copy"), extensions=[".PY", ".py"]),
                          {"extensions"}).extensions == (".py",)   # endings match in any case: no clash
    with pytest.raises(ValueError, match=r"--extension \['\.txt'\] \(the run has \['\.py'\]\)"):
        resumed_config(dataclasses.replace(cfg, out_dir=str(tmp_path / "copy"), extensions=[".txt"]), {"extensions"})
    (tmp_path / "copy" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"optimizer\.pt is missing: the run cannot resume at step 3"):
        run(parser.parse_args(base + ["--max-steps", "4"]))
    (tmp_path / "copy" / "trainer_state.json").write_text("{'step': 3")
    with pytest.raises(ValueError, match=r"copy/trainer_state\.json is not valid JSON"):
        run(parser.parse_args(base + ["--max-steps", "4"]))


def test_train_never_writes_over_another_model_and_a_finished_run_trains_nothing(source_tree, corpus, tmp_path,
                                                                                 monkeypatch):
    """A new run into a folder that holds a model is refused (the model would be replaced without a
    word), and so is --resume there when the folder holds no run to resume (a distilled copy); a run
    already at its --max-steps, or past its time budget, trains nothing and keeps its log (no NaN
    summary); --preset other than the run's is an error."""
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=2, save_every=2, eval_every=2)
    train(absolute_paths(cfg), log=lambda *a: None, preset="tiny")
    out = tmp_path / "run"
    before = (out / "train_log.json").read_text()
    with pytest.raises(ValueError, match=r"run already holds a model \(consolidated\.00\.pth, optimizer\.pt, "
                                         r"params\.json.*: mtp train would write over it; pass --resume to continue"):
        train(cfg, log=lambda *a: None)
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for name in ("params.json", "consolidated.00.pth", "tree.json"):
        shutil.copyfile(out / name if name != "tree.json" else out / "params.json", model_only / name)
    with pytest.raises(ValueError, match="no trainer_state.json, so it is no run --resume continues"):
        train(dataclasses.replace(cfg, out_dir=str(model_only)), resume=True, log=lambda *a: None)
    said = []
    assert train(cfg, resume=True, log=said.append)["summary"]["steps"] == 2
    assert said == [f"nothing to train: the run in {out} is at step 2 and --max-steps is 2; pass a larger "
                    "--max-steps to train on"]
    assert (out / "train_log.json").read_text() == before and "NaN" not in before
    spent = json.loads((out / "trainer_state.json").read_text())["train_time_s"]
    said.clear()
    train(dataclasses.replace(cfg, max_steps=5, time_budget_s=spent / 2), resume=True, log=said.append)
    assert said[0].startswith("nothing to train") and "--time-budget-s" in said[0]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=r"--preset cpu \(the run was started with --preset tiny\)"):
        run(parser.parse_args(["--preset", "cpu", "--resume", "--out-dir", str(out), "--max-steps", "3"]))


def test_sequential_schedule_trains_like_batched(source_tree, corpus, tmp_path):
    runs = {}
    for schedule in ("batched", "sequential"):
        cfg = tiny_config(source_tree, corpus, tmp_path / schedule, max_steps=4, head_schedule=schedule,
                          eval_every=4, save_every=4)
        runs[schedule] = train(cfg, log=lambda *a: None)["summary"]["final_loss"]
    assert runs["batched"] == pytest.approx(runs["sequential"], rel=1e-4)


def test_a_compiled_training_step_trains_like_eager(source_tree, corpus, tmp_path):
    """--compile: the step (forward, loss, backward) as one fullgraph torch.compile graph, or with the
    sequential head schedule each block compiled on its own. aot_eager needs no C++ compiler; the
    logged losses and gradient norms of every step equal eager's (up to the compiler's rounding), and
    the checkpoint is the eager module's (no compile wrapper in its names)."""
    import torch._dynamo

    logs = {}
    for schedule, backend in (("batched", None), ("batched", "aot_eager"), ("sequential", None),
                              ("sequential", "aot_eager")):
        torch._dynamo.reset()
        out = tmp_path / f"{schedule}_{backend}"
        said = []
        cfg = tiny_config(source_tree, corpus, out, max_steps=4, log_every=1, eval_every=4, save_every=4,
                          compile=backend, head_schedule=schedule)
        summary = train(cfg, log=said.append)["summary"]   # (graphs of earlier runs in this process not counted)
        graphs = summary.get("compiled_graphs")
        if backend is None:
            assert graphs is None
        else:   # the step in one fullgraph graph; or the blocks, a graph each at least
            assert graphs == 1 if schedule == "batched" else graphs >= 1
        # the gradient norm before clipping too: AdamW and clipping would hide a wrong gradient scale
        logs[schedule, backend] = [(entry["loss"], entry["grad_norm"])
                                   for entry in json.loads((out / "train_log.json").read_text())["steps"]]
        assert any("compiled with torch.compile (backend aot_eager)" in line for line in said) == (backend is not None)
        assert not any("_orig_mod" in key for key in torch.load(out / "consolidated.00.pth", weights_only=True))
    for schedule in ("batched", "sequential"):
        assert len(logs[schedule, None]) == 4
        for got, want in zip(logs[schedule, "aot_eager"], logs[schedule, None]):
            assert got == pytest.approx(want, rel=1e-5)


def test_blocks_compiled_for_a_fitted_schedule_compile_their_evaluation_variants_first(source_tree, corpus, tmp_path,
                                                                                         monkeypatch):
    """With the blocks compiled (sequential schedule) and the schedule fitted to a time budget, the
    blocks' no-grad variants are compiled before the first step (one evaluation up front): compiled
    at the first evaluation, inside the steps the fit times, they read as step time."""
    import torch._dynamo

    import mtp_engine.train as train_module

    torch._dynamo.reset()   # (no graphs cached by the tests before)
    calls = []
    real = train_module.evaluate

    def recording(*args, **kwargs):
        before = train_module._compiled_graphs()
        result = real(*args, **kwargs)
        calls.append(train_module._compiled_graphs() - before)
        return result
    monkeypatch.setattr(train_module, "evaluate", recording)
    cfg = tiny_config(source_tree, corpus, tmp_path / "run", max_steps=30, eval_every=2, save_every=30,
                      head_schedule="sequential", compile="aot_eager", time_budget_s=1.5, schedule_to_budget=True)
    train(cfg, log=lambda *a: None)
    assert len(calls) >= 2 and calls[0] >= 1 and not any(calls[1:]), calls


def test_compile_flag_is_checked_and_may_change_on_resume(source_tree, corpus, tmp_path):
    """--compile names a backend; a resumed run may change it, or go back to eager with none."""
    for name in ("fastest", "relu_runtime_error_TESTING_ONLY"):   # (the second: one of Dynamo's test backends)
        with pytest.raises(ValueError, match="compile must be none \\(eager\\) or a torch.compile backend"):
            tiny_config(source_tree, corpus, tmp_path, compile=name).validate()
    for strategy in ("ddp", "fsdp"):
        tiny_config(source_tree, corpus, tmp_path, compile="aot_eager", distributed=strategy).validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--preset", "tiny", "--compile", "aot_eager"])).compile == "aot_eager"
    assert config_from_args(parser.parse_args(["--preset", "tiny", "--compile", "none"])).compile is None
    # a run started compiled resumes eagerly with --compile none (and another backend with its name)
    out = tmp_path / "run"
    train(tiny_config(source_tree, corpus, out, max_steps=2, save_every=2, eval_every=2, compile="aot_eager"),
          log=lambda *a: None)
    for flag, want in (("none", None), ("inductor", "inductor"), (None, "aot_eager")):
        args = parser.parse_args(["--preset", "tiny", "--resume", "--out-dir", str(out)]
                                 + (["--compile", flag] if flag else []))
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
        assert resumed_config(absolute_paths(config_from_args(args)), given | {"out_dir"}).compile == want


def test_activation_checkpointing_trains_like_the_plain_run_and_may_change_on_resume(source_tree, corpus, tmp_path):
    """--activation-checkpointing: the same losses, gradient norms and evaluation as the plain run, step
    for step (both head schedules); the flag is checked, parses both ways, and a resumed run may turn
    it on or off."""
    logs = {}
    for schedule in ("batched", "sequential"):
        for checkpointed in (False, True):
            cfg = tiny_config(source_tree, corpus, tmp_path / f"{schedule}{checkpointed}", max_steps=3, log_every=1,
                              eval_every=3, save_every=3, head_schedule=schedule,
                              activation_checkpointing=checkpointed)
            said = []
            log = train(cfg, log=said.append)
            assert any("activation checkpointing" in line for line in said) == checkpointed
            logs[schedule, checkpointed] = ([(e["loss"], e["grad_norm"]) for e in log["steps"]]
                                            + [tuple(log["summary"]["final_eval"]["loss"])])
        assert len(logs[schedule, True]) == 4
        for got, want in zip(logs[schedule, True], logs[schedule, False]):
            assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="activation_checkpointing must be True or False, got 'yes'"):
        tiny_config(source_tree, corpus, tmp_path, activation_checkpointing="yes").validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flags, want in (([], False), (["--activation-checkpointing"], True), (["--no-activation-checkpointing"], False)):
        assert config_from_args(parser.parse_args(["--preset", "tiny"] + flags)).activation_checkpointing is want
    out = str(tmp_path / "batchedTrue")
    for flags, want in (([], True), (["--no-activation-checkpointing"], False)):
        args = parser.parse_args(["--preset", "tiny", "--resume", "--out-dir", out] + flags)
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
        assert resumed_config(absolute_paths(config_from_args(args)), given | {"out_dir"}).activation_checkpointing \
            is want


def test_bad_config_is_a_clear_error(source_tree, corpus, tmp_path):
    with pytest.raises(ValueError, match="head_schedule"):
        tiny_config(source_tree, corpus, tmp_path, head_schedule="zigzag").validate()
    with pytest.raises(ValueError, match="head_weights"):
        tiny_config(source_tree, corpus, tmp_path, head_weights=[1.0]).validate()
    for change, match in (({"grad_clip": -1.0}, "grad_clip must be > 0"), ({"grad_clip": float("nan")}, "grad_clip"),
                          ({"lr": float("inf")}, "lr must be a finite number"), ({"beta2": 1.0}, "betas"),
                          ({"head_weights": [1.0, float("nan"), 1.0, 1.0]}, "head_weights must be finite"),
                          ({"time_budget_s": -5.0}, "time_budget_s"), ({"extra_max_mb": float("nan")}, "extra_max_mb"),
                          ({"n_heads": 0}, "TrainConfig: n_heads must be a positive int"),
                          ({"dim": 30}, "not divisible by n_heads")):
        with pytest.raises(ValueError, match=match):
            tiny_config(source_tree, corpus, tmp_path, **change).validate()
    for name, value, match in (("max_train_files", 0, "max_train_files must be None or a positive int"),
                               ("seq_len", 1, "seq_len must be an int >= 2"),   # fields tiny_config sets
                               ("seq_len", 4, r"seq_len 4 leaves head 3 \(token t\+4\) no target"),
                               ("device", "bogus", "'bogus' is not a torch device")):
        cfg = tiny_config(source_tree, corpus, tmp_path)
        setattr(cfg, name, value)
        with pytest.raises(ValueError, match=match):
            cfg.validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda was asked for but CUDA is not available"):
            tiny_config(source_tree, corpus, tmp_path, device="cuda").validate()
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        preset_config("tiny", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_mtp_train_under_torchrun_two_processes(source_tree, corpus, tmp_path, strategy):
    """`mtp train` end to end under torchrun (gloo, 2 CPU processes), resuming a run that one process
    started with the same command (its optimizer state is keyed by index; the ranks must key it by
    name, or AdamW restarts from zero and the next save fails): steps, evaluation (FSDP gathers the
    root's parameters), a Meta checkpoint from the sharded model; rank 1 alone passes the time budget
    (its clock runs fast): both ranks stop together, at the budget check of step 8, and save (a rank
    that stopped alone left the other in a collective: a crash or a hang). The data goes on from the
    windows the one process read; then one process resumes the ranks' run."""
    import os
    import subprocess
    import sys

    import socket

    with socket.socket() as sock:          # torchrun's own port 0 hangs in rendezvous: pick a free one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    args = ["train", "--preset", "tiny", "--source", str(source_tree), "--corpus-dir", str(corpus.dir),
            "--vocab-size", "400", "--seq-len", "48", "--out-dir", str(out), "--no-progress",
            "--distributed", strategy, "--eval-every", "2", "--save-every", "2"]
    skewed = str(Path(__file__).parent / "_skewed_clock_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ([sys.executable, "-m", "mtp_engine"] + args + ["--max-steps", "2"],
                    launch + [skewed] + args + ["--max-steps", "100", "--time-budget-s", "1e6", "--resume"]):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["summary"]["steps"] == 8 and [e["step"] for e in log["evals"]] == [2, 4, 6, 8]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["windows_read"] == 4 * (2 + 2 * 6)   # batch 4: 2 steps of 1 rank, 6 of 2
    assert all(int(s["step"]) == 8 for s in torch.load(out / "optimizer.pt", weights_only=True)["state"].values())
    model_state = torch.load(out / "resume" / "consolidated.00.pth", weights_only=True)
    assert model_state["output.weight"].shape == (400, 32)
    assert "resuming" in proc.stdout
    # And back to one process: the ranks' state (keyed by name) loads there too.
    proc = subprocess.run([sys.executable, "-m", "mtp_engine"] + args + ["--max-steps", "9", "--resume"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["windows_read"] == 4 * (2 + 2 * 6 + 1)
    assert all(int(s["step"]) == 9 for s in torch.load(out / "optimizer.pt", weights_only=True)["state"].values())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_and_checkpointed_training_under_torchrun_trains_like_eager(source_tree, corpus, tmp_path, strategy):
    """`mtp train --distributed ddp|fsdp` under torchrun (gloo, 2 CPU processes) with `--compile
    aot_eager`, and with `--activation-checkpointing`: the same losses, gradient norms and held-out
    evaluation as the eager run, step for step (DDP: the step compiled, its own forward a graph break;
    FSDP: each block compiled, the gathers between; checkpointed blocks recompute inside FSDP's
    gathers around each block's backward)."""
    import os
    import socket
    import subprocess
    import sys

    logs = {}
    for variant, flags in (("eager", []), ("compiled", ["--compile", "aot_eager"]),
                           ("checkpointed", ["--activation-checkpointing"])):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        out = tmp_path / variant
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                   "-m", "mtp_engine", "train", "--preset", "tiny", "--source", str(source_tree), "--corpus-dir",
                   str(corpus.dir), "--vocab-size", "400", "--seq-len", "48", "--out-dir", str(out), "--no-progress",
                   "--distributed", strategy, "--max-steps", "3", "--log-every", "1", "--eval-every", "3",
                   "--save-every", "3"] + flags
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("compiled with torch.compile" in proc.stdout) == (variant == "compiled")
        assert ("activation checkpointing:" in proc.stdout) == (variant == "checkpointed")
        log = json.loads((out / "train_log.json").read_text())
        assert (log["summary"].get("compiled_graphs", 0) >= 1) == (variant == "compiled")
        logs[variant] = ([(e["loss"], e["grad_norm"]) for e in log["steps"]]
                         + [tuple(log["summary"]["final_eval"]["loss"])])
    assert len(logs["eager"]) == 4
    for variant in ("compiled", "checkpointed"):
        for got, want in zip(logs[variant], logs["eager"]):
            assert got == pytest.approx(want, rel=1e-5), variant


def test_a_run_shorter_than_the_warmup_keeps_the_presets_warmup_share(monkeypatch):
    """`mtp train --max-steps 40` (the default preset warms up for 100 of 2000 steps) warms up for
    the same 5%, as `mtp distill --steps 10` does (30 of 600), instead of refusing the run; a given
    --warmup-steps is kept, and an out-of-range one is still an error."""
    import argparse
    from mtp_engine import distill
    from mtp_engine.train import PRESETS, add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = PRESETS["default"]
    assert config_from_args(parser.parse_args(["--max-steps", "40"])).warmup_steps \
        == default["warmup_steps"] * 40 // default["max_steps"] == 2
    assert config_from_args(parser.parse_args(["--max-steps", "400"])).warmup_steps == default["warmup_steps"]
    assert config_from_args(parser.parse_args(["--max-steps", "40", "--warmup-steps", "7"])).warmup_steps == 7
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, max_steps=40\], got 50"):
        config_from_args(parser.parse_args(["--max-steps", "40", "--warmup-steps", "50"])).validate()

    def stop_at_validation(cfg):   # the config run() builds, before any model is loaded
        raise SystemExit(cfg)

    monkeypatch.setattr(distill.DistillConfig, "validate", stop_at_validation)
    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    for argv, want in ((["--steps", "10"], 30 * 10 // 600), (["--steps", "200"], 30),
                       (["--steps", "10", "--warmup-steps", "4"], 4)):
        with pytest.raises(SystemExit) as stopped:
            distill.run(parser.parse_args(["--out-dir", "x"] + argv))
        assert stopped.value.code.warmup_steps == want


def test_a_resume_over_a_changed_corpus_keeps_the_runs_tokenizer(source_tree, tmp_path):
    """Files added to the source since the run started: a resume tokenizes them with the run's own
    tokenizer.model (a new one would give the run's weights other token ids) and says the corpus
    changed."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_tree, src)
    cfg = preset_config("tiny", source=str(src), corpus_dir=str(tmp_path / "corpus"), vocab_size=400,
                        out_dir=str(tmp_path / "run"), progress=False, max_train_files=None, seq_len=48,
                        max_steps=4, time_budget_s=0.0)                       # stops after step 1
    train(cfg, log=lambda *a: None)
    tokenizer = (tmp_path / "run" / "tokenizer.model").read_bytes()
    lines = []
    cfg.time_budget_s, cfg.max_steps = None, 2
    train(cfg, resume=True, log=lambda *a: lines.append(" ".join(map(str, a))))   # unchanged: the cache as is
    assert any("corpus: reusing the cache" in line for line in lines)
    for name in ("argparse.py", "dataclasses.py"):
        shutil.copy(STDLIB / name, src / name)
    lines.clear()
    cfg.max_steps = 4
    train(cfg, resume=True, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == tokenizer
    assert (tmp_path / "corpus" / "tokenizer.model").read_bytes() == tokenizer
    assert any("warning: the corpus changed since the run started" in line for line in lines)
    lines.clear()   # an unchanged corpus: the cache (built with the run's tokenizer) is reused as is
    cfg.max_steps = 5
    train(cfg, resume=True, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("corpus: reusing the cache" in line for line in lines)
    assert not any("corpus changed" in line for line in lines)


def test_no_heldout_text_is_trained_on_through_links_copies_or_empty_files(tmp_path):
    """A symlink to a held-out file (the split hashes names: the alias went to training), a copy of
    one, and empty or non-UTF-8 files (an empty one could be the only held-out file, and the run then
    refused to start): the held-out text is never in training, the unreadable files are on neither
    side, and the log says what was left out and which rule held out what."""
    from mtp_engine.data import CorpusSource

    src = tmp_path / "notes"
    (src / "journal").mkdir(parents=True)
    texts = {f"journal/n{i}.md": f"note {i}\n" + "words and more words\n" * (i + 3) for i in range(8)}
    for name, text in texts.items():
        (src / name).write_text(text)
    (src / "journal" / "EMPTY.MD").write_text("")
    (src / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    split = CorpusSource(str(src), (".md", ".txt"), 0.3).split()
    assert split.unreadable == 2 and not split.by_folder
    held = split.heldout[0]
    (src / "journal" / "alias.md").symlink_to(held.name)
    (src / "copy.md").write_bytes(held.read_bytes())
    split = CorpusSource(str(src), (".md", ".txt"), 0.3).split()
    names = lambda files: sorted(f.relative_to(src).as_posix() for f in files)   # noqa: E731
    assert "journal/alias.md" not in names(split.train + split.heldout)
    assert "copy.md" not in names(split.train) and split.copies_of_heldout == ("copy.md" not in names(split.heldout))
    held_text = {f.read_bytes() for f in split.heldout}
    assert not any(f.read_bytes() in held_text for f in split.train)
    logs = []
    corpus = prepare_corpus(tmp_path / "corpus", src, vocab_size=300, extensions=[".md", ".txt"],
                            heldout_fraction=0.3, log=logs.append)
    assert set(corpus.manifest["heldout_files"]) == set(names(split.heldout))
    assert any("left out 2 file(s) empty or not UTF-8" in line for line in logs)
    (src / "tests").mkdir()
    (src / "tests" / "t.md").write_text("a test note\n" * 5)
    logs.clear()
    prepare_corpus(tmp_path / "corpus2", src, vocab_size=300, extensions=[".MD"], heldout_fraction=0.3,
                   log=logs.append)
    assert any("1 held-out files" in line and "test/ or tests/ folders; heldout_fraction unused" in line
               for line in logs)
