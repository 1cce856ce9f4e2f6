"""Every Triton kernel compiles for sm_90 (H100/H200) and fits its limits, checked on a CPU machine.

`benchmarks/compile_check.py` drives the public functions with MTP_CROSS_COMPILE set, so the launchers
pick their GPU configs and each launch is compiled to a cubin instead of run. Compiling needs Triton
imported without the interpreter, so everything here runs in a subprocess.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton build carries no CUDA toolchain")


def _compile_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTP_BACKEND", "MTP_CROSS_COMPILE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _jit_kernels_in_package():
    """Names of the @triton.jit functions ending in `_kernel` (launch entry points) in kernels/."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_kernel_compiles_for_sm90_within_limits(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick",
                           "--out", str(tmp_path)], env=_compile_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((tmp_path / "compile_sm90_quick.json").read_text())
    assert [r for r in records if r["problems"]] == []
    # A kernel added to kernels/ without a scenario here would never be compiled before a GPU run.
    assert {r["kernel"] for r in records} == _jit_kernels_in_package()
    assert all(r["registers"] > 0 and r["shared_bytes"] >= 0 for r in records)
    assert "0 failed" in (tmp_path / "compile_sm90_quick.md").read_text()
    # Programmatic dependent launches wait for the kernel before them (griddepcontrol.wait), in
    # every decode-step kernel; ordinary launches never do.
    programmatic = {r["kernel"] for r in records if r["scenario"] == "programmatic_launch"}
    assert {"_skinny_linear_kernel", "_add_rms_norm_fwd_kernel", "_rms_norm_fwd_kernel", "_swiglu_kernel",
            "_rope_cache_kernel", "_kv_attn_kernel", "_kv_combine_kernel"} <= programmatic, programmatic
    assert all(r["programmatic"] is (r["scenario"] == "programmatic_launch") for r in records)


def test_the_check_catches_a_kernel_that_cannot_run(tmp_path):
    """A jit global that is not a constexpr (a real bug this check found) fails to compile, and a
    tile config needing more shared memory than sm_90 has is flagged; a sound kernel passes."""
    script = tmp_path / "bad_kernels.py"
    script.write_text(textwrap.dedent('''
        import json, os, sys
        os.environ["TRITON_INTERPRET"] = "0"
        sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
        import torch, triton, triton.language as tl
        import compile_check

        SCALE = 2.0   # not a tl.constexpr: cannot be read inside a kernel

        @triton.jit
        def uses_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)

        @triton.jit
        def matmul_tile_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
            offs_m, offs_n, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = tl.load(a_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
                b = tl.load(b_ptr + (k + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
                acc = tl.dot(a, b, acc)
            tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)

        cc = compile_check.CrossCompiler(90, quick=True)
        x = torch.zeros(64)
        a, b, c = torch.zeros(256, 1024, dtype=torch.bfloat16), torch.zeros(1024, 256, dtype=torch.bfloat16), torch.zeros(256, 256)
        with cc.capture():
            uses_global_kernel[(1,)](x, 64, BLOCK=64)
            matmul_tile_kernel[(1,)](a, b, c, 1024, BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=4)
            matmul_tile_kernel[(1,)](a, b, c, 1024, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
        print(json.dumps([r["problems"] for r in cc.records]))
    '''))
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], env=_compile_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    global_problems, big_tile_problems, small_tile_problems = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(global_problems) == 1 and "compile error" in global_problems[0] and "SCALE" in global_problems[0]
    assert any("shared memory" in p for p in big_tile_problems)
    assert small_tile_problems == []


def test_cross_compile_switch(monkeypatch):
    import torch

    from mtp_kernels import backend

    cpu = torch.device("cpu")
    monkeypatch.delenv("MTP_CROSS_COMPILE", raising=False)
    assert backend.cross_compile_arch() is None and not backend.gpu_launch(cpu)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.cross_compile_arch() == 90 and backend.gpu_launch(cpu)
    assert backend.sm_count(cpu) == backend.CROSS_COMPILE_SM_COUNT
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the interpreter keeps its own small configs
    assert not backend.gpu_launch(cpu)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "sm90")
    with pytest.raises(ValueError, match="MTP_CROSS_COMPILE='sm90' must be a compute capability"):
        backend.cross_compile_arch()


