"""The `mtp` command line: help, complete on a tiny checkpoint, user errors (exit 2, one line), demo."""
import subprocess
import sys
import time

import pytest
import torch

from mtp_engine import Llama, ModelArgs, Transformer
from mtp_engine.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Meta-layout checkpoint dir with tokenizer.model beside it (as `mtp complete` finds it by default)."""
    from mtp_engine.checkpoint import save_checkpoint
    from mtp_engine.demo import stdlib_sources
    from mtp_engine.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(stdlib_sources(2), 512, root / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  n_future_tokens=2))
    save_checkpoint(model, root / "ckpt")
    return root / "ckpt", root / "tokenizer.model"


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "demo" in out and "examples:" in out
    assert "continue text prompts" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_complete_prints_text_and_stats(tiny_checkpoint, capsys):
    ckpt, tok = tiny_checkpoint
    code = main(["complete", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(tok), "--prompt", "import os",
                 "--prompt", "def f(x):", "--max-gen-len", "6", "--max-seq-len", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "import os" and lines[1].startswith("> ")
    assert "def f(x):" in lines
    assert lines[-1].startswith("[stats] 2 prompt(s)")


def test_complete_samples_each_prompt_and_shares_its_prefill(tiny_checkpoint, capsys):
    """--samples 3: each prompt then its three completions, the same as text_completion gives the
    prompt three times; through one cache row each sample after the first reuses the prompt's slots
    (all but its last token), which the stats line reports. Same text as with sharing off."""
    ckpt, tok = tiny_checkpoint
    argv = ["complete", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(tok), "--prompt", "import os",
            "--prompt", "def f(x):", "--max-gen-len", "6", "--max-seq-len", "32", "--device", "cpu",
            "--temperature", "1.5", "--seed", "4", "--samples", "3", "--max-batch-size", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "import os" and lines[5] == "def f(x):"
    texts = [line.split("] ", 1)[1] for line in lines[1:4] + lines[6:9]]
    assert [line[:5] for line in lines[1:4] + lines[6:9]] == ["> [1]", "> [2]", "> [3]"] * 2
    llama = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=1, device="cpu", seed=4)
    want = llama.text_completion(["import os"] * 3 + ["def f(x):"] * 3, temperature=1.5, top_p=1.0, max_gen_len=6)
    assert texts == [r["generation"] for r in want]
    assert len(set(texts[:3])) > 1   # three different samples
    lengths = [len(llama.tokenizer.encode(p, bos=True, eos=False)) for p in ("import os", "def f(x):")]
    # (the second prompt's first sample takes the bos from the first prompt's last sample)
    assert llama.last_stats["shared_prompt_tokens"] == 2 * (lengths[0] - 1) + 1 + 2 * (lengths[1] - 1)
    assert f"{llama.last_stats['shared_prompt_tokens']} prompt tokens shared" in lines[-1]
    unshared = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=1, device="cpu", seed=4)
    unshared.generator.share_prefixes = False
    assert [r["generation"] for r in unshared.text_completion(["import os"] * 3 + ["def f(x):"] * 3, temperature=1.5,
                                                              top_p=1.0, max_gen_len=6)] == texts
    assert unshared.last_stats["shared_prompt_tokens"] == 0


def test_complete_says_when_the_cache_cut_a_generation_short(tiny_checkpoint, capsys):
    ckpt, tok = tiny_checkpoint
    base = ["complete", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(tok), "--prompt", "import os",
            "--max-gen-len", "20"]
    assert main(base + ["--max-seq-len", "8"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "[note] 1 of 1 sequence(s) stopped at --max-seq-len 8 (prompt + generated tokens) " \
                   "before --max-gen-len 20"
    assert main(base + ["--max-seq-len", "64"]) == 0
    assert "[note]" not in capsys.readouterr().out


def test_complete_finds_tokenizer_next_to_checkpoint_and_samples(tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    argv = ["complete", "--ckpt-dir", str(ckpt), "--prompt", "x = ", "--max-gen-len", "5",
            "--max-seq-len", "16", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1] == first  # same seed, same sample
    greedy = argv[:argv.index("--temperature")]
    assert main(greedy) == 0
    want = greedy_text = capsys.readouterr().out.splitlines()[1]
    assert main(argv + ["--temperature", "5", "--top-k", "1"]) == 0   # a cut to one token is greedy
    assert capsys.readouterr().out.splitlines()[1] == want
    assert main(argv + ["--temperature", "5", "--min-p", "1"]) == 0   # the most likely token alone
    assert capsys.readouterr().out.splitlines()[1] == want
    assert main(greedy + ["--repetition-penalty", "1", "--presence-penalty", "0"]) == 0   # no penalty
    assert capsys.readouterr().out.splitlines()[1] == want
    # below 1 the repetition penalty favours the prompt's tokens (and those generated): a real change
    penalties = ["--repetition-penalty", "0.05", "--presence-penalty", "0.5", "--frequency-penalty", "2"]
    assert main(greedy + ["--max-gen-len", "40"] + penalties) == 0
    penalized = capsys.readouterr().out.splitlines()[1]
    assert main(greedy + ["--max-gen-len", "40"]) == 0
    assert penalized != capsys.readouterr().out.splitlines()[1]
    llama = Llama.build(str(ckpt), str(ckpt.parent / "tokenizer.model"), max_seq_len=16, max_batch_size=1,
                        device="cpu")
    want = llama.text_completion(["x = "], temperature=0.0, max_gen_len=40, repetition_penalty=0.05,
                                 presence_penalty=0.5, frequency_penalty=2)[0]["generation"]
    assert penalized == f"> {want}"
    first = llama.generate([llama.tokenizer.encode("x = ", bos=True, eos=False)], 1, temperature=0.0)[0][0][0]
    assert main(greedy + ["--logit-bias", f"{first}=-100"]) == 0   # the greedy first token banned
    banned = capsys.readouterr().out.splitlines()[1]
    want = llama.text_completion(["x = "], temperature=0.0, max_gen_len=5, logit_bias={first: -100})[0]["generation"]
    assert banned == f"> {want}" and banned != greedy_text


@pytest.mark.parametrize("extra, match", [
    (["--ckpt-dir", "/nonexistent/ckpt"], "checkpoint directory not found"),
    (["--temperature", "-1"], "temperature"),
    (["--max-seq-len", "2"], "max_seq_len 2"),  # the prompt alone does not fit
    (["--tokenizer-path", "/nonexistent/tok.model"], "tokenizer"),
    (["--max-batch-size", "0"], "max_batch_size must be a positive int, got 0"),
    (["--seed", "99999999999999999999999"], "seed"),
    (["--temperature", "1", "--top-k", "-2"], "top_k must be an int >= 0 (0 = no cut), got -2"),
    (["--temperature", "1", "--min-p", "2"], "min_p must be a number in [0, 1] (0 = no cut), got 2.0"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a number > 0 (1 = none) within float32's range, got 0.0"),
    (["--presence-penalty", "nan"], "presence_penalty must be a number (0 = none)"),
    (["--logit-bias", "5:1"], "--logit-bias takes ID=BIAS (an int token id, a number), got '5:1'"),
    (["--logit-bias", "99999=1"], "logit_bias: token id 99999 is not an int in [0, "),
    (["--logit-bias", "5=1", "--logit-bias", "5=-1"], "--logit-bias gives token 5 twice"),
    (["--max-seq-len", str(10 ** 12)], "a rotary table of 2000000000000 positions (2 x max_seq_len) needs"),
    (["--samples", "0"], "--samples must be an int >= 1, got 0"),
    (["--samples", "2"], "--samples 2 needs --temperature > 0: greedy decoding gives 2 identical completions"),
    (["--samples", "2", "--temperature", "1", "--stream"], "give one --prompt and --samples 1, not 1 prompt(s) x --samples 2"),
])
def test_user_errors_exit_2_with_one_line(tiny_checkpoint, capsys, extra, match):
    ckpt, tok = tiny_checkpoint
    argv = ["complete", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(tok), "--prompt", "import sys"]
    code = main(argv + extra)  # later flags override earlier ones
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("mtp complete: error:") and match in err


def test_bad_flag_value_is_argparse_exit_2(capsys):
    assert main(["complete", "--ckpt-dir", "x", "--prompt", "p", "--top-p", "lots"]) == 2
    assert "invalid float value" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [(["--max-gen-len", "0"], "--max-gen-len must be >= 1"),
                                        (["--random-weights", "--prompt", "x"], "do not apply with --random-weights"),
                                        (["--random-weights", "--ckpt-dir", "x"], "do not apply with --random-weights"),
                                        (["--out", "x"], "--out only applies with --random-weights"),
                                        (["--random-weights", "--out", __file__], "is a file; it must be a folder"),
                                        (["--random-weights", "--tokenizer-path", "t"],
                                         "do not apply with --random-weights")])
def test_demo_flags_that_cannot_apply_are_errors(args, match, capsys):
    assert main(["demo"] + args) == 2
    assert match in capsys.readouterr().err


def test_demo_and_eval_find_the_tokenizer_beside_the_checkpoint_as_complete_does(tiny_checkpoint, capsys):
    """Meta's layout (and `mtp demo --random-weights --out`'s): tokenizer.model in the checkpoint's parent."""
    ckpt, tok = tiny_checkpoint
    assert main(["demo", "--ckpt-dir", str(ckpt), "--max-gen-len", "3"]) == 0
    assert "demo took" in capsys.readouterr().out
    assert main(["eval", "--ckpt-dir", str(ckpt), "--max-files", "2", "--prompts", "1", "--prompt-len", "8",
                 "--gen-len", "3"]) == 0
    assert "| 1 | token t+2 |" in capsys.readouterr().out
    assert main(["demo", "--ckpt-dir", str(ckpt), "--tokenizer-path", str(ckpt / "nothing.model")]) == 2
    assert "tokenizer model not found" in capsys.readouterr().err


