"""Can Triton warp-specialize a dK/dV loop that adds each block's dQ share in a fixed order?

A deterministic 5-matmul flash-attention backward (FlashAttention-2's scheme without float atomics)
adds each key block's dS K into dQ in key-block order: the program of key block j waits until the
programs before it have added their share to a query block, then adds its own. That wait is a loop
(a spin on a per-query-block counter) inside the dK/dV kernel's main loop, the loop Triton's
automatic warp specialization splits into producer and consumer partitions (attention.py's
WARP_SPEC kernels, 2.33 against 2.83 ms for dK/dV at D128 on the H200).

This compiles three forms of a dK/dV-shaped loop for sm_90 with `warp_specialize=True`, on a CPU
(nothing runs): the loop alone, the loop with a float32 dQ read-add-write (unordered: a race, for
comparison), and the same with the ordering spin. It reports whether the pass split the kernel
(warps run > num_warps) or what it failed with.

    python benchmarks/probe_ordered_dq.py [--out benchmarks/results]

Writes ordered_dq_ws_probe_triton-<version>.{json,md}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FORMS = {"loop": (False, False), "loop + dQ add (unordered)": (True, False), "loop + dQ add in order (spin)": (True, True)}


@triton.jit
def _dkdv_like_kernel(Q, DQ, TURNS, B, T, H, stride_qt, N_BLOCKS, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                      DQ_ADD: tl.constexpr, IN_ORDER: tl.constexpr):
    pid = tl.program_id(0)
    desc = tl.make_tensor_descriptor(Q, shape=[B * T, H * HEAD_DIM], strides=[stride_qt, 1],
                                     block_shape=[BLOCK, HEAD_DIM])
    k = desc.load([pid * BLOCK, 0])
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    for i in tl.range(0, N_BLOCKS, warp_specialize=True):
        q = desc.load([i * BLOCK, 0])
        s = tl.dot(k, tl.trans(q))
        acc = tl.dot(s.to(q.dtype), q, acc)
        if DQ_ADD:
            share = tl.dot(tl.trans(s).to(q.dtype), k)
            if IN_ORDER:   # wait for the key blocks before this one to have added theirs
                while tl.atomic_add(TURNS + i, 0, sem="acquire", scope="gpu") < pid:
                    pass
            ptrs = DQ + (i * BLOCK + offs)[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(ptrs, share + tl.load(ptrs, cache_modifier=".cg"))
            tl.debug_barrier()
            tl.atomic_add(TURNS + i, 1, sem="release", scope="gpu")
    tl.store(DQ + offs[:, None] * HEAD_DIM + offs_d[None, :], acc)


def compile_form(dq_add: bool, in_order: bool, num_warps: int = 4) -> dict:
    """Compile one form for sm_90 (BLOCK 64, head dim 128, bf16): {"warps_run", "warp_specialized"},
    or {"error": the compiler's last line}."""
    signature = dict(Q="*bf16", DQ="*fp32", TURNS="*i32", B="i32", T="i32", H="i32", stride_qt="i32", N_BLOCKS="i32",
                     BLOCK="constexpr", HEAD_DIM="constexpr", DQ_ADD="constexpr", IN_ORDER="constexpr")
    src = triton.compiler.ASTSource(fn=_dkdv_like_kernel, signature=signature,
                                    constexprs=dict(BLOCK=64, HEAD_DIM=128, DQ_ADD=dq_add, IN_ORDER=in_order))
    compiled, error = common.compile_sm90(src, num_warps, num_stages=2)
    if error:   # the pass's failure is the finding
        return {"error": error}
    warps = int(compiled.metadata.num_warps)
    return {"warps_run": warps, "warp_specialized": warps > num_warps}


def main(out: str) -> None:
    common.refuse_interpreter("probe_ordered_dq.py")
    rows = [{"form": name, **compile_form(*flags)} for name, flags in FORMS.items()]
    common.write_probe(out, "ordered_dq_ws_probe", "Ordered dQ in a warp-specialized loop", "probe_ordered_dq.py", rows,
                       ["loop form", "warps run (asked 4)", "warp-specialized", "compile error"],
                       [[r["form"], r.get("warps_run"), r.get("warp_specialized"), r.get("error")] for r in rows])


if __name__ == "__main__":
    common.probe_command_line(__doc__, main)
