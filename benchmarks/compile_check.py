"""Compile every Triton kernel for a CUDA GPU on a machine that has none, and check it fits.

The interpreter runs kernels with numpy, so it cannot tell whether a kernel compiles for a real
GPU, how much shared memory a tile config needs, or whether it runs out of registers. Triton can
compile ahead of time for any target (its wheel carries ptxas), so this script drives the real
public functions and launchers on CPU tensors with `MTP_CROSS_COMPILE=<sm>` set: the launchers pick
exactly the tile configs, constexprs and dtypes a GPU run would, and every launch is compiled to a
cubin instead of being run. Autotuned kernels compile every config that survives pruning.

Each compiled variant is checked against the device's limits (H100/H200, sm_90):
  - shared memory per block <= 227 KiB (232448 bytes, the opt-in maximum);
  - registers per thread <= 255 and registers x threads per block <= 65536;
  - spills (a stack frame or local memory in the cubin) are reported, not failed: they cost speed,
    not correctness. So is whether ptxas serialized Hopper's asynchronous matmuls (wgmma; its note
    C7515, which makes every wgmma wait for the one before).

    python benchmarks/compile_check.py [--arch 90] [--quick] [--out benchmarks/results]

--quick compiles bf16 only, the first config of each autotuned kernel, and the tuners' candidates
at fewer shapes (the CI test runs it).
Writes compile_sm<arch>.json and .md under --out; exits 1 if any variant fails to compile or does
not fit. Launched kernels do not run, so the values they would write stay uninitialized: the
scenarios below never read results.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255

_TORCH_TO_TRITON = {
    "torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
    "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8",
    "torch.uint8": "u8", "torch.bool": "i1",
}


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _divisible_by_16(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count:\n{text}")
    return usage


def _tensor_core_instructions(ptx: str) -> str:
    """Which matrix instructions the dots became: Hopper's warpgroup `wgmma`, the older warp-level
    `mma.sync`, or none (a kernel without tl.dot, or a dot lowered to FMAs)."""
    kinds = [name for name, pattern in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if pattern in ptx]
    return "+".join(kinds) or "-"


def _wgmma_serialized(ptxas_log: str) -> bool:
    """Whether ptxas serialized the kernel's wgmma instructions (its note C7515 in the log of Triton's
    own ptxas run): each then waits for the previous one, and nothing overlaps a matmul."""
    return "C7515" in ptxas_log


class CrossCompiler:
    """Stands in for the GPU: every kernel launch inside `capture()` is compiled, never run."""

    def __init__(self, arch: int, quick: bool):
        import triton
        from triton.backends.compiler import GPUTarget

        self.arch, self.quick = arch, quick
        self.target = GPUTarget("cuda", arch, 32)
        self.cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
        self.records: list[dict] = []
        self._seen: set = set()
        self.scenario = ""

    # -------------------------------------------------------------------- one launch -> one cubin
    def compile_launch(self, jit_fn, args, kwargs) -> None:
        import triton

        params = inspect.signature(jit_fn.fn).parameters
        names = list(params)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        for name, p in params.items():
            if name not in bound and p.default is not inspect.Parameter.empty:
                bound[name] = p.default
        options = {k: v for k, v in kwargs.items() if k not in params and k not in ("grid", "warmup")}
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(jit_fn.params):
            value = bound[param.name]
            if param.is_constexpr or value is None:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            signature[param.name] = _arg_type(value)
            if not param.do_not_specialize and _divisible_by_16(value):
                attrs[(index,)] = [["tt.divisibility", 16]]
        key = (jit_fn.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in self._seen:
            return
        self._seen.add(key)
        record = dict(scenario=self.scenario, kernel=jit_fn.fn.__name__,
                      dtypes=sorted({t.lstrip("*") for t in signature.values() if t.startswith("*")}),
                      constexprs={k: v for k, v in constexprs.items() if v is not None},
                      num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))
        t0 = time.perf_counter()
        try:
            src = triton.compiler.ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
            with contextlib.redirect_stdout(io.StringIO()) as ptxas_log:   # printed by Triton (capture())
                compiled = triton.compile(src, target=self.target, options=options)
            if "registers" not in ptxas_log.getvalue():
                raise RuntimeError("no ptxas log for this compile: was it served from Triton's cache?")
            usage = _resource_usage(compiled.asm["cubin"], self.cuobjdump)
            # A warp-specialized kernel runs more warps than num_warps asked for (Triton adds a
            # producer and consumer partitions): the register budget counts them all.
            record.update(shared_bytes=int(compiled.metadata.shared), registers=usage["reg"],
                          warps_run=int(compiled.metadata.num_warps),
                          warp_specialized="ttg.warp_specialize" in compiled.asm["ttgir"],
                          programmatic="griddepcontrol.wait" in compiled.asm["ptx"],
                          spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
                          tensor_cores=_tensor_core_instructions(compiled.asm["ptx"]),
                          wgmma_serialized=_wgmma_serialized(ptxas_log.getvalue()))
            record["problems"] = self._problems(record)
        except Exception as exc:  # a compile error is the finding; keep going to report them all
            # A CompilationError ends with the cause (e.g. NameError(...)) after the source excerpt.
            last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            record["problems"] = [f"compile error: {type(exc).__name__}: {last_line[:300]}"]
            record["error"] = str(exc)[:4000]
        record["compile_s"] = round(time.perf_counter() - t0, 2)
        self.records.append(record)
        print(f"  {'FAIL' if record['problems'] else 'ok  '} {record['kernel']:<34} "
              f"{','.join(record['dtypes']):<16} w{record['num_warps']} s{record['num_stages']} "
              f"smem={record.get('shared_bytes', '-')} regs={record.get('registers', '-')} "
              f"spill={record.get('spill_bytes', '-')} mma={record.get('tensor_cores', '-')} "
              f"{'SERIALIZED ' if record.get('wgmma_serialized') else ''}"
              f"{'; '.join(record['problems'])}", flush=True)

    def _problems(self, r: dict) -> list[str]:
        problems = []
        max_shared = MAX_SHARED_BYTES.get(self.arch, 49152)
        if r["shared_bytes"] > max_shared:
            problems.append(f"shared memory {r['shared_bytes']} B > {max_shared} B")
        if r["registers"] > MAX_REGISTERS_PER_THREAD:
            problems.append(f"{r['registers']} registers per thread > {MAX_REGISTERS_PER_THREAD}")
        threads = 32 * r.get("warps_run", r["num_warps"])
        if r["registers"] * threads > REGISTERS_PER_SM:
            problems.append(f"{r['registers']} registers x {threads} threads > {REGISTERS_PER_SM}")
        return problems

    # -------------------------------------------------------------------- patching the runtime
    @contextlib.contextmanager
    def capture(self):
        """Compile instead of launching. Every compile inside runs ptxas (Triton's cache bypassed) and
        Triton prints its log, which `compile_launch` reads for the notes Triton otherwise drops."""
        from triton import knobs
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        compiler = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            compiler.compile_launch(fn, args, kwargs)

        def autotuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            call_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            configs = tuner.prune_configs(call_kwargs)
            for config in configs[:1] if compiler.quick else configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", autotuner_run), \
                mock.patch.object(knobs.nvidia, "dump_ptxas_log", True), \
                mock.patch.object(knobs.compilation, "always_compile", True):
            yield


# ============================================================================================
# Scenarios: the launches a GPU run makes, at shapes that pick its tile configs
# ============================================================================================
def scenarios(quick: bool = False):
    import torch

    import mtp_kernels as K
    from mtp_kernels import attention, kv_cache_attention, linear_ce_driver, reference, vocab_parallel_ce
    from mtp_engine.speculative import TokenTree, preset_paths

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    def fused_ce(dtype):
        # The chunk kernel's BLOCK_V follows V; softcap and label smoothing are constexprs.
        # 128256 streams the row in two passes, and so does 32000 with a softcap; 32000 (also with
        # label smoothing), 16000 and 1001 keep it in registers (ONE_PASS).
        for V, opts in ((32000, {}), (32000, dict(label_smoothing=0.1, z_loss=1e-4)), (32000, dict(softcap=30.0)),
                        (128256, {}), (16000, {}), (1001, dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4))):
            hidden = randn(4, 8, 64, dtype=dtype, grad=True)
            weight = randn(V, 64, dtype=dtype, grad=True)
            targets = torch.randint(0, V, (4, 8), generator=gen)
            K.fused_linear_cross_entropy(hidden, weight, targets, **opts).backward()

    def vocab_parallel(dtype):
        for V_local, softcap in ((16000, None), (501, 30.0)):
            logits = randn(8, V_local, dtype=dtype)
            targets = torch.randint(0, 2 * V_local, (8,), generator=gen)
            opts = linear_ce_driver.CEOptions(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=softcap)
            stats = torch.empty(3, 8)
            vocab_parallel_ce.vp_chunk_stats(logits, targets, V_local, stats, opts)
            vocab_parallel_ce.vp_chunk_grad(logits, targets, V_local, 2 * V_local, torch.zeros(8), torch.ones(8), opts)

    def rmsnorm(dtype):
        for D in (4096, 1024, 192):
            x = randn(8, D, dtype=dtype, grad=True)
            K.rms_norm(x, randn(D, dtype=dtype, grad=True)).sum().backward()
            K.add_rms_norm(randn(64, D, dtype=dtype), randn(64, D, dtype=dtype), randn(D, dtype=dtype))

    def flash(dtype):
        # 96 and 48: head dims that are not a power of two run on a padded, masked tile.
        for D, H, Hkv in ((128, 32, 8), (64, 16, 16), (96, 8, 8), (48, 4, 2)):
            q, k, v = (randn(1, 256, h, D, dtype=dtype, grad=True) for h in (H, Hkv, Hkv))
            attention.flash_attention(q, k, v, causal=True).sum().backward()
        q, k, v = (randn(1, 100, 4, 128, dtype=dtype, grad=True) for _ in range(3))
        attention.flash_attention(q, k, v, causal=False).sum().backward()

    def kv_cache(dtype):
        # Decode (Tq=1) and tree verification with 16 and 64 nodes, every launch the GPU tuner may
        # pick (row tiles x split counts; kv_launch_candidates).
        # --quick: the 7B's head dim and a padded one (EVEN_D off); 64 takes 128's code path.
        for D in (128, 48) if quick else (128, 64, 48):
            k_cache, v_cache = (randn(2, 1024, 8, D, dtype=dtype) for _ in range(2))
            seqlens = torch.tensor([5, 900], dtype=torch.int32)
            for Tq in (1, 16, 64):
                q = randn(2, Tq, 32, D, dtype=dtype)
                tree = (kv_cache_attention.pack_tree_mask(torch.tril(torch.ones(Tq, Tq, dtype=torch.bool)))
                        if Tq > 1 else None)
                if not attention._kernel_supports(q):   # float32 runs the reference on a GPU: nothing to compile
                    continue
                problem = kv_cache_attention.kv_problem(q, k_cache)
                for launch in kv_cache_attention.kv_launch_candidates(*problem, q.device):
                    kv_cache_attention._kv_run(q, k_cache, v_cache, seqlens, tree, D ** -0.5, launch)

    def rope_cache(dtype):
        # Decode (one token per sequence) and a prefill chunk at the 7B shape; a head dim of 48.
        for D, H, Hkv, T in ((128, 32, 8, 1), (128, 32, 8, 64), (48, 4, 4, 1)):
            q, k, v = (randn(2, T, h, D, dtype=dtype) for h in (H, Hkv, Hkv))
            k_cache, v_cache = (randn(2, 256, Hkv, D, dtype=dtype) for _ in range(2))
            freqs = torch.polar(torch.ones(2, T, D // 2), randn(2, T, D // 2, dtype=torch.float32))
            K.rope_cache_write(q, k, v, freqs, torch.arange(T).repeat(2, 1), k_cache, v_cache)

    def swiglu(dtype):
        K.swiglu(randn(1, 11008, dtype=dtype), randn(1, 11008, dtype=dtype))

    def skinny_linear(dtype):
        # The decode and verify projections of the 7B shape (fused qkv, w2, fused w13, wo) and odd
        # ones, every row tile (1, 16, 32, 64 rows), with every tile the launch tuner may pick
        # (cuBLAS, the other candidate, is not ours to compile).
        from mtp_kernels import skinny_fused as sf, skinny_linear as sl

        for rows, n_out, n_in in ((1, 12288, 4096), (1, 4096, 11008), (8, 22016, 4096), (16, 4096, 4096),
                                  (1, 1000, 333), (32, 4096, 11008), (64, 12288, 4096), (48, 1000, 333)):
            x, w = randn(rows, n_in, dtype=dtype), randn(n_out, n_in, dtype=dtype)
            if not sl._kernel_takes(x, w):   # float32 stays on cuBLAS
                continue
            for launch in sl.skinny_candidates(rows, x.device)[1:]:
                sl.skinny_linear_run(x, w, launch)
        # The gate/up GEMM with SwiGLU in its epilogue: the 7B w13 at every row tile, and an odd one
        # (--quick: 1 and 64 rows, and the odd one at 48).
        swiglu_shapes = ((1, 22016, 4096), (16, 22016, 4096), (32, 22016, 4096), (64, 22016, 4096),
                         (1, 1000, 333), (48, 1000, 333))
        for rows, n_out, n_in in swiglu_shapes[::3] + swiglu_shapes[5:] if quick else swiglu_shapes:
            x, w13 = randn(rows, n_in, dtype=dtype), randn(n_out, n_in, dtype=dtype)
            if not sl._kernel_takes(x, w13):
                continue
            for launch in sf.swiglu_candidates(rows, x.device)[1:]:   # every twin: the tuner may time any
                sl.skinny_linear_run(x, w13, launch, swiglu=True)
        # The q/k/v GEMM with rotary and the cache write in its epilogue: the 7B's heads (32 + 2 x 8 of
        # 128) at every row tile, and odd ones (6 + 2 x 2 heads of 64, K 333); --quick as above.
        rope_shapes = (((1, 1), 32, 8, 128, 4096), ((1, 16), 32, 8, 128, 4096), ((4, 8), 32, 8, 128, 4096),
                       ((1, 64), 32, 8, 128, 4096), ((1, 1), 6, 2, 64, 333), ((3, 16), 6, 2, 64, 333))
        for (B, T), H, Hkv, D, n_in in rope_shapes[::3] + rope_shapes[5:] if quick else rope_shapes:
            x, wqkv = randn(B * T, n_in, dtype=dtype), randn((H + 2 * Hkv) * D, n_in, dtype=dtype)
            if not sl._kernel_takes(x, wqkv):
                continue
            freqs = torch.polar(torch.ones(B, T, D // 2), randn(B, T, D // 2, dtype=torch.float32))
            caches = [randn(B, 128, Hkv, D, dtype=dtype) for _ in range(2)]
            rope = sf.RotaryCacheWrite(freqs, torch.arange(T).repeat(B, 1), *caches, H, Hkv)
            for launch in sf.rope_candidates(B * T, x.device)[1:]:
                sl.skinny_linear_run(x, wqkv, launch, rope=rope)

    def norm_launches(dtype, rows, with_delta):
        # Every launch the norm tuners may time (`norm_candidates`; none past 32 rows) for `rows` rows
        # of the 7B: the gate/up weight with SwiGLU, the q/k/v weight (32 + 2 x 32 heads of 128) with
        # rotary; --quick: the first two of each.
        from mtp_kernels import skinny_fused as sf, skinny_linear as sl, skinny_norm as sn

        x = randn(rows, 4096, dtype=dtype)
        if not sl._kernel_takes(x, randn(16, 4096, dtype=dtype)):
            return
        delta = randn(rows, 4096, dtype=dtype) if with_delta else None
        norm = sn.NormPrologue(randn(4096, dtype=dtype), 1e-5, delta)
        h_out = torch.empty_like(x) if with_delta else None
        w13 = randn(22016, 4096, dtype=dtype)
        for launch in sn.norm_candidates(rows, x.device, None, sf.swiglu_candidates)[1:3 if quick else None]:
            sl.skinny_linear_run(x, w13, launch, swiglu=True, norm=norm, h_out=h_out)
        wqkv = randn(12288, 4096, dtype=dtype)
        freqs = torch.polar(torch.ones(1, rows, 64), randn(1, rows, 64, dtype=torch.float32))
        rope = sf.RotaryCacheWrite(freqs, torch.arange(rows)[None], *(randn(1, 128, 32, 128, dtype=dtype)
                                                                      for _ in range(2)), 32, 32)
        for launch in sn.norm_candidates(rows, x.device, None, sf.rope_candidates)[1:3 if quick else None]:
            sl.skinny_linear_run(x, wqkv, launch, rope=rope, norm=norm, h_out=h_out)

    def norm_prologue(dtype):
        # A block's residual add and RMSNorm inside the q/k/v (rotary) and gate/up (SwiGLU) launches:
        # one row, 16 and 32, with the add (a block's second and later norms) and without (the
        # first block's); --quick: one row and 16 rows, with the add. (Their programmatic form:
        # programmatic_launch below.)
        for rows, with_delta in ((1, True), (16, True)) if quick else ((1, True), (1, False), (16, True), (32, True)):
            norm_launches(dtype, rows, with_delta)

    def programmatic_launch(dtype):
        # A decode step's kernels as programmatic dependent launches (Hopper; dependent_launch.py):
        # the skinny GEMM tiles of the 7B's one-row and 64-row steps with their epilogue twins, both
        # with the early first weight tile (it changes the loop) and waiting first (--quick: the early
        # tile only), the kernels that only wait first, and the norm prologue's launches at one row
        # (not --quick).
        from mtp_kernels import skinny_fused as sf, skinny_linear as sl
        from mtp_kernels.dependent_launch import programmatic_launch

        def skinny(rows):
            x, w = randn(rows, 4096, dtype=dtype), randn(12288, 4096, dtype=dtype)   # 32 + 2 x 32 heads
            launches = sl.skinny_candidates(rows, x.device)[1:]
            for launch in launches if not quick else launches[:2] + [c for c in launches if c.split_k > 1][:1]:
                sl.skinny_linear_run(x, w, launch)
                sl.skinny_linear_run(x, w, sf.swiglu_twin(launch), swiglu=True)
                if sf.rope_twin(launch) is not None:
                    freqs = torch.polar(torch.ones(1, rows, 64), randn(1, rows, 64, dtype=torch.float32))
                    caches = [randn(1, 128, 32, 128, dtype=dtype) for _ in range(2)]
                    rope = sf.RotaryCacheWrite(freqs, torch.arange(rows)[None], *caches, 32, 32)
                    sl.skinny_linear_run(x, w, sf.rope_twin(launch), rope=rope)

        if not sl._kernel_takes(randn(1, 4096, dtype=dtype), randn(16, 4096, dtype=dtype)):
            return   # float32 stays on cuBLAS, and on the reference elsewhere in a step
        with programmatic_launch():
            for early in (True,) if quick else (True, False):
                with mock.patch.object(sl, "EARLY_WEIGHT_TILE", early):
                    for rows in (1, 64):
                        skinny(rows)
            K.rms_norm(randn(1, 4096, dtype=dtype), randn(4096, dtype=dtype))
            K.add_rms_norm(randn(1, 4096, dtype=dtype), randn(1, 4096, dtype=dtype), randn(4096, dtype=dtype))
            K.swiglu(randn(1, 11008, dtype=dtype), randn(1, 11008, dtype=dtype))
            q, k, v = (randn(1, 1, h, 128, dtype=dtype) for h in (32, 8, 8))
            k_cache, v_cache = (randn(1, 1024, 8, 128, dtype=dtype) for _ in range(2))
            freqs = torch.polar(torch.ones(1, 1, 64), randn(1, 1, 64, dtype=torch.float32))
            K.rope_cache_write(q, k, v, freqs, torch.zeros(1, 1, dtype=torch.long), k_cache, v_cache)
            seqlens = torch.tensor([900], dtype=torch.int32)
            problem = kv_cache_attention.kv_problem(q, k_cache)
            for launch in kv_cache_attention.kv_launch_candidates(*problem, q.device)[:2]:
                kv_cache_attention._kv_run(q, k_cache, v_cache, seqlens, None, 128 ** -0.5, launch)
                if launch.n_splits > 1 and launch.combine_last:   # the separate combine kernel too
                    kv_cache_attention._kv_run(q, k_cache, v_cache, seqlens, None, 128 ** -0.5,
                                               dataclasses.replace(launch, combine_last=False))
            if not quick:   # the norm prologue's launches at one row, with the early weight tile
                norm_launches(dtype, 1, True)

    def sampling(dtype):
        for R in (1, 48, 256):
            hidden, weight = randn(R, 256, dtype=dtype), randn(32000, 256, dtype=dtype)
            K.linear_argmax(hidden, weight)
            for k in (4, K.sampling.MAX_KERNEL_TOP_K):   # a tree's draft width, and the widest in-kernel
                K.linear_candidates(hidden, weight, k).topk(k)
            # Sampling as the Generator's steps draw: a temperature per row (0 marks a greedy row).
            K.linear_sample(hidden, weight, temperature=torch.full((R,), 0.8), generator=torch.Generator())
        # Every tile the selection tuner may time past 64 rows (no tuning on a CPU): an argmax, a
        # one-read verify step's ranks (4) and the widest.
        hidden, weight = randn(256, 256, dtype=dtype), randn(32000, 256, dtype=dtype)
        for tile in K.sampling.select_tiles(256, dtype, hidden.device)[1:]:
            for k in (4,) if quick else (1, 4, K.sampling.MAX_KERNEL_TOP_K):
                K.sampling._select_launch(hidden, weight, 0.0, None, k, tile)
            K.linear_sample(hidden, weight, temperature=0.8, generator=torch.Generator().manual_seed(1))
            # The top-p fallback samples on the host from the logits the (skipped) kernel would write.
            with mock.patch.object(reference, "sample_logits", lambda logits, *_: logits[:, 0].long()):
                K.linear_sample(hidden, weight, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))

    def sampling_llama3_vocabulary(dtype):
        # Pass 2's widest row in one merge program (16 warps): 1002 vocab blocks x 8 ranks.
        hidden, weight = randn(1, 256, dtype=dtype), randn(128256, 256, dtype=dtype)
        K.linear_topk(hidden, weight, 8)

    def tree_verify(dtype):
        tree = TokenTree.from_paths(preset_paths(4), 4)
        T = len(tree.parents)
        candidates = torch.randint(0, 100, (8, T), generator=gen)
        accepted, accept_len, _ = K.tree_accept(candidates, candidates.clone(), tree.parents)
        K.tree_accept_tokens(candidates, candidates.clone(), tree.parents)
        caches = [randn(6, 8, 512, 8, 128, dtype=dtype) for _ in range(2)]
        seqlens = torch.full((8,), 100, dtype=torch.int32)
        K.compact_kv_cache(*caches, seqlens, torch.arange(4).repeat(8, 1), torch.full((8,), 4))

    return dict(fused_ce=fused_ce, vocab_parallel_ce=vocab_parallel, rmsnorm=rmsnorm, flash_attention=flash,
                kv_cache_attention=kv_cache, rope_cache=rope_cache, swiglu=swiglu, sampling=sampling,
                sampling_llama3_vocabulary=sampling_llama3_vocabulary,
                tree_verify=tree_verify, skinny_linear=skinny_linear, norm_prologue=norm_prologue,
                programmatic_launch=programmatic_launch)


def markdown(records, arch: int, quick: bool) -> str:
    import triton

    lines = [f"# Triton kernels compiled for sm_{arch} on a CPU machine (Triton {triton.__version__})", "",
             f"`python benchmarks/compile_check.py --arch {arch}{' --quick' if quick else ''}`: every launch the "
             "public functions make at these shapes, compiled, not run. Shared memory in bytes per block "
             f"(limit {MAX_SHARED_BYTES.get(arch, 49152)}), registers per thread (ptxas), spill = stack + local "
             "bytes per thread, MMA = the tensor-core instructions in the PTX (wgmma: Hopper warpgroup MMA; "
             "mma: warp-level mma.sync), serialized = ptxas made each wgmma wait for the previous one (its "
             "note C7515). Warps: num_warps, and after an arrow the warps a warp-specialized kernel runs "
             "(Triton's producer and consumer partitions).", "",
             "| scenario | kernel | dtypes | constexprs | warps | stages | shared B | regs | spill B | MMA | serialized | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        warps = f"{r['num_warps']} -> {r['warps_run']} (WS)" if r.get("warp_specialized") else r["num_warps"]
        lines.append(f"| {r['scenario']} | {r['kernel']} | {','.join(r['dtypes'])} | {consts} | {warps} | "
                     f"{r['num_stages']} | {r.get('shared_bytes', '-')} | {r.get('registers', '-')} | "
                     f"{r.get('spill_bytes', '-')} | {r.get('tensor_cores', '-')} | "
                     f"{'yes' if r.get('wgmma_serialized') else '-'} | "
                     f"{'; '.join(r['problems']) or 'ok'} |")
    failed = sum(bool(r["problems"]) for r in records)
    spilling = sum(r.get("spill_bytes", 0) > 0 for r in records)
    serialized = sum(bool(r.get("wgmma_serialized")) for r in records)
    specialized = sum(bool(r.get("warp_specialized")) for r in records)
    programmatic = sum(bool(r.get("programmatic")) for r in records)
    lines += ["", f"{len(records)} variants, {failed} failed, {spilling} spill, {serialized} with serialized wgmma, "
              f"{specialized} warp-specialized, {programmatic} waiting for the kernel before them (programmatic "
              "dependent launch: griddepcontrol.wait in the PTX)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("--quick", action="store_true", help="bf16 only, first config of each autotuned kernel")
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    # Before Triton and the kernels are imported: compiled kernels, GPU launch configs for CPU tensors.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["MTP_CROSS_COMPILE"] = str(args.arch)
    os.environ.pop("MTP_BACKEND", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["MTP_WARP_SPEC"] = "1"   # compile the warp-specialized configs whatever this machine's Triton
    sys.path.insert(0, str(ROOT))
    import torch

    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    compiler = CrossCompiler(args.arch, args.quick)
    all_scenarios = scenarios(args.quick)
    unknown = set(args.only or ()) - set(all_scenarios)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(all_scenarios)}")
    t0 = time.perf_counter()
    with compiler.capture():
        for name, run in all_scenarios.items():
            if args.only and name not in args.only:
                continue
            for dtype in dtypes:
                compiler.scenario = name
                print(f"{name} {str(dtype).removeprefix('torch.')}", flush=True)
                run(dtype)
    failed = [r for r in compiler.records if r["problems"]]
    print(f"{len(compiler.records)} variants compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s, "
          f"{len(failed)} failed")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compile_sm{args.arch}{'_quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(compiler.records, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(compiler.records, args.arch, args.quick))
    return 1 if failed or not compiler.records else 0


if __name__ == "__main__":
    sys.exit(main())
