"""Self-distillation of the drafting heads: targets, prompts, frozen parts, and the gain it is for."""
import json
import re
import sysconfig
from pathlib import Path

import pytest
import torch

from mtp_engine import ModelArgs, Transformer
from mtp_engine.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from mtp_engine.cli import main
from mtp_engine.data import find_source_files, read_text, split_files
from mtp_engine.distill import (DistillConfig, distill_heads, greedy_sequences, head_targets,
                                training_prompts)
from mtp_engine.evaluate import chain_tokens_per_forward
from mtp_engine.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def tiny_model(seed=0, vocab=64):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=vocab, multiple_of=16,
                                 max_seq_len=64, n_future_tokens=4)).eval()


def chain_rate(model, prompts, gen_len):
    """Greedy chain tokens per forward over `prompts` (as `mtp eval` computes it)."""
    sequences = greedy_sequences(model, prompts, gen_len, batch_size=len(prompts))
    total = forwards = 0
    with torch.no_grad():
        for seq in sequences.tolist():
            top1 = model.forward(torch.tensor([seq]), return_all_heads=True)[0].argmax(-1)   # (L, n)
            r = chain_tokens_per_forward(top1, seq, len(prompts[0]), gen_len)
            total += r["tokens_per_forward"] * r["forwards"]
            forwards += r["forwards"]
    return total / forwards


def test_head_targets_are_the_continuation_i_steps_ahead():
    seq = torch.arange(10)[None] + 100                    # one sequence, prompt of 4 tokens
    t = head_targets(seq, n_extra=2, prompt_len=4)
    # head 1 at position p predicts seq[p + 2], only where p + 2 >= 4 (the continuation)
    assert t[0, 0].tolist() == [-100, -100, 104, 105, 106, 107, 108, 109, -100, -100]
    assert t[1, 0].tolist() == [-100, 104, 105, 106, 107, 108, 109, -100, -100, -100]


def test_training_prompts_never_come_from_heldout_files(tmp_path):
    root = tmp_path / "src"
    (root / "test").mkdir(parents=True)
    for name in ("heapq.py", "bisect.py", "textwrap.py"):
        (root / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    (root / "test" / "test_heapq.py").write_text((STDLIB / "test" / "test_heapq.py").read_text(encoding="utf-8"))
    tok = Tokenizer(default_checkpoint() / "tokenizer.model")
    prompts = training_prompts(tok, 7, 16, 8, root)
    assert len(prompts) == 7 and all(len(p) == 16 for p in prompts)
    train, heldout = split_files(find_source_files(root), root)
    train_streams = [tok.encode(read_text(f), bos=True, eos=True) for f in train]

    def inside(p, streams):
        return any(s[i:i + len(p)] == p for s in streams for i in range(len(s) - len(p) + 1))

    assert all(inside(p, train_streams) for p in prompts)
    assert len({tuple(p) for p in prompts}) == 7                  # several per file, all different
    heldout_streams = [tok.encode(read_text(f), bos=True, eos=True) for f in heldout]
    assert not any(inside(p, heldout_streams) for p in prompts)


def test_distillation_trains_only_the_extra_heads_and_raises_acceptance():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    train_prompts = torch.randint(0, 64, (48, 8), generator=g).tolist()
    eval_prompts = torch.randint(0, 64, (12, 8), generator=g).tolist()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rate_before = chain_rate(model, eval_prompts, 24)
    greedy_before = greedy_sequences(model, eval_prompts, 24, 12)

    sequences = greedy_sequences(model, train_prompts, 24, 16)
    log = distill_heads(model, sequences, 8, DistillConfig(steps=120, batch_size=16, lr=3e-3, warmup_steps=5),
                        log=lambda *a: None)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("extra_heads."):
            continue
        assert torch.equal(after[key], value), f"{key} changed: only the extra heads may train"
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("extra_heads."))
    assert all(p.requires_grad for p in model.parameters())       # left trainable as it was found
    losses = [s["loss"] for s in log["steps"]]
    assert losses[-1] < 0.6 * losses[0]
    assert torch.equal(greedy_sequences(model, eval_prompts, 24, 12), greedy_before)   # same model output
    rate_after = chain_rate(model, eval_prompts, 24)
    assert rate_after > rate_before + 0.3, (rate_before, rate_after)


def test_distill_needs_extra_heads_and_valid_config():
    one_head = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16,
                                     max_seq_len=64, n_future_tokens=1))
    with pytest.raises(ValueError, match="only head 0"):
        distill_heads(one_head, torch.zeros(2, 12, dtype=torch.long), 4,
                      DistillConfig(steps=1, batch_size=1, warmup_steps=0))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        DistillConfig(steps=0).validate()
    # A negative clip norm trained the heads backwards, silently; 0 froze them.
    for change, match in (({"grad_clip": -1.0}, "grad_clip must be > 0"), ({"grad_clip": 0.0}, "grad_clip must be > 0"),
                          ({"weight_decay": -0.1}, "weight_decay >= 0"), ({"lr": float("nan")}, "lr must be a finite"),
                          ({"warmup_steps": 700}, r"warmup_steps must be in \[0, steps=600\]")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**change).validate()