def test_flash_forward_sm90_compile_reads_ptxas_log(tmp_path):
    """The flash forward's main config compiles for sm_90 without spill, and the check reads ptxas's
    own log for it (wgmma serialization is False, not unknown: a compile without a log would fail)."""
    script = tmp_path / "flash_fwd.py"
    script.write_text(textwrap.dedent('''
        import json, os, sys
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ["MTP_CROSS_COMPILE"] = "90"
        sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
        import torch, triton
        import compile_check
        from mtp_kernels import attention

        cc = compile_check.CrossCompiler(90, quick=True)
        q, k, v = (torch.randn(1, 256, h, 128).bfloat16() for h in (32, 8, 8))
        with cc.capture():
            for ws in (False, True):
                config = triton.Config(dict(BLOCK_M=128, BLOCK_N=64, FOLD_SCALE=True, WARP_SPEC=ws),
                                       num_warps=4 if ws else 8, num_stages=2 if ws else 3)
                attention.flash_attention_fwd(q, k, v, True, 128 ** -0.5, config=config)
        print(json.dumps([{key: r.get(key) for key in ("problems", "spill_bytes", "wgmma_serialized",
                                                       "warp_specialized", "warps_run")}
                          for r in cc.records]))
    '''))
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], env=_compile_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain, specialized = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["problems"] == [] and plain["spill_bytes"] == 0
    assert plain["wgmma_serialized"] is False and plain["warp_specialized"] is False and plain["warps_run"] == 8
    # The WARP_SPEC config really is split into partitions (Triton keeps the loop whole, silently,
    # when a branch or a second loop gets in the way): a producer and two consumer warpgroups.
    assert specialized["problems"] == [] and specialized["spill_bytes"] == 0
    assert specialized["warp_specialized"] is True and specialized["warps_run"] == 12


def test_serialization_reader(load_script):
    compile_check = load_script(ROOT / "benchmarks" / "compile_check.py")
    assert compile_check._wgmma_serialized("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async "
                                           "instructions are serialized due to ...\nptxas info    : Used 182 registers")
    assert not compile_check._wgmma_serialized("ptxas info    : Used 182 registers, used 1 barriers")


def test_ordered_dq_probe_reports_each_loop_form(tmp_path):
    """benchmarks/probe_ordered_dq.py compiles its three dK/dV-shaped loops for sm_90: the plain loop
    is one Triton's pass warp-specializes (else the probe would say nothing), and every form comes
    out as a warp count or the compiler's error, in the JSON and the table."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_ordered_dq.py"), "--out", str(tmp_path)],
                          env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("ordered_dq_ws_probe_triton-*.json")
    rows = {r["form"]: r for r in json.loads(path.read_text())["rows"]}
    assert list(rows) == ["loop", "loop + dQ add (unordered)", "loop + dQ add in order (spin)"]
    assert (rows["loop"].get("warps_run"), rows["loop"].get("warp_specialized")) == (12, True)
    assert all(("error" in r) != ("warps_run" in r) for r in rows.values())
    assert "| loop | 12 | True | - |" in path.with_suffix(".md").read_text()


def test_skinny_ws_forms_probe_reports_each_form(tmp_path):
    """benchmarks/probe_skinny_ws_forms.py compiles the TMA tile's forms for sm_90: the two that
    kernels/skinny_ws.py offers (64 rows as M; 32 rows swapped) are split into producer and consumer
    warps on wgmma, which is what the skinny_ws docstring and README claim; the forms it leaves out
    come out as a warp count or the compiler's error, in the JSON and the table."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_skinny_ws_forms.py"), "--out", str(tmp_path)],
                          env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("skinny_ws_forms_triton-*.json")
    rows = {r["form"]: r for r in json.loads(path.read_text())["rows"]}
    offered = [r for r in rows.values() if r["offered"]]
    assert len(rows) == 4 and len(offered) == 2
    assert all((r.get("warps_run"), r.get("warp_specialized"), r.get("tensor_cores")) == (12, True, "wgmma")
               for r in offered)
    assert all(("error" in r) != ("warps_run" in r) for r in rows.values())
    assert "| 32 rows, weight rows as M (swap_ab) | True | 12 | True | wgmma | - |" in path.with_suffix(".md").read_text()
