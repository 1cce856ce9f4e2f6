"""LaunchTuner: per-shape launch choice by timing (the GPU timer itself runs in the GPU tests of
its users: test_attention.py, test_skinny_linear.py)."""
import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import PTXASError

from mtp_kernels import launch_tuner
from mtp_kernels.launch_tuner import LaunchTuner


def test_tune_keeps_the_fastest_and_failures_lose():
    tuner = LaunchTuner("demo")
    ran = []
    times = tuner.tune(("shape", 1), ["a", "b", "c"], lambda c: ran.append(c), timer=lambda fn: fn() or 1.0)
    assert ran == ["a", "b", "c"] and times == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert tuner.chosen[("shape", 1)] == "a"          # ties go to the first candidate

    cost = {"a": 3.0, "b": 2.0, None: 2.5}

    def timer(fn):
        return cost[fn()]
    times = tuner.tune("k", ["a", "b", None], lambda c: c, timer)
    assert tuner.chosen["k"] == "b" and times[None] == 2.5

    def run(c):
        if c == "b":
            raise RuntimeError("out of resources")
        return c
    times = tuner.tune("k", ["a", "b", None], run, timer)
    assert times["b"] == float("inf") and tuner.chosen["k"] is None   # None is a real choice (e.g. cuBLAS)

    def fails_ptxas(c):   # Triton's compile and ptxas errors are not RuntimeErrors
        if c == "a":
            raise PTXASError("ptxas failed")
        return c
    times = tuner.tune("k", ["a", "b"], fails_ptxas, timer)
    assert times["a"] == float("inf") and tuner.chosen["k"] == "b"
    with pytest.raises(RuntimeError, match=r"demo: none of \['a', 'b'\] runs for k2"):
        tuner.tune("k2", ["a", "b"], lambda c: (_ for _ in ()).throw(RuntimeError("no")), timer)
    with pytest.raises(AssertionError):   # a wrong result in a checking timer is not swallowed
        tuner.tune("k3", ["a"], lambda c: c, lambda fn: (_ for _ in ()).throw(AssertionError("mismatch")))


def test_choose_tunes_once_and_falls_back(monkeypatch):
    tuner = LaunchTuner("demo")
    cpu = torch.device("cpu")
    # not on CUDA: no tuning, the fallback, nothing remembered
    def tune_k(key, candidates=("a", "b")):
        return lambda: tuner.tune(key, list(candidates), lambda c: c)
    assert tuner.choose("k", cpu, tune_k("k"), fallback=lambda: "f") == "f" and not tuner.chosen
    monkeypatch.setattr(launch_tuner, "tuning_enabled", lambda device: True)
    calls = []
    monkeypatch.setattr(launch_tuner, "cuda_graph_ms", lambda fn: calls.append(fn()) or {"a": 2.0, "b": 1.0}[calls[-1]])
    assert tuner.choose("k", cpu, tune_k("k"), fallback=lambda: "f") == "b"
    assert tuner.choose("k", cpu, tune_k("k"), fallback=lambda: "f") == "b" and calls == ["a", "b"]
    # a known key is one lookup: the fallback is not even built
    assert tuner.choose("k", cpu, lambda: pytest.fail("retuned"), fallback=lambda: pytest.fail("built")) == "b"
    # MTP_TUNE=0 keeps the default also for a shape tuned before the switch
    monkeypatch.setenv("MTP_TUNE", "0")
    assert tuner.choose("k", cpu, lambda: pytest.fail("retuned"), fallback=lambda: "f") == "f"
    monkeypatch.delenv("MTP_TUNE")
    # a tuning failure warns, keeps the fallback for the shape and does not retry
    monkeypatch.setattr(launch_tuner, "cuda_graph_ms", lambda fn: (_ for _ in ()).throw(RuntimeError("capture")))
    with pytest.warns(UserWarning, match="demo: launch tuning failed for k2, keeping the default launch"):
        assert tuner.choose("k2", cpu, tune_k("k2", "a"), fallback=lambda: "f") == "f"
    assert tuner.choose("k2", cpu, lambda: pytest.fail("retuned"), fallback=lambda: "f") == "f"
    def tune_fails_to_compile():
        raise CompilationError("kernel.py", None, "bad")
    with pytest.warns(UserWarning, match="demo: launch tuning failed for k3"):
        assert tuner.choose("k3", cpu, tune_fails_to_compile, fallback=lambda: "f") == "f"


