"""CPU benchmark of the n-head linear + cross-entropy: our reference path vs eager PyTorch.

Not part of `make test`. Run with
    pytest benchmarks/test_bench_fused_ce_cpu.py                      # timings + checks
    pytest benchmarks/test_bench_fused_ce_cpu.py --benchmark-disable  # checks only
Each timed contender's loss and gradients are also checked against a float64 oracle, so a
benchmark of a wrong result fails. The end-to-end smoke test runs the GPU benchmark script's whole
pipeline (contenders, correctness columns, JSON and markdown writers) on CPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_ce as bench  # noqa: E402

SHAPE = bench.Shape("cpu_tiny", n=4, N=256, D=64, V=1001)
TOL = dict(rtol=1e-5, atol=1e-6)


def _ours_or_skip():
    try:
        return bench._ours_fn()
    except ImportError as err:
        pytest.skip(f"mtp_kernels.fused_linear_cross_entropy is not importable: {err}")


@pytest.fixture
def reference_backend(monkeypatch):
    """The CPU (reference) path even where MTP_BACKEND=triton is set for interpreted tests."""
    monkeypatch.setenv("MTP_BACKEND", "reference")


@pytest.fixture(scope="module")
def inputs():
    return bench.make_inputs(SHAPE, torch.device("cpu"), torch.float32, seed=0)


@pytest.fixture(scope="module")
def eager_result(inputs):
    """An oracle independent of every contender (eager_per_head among them): each head's logits in
    float64, its mean cross-entropy over valid targets, summed over heads, as the benchmark's loss."""
    hidden, weight, targets = inputs
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = sum(torch.nn.functional.cross_entropy(h[i] @ w.T, targets[i], ignore_index=bench.IGNORE_INDEX)
               for i in range(SHAPE.n))
    loss.backward()
    return loss.float(), h.grad.float(), w.grad.float()


@pytest.mark.parametrize("contender", ["eager_per_head", "eager_all_heads", "ours"])
def test_fused_ce_fwd_bwd_cpu(benchmark, reference_backend, inputs, eager_result, contender):
    if contender == "ours":
        _ours_or_skip()
    hidden, weight, targets = inputs
    loss_fn = bench.CONTENDERS[contender](torch.device("cpu"))

    def clear_grads():
        hidden.grad = weight.grad = None

    def step():
        return bench.forward_backward(loss_fn, hidden, weight, targets)

    benchmark.group = f"fused_ce fwd+bwd {SHAPE.label()}"
    loss = benchmark.pedantic(step, setup=clear_grads, rounds=10, warmup_rounds=1, iterations=1)

    ref_loss, ref_dh, ref_dw = eager_result
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(hidden.grad, ref_dh, **TOL)
    torch.testing.assert_close(weight.grad, ref_dw, **TOL)
    clear_grads()


def test_ignored_targets_equal_per_head():
    """The concat contenders rely on every head having the same number of ignored targets."""
    _, _, targets = bench.make_inputs(bench.Shape("odd", n=3, N=37, D=8, V=11), torch.device("cpu"), torch.float32)
    ignored = (targets == bench.IGNORE_INDEX).sum(dim=1)
    assert ignored.tolist() == [round(bench.IGNORE_FRACTION * 37)] * 3
    valid = targets[targets != bench.IGNORE_INDEX]
    assert valid.min() >= 0 and valid.max() < 11


def test_bench_pipeline_cpu_smoke(tmp_path, reference_backend):
    """The whole script on CPU: every contender either runs and matches eager or is recorded."""
    code = bench.main(["--device", "cpu", "--quick", "--shapes", "quick_odd", "--rep-ms", "5", "--out", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "fused_ce_cpu.json").read_text())
    rows = {r["contender"]: r for r in payload["results"]}
    assert set(rows) == set(bench.CONTENDERS)
    assert payload["meta"]["torch"] == torch.__version__
    assert payload["ceilings"]["matmul_tflops"] > 0
    for name in ("eager_per_head", "eager_all_heads"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["ms"] > 0 and rows[name]["x_floor"] > 0
    # eager_per_head is the script's reference (its own errors are 0 by construction; the timed test
    # above checks it against a float64 oracle); the others are measured against it.
    assert rows["eager_per_head"]["dh_rel_err"] == 0.0 and rows["eager_per_head"]["dw_rel_err"] == 0.0
    assert rows["eager_all_heads"]["dh_rel_err"] < 1e-5 and rows["eager_all_heads"]["dw_rel_err"] < 1e-5
    for name in ("liger_per_head", "liger_concat", "cce_per_head", "cce_concat"):
        assert rows[name]["status"] in ("skipped", "error"), rows[name]  # these peers need CUDA
    try:
        bench._ours_fn()
    except ImportError:
        assert rows["ours"]["status"] == "error"
    else:
        assert rows["ours"]["status"] == "ok", rows["ours"]
        assert rows["ours"]["head_loss_max_rel_err"] < 1e-5
    for row in rows.values():
        if row["status"] == "ok":
            assert row["loss_rel_err"] < 1e-5, row
    markdown = (tmp_path / "fused_ce_cpu.md").read_text()
    assert "| quick_odd | eager_per_head |" in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| quick_odd |")]) == len(bench.CONTENDERS)
