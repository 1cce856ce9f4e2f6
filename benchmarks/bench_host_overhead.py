"""Host time of one call of the public attention functions: Python checks, the autotuner's lookup,
Triton's argument binding and the launch.

    python benchmarks/bench_host_overhead.py [--out DIR] [--calls N] [--cpu-smoke]

Each row times `calls` calls that only enqueue GPU work (no synchronize between them) with
time.perf_counter: the host's cost per call, whatever the kernel's GPU time. Where it exceeds the
kernel's time, the call is host bound: do_bench and back-to-back timings then measure the host, not
the kernel (bench_attention.py's "forward kernels" table shows such a gap). The flash forward is
also taken apart: the public function, the host launcher `flash_attention_fwd`, `_launch` alone
(which launches the autotuner's kept choice), the autotuner's own launch (what `_launch` did at every
call before it kept the choice), and the kernel launched with the chosen config; then cProfiles of
the public forward and of forward+backward list where the host time goes. SDPA is the yardstick. CUDA; `--cpu-smoke` runs the same
code on one tiny float32 shape on the CPU (TRITON_INTERPRET=1 for the Triton path), numbers meaningless.
Writes host_overhead_<device-slug>.json and .md into DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_attention import _sdpa_attention as _sdpa  # noqa: E402  (bench_attention's SDPA contender)

SHAPES = [(8, 16, 2048, 64), (4, 32, 4096, 128)]   # bench_attention's flash shapes: B, H, T, D
SMOKE_SHAPES = [(1, 2, 40, 16)]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, calls: int) -> float:
    """Median over 5 rounds of the host microseconds per call of `calls` enqueued calls."""
    fn()
    _sync()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        _sync()
    return sorted(rounds)[2]


def _captured_launch(attention, q, k, v, scale):
    """The positional arguments flash_attention_fwd hands to `_launch` for these inputs."""
    seen = []
    launch = attention._launch

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return launch(*args, **kwargs)
    attention._launch = spy
    try:
        attention.flash_attention_fwd(q, k, v, True, scale)
    finally:
        attention._launch = launch
    return seen[0]


def bench_shape(attention, B, H, T, D, calls: int, device: str) -> tuple[list[dict], str]:
    import triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
    scale = D ** -0.5
    shape = f"B{B} H{H} T{T} D{D} causal"
    (launch_args, launch_kwargs) = _captured_launch(attention, q.detach(), k.detach(), v.detach(), scale)
    which, kernel_args, T_, block, programs, D_, causal = launch_args[:7]
    chosen = (attention._tuned("fwd").best_config if device == "cuda"
              else triton.Config(dict(attention._INTERP_FWD), num_warps=4))
    raw_args = launch_args[:7] + (chosen,) + launch_args[8:]   # `config` is _launch's 8th argument

    def autotuner_launch():   # what `_launch` did at every call before it kept the autotuner's choice
        if device != "cuda":
            return attention._launch(*raw_args)
        attention._tuned(which)[lambda meta: (triton.cdiv(T_, meta[block]), programs)](
            *kernel_args, **attention._head_dim_tile(D_), CAUSAL=causal)

    def fwd_bwd(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)
        return run

    rows = []
    with torch.no_grad():
        for name, fn in [
            ("flash_attention (public)", lambda: attention.flash_attention(q, k, v, causal=True)),
            ("flash_attention_fwd (host launcher)", lambda: attention.flash_attention_fwd(q, k, v, True, scale)),
            ("_launch alone (the autotuner's choice, kept)", lambda: attention._launch(*launch_args, **launch_kwargs)),
            ("the autotuner's launch", autotuner_launch),
            ("kernel with the chosen config", lambda: attention._launch(*raw_args)),
            ("sdpa", lambda: _sdpa(q, k, v)),
        ]:
            rows.append({"shape": shape, "call": f"forward: {name}", "host_us": host_us(fn, calls)})
    for name, fn in [("flash_attention", lambda q, k, v: attention.flash_attention(q, k, v, causal=True)),
                     ("sdpa", _sdpa)]:
        rows.append({"shape": shape, "call": f"forward + backward: {name}",
                     "host_us": host_us(fwd_bwd(fn), max(calls // 4, 10))})

    text = io.StringIO()
    for title, fn, n, order in (("public forwards", lambda: attention.flash_attention(q, k, v, causal=True),
                                 calls, "tottime"),
                                ("forwards + backwards", fwd_bwd(lambda q, k, v: attention.flash_attention(q, k, v)),
                                 max(calls // 4, 2), "cumulative")):
        profile = cProfile.Profile()
        with torch.no_grad() if order == "tottime" else contextlib.nullcontext():
            profile.enable()
            for _ in range(n):
                fn()
            profile.disable()
        _sync()
        text.write(f"### cProfile of {n} {title}, {shape} (sorted by {order} time)\n\n```\n")
        stats = io.StringIO()
        pstats.Stats(profile, stream=stats).sort_stats(order).print_stats(25)
        text.write(stats.getvalue().strip() + "\n```\n\n")
    return rows, text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny float32 shape on the CPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_host_overhead: CUDA only (it times what the host spends per GPU launch); --cpu-smoke checks the script")
        return 0
    from mtp_kernels import attention

    rows, profiles = [], []
    for B, H, T, D in (SMOKE_SHAPES if args.cpu_smoke else SHAPES):
        shape_rows, profile = bench_shape(attention, B, H, T, D, 2 if args.cpu_smoke else args.calls, device)
        rows += shape_rows
        profiles.append(profile)
    name = common.device_name(device)
    md = [f"# Host time per call on {name} (torch {torch.__version__})", "",
          "Microseconds the host spends per call, enqueueing only (median of 5 rounds). A call whose host "
          "time exceeds its kernel's GPU time is host bound.", "",
          common.markdown_table(["shape", "call", "host us"], [[r["shape"], r["call"], r["host_us"]] for r in rows]),
          "", *profiles]
    out = Path(args.out)
    slug = common.device_slug(device)
    common.write_json(out / f"host_overhead_{slug}.json",
                      {"env": common.environment_info(device), "rows": rows, "profiles": profiles})
    common.write_markdown(out / f"host_overhead_{slug}.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
