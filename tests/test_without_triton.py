"""Without Triton (macOS, Windows: it has Linux wheels only) the package imports and everything runs
on the PyTorch reference path: kernels/triton_import.py stands in for Triton there."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.modules["triton"] = None            # `import triton` now fails, as where it is not installed
    import torch
    import torch.nn.functional as F
    from mtp_kernels import fused_linear_cross_entropy
    from mtp_kernels.backend import triton_available
    from mtp_engine import Generator, ModelArgs, Transformer
    from mtp_engine.cli import main
    from mtp_engine.loss import MTPLoss
    import mtp_engine.train, mtp_engine.distill, mtp_engine.evaluate, mtp_engine.tensor_parallel
    import mtp_kernels.vocab_parallel_ce, mtp_kernels.skinny_ws, mtp_kernels.dependent_launch
    assert not triton_available()

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 7))
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    want = sum(F.cross_entropy(hidden[i] @ weight.T, targets[i]) for i in range(2))
    assert torch.allclose(loss, want), (loss, want)

    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=61, multiple_of=16, n_future_tokens=2,
                     max_seq_len=64, max_batch_size=2)
    model = Transformer(args)
    tokens = torch.randint(0, 61, (2, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = MTPLoss(2)(model.head_hidden(tokens), model.output.weight, tokens)
    out.loss.backward()
    opt.step()

    model.eval()
    gen = Generator(model, max_batch_size=2, max_seq_len=32)
    plain = gen.generate([[1, 2, 3], [4, 5]], max_gen_len=6).tokens
    for speculative in ("chain", "tree"):
        assert gen.generate([[1, 2, 3], [4, 5]], max_gen_len=6, speculative=speculative).tokens == plain

    os.environ["MTP_BACKEND"] = "triton"
    try:
        fused_linear_cross_entropy(hidden, weight, targets)
    except RuntimeError as error:
        assert "Triton is not installed" in str(error), error
    else:
        raise AssertionError("MTP_BACKEND=triton ran without Triton")
    os.environ["MTP_BACKEND"] = "reference"
    from mtp_kernels.fused_linear_ce import _ce_chunk_kernel
    try:
        _ce_chunk_kernel[(1,)]()
    except RuntimeError as error:
        assert "_ce_chunk_kernel: Triton is not installed" in str(error), error
    else:
        raise AssertionError("a kernel launched without Triton")
    try:
        main(["--help"])
    except SystemExit as done:
        assert done.code == 0
    print("all ran without Triton")
""")


def test_everything_runs_without_triton():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MTP_BACKEND": "auto", "TRITON_INTERPRET": "0"})
    assert run.returncode == 0 and "all ran without Triton" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
