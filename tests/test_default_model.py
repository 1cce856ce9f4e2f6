"""The embedded default model (mtp_engine/default_model): it loads, it writes Python, self-speculation is exact on it,
and `mtp complete` / `mtp demo` use it when no checkpoint is given."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mtp_engine.checkpoint import default_checkpoint, load_checkpoint
from mtp_engine.cli import main
from mtp_engine.generate import Generator
from mtp_engine.tokenizer import Tokenizer

PROMPT = "    def __init__(self, name):\n        self."


@pytest.fixture(scope="module")
def default_model():
    ckpt = default_checkpoint()
    return ckpt, load_checkpoint(ckpt, device="cpu", dtype=torch.float32).eval(), Tokenizer(ckpt / "tokenizer.model")


def test_default_model_is_a_trained_four_head_model(default_model):
    ckpt, model, tok = default_model
    p = model.params
    assert p.n_future_tokens == 4 and p.vocab_size == tok.n_words >= 8000
    assert 4e6 < model.num_params() < 25e6
    shards = sorted(ckpt.glob("consolidated.*.pth"))
    assert shards and all(s.stat().st_size < 16 * 2**20 for s in shards)
    assert torch.load(shards[0], weights_only=True, mmap=True)["output.weight"].dtype == torch.bfloat16
    log = json.loads((ckpt / "train_log.json").read_text())
    # Trained, not random: the final held-out loss of head 0 is far below log(V) (random ~9.0).
    assert log["summary"]["final_eval"]["loss"][0] < 6.0


def test_default_model_completes_python_and_speculation_is_exact(default_model):
    _, model, tok = default_model
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=128)
    prompts = [tok.encode(PROMPT, bos=True, eos=False), tok.encode("import os\nimport sys\n", bos=True, eos=False)]
    plain = gen.generate(prompts, max_gen_len=24, temperature=0.0)
    assert "name" in plain.text[0] or "self" in plain.text[0] or plain.text[0].strip()
    for mode in ("chain", "tree"):
        spec = gen.generate(prompts, max_gen_len=24, temperature=0.0, speculative=mode)
        assert spec.tokens == plain.tokens, mode
        assert spec.stats["tokens_per_forward"] >= 1.0


def test_mtp_complete_uses_the_default_model(capsys):
    assert main(["complete", "--prompt", "def add(a, b):\n    return", "--max-gen-len", "8", "--device", "cpu",
                 "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "def add(a, b):" and "[stats]" in out


def test_mtp_demo_runs_the_default_model():
    proc = subprocess.run([sys.executable, "-m", "mtp_engine", "demo", "--max-gen-len", "24"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "def fibonacci(n):" in proc.stdout and "identical text" in proc.stdout
    assert "tokens/forward" in proc.stdout


def test_an_installed_wheel_carries_the_default_model(tmp_path):
    """A wheel built from the sources (not an editable install) has the default model as package
    data: installed elsewhere, `mtp complete` without --ckpt-dir finds and runs it."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(repo / "setup.py", src)
    for package in ("kernels", "mtp_engine"):
        shutil.copytree(repo / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", str(src), "-w", str(tmp_path / "wheel")], check=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("mtp_engine-*.whl"))
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    script = ("import mtp_engine, sys\n"
              f"assert mtp_engine.__file__.startswith({str(target)!r}), mtp_engine.__file__\n"
              "from mtp_engine.cli import main\n"
              "sys.exit(main(['complete', '--prompt', 'def add(a, b):', '--max-gen-len', '4']))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "def add(a, b):" in run.stdout and "[stats]" in run.stdout + run.stderr