def test_trained_demo_at_one_new_token_prints_no_acceptance(capsys):
    """One new token comes from the prefill: no verify step ran, and the acceptance prints as '-'."""
    assert main(["demo", "--max-gen-len", "1"]) == 0
    assert "acceptance by depth - / - / -" in capsys.readouterr().out


def test_demo_runs_as_module(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mtp_engine", "demo", "--random-weights", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "NOTE: random weights, the text is noise" in proc.stdout
    assert "def fibonacci(n):" in proc.stdout
    assert (tmp_path / "ckpt" / "params.json").is_file() and (tmp_path / "tokenizer.model").is_file()
    assert elapsed < 30


def test_text_the_console_cannot_show_is_escaped_and_an_empty_demo_prompt_kept(monkeypatch, capsys):
    """On a console whose encoding lacks a character (a Windows code page, PYTHONIOENCODING=ascii),
    the finished generation is printed escaped, not lost to an encoding error; `mtp demo --prompt ""`
    completes the empty prompt, not the default one."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mtp_engine", "complete", "--prompt", 'name = "café',
                          "--max-gen-len", "2", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'name = "caf\\xe9' in run.stdout
    import io
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["complete", "--ckpt-dir", "/nonexistent", "--prompt", "x"]) == 2
    assert stream.errors == "strict"   # the caller's stream as it was
    monkeypatch.undo()
    from mtp_engine import demo
    seen = []
    monkeypatch.setattr(demo, "run_trained_demo", lambda ckpt, n, prompt, **kw: seen.append(prompt))
    assert main(["demo", "--prompt", ""]) == 0 and seen == [""]
    assert main(["demo"]) == 0 and seen[-1] == demo.DEMO_PROMPT
