"""Which forms of the skinny GEMM's TMA tile does Triton warp-specialize for sm_90?

kernels/skinny_ws.py offers its tiles in two forms: rows of x as wgmma's M (64-row tiles), and the
weight rows as M (`swap_ab`: every 32-row tile, one 64-row tile). This compiles a 64-row tile of the
first and a 32-row tile of the second, and two forms it does not offer, on a CPU
(nothing runs), and reports whether Triton's automatic pass split the K loop into producer and
consumer warps (warps run > num_warps asked) and which matrix instructions the dots became:
  - 32 rows of x as M, not swapped: the dot is too short for wgmma's M of 64;
  - a persistent program per SM over the n tiles, one flattened (tile, K) loop
    (`tl.range(..., flatten=True, warp_specialize=True)`), the form Triton's persistent matmul
    tutorial uses.

    python benchmarks/probe_skinny_ws_forms.py [--out benchmarks/results]

Writes skinny_ws_forms_triton-<version>.{json,md}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NUM_WARPS = 4
# form: (BLOCK_M, SWAP_AB, persistent); whether it is offered comes from skinny_linear's tile table
FORMS = {"64 rows as M": (64, False, False),
         "32 rows, weight rows as M (swap_ab)": (32, True, False),
         "32 rows as M": (32, False, False),
         "64 rows as M, persistent (flattened loop)": (64, False, True)}


def offered(block_m: int, swap: bool, persistent: bool) -> bool:
    """Whether the GPU tile table (`skinny_linear.ws_tiles`) has a tile of this form (none is persistent)."""
    common.import_mtp_kernels()
    from mtp_kernels.skinny_linear import ws_tiles

    return not persistent and any(t.swap_ab == swap for t in ws_tiles(block_m, gpu=True))


@triton.jit
def _persistent_tile_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    for tile in tl.range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0), flatten=True,
                         warp_specialize=True):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            acc = tl.dot(x_desc.load([0, kt * BLOCK_K]), tl.trans(w_desc.load([tile * BLOCK_N, kt * BLOCK_K])), acc)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _source(block_m: int, swap_ab: bool, persistent: bool):
    """The ASTSource of one form: the shipped `skinny_ws_kernel` (plain epilogue, unsplit, bf16,
    64 x 128 weight tiles) or the probe's persistent kernel."""
    if persistent:
        signature = dict(X="*bf16", W="*bf16", Y="*bf16", M="i32", N="i32", K="i32", stride_xm="i32",
                         stride_wn="i32", stride_ym="i32", BLOCK_M="constexpr", BLOCK_N="constexpr",
                         BLOCK_K="constexpr")
        return triton.compiler.ASTSource(fn=_persistent_tile_kernel, signature=signature,
                                         constexprs=dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128))
    common.import_mtp_kernels()   # installed, or loaded from kernels/
    from mtp_kernels.skinny_ws import skinny_ws_kernel as kernel
    pointers = dict(X="*bf16", W="*bf16", Y="*bf16")
    constexprs = dict(PARTIALS=None, COUNTERS=None, FREQS=None, SLOTS=None, K_CACHE=None, V_CACHE=None,
                      BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, SWAP_AB=swap_ab, SPLIT_K=1, SWIGLU=False,
                      ROPE=False, PDL=False)
    signature = {p.name: "constexpr" if p.name in constexprs else pointers.get(p.name, "i32") for p in kernel.params}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)


def compile_form(block_m: int, swap_ab: bool, persistent: bool) -> dict:
    """Compile one form for sm_90 (4 stages): {"warps_run", "warp_specialized", "tensor_cores"},
    or {"error": the compiler's last line}."""
    compiled, error = common.compile_sm90(_source(block_m, swap_ab, persistent), NUM_WARPS, num_stages=4)
    if error:
        return {"error": error}
    ptx = compiled.asm["ptx"]
    tensor_cores = "+".join(n for n, p in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if p in ptx) or "-"
    warps = int(compiled.metadata.num_warps)
    return {"warps_run": warps, "warp_specialized": warps > NUM_WARPS, "tensor_cores": tensor_cores}


def main(out: str) -> None:
    common.refuse_interpreter("probe_skinny_ws_forms.py")
    rows = [{"form": name, "offered": offered(block_m, swap, persistent), **compile_form(block_m, swap, persistent)}
            for name, (block_m, swap, persistent) in FORMS.items()]
    common.write_probe(
        out, "skinny_ws_forms", "Skinny GEMM TMA tile forms", "probe_skinny_ws_forms.py", rows,
        ["form", "offered", f"warps run (asked {NUM_WARPS})", "warp-specialized", "matrix instructions", "compile error"],
        [[r["form"], r["offered"], r.get("warps_run"), r.get("warp_specialized"), r.get("tensor_cores"), r.get("error")]
         for r in rows])


if __name__ == "__main__":
    common.probe_command_line(__doc__, main)