def test_tuning_enabled_reads_the_environment(monkeypatch):
    assert not launch_tuner.tuning_enabled(torch.device("cpu"))
    if torch.cuda.is_available():
        monkeypatch.setenv("MTP_TUNE", "0")
        assert not launch_tuner.tuning_enabled(torch.device("cuda"))
        monkeypatch.setenv("MTP_TUNE", "1")
        assert launch_tuner.tuning_enabled(torch.device("cuda"))


def test_rotation_count_holds_twice_the_l2_and_divides_the_calls():
    mib = 1 << 20
    l2 = 50 * mib                                                      # the H100's L2
    # the 7B projections in bf16: wo (32 MiB) needs 4 copies for 100 MiB, 5 divide the 10 calls;
    # fused qkv (96 MiB) and w2 (86 MiB) need 2, the fused w13 (172 MiB) is read from HBM alone
    assert [launch_tuner.rotation_count(n * k * 2, l2) for n, k in
            ((4096, 4096), (12288, 4096), (4096, 11008), (22016, 4096))] == [5, 2, 2, 1]
    assert launch_tuner.rotation_count(1000, l2) == launch_tuner.GRAPH_CALLS   # at most one copy per call
    assert launch_tuner.rotation_count(0, l2) == launch_tuner.GRAPH_CALLS
    assert launch_tuner.rotation_count(2 * l2, l2) == 1
    assert launch_tuner.rotation_count(2 * l2 - 1, l2) == 2
    # other graph sizes: 4 copies divide 12 calls, 5 become 6, 8 become 12
    assert [launch_tuner.rotation_count(n, l2, calls=12) for n in (l2 // 2, l2 * 2 // 5, l2 // 4)] == [4, 6, 12]
    for nbytes in range(1, 3 * l2, l2 // 7):
        count = launch_tuner.rotation_count(nbytes, l2)
        assert launch_tuner.GRAPH_CALLS % count == 0
        assert count * nbytes >= 2 * l2 or count == launch_tuner.GRAPH_CALLS


def test_rotating_copies_cycle_through_clones(monkeypatch):
    weight = torch.randn(8, 16)                                        # 512 bytes
    nxt = launch_tuner.rotating_copies(weight, l2_bytes=512)           # 2x the L2 in 2 copies
    seen = [nxt() for _ in range(5)]
    assert seen[0] is weight and seen[1] is not weight and seen[2] is weight and seen[3] is seen[1]
    assert torch.equal(seen[1], weight) and seen[1].data_ptr() != weight.data_ptr()
    # the L2 size defaults to the device's (a CUDA query, stood in for here); here 10 copies
    monkeypatch.setattr(launch_tuner, "l2_cache_bytes", lambda device: 50 << 20)
    nxt = launch_tuner.rotating_copies(weight)
    ptrs = [nxt().data_ptr() for _ in range(2 * launch_tuner.GRAPH_CALLS)]
    assert len(set(ptrs)) == launch_tuner.GRAPH_CALLS and ptrs[:10] == ptrs[10:]
    # a graph of GRAPH_CALLS calls captured after any number of other calls never repeats a copy,
    # not even from its last call to the first of the next replay
    for need in (2, 3, 4):   # copies to hold 2x the L2; 3 and 4 become 5
        nxt = launch_tuner.rotating_copies(weight, l2_bytes=need * 512 // 2)
        for warmup in range(3):
            graph = [nxt().data_ptr() for _ in range(launch_tuner.GRAPH_CALLS)]
            replayed = graph + graph
            assert all(a != b for a, b in zip(replayed, replayed[1:]))