def test_mtp_distill_command_end_to_end(tmp_path, capsys):
    """On a tiny 2-shard checkpoint with the shipped tokenizer beside it (Meta's layout): writes a
    loadable checkpoint in the input dtype and shard count, the tokenizer and a log; only extra-head
    tensors differ from the input. What it cannot do is refused before any generation."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("heapq.py", "bisect.py", "textwrap.py", "string.py"):
        (src / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=8192, multiple_of=16, max_seq_len=64,
                                  n_future_tokens=4))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt, dtype=torch.bfloat16, shards=2)
    (ckpt / "train_log.json").write_text(json.dumps({"config": {"seq_len": 48}}))   # read by `mtp eval`
    (tmp_path / "tokenizer.model").write_bytes((default_checkpoint() / "tokenizer.model").read_bytes())
    out = tmp_path / "out"
    code = main(["distill", "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--source", str(src), "--prompts", "8",
                 "--prompt-len", "16", "--gen-len", "8", "--steps", "3", "--batch-size", "4", "--warmup-steps", "1",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    distilled = load_checkpoint(out)
    original = load_checkpoint(ckpt)
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert shard["output.weight"].dtype == torch.bfloat16 and (out / "consolidated.01.pth").is_file()
    for key, value in original.state_dict().items():
        same = torch.equal(distilled.state_dict()[key], value)
        assert same or key.startswith("extra_heads."), key
    log = json.loads((out / "distill_log.json").read_text())
    assert log["sequences"] == 8 and log["steps"][-1]["step"] == 3
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "tokenizer.model").read_bytes()
    assert (out / "train_log.json").read_bytes() == (ckpt / "train_log.json").read_bytes()
    assert main(["distill", "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err
    # Prompts longer than the trained context (train_log.json's 48 tokens): said, then done.
    assert main(["distill", "--ckpt-dir", str(ckpt), "--out-dir", str(tmp_path / "long"), "--source", str(src),
                 "--prompts", "4", "--prompt-len", "40", "--gen-len", "16", "--steps", "1", "--batch-size", "4",
                 "--warmup-steps", "1", "--device", "cpu"]) == 0
    assert "run past the 48-token context the model was trained on" in capsys.readouterr().err
    # Into a folder that holds a model (the source's own, or the first distillation's): refused, since
    # its tree.json, resume/ copy or run state would describe the old heads.
    for taken in (ckpt, out):
        assert main(["distill", "--ckpt-dir", str(ckpt), "--out-dir", str(taken), "--source", str(src)]) == 2
        err = capsys.readouterr().err
        assert f"{taken} already holds a model" in err and "distill into a new folder" in err
    one_head = tmp_path / "one_head"
    save_checkpoint(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=8192, multiple_of=16)), one_head)
    for ckpt_dir, out_dir, match in ((one_head, out, "this model has only head 0"),
                                     (ckpt, tmp_path / "tokenizer.model", r"tokenizer\.model is a file"),
                                     (ckpt, tmp_path / "tokenizer.model" / "sub", r"tokenizer\.model is a file")):
        assert main(["distill", "--ckpt-dir", str(ckpt_dir), "--out-dir", str(out_dir), "--source", str(src)]) == 2
        captured = capsys.readouterr()
        assert re.search(match, captured.err), captured.err
        assert "greedy continuations" not in captured.out      # refused before any work


def test_distilling_a_runs_resume_copy_carries_the_runs_log(tmp_path, capsys):
    """A training run's resume/ copy has its train_log.json in the run's folder: the distilled model
    gets it (mtp eval reads the trained context and corpus from it)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=16, max_seq_len=64,
                                  n_future_tokens=2))
    run_dir = tmp_path / "run"
    save_checkpoint(model, run_dir / "resume")
    (run_dir / "trainer_state.json").write_text("{}")
    (run_dir / "train_log.json").write_text(json.dumps({"config": {"seq_len": 48}}))
    (run_dir / "tokenizer.model").write_bytes((default_checkpoint() / "tokenizer.model").read_bytes())
    src = tmp_path / "src"
    src.mkdir()
    for name in ("heapq.py", "bisect.py", "textwrap.py"):
        (src / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["distill", "--ckpt-dir", str(run_dir / "resume"), "--out-dir", str(out), "--source", str(src),
                 "--prompts", "2", "--prompt-len", "8", "--gen-len", "4", "--steps", "1", "--batch-size", "2",
                 "--warmup-steps", "0", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert (out / "train_log.json").read_bytes() == (run_dir / "train_log.json").read_bytes()
