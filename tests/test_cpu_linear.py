"""The CPU decode GEMM's layout choice (cpu_linear.py): both layouts equal F.linear against a float64
oracle, the timed choice takes the faster layout and remembers it, MTP_TUNE=0 and everything outside
its range keep F.linear, and the CPU paths that use it (the model's projections, linear_argmax)."""
import pytest
import torch

from mtp_kernels import cpu_linear, reference


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test starts with no remembered layout and tuning on."""
    monkeypatch.setattr(cpu_linear, "_chosen", {})
    monkeypatch.setattr(cpu_linear, "_times", {})
    monkeypatch.delenv("MTP_TUNE", raising=False)


def _inputs(M, N, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)


@pytest.mark.parametrize("layout", cpu_linear.LAYOUTS)
@pytest.mark.parametrize("M,N,K", [(1, 37, 33), (4, 1001, 64), (37, 21, 96), (64, 130, 7), (1, 1, 1)])
def test_every_layout_matches_the_float64_oracle(layout, M, N, K):
    x, w = _inputs(M, N, K, seed=M + N + K)
    if layout not in cpu_linear.layouts_for(M):
        with pytest.raises(ValueError, match=f"padded layout takes one row, got {M}"):
            cpu_linear.rows_times_weight_t(x, w, layout)
        return
    y = cpu_linear.rows_times_weight_t(x, w, layout)
    assert y.shape == (M, N) and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    # float64 stays float64, to the last bits of a float64 sum
    y64 = cpu_linear.rows_times_weight_t(x.double(), w.double(), layout)
    torch.testing.assert_close(y64, x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_row_buckets_are_powers_of_two():
    assert [cpu_linear.row_bucket(rows) for rows in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]


def test_an_unknown_layout_is_an_error():
    x, w = _inputs(2, 3, 4)
    with pytest.raises(ValueError, match="unknown layout 'columns'"):
        cpu_linear.rows_times_weight_t(x, w, "columns")


@pytest.mark.parametrize("times,want", [({"linear": 2.0, "transposed": 1.0}, "transposed"),
                                        ({"linear": 1.0, "transposed": 2.0}, "linear"),
                                        ({"linear": 1.0, "transposed": 1.0}, "linear")])
def test_the_faster_layout_is_chosen_once_per_shape(monkeypatch, times, want):
    calls = []
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda x, w: calls.append((x.shape, w.shape)) or dict(times))
    x, w = _inputs(5, 40, 24)
    for _ in range(3):
        assert cpu_linear.cpu_layout(x, w) == want
    assert calls == [((5, 24), (40, 24))]                     # timed at the first call only
    x8 = torch.cat([x, x[:3]])
    assert cpu_linear.cpu_layout(x8, w) == want and len(calls) == 1      # 5 and 8 rows: one bucket of 8
    assert cpu_linear.cpu_layout(x[:3], w) == want and len(calls) == 2   # 3 rows, a bucket of 4: timed
    assert cpu_linear.cpu_layout(x[:4], w) == want and len(calls) == 2
    key = (torch.float32, 8, 40, 24, torch.get_num_threads())
    assert cpu_linear.chosen_layouts()[key] == {"layout": want, "ms": times}


def test_matmul_t_runs_the_chosen_layout(monkeypatch):
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda x, w: {"linear": 9.0, "transposed": 1.0})
    ran = []
    real = cpu_linear.rows_times_weight_t
    monkeypatch.setattr(cpu_linear, "rows_times_weight_t", lambda x, w, layout: ran.append(layout) or real(x, w, layout))
    x, w = _inputs(6, 50, 16)
    y = cpu_linear.matmul_t(x.view(2, 3, 16), w)            # leading dims are rows
    assert ran == ["transposed"] and y.shape == (2, 3, 50)
    torch.testing.assert_close(y.reshape(6, 50), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("M,layouts", [(1, {"linear", "transposed", "padded"}), (4, {"linear", "transposed"})])
def test_timing_measures_the_rows_layouts(monkeypatch, M, layouts):
    monkeypatch.setattr(cpu_linear, "_WORTH_TIMING_S", 0.0)
    x, w = _inputs(M, 256, 64)
    times = cpu_linear.time_layouts(x, w, rounds=1)
    assert set(times) == layouts and all(0 < ms < 1e3 for ms in times.values())


def test_a_product_too_small_to_matter_keeps_f_linear_untimed(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_WORTH_TIMING_S", 10.0)   # every product is "too small"
    x, w = _inputs(4, 256, 64)
    times = cpu_linear.time_layouts(x, w)
    assert list(times) == ["linear"] and cpu_linear.cpu_layout(x, w) == "linear"


def test_tuning_off_keeps_f_linear_and_remembers_nothing(monkeypatch):
    monkeypatch.setenv("MTP_TUNE", "0")
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda x, w: pytest.fail("timed with MTP_TUNE=0"))
    x, w = _inputs(4, 30, 8)
    assert cpu_linear.cpu_layout(x, w) == "linear" and cpu_linear.chosen_layouts() == {}
    # also for a shape timed before the switch
    monkeypatch.setattr(cpu_linear, "_chosen", {(x.dtype, cpu_linear.row_bucket(4), 30, 8, torch.get_num_threads()):
                                                "transposed"})
    assert cpu_linear.cpu_layout(x, w) == "linear"


@pytest.mark.parametrize("case", ["rows65", "no_rows", "grad", "dtype_mismatch", "strided_3d"])
def test_outside_its_range_matmul_t_is_f_linear(monkeypatch, case):
    monkeypatch.setattr(cpu_linear, "cpu_layout", lambda x, w: pytest.fail("layout chosen"))
    x, w = _inputs(65 if case == "rows65" else 4, 12, 8)
    if case == "no_rows":
        x = x[:0]
    if case == "grad":
        w.requires_grad_(True)
    if case == "dtype_mismatch":
        with pytest.raises(RuntimeError):   # F.linear's own error: nothing here hides it
            cpu_linear.matmul_t(x.double(), w)
        return
    if case == "strided_3d":   # inside the range: rows that are no view of (15, 8) are copied
        monkeypatch.undo()
        x = torch.randn(3, 8, 5).transpose(1, 2)   # (3, 5, 8)
        torch.testing.assert_close(cpu_linear.matmul_t(x, w), torch.nn.functional.linear(x, w))
        return
    y = cpu_linear.matmul_t(x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w))
    if case == "grad":
        y.sum().backward()
        torch.testing.assert_close(w.grad, x.sum(0).expand(12, 8))


def test_the_cpu_paths_use_it(monkeypatch):
    """The model's projections (reference.skinny_linear) and the token selection
    (reference.linear_argmax) run their few rows through the chosen layout."""
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda x, w: {"linear": 5.0, "transposed": 1.0})
    x, w = _inputs(3, 1001, 48, seed=3)
    torch.testing.assert_close(reference.skinny_linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(reference.linear_argmax(x, w), (x.double() @ w.double().T).argmax(-1))
    layouts = {key[1:4]: value["layout"] for key, value in cpu_linear.chosen_layouts().items()}
    assert layouts == {(4, 1001, 48): "transposed"}   # 3 rows: the bucket of 4
