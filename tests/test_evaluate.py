"""`mtp eval`: tokens per forward from one greedy rollout, checked against the real speculative generator."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mtp_engine.checkpoint import save_checkpoint
from mtp_engine.cli import main
from mtp_engine.evaluate import chain_tokens_per_forward, draft_ranks, format_table, tree_tokens_per_forward
from mtp_engine.generate import Generator
from mtp_engine.tokenizer import Tokenizer
from mtp_engine.speculative import resolve_tree

sys.path.insert(0, str(Path(__file__).parent))
from test_speculative import drafting_model  # noqa: E402


def test_chain_walk_by_hand():
    # k = 3 heads. sequence = prompt (2 tokens) + rollout of 6. top1[t, i]: head i's guess for t+1+i.
    seq = [10, 11, 12, 13, 14, 15, 16, 17]
    L = len(seq)
    top1 = torch.full((L, 3), -1)
    # step 1 (prefill at q=1 drafted by heads at 1): head1 -> seq[3]=13 right, head2 -> seq[4]=14 right
    top1[1, 1], top1[1, 2] = 13, 14
    # next q = 1 + 3 = 4: head1 right (seq[6]=16), head2 wrong
    top1[4, 1], top1[4, 2] = 16, 0
    out = chain_tokens_per_forward(top1, seq, prompt_len=2, gen_len=6)
    # forwards: prefill (1 token) + step (2 drafts + 1) + step (1 draft + 1) = 6 tokens? 1 + 3 + 2 = 6
    assert out["forwards"] == 3 and out["tokens_per_forward"] == pytest.approx(2.0)
    assert out["accepted_per_depth"] == [2, 1]


def test_tree_walk_uses_lower_ranks():
    seq = [5, 6, 7, 8, 9, 10]
    topk = torch.zeros((len(seq), 3, 2), dtype=torch.long)
    topk[0, 1] = torch.tensor([99, 7])     # head 1 at q=0: seq[2]=7 is its rank 1
    topk[0, 2] = torch.tensor([8, 98])     # head 2: seq[3]=8 is rank 0
    chain = chain_tokens_per_forward(topk[..., 0], seq, 1, 5)
    tree = tree_tokens_per_forward(topk, seq, 1, 5, [[0], [1], [0, 0], [1, 0]])
    narrow = tree_tokens_per_forward(topk, seq, 1, 5, [[0], [1], [0, 0]])
    assert tree["forwards"] < chain["forwards"]
    assert narrow["accepted_per_depth"][1] < tree["accepted_per_depth"][1]


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_rollout_estimate_equals_the_speculative_generator(mode):
    """The estimate `mtp eval` reports is exactly what the real speculative generator achieves: its
    forwards and, with the rollout running heads - 1 tokens past gen_len as eval's does (the last
    step's drafts reach past it and the generator counts them), its acceptance by depth."""
    model, _ = drafting_model(heads=4, agreement=0.6, seed=5)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    gen_len = 24
    tree = resolve_tree("chain" if mode == "chain" else [[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0]], 4)
    gen = Generator(model, max_batch_size=1, max_seq_len=64)
    for prompt in prompts:
        real = gen.generate([prompt], max_gen_len=gen_len, temperature=0.0, speculative="tree", tree=tree, eos_id=-1)
        plain = gen.generate([prompt], max_gen_len=gen_len + 3, temperature=0.0, eos_id=-1)
        assert real.tokens[0] == plain.tokens[0][:gen_len]
        sequence = prompt + plain.tokens[0]
        model.clear_caches()
        with torch.no_grad():
            topk = draft_ranks(model, sequence, 2)   # eval's ranking: the generator's drafting function
        if mode == "chain":
            est = chain_tokens_per_forward(topk[..., 0], sequence, len(prompt), gen_len)
        else:
            est = tree_tokens_per_forward(topk, sequence, len(prompt), gen_len, tree)
        model.setup_caches(1, 64)
        assert real.stats["forwards"] == est["forwards"], (real.stats, est)
        assert real.stats["tokens_per_forward"] == pytest.approx(est["tokens_per_forward"])
        assert est["tokens_per_forward"] > 1.2
        assert real.stats["acceptance_per_depth"] == pytest.approx([a / est["steps"] for a in est["accepted_per_depth"]])


