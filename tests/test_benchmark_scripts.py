"""The benchmark scripts that a GPU session runs through gpu_check.sh work before the GPU is lent.

A device lease is 15 minutes; a script that dies on a Python error wastes it. Each script runs here
in a subprocess, as gpu_check.sh runs it, in its CPU mode on tiny shapes; the GPU-only scripts are
at least imported (syntax, imports, module-level names), and gpu_check.sh is parsed by bash.
"""
import importlib.util
import json
import re
import math
import os
import types
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _env(**overrides):
    """The environment gpu_check.sh gives a stage: the checkout importable, no backend override."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTP_BACKEND", "MTP_CROSS_COMPILE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               **overrides)
    return env


def _run(args, tmp_path, **env_overrides):
    proc = subprocess.run([sys.executable, *map(str, args), "--out", str(tmp_path)], env=_env(**env_overrides),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("test_")))
def test_script_imports(script, load_script):
    load_script(BENCH / script)   # every script guards its work behind __main__


def test_gpu_check_script_parses_and_knows_its_stages():
    text = (BENCH / "gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    for stage_script in ("bench_rmsnorm.py", "bench_fused_ce.py", "profile_fused_ce.py", "bench_attention.py",
                         "bench_generate.py", "bench_head_schedule.py", "bench_host_overhead.py",
                         "probe_warp_spec.py", "probe_skinny_rows.py", "probe_dependent_launch.py",
                         "bench_prefill.py", "bench_sampling.py", "bench_train_step.py",
                         "bench_continuous_batching.py"):
        assert stage_script in text and (BENCH / stage_script).exists()


def _scratch_gpu_check(tmp_path):
    """A copy of gpu_check.sh (and common.py, which its guard reads) in a scratch checkout, and the
    environment to run it with: (script, env)."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "kernels").mkdir()
    for name in ("gpu_check.sh", "common.py"):
        (tmp_path / "benchmarks" / name).write_text((BENCH / name).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MTP_WARP_SPEC", "MTP_PDL")}
    env.update(OUT=str(tmp_path / "out"), RESULTS_DIR=str(tmp_path / "results"))
    return tmp_path / "benchmarks" / "gpu_check.sh", env


def test_gpu_check_survives_peer_wheels_that_do_not_install(tmp_path):
    """A broken .whl used to leave PYTHONPATH unset, and `set -u` then killed the script before any
    stage ran. Run a copy of the script in a scratch checkout with a bad wheel."""
    script, env = _scratch_gpu_check(tmp_path)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "broken-0.0-py3-none-any.whl").write_bytes(b"not a zip file")
    # `env` fails on a machine without a GPU, but as a stage: it is logged and packed, the run goes on.
    proc = subprocess.run(["bash", str(script), "env", "no_such_stage"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "did not install" in proc.stdout and "unknown stage no_such_stage" in proc.stdout
    assert "=== summary" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "results.tar.gz"]


def test_gpu_check_cuts_its_stages_to_the_calls_time(tmp_path):
    """GPU_CHECK_SECONDS bounds the whole call: a stage's limit is cut to what is left (15 s kept for
    packing), and a stage that would get under 20 s is skipped and said so, with the summary and the
    packed results still written (the device's own limit killed the script mid-stage: no summary, the
    stage's results unpacked)."""
    script, env = _scratch_gpu_check(tmp_path)
    env["GPU_CHECK_SECONDS"] = "50"
    proc = subprocess.run(["bash", str(script), "env", "env"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert re.search(r"=== env \(.*, limit 3[0-5]s\)", log), log   # 60 s asked, about 35 left
    env.update(GPU_CHECK_SECONDS="30", OUT=str(tmp_path / "out2"))
    proc = subprocess.run(["bash", str(script), "env"], env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out2" / "gpu_check.log").read_text()
    assert "=== env skipped: " in log and "env: skipped (deadline)" in log.split("=== summary")[-1]
    assert (tmp_path / "out2" / "results.tar.gz").exists()


@pytest.mark.parametrize("setting,stages,switched_off", [(None, ["env"], True), ("1", ["env"], False),
                                                          (None, ["tests"], False)])
def test_gpu_check_without_tests_runs_without_warp_specialization(tmp_path, setting, stages, switched_off):
    """A call without a tests stage has no GPU check of the warp-specialized kernels behind it: unless
    MTP_WARP_SPEC=1 was asked for by hand, its benchmarks run with MTP_WARP_SPEC=0; likewise
    programmatic dependent launches (MTP_PDL=0). (The tests stage here collects a file that does not
    exist, so pytest stops at once; the guards after it then switch both off, each with its message.)"""
    script, env = _scratch_gpu_check(tmp_path)
    env["GPU_TESTS"] = "no_such_test_file.py"
    if setting is not None:
        env["MTP_WARP_SPEC"] = setting
    proc = subprocess.run(["bash", str(script), *stages], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("no tests stage in this call: warp-specialized kernels off" in proc.stdout) is switched_off
    assert ("not confirmed by their GPU tests" in proc.stdout) is (stages == ["tests"])
    assert ("no tests stage in this call: programmatic dependent launches off (MTP_PDL=0)" in proc.stdout) \
        is (stages == ["env"])
    assert ("programmatic dependent launches not confirmed by their GPU tests" in proc.stdout) is (stages == ["tests"])
    assert ("warp-specialized kernels not confirmed by their GPU tests" in proc.stdout) is (stages == ["tests"])


def test_bench_prefill_tiny(tmp_path):
    """Grouped against one-forward prefill on a tiny model, with and without shared prefixes: all
    timed, the tokens each computes counted (groups compute no more than padding to the longest,
    equal lengths are one forward, prompts that begin alike share)."""
    out = _run([BENCH / "bench_prefill.py", "--tiny"], tmp_path)
    assert "| one long |" in out
    result = json.loads(next(tmp_path.glob("prefill_*_tiny.json")).read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert all(r["one forward"]["status"] == r["groups"]["status"] == "ok" for r in rows.values())
    assert rows["one long"]["grouped_tokens"] < rows["one long"]["padded_tokens"]
    assert rows["one long"]["groups"]["forwards"] == 2 and rows["equal"]["groups"]["forwards"] == 1
    assert all(r["prompt_tokens"] <= r["grouped_tokens"] <= r["padded_tokens"] for r in rows.values())
    # prompts that begin alike share their prefix (all but the last token of the n samples' prompt)
    assert all(r["no sharing"]["status"] == "ok" and r["no sharing"]["shared_tokens"] == 0 for r in rows.values())
    assert rows["spread"]["groups"]["shared_tokens"] == 0 and rows["few-shot"]["groups"]["shared_tokens"] > 0
    samples = rows["n samples"]
    assert samples["groups"]["shared_tokens"] == (len(samples["lengths"]) - 1) * (samples["lengths"][0] - 1)


def test_bench_train_step_tiny(tmp_path):
    """Eager against compiled training steps, tiny model (aot_eager): both timed, the same loss, the
    floor from the step's FLOPs, and the compile's first call reported apart."""
    out = _run([BENCH / "bench_train_step.py", "--tiny"], tmp_path)
    assert "| compiled / floor |" in out
    result = json.loads((tmp_path / "train_step_cpu_tiny.json").read_text())
    assert (tmp_path / "train_step_cpu_tiny.md").exists() and result["backend"] == "aot_eager"
    (config,) = result["configs"]
    assert config["eager"]["status"] == config["compiled"]["status"] == config["checkpointed"]["status"] == "ok", config
    assert config["compiled"]["loss"] == pytest.approx(config["eager"]["loss"], rel=1e-5)
    # activation checkpointing: the same loss, far less kept for the backward, a slower step
    assert config["checkpointed"]["loss"] == config["eager"]["loss"]
    assert 0 < config["checkpointed"]["saved_mib"] < 0.5 * config["eager"]["saved_mib"]
    assert config["checkpointed_slowdown"] > 0 and "| checkpointed / eager |" in out
    assert config["speedup"] > 0 and config["floor_ms"] > 0 and config["first_compiled_call_s"] > 0
    # 6 x tokens x (4 blocks' projections + 2 x the unembedding) + the attention term
    dim, hidden, vocab, tokens = 32, 128, 512, 2 * 64   # (hidden: 2/3 of 4 dim up to a multiple of 64)
    block = 4 * dim * dim + 3 * dim * hidden
    assert config["flops"] == 6 * tokens * (4 * block + 2 * vocab * dim) + 6 * 4 * 2 * 64 ** 2 * dim


def test_bench_sampling_tiny(tmp_path):
    """Token selection at the unembedding, tiny shapes: every contender timed at every row count, the
    floors, ratios and the noise's cost (keyed sample / argmax) positive, tokens in the vocabulary."""
    out = _run([BENCH / "bench_sampling.py", "--tiny"], tmp_path)
    assert "| sample / argmax |" in out
    result = json.loads((tmp_path / "sampling_cpu_tiny.json").read_text())
    assert (tmp_path / "sampling_cpu_tiny.md").exists()
    assert (result["V"], result["D"], result["dtype"]) == (8192, 64, "float32")
    assert result["weight_bytes"] == 8192 * 64 * 4 and result["ceilings"]["copy_gbps"] > 0
    assert [r["R"] for r in result["rows"]] == [1, 8, 64]
    for row in result["rows"]:
        for key in ("bytes_floor_ms", "flops_floor_ms", "floor_ms", "sample_vs_argmax", "argmax_speedup_vs_eager",
                    "sample_speedup_vs_eager", "sample_top_p_speedup_vs_eager"):
            assert isinstance(row[key], float) and row[key] > 0, (row["R"], key, row[key])
        for name in ("argmax", "sample", "sample_top_p", "sample_top_k", "eager_argmax", "eager_sample",
                     "eager_sample_top_p"):
            entry = row[name]
            assert entry["status"] == "ok" and entry["ms"] > 0 and entry["vs_floor"] > 0, (row["R"], name, entry)
            assert entry["tokens_in_range"], (row["R"], name)


def test_bench_continuous_batching_tiny(tmp_path):
    """Static batches and continuous batching give the same tokens (the script exits 1 otherwise),
    plain and tree, with their times, rates and forwards; continuous batching runs fewer forwards."""
    out = _run([BENCH / "bench_continuous_batching.py", "--tiny", "--prompts", "6", "--rows", "2"], tmp_path)
    assert "| decoding | static ms | continuous ms | speedup |" in out
    result = json.loads((tmp_path / "continuous_batching_cpu_tiny.json").read_text())
    assert (result["prompts"], result["rows"]) == (6, 2) and len(result["gen_lens"]) == 6
    assert [m["mode"] for m in result["modes"]] == ["plain", "tree"]
    for m in result["modes"]:
        assert m["same_tokens"] and m["speedup"] > 0
        assert m["continuous"]["forwards"] < m["static"]["forwards"], m
        for name in ("static", "continuous"):
            assert m[name]["ms"] > 0 and m[name]["tokens_per_s"] > 0


def test_bench_host_overhead_cpu_smoke(tmp_path):
    """Every row of the host-time table, the flash forward taken apart, and its profile."""
    _run([BENCH / "bench_host_overhead.py", "--cpu-smoke"], tmp_path, TRITON_INTERPRET="1", MTP_BACKEND="triton")
    result = json.loads((tmp_path / "host_overhead_cpu.json").read_text())
    calls = [r["call"] for r in result["rows"]]
    assert len(calls) == 8 and "forward: kernel with the chosen config" in calls
    assert all(isinstance(r["host_us"], float) and r["host_us"] > 0 for r in result["rows"])
    assert "function calls" in result["profiles"][0] and "tottime" in result["profiles"][0]


def test_probe_warp_spec_cpu_smoke(tmp_path):
    """Every warp-specialized launch of the probe runs and is judged right under the interpreter."""
    _run([BENCH / "probe_warp_spec.py", "--cpu-smoke"], tmp_path, TRITON_INTERPRET="1", MTP_BACKEND="triton")
    rows = json.loads((tmp_path / "warp_spec_probe_cpu.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"forward", "dQ", "dK/dV"}
    assert all("error" not in r and r["bad_rows"] == 0 and r["rel_err"] < 1e-5 for r in rows), rows


def test_probe_warp_spec_locates_bad_rows(load_script):
    """A wrong row is found in its query block and in the half of the block a consumer takes."""
    probe = load_script(BENCH / "probe_warp_spec.py")
    want = torch.randn(2, 256, 3, 8, generator=torch.Generator().manual_seed(0))
    got = want.clone()
    got[1, 128 + 70, 2] = float("nan")     # block 1, second half
    got[0, 5, 0] += 10.0                    # block 0, first half
    got[0, 6, 1] += 1e-4                    # within tolerance
    found = probe.bad_rows(got, want, block_m=128, tol=0.05)
    assert found == {"bad_rows": 2, "of_rows": 2 * 256 * 3, "blocks": [0, 1], "halves": ["first", "second"]}


def test_probe_warp_spec_timing_tables(triton_backend, load_script, monkeypatch):
    """The timing part (GPU only in a run) on interpreter shapes: every tuned config gets a row, each
    warp-specialized one an error against SDPA, and the summary table pairs the best plain time with
    the best warp-specialized one."""
    import triton
    from mtp_kernels import attention

    probe = load_script(BENCH / "probe_warp_spec.py")
    monkeypatch.setenv("MTP_WARP_SPEC", "1")
    monkeypatch.setattr(probe, "TIMED_FLASH_SHAPES", [(1, 2, 40, 16)])
    configs = {"fwd": [triton.Config(dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=True, WARP_SPEC=w), num_warps=4)
                       for w in (False, True)],
               "dq": [triton.Config(dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=w), num_warps=4) for w in (False, True)],
               "dkdv": [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, ONE_LOOP=True, WARP_SPEC=w), num_warps=4)
                        for w in (False, True)]}

    class Tuned:   # what the autotuner leaves after a GPU run: every config's time, the pick
        def __init__(self, which):
            self.configs_timings = {c: [1.0 + i] for i, c in enumerate(configs[which])}
            self.best_config = configs[which][0]
    monkeypatch.setattr(attention, "_tuned", Tuned)
    flash_rows = probe.time_flash(attention, "cpu", torch.float32)
    assert [(r["kernel"], r["warp_spec"], r["chosen"]) for r in flash_rows] == [
        (k, ws, not ws) for k in ("forward", "dQ", "dK/dV") for ws in (False, True)]
    assert all(r["rel_err_vs_sdpa"] < 1e-5 for r in flash_rows if r["warp_spec"]), flash_rows
    # a wrong dV with a right dK is found (the two come from one kernel's two accumulators)
    real_bwd = attention.flash_attention_bwd

    def bwd_with_nan_dv(*args, dkdv_config=None, **kwargs):
        dq, dk, dv = real_bwd(*args, dkdv_config=dkdv_config, **kwargs)
        return (dq, dk, torch.full_like(dv, float("nan"))) if dkdv_config is not None else (dq, dk, dv)
    monkeypatch.setattr(attention, "flash_attention_bwd", bwd_with_nan_dv)
    judged = {r["kernel"]: r for r in probe.time_flash(attention, "cpu", torch.float32) if r["warp_spec"]}
    assert math.isnan(judged["dK/dV"]["rel_err_vs_sdpa"]) and judged["dQ"]["rel_err_vs_sdpa"] < 1e-5
    table = probe.timing_markdown(flash_rows)
    assert "| B1 H2 T40 D16 causal | forward | 1.0 | 2.0 | 0.5 |" in table, table


def test_bench_attention_cpu_smoke(tmp_path, load_script):
    _run([BENCH / "bench_attention.py", "--cpu-smoke"], tmp_path, TRITON_INTERPRET="1", MTP_BACKEND="triton")
    result = json.loads((tmp_path / "attention_cpu-smoke.json").read_text())
    assert {r["impl"] for r in result["flash"]} == {"ours", "sdpa", "eager"}
    assert all(isinstance(r["fwd_ms"], float) and isinstance(r["fwd_bwd_ms"], float) for r in result["flash"])
    assert next(r for r in result["flash"] if r["impl"] == "ours")["bwd_bitwise_deterministic"] is True
    (decode,) = result["decode"]
    for key in ("ours_tq1_launch_ms", "ours_tq1_ms", "ours_tq16_ms", "ours_tq64_ms", "sdpa_tq1_ms"):
        assert isinstance(decode[key], float) and decode[key] > 0, (key, decode[key])
    smoke_table = (tmp_path / "attention_cpu-smoke.md").read_text()
    assert "| 2 | 40 |" in smoke_table
    assert "not a speed" in smoke_table and "CUDA-graph replays" not in smoke_table   # says what it timed

    # A GPU run also lists every forward config the autotuner timed (none tune on a CPU): fake one.
    bench = load_script(BENCH / "bench_attention.py")
    ours = next(r for r in result["flash"] if r["impl"] == "ours")
    ours["tuned_configs"] = {"fwd": "BLOCK_M: 64", "fwd_timings_ms": {"BLOCK_M: 128": 1.25, "BLOCK_M: 64": 1.0}}
    table = bench.to_markdown(result)
    assert "| BLOCK_M: 64 | 1 | yes |" in table and "| BLOCK_M: 128 | 1.25 |  |" in table
    assert table.index("BLOCK_M: 64 | 1 |") < table.index("BLOCK_M: 128 | 1.25")
    assert "### dQ configs" not in table
    ours["tuned_configs"].update(dq="WARP_SPEC: True", dq_timings_ms={"WARP_SPEC: True": 0.9, "WARP_SPEC: False": 1.1})
    table = bench.to_markdown(result)
    assert "### dQ configs" in table and "| WARP_SPEC: True | 0.9 | yes |" in table
    assert "### dK/dV configs" not in table
    # and, timed back to back (GPU only: none on a CPU), the same calls with their host overhead hidden
    assert "### Back-to-back" not in table and bench._bench_back_to_back_ms(lambda: None) is None
    sdpa = next(r for r in result["flash"] if r["impl"] == "sdpa")
    ours.update(fwd_ms_back_to_back=1.2, fwd_bwd_ms_back_to_back=4.0, fwd_vs_sdpa_back_to_back=0.8,
                fwd_bwd_vs_sdpa_back_to_back=0.75)
    sdpa.update(fwd_ms_back_to_back=0.96, fwd_bwd_ms_back_to_back=3.0)
    table = bench.to_markdown(result)
    assert "### Back-to-back" in table and "| ours | 1.2 | 0.8 | 4 | 0.75 |" in table
    # and the forward's kernels from the profiler, largest first
    assert "### Forward kernels" not in table and ours["fwd_kernels_ms"] is None
    ours["fwd_kernels_ms"] = {"copy_kernel": 0.09, "_flash_fwd_kernel": 1.22}
    assert "_flash_fwd_kernel: 1.22, copy_kernel: 0.09 |" in bench.to_markdown(result)


def test_tree_attention_floor_counts_only_the_scores_the_mask_keeps(load_script):
    """A 64-node tree's floor: 64 x S cached scores plus its mask's true entries (each node sees its
    ancestors and itself), not 64 x (S + 64); compute bound at this rate, so the count decides."""
    bench = load_script(BENCH / "bench_attention.py")
    mask = bench._tree_mask(64, "cpu")
    pairs = int(mask.sum())
    assert 64 < pairs < 64 * 64 / 4
    B, S, H, Hkv, D = 1, 1024, 32, 8, 128
    floor = bench._kv_floor_ms(B, S, 64, H, Hkv, D, 2, copy_gbps=1e12, matmul_tflops=1.0, tree_pairs=pairs)
    assert floor == pytest.approx(4 * B * H * D * (64 * S + pairs) / 1e9)
    assert bench._kv_floor_ms(B, S, 1, H, Hkv, D, 2, 1e12, 1.0) == pytest.approx(4 * H * D * (S + 1) / 1e9)


def test_bench_attention_holds_sdpa_to_one_backend(load_script):
    # On a GPU the table times SDPA's FlashAttention-2 and cuDNN backends beside its default pick.
    bench = load_script(BENCH / "bench_attention.py")
    q, k, v = (torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(bench._sdpa_on_backend("MATH")(q, k, v), bench._eager_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)
    # A backend this machine lacks (cuDNN on a CPU) is that contender's recorded error, not a crash.
    assert bench._bench_ms(lambda: bench._sdpa_on_backend("CUDNN_ATTENTION")(q, k, v)).startswith("error:")


def test_bench_fused_ce_cpu_quick(tmp_path):
    _run([BENCH / "bench_fused_ce.py", "--device", "cpu", "--quick", "--skip-ceilings", "--rep-ms", "5"], tmp_path)
    rows = {r["contender"]: r for r in json.loads((tmp_path / "fused_ce_cpu.json").read_text())["results"]}
    assert rows["ours"]["status"] == "ok" and rows["eager_per_head"]["status"] == "ok"
    assert "Ceilings not measured (--skip-ceilings): the floors assume a matmul rate of 1 TFLOP/s" in \
        (tmp_path / "fused_ce_cpu.md").read_text()


@pytest.mark.parametrize("args,match", [(["--rep-ms", "0"], "--rep-ms must be > 0"),
                                        (["--contenders", "ours,ours"], "--contenders names one entry twice"),
                                        (["--contenders", "nobody"], "unknown --contenders ['nobody']"),
                                        (["--device", "tpu"], "invalid choice: 'tpu'")])
def test_bench_fused_ce_argument_errors_exit_2(load_script, capsys, args, match):
    bench = load_script(BENCH / "bench_fused_ce.py")
    with pytest.raises(SystemExit) as refused:   # argparse's usage error, before any work
        bench.main(["--quick", "--skip-ceilings"] + args)
    assert refused.value.code == 2 and match in capsys.readouterr().err


def test_bench_fused_ce_per_head_peers_and_scratch_labels(load_script):
    """Per-head contenders run each head's backward before the next head's forward (the paper's
    order, one head's buffers alive at a time): same loss and gradients as one backward of the sum.
    The scratch column gives what our variants ran with: the driver raises a budget below V*D
    bytes when it sums dW in float32 and casts at the end."""
    bench = load_script(BENCH / "bench_fused_ce.py")
    shape = bench.Shape("odd", n=3, N=37, D=16, V=101)
    hidden, weight, targets = bench.make_inputs(shape, torch.device("cpu"), torch.float32)
    loss = bench.forward_backward(bench.eager_per_head(torch.device("cpu")), hidden, weight, targets)
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    summed = sum(torch.nn.functional.cross_entropy(hidden[i] @ weight.T, targets[i], ignore_index=bench.IGNORE_INDEX)
                 for i in range(shape.n))
    summed.backward()
    torch.testing.assert_close(loss, summed.detach())
    torch.testing.assert_close(dh, hidden.grad)
    torch.testing.assert_close(dw, weight.grad)
    v32k, v128k = bench.SHAPES["v32k"], bench.SHAPES["v128k"]
    assert bench.our_scratch_mib("ours_scratch64", v32k, torch.bfloat16) == 32000 * 4096 * 2 / 2**20   # 250 MiB
    assert bench.our_scratch_mib("ours_scratch512", v32k, torch.bfloat16) == 512
    assert bench.our_scratch_mib("ours", v128k, torch.bfloat16) == 128256 * 4096 * 2 / 2**20          # 1002 MiB
    assert bench.our_scratch_mib("ours_native_accum", v128k, torch.bfloat16) == 256                   # no cast
    assert bench.our_scratch_mib("ours_scratch64", v32k, torch.float32) == 64                         # no cast


def test_bench_generate_tiny(tmp_path, load_script, monkeypatch):
    _run([BENCH / "bench_generate.py", "--tiny"], tmp_path)
    table = (tmp_path / "generate_cpu.md").read_text()
    for mode in ("plain", "chain", "tree"):
        assert f"| {mode} |" in table
    # The peer of the plain step, timed in the same run: eager PyTorch.
    result = json.loads((tmp_path / "generate_cpu.json").read_text())
    for row in result["step_costs"]:
        assert row["eager_plain_ms"] > 0 and row["plain_vs_eager"] == row["plain_ms"] / row["eager_plain_ms"]
    assert "| eager PyTorch ms | plain / eager |" in table
    bench = load_script(BENCH / "bench_generate.py")
    monkeypatch.setenv("MTP_BACKEND", "triton")
    gen = types.SimpleNamespace(cuda_graphs=None)
    with bench.eager_pytorch(gen):
        assert os.environ["MTP_BACKEND"] == "reference" and gen.cuda_graphs is False
    assert os.environ["MTP_BACKEND"] == "triton" and gen.cuda_graphs is None
    # The shipped model's head dim (48) is not a kernel head dim: the table must say what ran.
    assert "Attention: reference attention (head dim 48, float32, cpu)" in table


@pytest.mark.parametrize("args,match", [(["--ckpt-dir", "/nonexistent/ckpt"], "no params.json there"),
                                        (["--gen-len", "0"], "--gen-len: must be an int >= 1, got 0"),
                                        (["--batches", "1", "0"], "--batches: must be an int >= 1, got 0")])
def test_bench_generate_refuses_arguments_that_would_measure_something_else(tmp_path, args, match):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_generate.py"), "--tiny", "--out", str(tmp_path), *args],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())   # refused before measuring


def test_gpu_train_default_dry_run_on_cpu(tmp_path):
    """The device lease's training stage end to end, tiny: corpus with extra sources and the shipped
    tokenizer, a schedule fitted to the budget, self-distilled heads, eval with a fitted tree, and the
    checkpoint split into pieces that come back from the device and join into a loadable checkpoint."""
    import sysconfig
    import tarfile

    from mtp_engine.checkpoint import load_checkpoint

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    for name in ("heapq.py", "bisect.py", "textwrap.py", "string.py", "functools.py"):
        (src / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("test_heapq.py", "test_bisect.py"):
        (src / "test" / name).write_text((stdlib / "test" / name).read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    env = _env(PYTHON=sys.executable, PRESET="tiny", TRAIN_SECONDS="6", EVAL_DEVICE="cpu", EXTRA_MB="0.2",
               SOURCE_DIR=str(src), WORK=str(tmp_path / "work"), TRAIN_ARGS="--vocab-size 8192", PART_SIZE="200k",
               EVAL_ARGS="--prompts 2 --max-files 2 --tree-budget 8", DISTILL_STEPS="3",
               DISTILL_ARGS="--prompts 4 --prompt-len 16 --gen-len 8 --batch-size 2 --warmup-steps 1")
    proc = subprocess.run(["bash", str(BENCH / "gpu_train_default.sh"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = sorted((out / "model").glob("consolidated.00.pth.part-*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 200 * 1024 for p in parts)   # joined in name order
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "consolidated.00.pth").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(out / "model" / "meta.tar.gz") as tar:
        tar.extractall(ckpt)
    model = load_checkpoint(ckpt)
    assert model.n_future_tokens == 4 and model.vocab_size == 8192
    log = json.loads((ckpt / "train_log.json").read_text())
    # The fitted step count follows this machine's speed over the 6-s budget (over 25 when run alone;
    # a helper's run beside other load once got fewer): only a degenerate fit fails here.
    assert log["corpus"]["train_tokens"] > 0 and log["schedule_fit"]["max_steps"] >= 5
    assert json.loads((ckpt / "eval.json").read_text())["heads"] == 4 and (ckpt / "tree.json").is_file()
    assert json.loads((ckpt / "distill_log.json").read_text())["steps"][-1]["step"] == 3
    assert json.loads((ckpt / "eval_pretrained.json").read_text())["heads"] == 4

    # The n=1 baseline: no tree to fit, logs only.
    env.update(MODEL_NAME="n1", RETURN_CHECKPOINT="0", TRAIN_ARGS="--vocab-size 8192 --n-future-tokens 1",
               TRAIN_SECONDS="4")
    proc = subprocess.run(["bash", str(BENCH / "gpu_train_default.sh"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "n1").iterdir()) == ["meta.tar.gz"]
    with tarfile.open(out / "n1" / "meta.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["eval.json", "params.json", "tokenizer.model", "train_log.json"]


def test_bench_generate_reports_the_decode_gemm_tuning(monkeypatch, load_script):
    """The report of what the skinny-GEMM tuner measured (filled only on a GPU): GB/s and choice."""
    from mtp_kernels import skinny_linear as sl
    from mtp_kernels.launch_tuner import LaunchTuner

    module = load_script(BENCH / "bench_generate.py")
    tuner = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", tuner)
    tile = sl.SkinnyLaunch(16, 256, use_dot=False, num_warps=4, num_stages=4)
    key = ("cuda:0", torch.bfloat16, 1, 4096, 4096)
    tuner.times[key] = {None: 0.0125, tile: 0.0100, sl.SkinnyLaunch(32, 256, True): float("inf")}
    tuner.chosen[key] = tile
    (row,) = module.skinny_launch_report()
    assert row["row_tile"] == 1 and row["cublas_ms"] == 0.0125 and row["kernel_ms"] == 0.0100
    assert abs(row["kernel_GBps"] - 4096 * 4096 * 2 / 1e6 / 0.0100) < 1e-6
    assert row["chosen"] == row["best_tile"] == "1x16x256 fma w4 s4"
    assert row["times_ms"] == {"cuBLAS": 0.0125, "1x16x256 fma w4 s4": 0.0100, "16x32x256 dot w4 s3": float("inf")}
    split = sl.SkinnyLaunch(64, 128, True, num_warps=4, num_stages=4, block_m=64, split_k=2)
    tuner.times[key] = {None: 0.0125, split: 0.0110}
    tuner.chosen[key] = split
    (row,) = module.skinny_launch_report()
    assert row["chosen"] == row["best_tile"] == "64x64x128 dot w4 s4 k2"   # the K split shows
    assert row["cublaslt_ms"] is None and row["cublaslt_GBps"] is None     # not timed (a CPU tuning)
    # cuBLASLt timed fastest: chosen, in its own columns, never the "best kernel tile".
    tuner.times[key] = {None: 0.0125, sl.BlasLaunch("cublaslt"): 0.0100, split: 0.0110}
    tuner.chosen[key] = sl.BlasLaunch("cublaslt")
    (row,) = module.skinny_launch_report()
    assert row["chosen"] == "cuBLASLt" and row["best_tile"] == "64x64x128 dot w4 s4 k2"
    assert row["cublaslt_ms"] == 0.0100 and abs(row["cublaslt_GBps"] - 4096 * 4096 * 2 / 1e6 / 0.0100) < 1e-6
    assert row["times_ms"] == {"cuBLAS": 0.0125, "cuBLASLt": 0.0100, "64x64x128 dot w4 s4 k2": 0.0110}
    assert row["ws_tile"] == "-" and row["ws_ms"] is None and row["ws_GBps"] is None   # none timed
    # A warp-specialized tile has its own columns, slower than the best tile here.
    ws = sl.SkinnyLaunch(64, 128, True, 4, 4, 64, ws=True)
    tuner.times[key][ws] = 0.0120
    (row,) = module.skinny_launch_report()
    assert row["best_tile"] == "64x64x128 dot w4 s4 k2" and row["ws_tile"] == "64x64x128 dot w4 s4 ws"
    assert row["ws_ms"] == 0.0120 and abs(row["ws_GBps"] - 4096 * 4096 * 2 / 1e6 / 0.0120) < 1e-6
    text = module.to_markdown({"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
                               "step_attention": "a", "tree_nodes": [4], "step_costs": [{"batch": 1, "plain_ms": 5.0}],
                               "decode_gemm_launches": [row], "gen_len": 8, "e2e_model": "-", "e2e_attention": "-",
                               "end_to_end": []})
    assert "| cuBLAS ms | cuBLAS GB/s | cuBLASLt ms | cuBLASLt GB/s |" in text and "| cuBLASLt |" in text
    assert "| best warp-specialized tile | ws ms | ws GB/s | chosen |" in text and "| 64x64x128 dot w4 s4 ws |" in text
    assert "CUDA graphs: True;" in text
    # A generator whose capture failed ran its steps eagerly: the report says which, not "CUDA graphs: True".
    text = module.to_markdown({"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
                               "step_attention": "a", "tree_nodes": [4],
                               "step_costs": [{"batch": 1, "plain_ms": 5.0, "cuda_graphs": False}],
                               "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []})
    assert "CUDA graphs: True (a capture failed during these, which ran eagerly from then on: step costs at batch 1)" in text


def test_bench_generate_reports_the_swiglu_epilogue_tuning(monkeypatch, load_script):
    """The gate/up tuner's report (filled only on a GPU): the unfused pair against the best fused
    tile, GB/s over the whole (2F, K) weight, the choice; and its markdown table."""
    from mtp_kernels import skinny_fused as sf, skinny_linear as sl
    from mtp_kernels.launch_tuner import LaunchTuner

    module = load_script(BENCH / "bench_generate.py")
    tuner = LaunchTuner("skinny_linear_swiglu")
    monkeypatch.setattr(sf, "_SWIGLU_TUNER", tuner)
    tile = sl.SkinnyLaunch(16, 256, True, num_warps=4, num_stages=3, block_m=64, split_k=2)
    key = ("cuda:0", torch.bfloat16, 64, 22016, 4096)
    tuner.times[key] = {None: 0.040, tile: 0.036, sl.SkinnyLaunch(64, 64, True, block_m=64): float("inf")}
    tuner.chosen[key] = tile
    (row,) = module.epilogue_launch_report("swiglu")
    assert (row["row_tile"], row["N"], row["K"], row["unfused_ms"], row["fused_ms"]) == (64, 22016, 4096, 0.040, 0.036)
    assert abs(row["fused_GBps"] - 2 * 11008 * 4096 * 2 / 1e6 / 0.036) < 1e-6
    assert row["chosen"] == row["best_tile"] == "64x16x256 dot w4 s3 k2"
    assert row["times_ms"] == {"unfused": 0.040, "64x16x256 dot w4 s3 k2": 0.036, "64x64x64 dot w4 s3": float("inf")}
    tuner.chosen[key] = None
    (row,) = module.epilogue_launch_report("swiglu")
    assert row["chosen"] == "unfused"
    rope_tuner = LaunchTuner("skinny_linear_rope")
    monkeypatch.setattr(sf, "_ROPE_TUNER", rope_tuner)
    rope_key = ("cuda:0", torch.bfloat16, 1, 6144, 4096, 4096)
    rope_tile = sl.SkinnyLaunch(8, 1024, False)
    rope_tuner.times[rope_key] = {None: 0.020, rope_tile: 0.018}
    rope_tuner.chosen[rope_key] = rope_tile
    (rope_row,) = module.epilogue_launch_report("rope")
    assert (rope_row["N"], rope_row["K"], rope_row["chosen"]) == (6144, 4096, "1x8x1024 fma w4 s3")
    assert abs(rope_row["fused_GBps"] - 6144 * 4096 * 2 / 1e6 / 0.018) < 1e-6
    result = {"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
              "step_attention": "a", "tree_nodes": [4], "step_costs": [{"batch": 1, "plain_ms": 5.0}],
              "swiglu_launches": [row], "rope_launches": [rope_row], "gen_len": 8, "e2e_model": "-",
              "e2e_attention": "-", "end_to_end": []}
    text = module.to_markdown(result)
    assert "SwiGLU in its epilogue" in text and "64x16x256 dot w4 s3 k2" in text and "| unfused |" in text
    assert "rotary and the cache write in its epilogue" in text and "1x8x1024 fma w4 s3" in text


def test_bench_generate_reports_the_norm_prologue_tuning(monkeypatch, load_script):
    """The norm prologue's tuners (filled only on a GPU): the unfused pair against the best launch
    with the prologue, whether the rows carried a residual add, and the markdown table."""
    from mtp_kernels import skinny_linear as sl, skinny_norm as sn
    from mtp_kernels.launch_tuner import LaunchTuner

    module = load_script(BENCH / "bench_generate.py")
    tuner = LaunchTuner("skinny_linear_swiglu_norm")
    monkeypatch.setitem(sn._NORM_TUNERS, "skinny_linear_swiglu", tuner)
    monkeypatch.setitem(sn._NORM_TUNERS, "skinny_linear_rope", LaunchTuner("skinny_linear_rope_norm"))
    tile = sl.SkinnyLaunch(8, 512, False)
    key = ("cuda:0", torch.bfloat16, 1, 22016, 4096, 0, True)
    tuner.times[key] = {None: 0.048, tile: 0.046}
    tuner.chosen[key] = tile
    (row,) = module.epilogue_launch_report("swiglu_norm")
    assert (row["N"], row["add"], row["chosen"], row["unfused_ms"]) == (22016, True, "1x8x512 fma w4 s3", 0.048)
    assert module.epilogue_launch_report("rope_norm") == []
    result = {"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
              "step_attention": "a", "tree_nodes": [4], "step_costs": [{"batch": 1, "plain_ms": 5.0}],
              "swiglu_norm_launches": [row], "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []}
    text = module.to_markdown(result)
    assert "residual add and norm in its prologue" in text and "add_rms_norm, then the gate/up launch" in text
    assert "| 1 | 22016 | 4096 | True | 0.048 |" in text


def test_probe_dependent_launch_times_a_decode_step_three_ways(triton_backend, load_script, monkeypatch):
    """The probe (GPU) on a CPU under the interpreter, a tiny model, a stand-in timer: at each batch
    the decode step runs under each variant, with ordinary launches, programmatic ones with the early
    weight tile and programmatic ones that wait first (the switches set while it runs and restored
    after); the saving per kernel comes out of the timer's ms; the markdown lists them."""
    from mtp_engine.model import ModelArgs, Transformer
    from mtp_kernels import dependent_launch, skinny_linear
    from mtp_kernels.dependent_launch import launch_programmatic

    module = load_script(BENCH / "probe_dependent_launch.py")
    monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
    monkeypatch.setenv("MTP_TUNE", "0")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, multiple_of=16,
                                  max_seq_len=32, max_batch_size=2)).eval()
    model.fuse_projections()
    seen = []
    ms = {"ordinary": 3.0, "programmatic, early weight tile": 2.5, "programmatic, waiting first": 2.8}

    def timer(step, setting):
        with setting():
            out = step()
            state = (launch_programmatic(out.device), skinny_linear.EARLY_WEIGHT_TILE)
        seen.append((out.shape[0], state))
        return {(False, True): 3.0, (True, True): 2.5, (True, False): 2.8}[state]

    rows = module.probe(model, (1, 2), 4, timer, kernel_count=lambda tokens, lengths: 100)
    assert seen == [(B, state) for B in (1, 2) for state in ((False, True), (True, True), (True, False))]
    assert skinny_linear.EARLY_WEIGHT_TILE is True and not launch_programmatic(torch.device("cpu"))
    assert [r["ms"] for r in rows] == [ms, ms] and rows[0]["kernels"] == 100
    assert rows[0]["saved_us_per_kernel"] == pytest.approx({"programmatic, early weight tile": 5.0,
                                                            "programmatic, waiting first": 2.0})
    text = module.to_markdown({"env": {"device": "test"}, "shape": module.SHAPE, "kv_len": 4, "rows": rows})
    assert "| 2 | 100 | 3 | 2.5 | 2.8 | 5 | 2 |" in text


def test_probe_skinny_rows_times_every_64_row_tile_at_64_rows_and_at_one(triton_backend, load_script):
    """The probe (GPU) on a CPU under the interpreter, tiny shapes, a stand-in timer: every 64-row
    tile runs with 64 rows and with 1 row of x on rotated weight copies (right products both), every
    one-row launch once; GB/s and the speedup come out of the timer's ms; the markdown lists them."""
    from mtp_kernels import skinny_linear as sl

    module = load_script(BENCH / "probe_skinny_rows.py")
    seen = []

    def timer(fn):
        out = fn()
        seen.append(out.shape[0])
        return 2.0 if out.shape[0] == 64 else 1.0
    result = module.probe([(40, 24)], torch.device("cpu"), torch.float32, timer, l2_bytes=40 * 24 * 4)
    tiles = sl.skinny_candidates(64, torch.device("cpu"))[1:]
    one_row = sl.skinny_candidates(1, torch.device("cpu"))[1:]
    assert seen == [64, 1] * len(tiles) + [1] * len(one_row)
    assert [r["tile"] for r in result["tiles"]] == [t.label() for t in tiles]
    row = result["tiles"][0]
    assert (row["ms_64_rows"], row["ms_1_row"], row["one_row_speedup"]) == (2.0, 1.0, 2.0)
    assert abs(row["GBps_1_row"] - 40 * 24 * 4 / 1e9 / 1.0 * 1e3) < 1e-12
    (best,) = result["one_row"]
    assert best["ms"] == 1.0 and set(best["times_ms"]) == {t.label() for t in one_row}
    result["env"] = {"device": "test"}
    text = module.to_markdown(result)
    assert "64 rows / 1 row" in text and tiles[0].label() in text and best["best_tile"] in text


def test_probe_skinny_rows_products_are_right(triton_backend, load_script):
    """What the probe times is the product it names: each launch's output against x @ w^T."""
    module = load_script(BENCH / "probe_skinny_rows.py")
    from mtp_kernels import skinny_linear as sl

    checked = []
    run = sl.skinny_linear_run

    def checking_run(x, w, launch):
        out = run(x, w, launch)
        torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)
        checked.append(launch)
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sl, "skinny_linear_run", checking_run)
        module.probe([(37, 33)], torch.device("cpu"), torch.float32, lambda fn: fn() is not None and 1.0)
    assert len(checked) == 2 * len(sl.skinny_candidates(64, torch.device("cpu"))[1:]) + \
        len(sl.skinny_candidates(1, torch.device("cpu"))[1:])


def test_bench_generate_reports_the_selection_tuning(monkeypatch, load_script):
    """The report of what the token-selection tuner measured past 64 rows (filled only on a GPU):
    the fixed rule's tile, the chosen one with its TFLOP/s, every tile; its markdown table."""
    from mtp_kernels import sampling
    from mtp_kernels.launch_tuner import LaunchTuner

    module = load_script(BENCH / "bench_generate.py")
    tuner = LaunchTuner("linear_select")
    monkeypatch.setattr(sampling, "_SELECT_TUNER", tuner)
    fixed, wide = sampling.SelectTile(128, 128, 64, 8, 3), sampling.SelectTile(128, 256, 64, 8, 3)
    key = ("cuda:0", torch.bfloat16, 256, 32000, 4096, 4)
    tuner.times[key] = {fixed: 0.2, wide: 0.125, sampling.SelectTile(64, 256, 64, 4, 4): float("inf")}
    tuner.chosen[key] = wide
    (row,) = module.select_launch_report()
    assert (row["rows"], row["top_k"], row["fixed_tile"], row["fixed_ms"]) == (256, 4, "128x128x64 w8 s3", 0.2)
    assert row["chosen"] == "128x256x64 w8 s3" and row["chosen_ms"] == 0.125
    assert abs(row["chosen_TFLOPs"] - 2 * 256 * 32000 * 4096 / 0.125 / 1e9) < 1e-6
    result = {"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
              "step_attention": "a", "tree_nodes": [4], "step_costs": [{"batch": 1, "plain_ms": 5.0}],
              "select_launches": [row], "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []}
    text = module.to_markdown(result)
    assert "### Token selection launches past 64 rows" in text
    assert "| 256 | 32000 | 4096 | 4 | 128x128x64 w8 s3 | 0.2 | 128x256x64 w8 s3 | 0.125 | 537 |" in text


def test_bench_generate_reports_the_kv_launch_tuning(monkeypatch, load_script):
    """The report of what the KV-attention tuner measured per shape (filled only on a GPU): the
    heuristic's launch, the chosen one and every candidate, by label; its markdown table."""
    from mtp_kernels import kv_cache_attention
    from mtp_kernels.launch_tuner import LaunchTuner

    module = load_script(BENCH / "bench_generate.py")
    tuner = LaunchTuner("kv_cache_attention")
    monkeypatch.setattr(kv_cache_attention, "_KV_TUNER", tuner)
    key = ("cpu", torch.bfloat16, 1, 1, 32, 128, 1088, 8, False)     # device, dtype, q shape, S_max, Hkv, tree
    heuristic = kv_cache_attention._kv_heuristic(1, 8, 4, 1088, torch.device("cpu"))
    last = kv_cache_attention.KVLaunch(16, 16, 1, 1, 128, 9, combine_last=True)
    tuner.times[key] = {heuristic: 0.0097, last: 0.0084}
    tuner.chosen[key] = last
    (row,) = module.kv_launch_report()
    assert (row["B"], row["Tq"], row["H"], row["Hkv"], row["S_max"], row["tree"]) == (1, 1, 32, 8, 1088, False)
    assert row["heuristic"] == heuristic.label() and row["heuristic_ms"] == 0.0097
    assert row["chosen"] == "M16 x9+last" and row["chosen_ms"] == 0.0084
    text = module.to_markdown({"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
                               "step_attention": "a", "tree_nodes": [4],
                               "step_costs": [{"batch": 1, "plain_ms": 5.0}], "kv_launches": [row],
                               "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []})
    assert "| 1 | 1 | 32 / 8 | 1088 | " in text and "M16 x9+last: 0.0084" in text
    # the split path's combine kernel counts as attention in the step breakdown (it fell in "other")
    assert module.step_kernel_group("_kv_combine_kernel") == module.step_kernel_group("_kv_attn_kernel") == "attention"


def test_bench_generate_names_the_kernels_under_other(load_script):
    """The step breakdown groups kernels by name and lists the largest ungrouped ones, which the
    markdown prints under the table (the verify step's "other" grew from 0.02 to 0.20 ms with no
    name to it, tenth session)."""
    module = load_script(BENCH / "bench_generate.py")
    per_kernel = {"_skinny_linear_kernel": 2.0, "nvjet_tst_64x8_64x16": 1.0, "_kv_attn_kernel": 0.3,
                  "void at::native::index_elementwise_kernel<128, 4>": 0.05, "Memset (Device)": 0.01,
                  "void at::native::CatArrayBatchedCopy<...>": 0.08, "_rms_norm_fwd": 0.1}
    k = module.group_kernel_ms(per_kernel, top_other=2)
    assert k["GEMM (cuBLAS or skinny)"] == 3.0 and k["attention"] == 0.3 and k["norms"] == 0.1
    assert k["other"] == pytest.approx(0.14) and k["kernels_ms"] == pytest.approx(3.54)
    assert list(k["other_kernels"]) == ["void at::native::CatArrayBatchedCopy<...>",
                                        "void at::native::index_elementwise_kernel<128, 4>"]
    text = module.to_markdown({"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
                               "step_attention": "a", "tree_nodes": [4],
                               "step_costs": [{"batch": 1, "plain_ms": 5.0, "plain_kernel_ms": k}],
                               "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []})
    assert "- batch 1, plain: `void at::native::CatArrayBatchedCopy<...>` 0.08, `void at::native::index" in text


def test_bench_generate_reports_the_step_variants(load_script):
    """On a GPU each verify step's capture times its variants (heads concurrent or in order, one or
    two reads of the unembedding, on Hopper each also with programmatic launches) and keeps the
    fastest, and the plain step's its ordinary and programmatic launches: the report takes those
    timings from the Generator's graphs and prints them with the way kept, the best one-read over the
    best two-read time and the best programmatic over the best ordinary one; without graphs (CPU
    runs) there are no tables."""
    module = load_script(BENCH / "bench_generate.py")
    four = {"concurrent, one read": 6.0, "concurrent, two reads": 6.3, "in order, one read": 6.1,
            "in order, two reads": 6.4}
    plain = {"ordinary launches": 5.0, "programmatic launch": 4.8}

    class Graphs:
        def variant_choices(self):
            return [((1, True, "forward", 16), {"concurrent": 9.0, "in order": 9.0}, "concurrent"),   # a forward
                    ((1, True, "plain"), plain, "programmatic launch"),                             # the plain step
                    ((1, True, "verify", 4, 4, 2, 123, None), {"concurrent, two reads": 5.5}, "concurrent, two reads"),
                    ((1, True, "verify", 64, 4, 2, 456, None), four, "concurrent, one read")]

    class Gen:
        _graphs = Graphs()

    assert module.step_variant_choice(Gen(), ("verify", 64)) == (four, "concurrent, one read")
    assert module.step_variant_choice(Gen(), ("verify", 16)) is None
    assert module.step_variant_choice(Gen(), ("plain",)) == (plain, "programmatic launch")
    Gen._graphs = None
    assert module.step_variant_choice(Gen(), ("verify", 4)) is None
    with_pdl = {**four, "concurrent, one read, programmatic launch": 5.7, "in order, two reads, programmatic launch": 6.0}
    row = {"batch": 1, "plain_ms": 5.0, "verify4_capture_ms": {"concurrent, two reads": 5.5},
           "verify4_kept": "concurrent, two reads", "verify64_capture_ms": with_pdl,
           "verify64_kept": "concurrent, one read, programmatic launch",
           "plain_capture_ms": plain, "plain_kept": "programmatic launch"}
    result = {"env": {"device": "test"}, "step_model": "m", "kv_len": 1024, "cuda_graphs": True,
              "step_attention": "a", "tree_nodes": [4, 16, 64], "step_costs": [row],
              "gen_len": 8, "e2e_model": "-", "e2e_attention": "-", "end_to_end": []}
    text = module.to_markdown(result)
    assert ("| batch | nodes | concurrent, two reads ms | concurrent, one read ms | in order, one read ms | "
            "in order, two reads ms | concurrent, one read, programmatic launch ms | "
            "in order, two reads, programmatic launch ms | kept | one read / two reads | "
            "programmatic / ordinary |") in text
    assert "| 1 | 4 | 5.5 | - | - | - | - | - | concurrent, two reads | - | - |" in text
    assert ("| 1 | 64 | 6.3 | 6 | 6.1 | 6.4 | 5.7 | 6 | concurrent, one read, programmatic launch | 0.95 | "
            "0.95 |") in text
    assert "| 1 | 5 | 4.8 | 0.96 | programmatic launch |" in text
    for key in ("verify4_capture_ms", "verify64_capture_ms", "plain_capture_ms"):
        del row[key]
    text = module.to_markdown(result)
    assert "Verify step variants" not in text and "Plain step launches" not in text


def test_warp_spec_guard_reads_the_gpu_test_results(load_script, tmp_path):
    """gpu_check.sh keeps the warp-specialized flash configs in the benchmarks only when both their
    GPU tests (every config; a NaN neighbour sequence) ran and passed."""
    common = load_script(BENCH / "common.py")

    def junit(*cases):
        path = tmp_path / "gpu_tests.xml"
        body = "".join(f'<testcase classname="tests.test_attention" name="{name}">{inner}</testcase>'
                       for name, inner in cases)
        path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
        return str(path)

    every = "test_flash_attention_gpu_every_config"
    apart = "test_flash_attention_gpu_warp_specialized_sequences_stay_apart"
    assert not common.warp_spec_tests_failed(junit((f"{every}[64-True]", ""), (f"{every}[128-True]", ""),
                                                   (f"{apart}[True]", ""), ("test_other", '<failure message="x"/>')))
    # one of the two missing (GPU_TESTS left it out, or it was renamed): not confirmed
    assert common.warp_spec_tests_failed(junit((f"{every}[64-True]", ""), (f"{every}[128-True]", "")))
    assert common.warp_spec_tests_failed(junit((f"{every}[64-True]", ""), (f"{every}[128-True]", '<failure message="x"/>')))
    assert common.warp_spec_tests_failed(junit((f"{every}[64-True]", '<error message="hang"/>')))
    assert common.warp_spec_tests_failed(junit((f"{every}[64-True]", '<skipped message="needs CUDA"/>')))
    assert common.warp_spec_tests_failed(junit((f"{every}[64-True]", ""), (f"{apart}[True]", '<failure message="x"/>')))
    assert common.warp_spec_tests_failed(junit(("test_other", "")))          # not run (GPU_TESTS left it out)
    assert common.warp_spec_tests_failed(str(tmp_path / "missing.xml"))     # the stage died first
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite")
    assert common.warp_spec_tests_failed(str(tmp_path / "cut.xml"))
    script = (BENCH / "gpu_check.sh").read_text()
    assert "guard_by_tests MTP_WARP_SPEC warp_spec_tests_failed" in script
    assert "MTP_WARP_SPEC=${MTP_WARP_SPEC:-1} run_stage tests" in script
    # The same guard for programmatic dependent launches (one test, every parameter of it).
    pdl = "test_gpu_programmatic_decode_step_in_a_graph"
    assert not common.programmatic_tests_failed(junit((f"{pdl}[1-launch0]", ""), (f"{pdl}[3-launch1]", "")))
    assert common.programmatic_tests_failed(junit((f"{pdl}[1-launch0]", ""), (f"{pdl}[3-launch1]", '<failure message="x"/>')))
    assert common.programmatic_tests_failed(junit((f"{every}[64-True]", "")))   # not run
    # a case skipped because its warp-specialized tile is not offered: the others decide
    not_offered = '<skipped message="warp-specialized tile not offered here"/>'
    assert not common.programmatic_tests_failed(junit((f"{pdl}[1-launch0]", ""), (f"{pdl}[17-launch2]", not_offered)))
    assert common.programmatic_tests_failed(junit((f"{pdl}[1-launch0]", '<skipped message="needs CUDA"/>')))
    assert common.programmatic_tests_failed(junit((f"{pdl}[17-launch2]", not_offered),
                                                  (f"{pdl}[1-launch0]", '<error message="x"/>')))
    assert "guard_by_tests MTP_PDL programmatic_tests_failed" in script
    # The skinny GEMM's warp-specialized tiles: the benchmarks get the tiles whose every case passed.
    ws = "test_gpu_bf16_warp_specialized_tiles"
    a, b = "32x64x128_dot_w4_s4_ws_swap", "64x64x128_dot_w4_s3_k2_ws"
    assert common.skinny_ws_selection(junit((f"{ws}[17-{a}]", ""), (f"{ws}[32-{a}]", ""), (f"{ws}[64-{b}]", ""))) == "1"
    assert common.skinny_ws_selection(junit((f"{ws}[17-{a}]", ""), (f"{ws}[32-{a}]", '<failure message="nan"/>'),
                                            (f"{ws}[64-{b}]", ""))) == b
    assert common.skinny_ws_selection(junit((f"{ws}[17-{a}]", '<skipped message="not Hopper"/>'))) == "0"
    assert common.skinny_ws_selection(junit((f"{pdl}[1-launch0]", ""))) == "0"   # not run
    assert common.skinny_ws_selection(str(tmp_path / "missing.xml")) == "0"
    # set by hand: narrowed to the hand-picked tiles that passed, never kept past a failure
    passed_all = junit((f"{ws}[17-{a}]", ""), (f"{ws}[64-{b}]", ""))
    assert common.skinny_ws_selection(passed_all, "1") == "1" and common.skinny_ws_selection(passed_all, a) == a
    one_failed = junit((f"{ws}[17-{a}]", '<failure message="nan"/>'), (f"{ws}[64-{b}]", ""))
    assert common.skinny_ws_selection(one_failed, a) == "0" and common.skinny_ws_selection(one_failed, "1") == b
    assert "common.skinny_ws_selection" in script
    assert "-k warp_specialized_tiles" in script and '-k "not warp_specialized_tiles"' in script


def test_idle_gaps_finds_where_the_gpu_waited(load_script):
    """profile_fused_ce reports the GPU's idle time inside one step from the profiler's kernel intervals."""
    common = load_script(BENCH / "common.py")

    intervals = [(0.0, 100.0, "gemm"), (50.0, 120.0, "ce_chunk"),     # overlapping: one busy stretch
                 (620.0, 700.0, "gemm"),                                # 500 us idle before it
                 (710.0, 800.0, "cast")]                                # 10 us idle
    timeline = common.idle_gaps(intervals, top=1)
    assert timeline["span_ms"] == 0.8 and timeline["busy_ms"] == pytest.approx(0.29)
    assert timeline["idle_ms"] == pytest.approx(0.51)
    assert timeline["gaps"] == [{"ms": 0.5, "after": "ce_chunk", "before": "gemm"}]
    assert common.idle_gaps([])["idle_ms"] == 0.0


@pytest.mark.parametrize("stem", ["attention_nvidia-h100-80gb-hbm3", "generate_nvidia-h100-80gb-hbm3", "generate_cpu"])
def test_charts_carry_the_tables_numbers(stem, load_script):
    """The PNG charts of bench_attention / bench_generate draw exactly the result's numbers."""
    charts = load_script(BENCH / "charts.py")
    result = json.loads((BENCH / "results" / f"{stem}.json").read_text())
    if stem.startswith("attention"):
        panels = charts.attention_panels(result)
        (_, groups, tflops), (_, decode_groups, bandwidth), (_, _, tree) = panels
        ours = next(r for r in result["flash"] if r["impl"] == "ours")
        assert tflops["ours"][:2] == [ours["fwd_tflops"], ours["fwd_bwd_tflops"]]
        assert len(groups) == 2 * len({r["shape"] for r in result["flash"]}) and set(tflops) == {r["impl"] for r in result["flash"]}
        assert bandwidth["ours"] == [r["ours_frac_of_copy_bw"] for r in result["decode"]]
        assert decode_groups[0] == f"B{result['decode'][0]['B']} S{result['decode'][0]['S']}"
        assert tree["Tq=64 / Tq=1"] == [r["tree64_vs_decode"] for r in result["decode"]]
    else:
        panels = charts.generate_panels(result)
        (_, groups, plain), (_, _, verify), (_, e2e_groups, e2e) = panels
        assert plain["plain"] == [r["plain_x_floor"] for r in result["step_costs"]]
        assert verify["16 nodes"] == [r["ratio16"] for r in result["step_costs"]]
        assert "plain" not in e2e and e2e_groups == [f"batch {b}" for b in dict.fromkeys(r["batch"] for r in result["end_to_end"])]
        tree_b1 = next(r for r in result["end_to_end"] if r["mode"] == "tree" and r["batch"] == 1)
        assert e2e["tree"][0] == tree_b1["speedup"]


def test_charts_draw_or_say_why_not(tmp_path, load_script):
    charts = load_script(BENCH / "charts.py")
    src = BENCH / "results" / "attention_nvidia-h100-80gb-hbm3.json"
    copy = tmp_path / src.name
    copy.write_text(src.read_text())
    png = charts.chart_for(copy)
    if importlib.util.find_spec("matplotlib") is None:
        assert png is None                       # noted and skipped: matplotlib is benchmark-only
    else:
        assert png == copy.with_suffix(".png") and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="not an attention"):
        charts.chart_for(BENCH / "results" / "fused_ce_nvidia-h100-80gb-hbm3.json")


def test_bench_cpu_decode_times_both_gemm_layouts(monkeypatch, load_script):
    """Both phases on a tiny model: F.linear first (MTP_TUNE=0, nothing timed or remembered), then the
    timed layouts, whose choices the report lists; MTP_TUNE is given back as it was."""
    from mtp_kernels import cpu_linear

    monkeypatch.setattr(cpu_linear, "_chosen", {})
    monkeypatch.setattr(cpu_linear, "_times", {})
    monkeypatch.setenv("MTP_TUNE", "1")
    module = load_script(BENCH / "bench_cpu_decode.py")
    monkeypatch.setattr(module, "SHAPE_CPU", dict(dim=64, n_layers=5, n_heads=4, vocab_size=300, multiple_of=16,
                                                  n_future_tokens=4))
    monkeypatch.setattr(module, "TREE_NODES", (4,))
    result = module.run((1, 2), kv_len=12, dtypes=("float32", "bfloat16"))
    assert os.environ["MTP_TUNE"] == "1"
    assert list(result["phases"]) == [f"{dtype}, {label}" for dtype in ("float32", "bfloat16")
                                      for label in ("F.linear", "timed layouts")]
    for steps in result["phases"].values():
        assert [r["batch"] for r in steps] == [1, 2] and all(r["ratio4"] > 0 for r in steps)
    shapes = {(r["dtype"], r["rows"], r["N"], r["K"]) for r in result["layouts"]}
    for dtype in ("float32", "bfloat16"):   # the fused wqkv at a plain step's row and 2 x 4 verify rows
        assert (dtype, 1, 192, 64) in shapes and (dtype, 8, 192, 64) in shapes
    assert ("float32", 8, 300, 64) in shapes    # the unembedding: float32 logits in both dtypes
    text = module.to_markdown(result)
    assert "| float32, F.linear | 1 |" in text and "| bfloat16, timed layouts | 2 |" in text
    assert "## Layout chosen per shape" in text