def test_mtp_eval_on_a_tiny_checkpoint(tmp_path, capsys):
    from mtp_engine.data import prepare_corpus
    from test_train import SOURCES, STDLIB

    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    for name in SOURCES:
        (src / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("test_heapq.py", "test_bisect.py"):
        (src / "test" / name).write_text((STDLIB / "test" / name).read_text(encoding="utf-8"), encoding="utf-8")
    corpus = prepare_corpus(tmp_path / "corpus", src, vocab_size=400, log=lambda *a: None)
    model, _ = drafting_model(heads=4, vocab=400, seed=1)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt)
    (ckpt / "tokenizer.model").write_bytes(Path(corpus.tokenizer.model_path).read_bytes())
    # the loss windows are the context the checkpoint was trained on (its train_log.json), not max_seq_len
    (ckpt / "train_log.json").write_text(json.dumps({"config": {"seq_len": 48}}))
    out_json = tmp_path / "eval.json"
    rc = main(["eval", "--ckpt-dir", str(ckpt), "--source", str(src), "--prompts", "2", "--prompt-len", "16",
               "--gen-len", "12", "--max-files", "2", "--json", str(out_json), "--device", "cpu",
               "--build-tree", str(tmp_path / "fitted.json"), "--tree-budget", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert len(result["head_loss"]) == 4 and all(0 <= a <= 1 for a in result["head_top1"])
    assert result["seq_len"] == 48 and f"over {result['heldout_windows']} windows of 48 tokens" in printed
    assert set(result["speculative"]) == {"chain", *result["trees"]} and "fitted" in result["trees"]
    fitted = json.loads((tmp_path / "fitted.json").read_text())
    assert len(fitted["paths"]) == 6 and len(fitted["rates"]) == 3 and fitted["expected_accept_length"] >= 1
    from mtp_engine.evaluate import format_table
    assert "held-out prompts of" in format_table(result) and "asked" not in format_table(result)
    assert f"{result['speculative']['chain']['prompts']} held-out prompts (of 99 asked: one per held-out file" \
        in format_table({**result, "prompts_asked": 99})
    # `mtp complete` takes the same tree file, and a training run's resume/ copy is scored on the run's
    # window (its log is in the run's folder).
    assert main(["complete", "--ckpt-dir", str(ckpt), "--prompt", "import os", "--max-gen-len", "4", "--device",
                 "cpu", "--speculative", "tree", "--tree", str(tmp_path / "fitted.json")]) == 0
    depth = max(len(p) for p in fitted["paths"])
    assert f"; tree, {depth + 1} heads, 6 drafted nodes" in capsys.readouterr().out
    from mtp_engine.evaluate import trained_seq_len
    run_dir = tmp_path / "run"
    save_checkpoint(model, run_dir / "resume")
    (run_dir / "train_log.json").write_text(json.dumps({"config": {"seq_len": 40}}))
    assert trained_seq_len(run_dir / "resume") is None                    # not a training run yet
    (run_dir / "trainer_state.json").write_text("{}")
    assert trained_seq_len(run_dir / "resume") == 40
    assert "fitted tree: 6 nodes" in printed
    for r in result["speculative"].values():
        assert 1.0 <= r["tokens_per_forward"] <= 4.0
    assert format_table(result) in printed
    # The wrong tokenizer for the model (8192 words against 400) is refused, not scored.
    from mtp_engine.checkpoint import default_checkpoint

    rc = main(["eval", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(default_checkpoint() / "tokenizer.model"),
               "--source", str(src), "--device", "cpu"])
    assert rc == 2 and "vocab_size 400 does not match the tokenizer's 8192" in capsys.readouterr().err


def test_mtp_eval_errors_name_the_file(tmp_path, capsys):
    assert main(["eval", "--ckpt-dir", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [(["--prompts", "0"], "prompts must be an int >= 1"),
                                        (["--gen-len", "0"], "gen_len must be an int >= 1"),
                                        (["--max-files", "-1"], "max_files must be an int >= 1"),
                                        (["--tree-budget", "0"], "tree_budget must be an int >= 1"),
                                        (["--json", "/nonexistent-folder/eval.json"], "--json .*folder does not exist"),
                                        (["--json", "/"], "--json / is a folder; it must name the file"),
                                        (["--seq-len", "0"], "seq_len must be an int >= 1")])
def test_mtp_eval_checks_its_arguments_before_evaluating(args, match, capsys):
    import re

    assert main(["eval", "--device", "cpu"] + args) == 2
    assert re.search(match, capsys.readouterr().err)


def test_tree_files_and_specs_are_read_or_refused_by_name(tmp_path):
    from mtp_engine.evaluate import resolve_trees

    (tmp_path / "plain.json").write_text("[[0], [1], [0, 0]]")                 # a list, not {"paths": ...}
    assert resolve_trees([str(tmp_path / "plain.json")], 3) == {"plain": [[0], [1], [0, 0]]}
    (tmp_path / "broken.json").write_text("[[0], [1")
    (tmp_path / "other.json").write_text('{"rates": [0.5]}')
    for spec, error, match in ((str(tmp_path / "missing.json"), FileNotFoundError, r"missing\.json: no such tree file"),
                               (str(tmp_path / "broken.json"), ValueError, r"broken\.json: not valid JSON"),
                               (str(tmp_path / "other.json"), ValueError, r"other\.json: holds no list of paths"),
                               ("[[0], [0, 0", ValueError, r"--tree '\[\[0\], \[0, 0': not a valid JSON list")):
        with pytest.raises(error, match=match):
            resolve_trees([spec], 3)


def test_a_depth_a_tree_cannot_reach_prints_as_a_dash():
    from mtp_engine.evaluate import CHAIN

    result = {"heldout_windows": 1, "seq_len": 8, "head_loss": [1.0, 2.0, 3.0], "head_top1": [0.1] * 3,
              "prompt_len": 4, "gen_len": 4, "trees": {"flat": [[0], [1]]},
              "speculative": {CHAIN: {"tokens_per_forward": 1.5, "prompts": 1, "acceptance_per_depth": [0.5, 0.0]},
                              "flat": {"tokens_per_forward": 1.7, "prompts": 1, "acceptance_per_depth": [0.73, 0.0]}}}
    table = format_table(result)
    assert "| chain | 1.50 | 0.50 / 0.00 |" in table and "| tree `flat` (2 nodes) | 1.70 | 0.73 / - |" in table


def test_mtp_eval_refuses_a_tree_for_a_model_without_drafting_heads(tmp_path, capsys):
    from mtp_engine import ModelArgs, Transformer
    from mtp_engine.checkpoint import default_checkpoint

    save_checkpoint(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8192, multiple_of=16)),
                    tmp_path / "one_head")
    assert main(["eval", "--ckpt-dir", str(tmp_path / "one_head"), "--tree", "heads2", "--device", "cpu",
                 "--tokenizer-path", str(default_checkpoint() / "tokenizer.model")]) == 2
    assert "--tree needs a model with at least 2 heads" in capsys.readouterr().err


def test_tree_names_never_pool_two_trees_in_one_row(tmp_path):
    """A tree file named chain.json, or two files with one stem, each keep their own row: before,
    they shared a list and the printed figure averaged both."""
    from mtp_engine.evaluate import CHAIN, add_tree, evaluate_checkpoint, resolve_trees

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, paths in (("a", [[0], [1]]), ("b", [[0], [0, 0]])):
        (tmp_path / folder / "chain.json").write_text(json.dumps({"paths": paths}))
    trees = resolve_trees([str(tmp_path / "a" / "chain.json"), str(tmp_path / "b" / "chain.json"), "chain"], 3)
    assert list(trees) == ["chain#2", "chain#3", "chain#4"]
    assert trees["chain#2"] == [[0], [1]] and trees["chain#3"] == [[0], [0, 0]]
    named = {}
    assert [add_tree(named, "t", [[0]]) for _ in range(3)] == ["t", "t#2", "t#3"]
    with pytest.raises(ValueError, match="may not be named 'chain'"):
        evaluate_checkpoint(None, None, trees={CHAIN: [[0]]})


def test_measurements_refuse_what_would_measure_nothing(tmp_path):
    """measure_acceptance_rates refuses no prompts, too few new tokens for every depth, a top_k past
    the vocabulary and a prompt past the rotary table, before any rollout; eval refuses a tree rank
    past the vocabulary and lengths past the rotary table by name, and names the split it found
    no files of."""
    from mtp_engine.evaluate import evaluate_checkpoint, heldout_token_stream
    from mtp_engine.speculative import measure_acceptance_rates

    model, _ = drafting_model(heads=4, vocab=32, seed=1)   # max_seq_len 64 (rotary table 128)
    for kwargs, match in (({"prompts": []}, "at least one prompt"),
                          ({"prompts": [[1, 2]], "max_gen_len": 3}, r"max_gen_len must be an int >= heads = 4"),
                          ({"prompts": [[1, 2]], "top_k": 33}, r"top_k must be an int in \[1, vocab_size = 32\]"),
                          ({"prompts": [[1] * 120], "max_gen_len": 9},
                           r"a prompt of 120 tokens \+ max_gen_len 9 exceed the rotary table \(128 positions")):
        with pytest.raises(ValueError, match=match):
            measure_acceptance_rates(model, **kwargs)

    class Words:
        def encode(self, text, bos, eos):
            return [1] + [2 + ord(c) % 29 for c in text] + [1]

    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    (src / "test" / "test_a.py").write_text("x = 1\n" * 100)
    (src / "a.py").write_text("y")
    with pytest.raises(ValueError, match="no readable training files of more than 200 characters"):
        heldout_token_stream(Words(), src, split="train")
    with pytest.raises(ValueError, match=r"tree 'wide' has a node of rank 40, but a head has only 32 tokens"):
        evaluate_checkpoint(model, Words(), source=src, max_files=1, seq_len=16, n_prompts=1, prompt_len=8,
                            gen_len=8, trees={"wide": [[40]]})
    with pytest.raises(ValueError, match=r"--prompt-len 100 \+ --gen-len 28 \(\+ 3 drafted past it\) exceed the rotary table \(128 "):
        evaluate_checkpoint(model, Words(), source=src, max_files=1, seq_len=16, n_prompts=1, prompt_len=100,
                            gen_len=28)


def test_a_run_on_text_files_is_evaluated_and_distilled_on_its_own_corpus(tmp_path, capsys):
    """`mtp train --source D --extension .txt --heldout-fraction F`: the run's corpus is D's .txt files
    split by F, and `mtp eval` / `mtp distill` on its checkpoint read that corpus, split the same way,
    without being told (its train_log.json); flags still override, and a corpus that is gone is named."""
    from test_train import SOURCES, STDLIB

    src = tmp_path / "texts"
    src.mkdir()
    for name in SOURCES:
        (src / name.replace(".py", ".txt")).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--source", str(src), "--extension", ".txt", "--heldout-fraction", "0.3",
                 "--corpus-dir", str(tmp_path / "corpus"), "--out-dir", str(run), "--vocab-size", "400",
                 "--seq-len", "48", "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--no-progress",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["extensions"] == [".txt"] and manifest["heldout_fraction"] == 0.3
    assert all(f.endswith(".txt") for f in manifest["train_files"] + manifest["heldout_files"])
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--ckpt-dir", str(run), "--prompts", "1", "--prompt-len", "8", "--gen-len", "4",
                 "--max-files", "2", "--json", str(out_json), "--device", "cpu"]) == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert result["corpus"] == {"folder": str(src.resolve()), "extensions": [".txt"], "heldout_fraction": 0.3}
    assert f"(held-out files of {src.resolve()})" in capsys.readouterr().out

    from mtp_engine.evaluate import heldout_token_stream, trained_source
    tokenizer = Tokenizer(run / "tokenizer.model")
    heldout_text = [tokenizer.decode(s[1:-1]) for s in heldout_token_stream(tokenizer, trained_source(run))]
    expected = [(src / f).read_text(encoding="utf-8") for f in manifest["heldout_files"]]
    assert sorted(heldout_text) == sorted(t for t in expected if len(t) > 200)
    assert trained_source(run, extensions=[".md"], heldout_fraction=0.5).extensions == (".md",)
    assert main(["distill", "--ckpt-dir", str(run), "--out-dir", str(tmp_path / "distilled"), "--prompts", "2",
                 "--prompt-len", "8", "--gen-len", "4", "--steps", "1", "--batch-size", "2", "--warmup-steps", "0",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # Split anew (another share): the held-out files the run trained on are named, as are, for
    # distill, prompts from files it held out.
    small = ["--prompts", "1", "--prompt-len", "8", "--gen-len", "4", "--max-files", "2", "--device", "cpu"]
    assert main(["eval", "--ckpt-dir", str(run), "--heldout-fraction", "0.95"] + small) == 0
    assert "were training files of the run (its corpus manifest)" in capsys.readouterr().out
    assert main(["distill", "--ckpt-dir", str(run), "--out-dir", str(tmp_path / "d2"), "--heldout-fraction", "0.01",
                 "--prompts", "2", "--prompt-len", "8", "--gen-len", "4", "--steps", "1", "--batch-size", "2",
                 "--warmup-steps", "0", "--device", "cpu"]) == 0
    assert "were held-out files of the run" in capsys.readouterr().err
    # A training file removed since: a prompt fewer, the same held-out files, nothing to warn of.
    (src / manifest["train_files"][0]).unlink()
    assert main(["eval", "--ckpt-dir", str(run), "--json", str(out_json)] + small) == 0
    assert "warning" not in capsys.readouterr().out and json.loads(out_json.read_text())["heldout_windows"] > 0
    # The corpus moved: eval reads the run's own lists there, and the run resumes on it.
    moved = tmp_path / "moved"
    src.rename(moved)
    assert main(["eval", "--ckpt-dir", str(run), "--source", str(moved), "--json", str(out_json)] + small) == 0
    assert "warning" not in capsys.readouterr().out
    assert json.loads(out_json.read_text())["corpus"]["folder"] == str(moved)
    assert main(["train", "--resume", "--out-dir", str(run), "--source", str(moved), "--max-steps", "3",
                 "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert json.loads((run / "train_log.json").read_text())["config"]["source"] == str(moved.resolve())
    shutil.rmtree(moved)
    for command in (["eval", "--ckpt-dir", str(run)],
                    ["distill", "--ckpt-dir", str(run), "--out-dir", str(tmp_path / "again")]):
        assert main(command + ["--device", "cpu"]) == 2
        assert f"was trained on the files under {moved.resolve()}, which is not here: give --source" \
            in capsys.readouterr().err
