"""Where the warp-specialized flash kernels go wrong on a GPU, and whether the right ones pay.

    python benchmarks/probe_warp_spec.py [--out DIR] [--cpu-smoke] [--parts flash timing]

On an H100 with Triton 3.6 (fourteenth session) the warp-specialized flash forward gave NaN rows,
while every interpreter test passes. The `flash` part runs each warp-specialized config (tile,
num_stages) of the forward, dQ and dK/dV over a grid of cases, one factor changed at a time (one
sequence against two, a length that is a multiple of the block against a ragged one, causal or
not, head dim 64 or 128, contiguous tensors or views of a fused qkv projection), and says for each
which rows went wrong. Its first run (seventeenth session) found the forward's num_stages=3 configs
and dK/dV's 32-row query blocks wrong in every case and the rest right: those two are gone from
attention.py's lists. (A warp-specialized tree-verification kernel was probed too: its second
consumer's rows were wrong and it ran at 0.67x the plain kernel's speed, so it was removed.)
The `timing` part (GPU only) times every config at bench_attention.py's shapes (`time_flash`).

A bad output row (`BAD_ROW_TOL`) is located by its query block and by its half of the block: the two consumer
warpgroups each take one half, so a fault that always sits in one half points at the partition.
Results (relative error against float32, bad rows, where) go to warp_spec_probe_<slug>.json / .md.
It switches MTP_WARP_SPEC=1 on for itself. `--cpu-smoke` runs the interpreter's small tiles on the
CPU in float32 (the numbers there only show that the script runs).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# A bad row: error above this share of the mean row norm. bf16 rows stay well under it; what the
# probe hunts (NaN, another row's values, stale buffers) lands far above.
BAD_ROW_TOL = 0.2


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def bad_rows(got: torch.Tensor, want: torch.Tensor, block_m: int, tol: float) -> dict:
    """got, want: (B, T, H, D). A row (b, t, h) is bad when it is not finite or its error passes
    `tol` times the mean row norm of `want` (a row's own norm can be 0: dQ of a causal first row).
    Returns how many, and which query blocks and block halves (of `block_m` rows) hold them:
    "first" / "second" half, the rows each consumer warpgroup takes."""
    got, want = got.double(), want.double()
    err = (got - want).norm(dim=-1) / want.norm(dim=-1).mean().clamp_min(1e-30)
    bad = ~torch.isfinite(got).all(dim=-1) | (err > tol)                      # (B, T, H)
    where = bad.nonzero().tolist()
    blocks = sorted({t // block_m for _, t, _ in where})
    halves = sorted({"first" if (t % block_m) < block_m // 2 else "second" for _, t, _ in where})
    return {"bad_rows": len(where), "of_rows": bad.numel(), "blocks": blocks[:12], "halves": halves}


def _flash_inputs(B, T, H, Hkv, D, fused: bool, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g).to(device, dtype)
        return qkv.split([H, Hkv, Hkv], dim=2)
    return tuple(torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))


def flash_cases(smoke: bool):
    """(label, B, T, H, Hkv, D, causal, fused), one factor changed at a time from the first."""
    if smoke:
        return [("B1 T64 causal", 1, 64, 2, 1, 16, True, False), ("B2 T37 fused", 2, 37, 4, 2, 32, False, True)]
    base = dict(B=1, T=1024, H=8, Hkv=2, D=128, causal=True, fused=False)
    variants = [("base: B1 T1024 D128 causal", {}), ("non-causal", dict(causal=False)),
                ("T1000 (ragged)", dict(T=1000)), ("two sequences", dict(B=2)),
                ("D64", dict(D=64)), ("fused qkv views", dict(fused=True)),
                ("failing test: B2 T1000 fused, non-causal", dict(B=2, T=1000, fused=True, causal=False))]
    return [(label, *({**base, **change}[k] for k in ("B", "T", "H", "Hkv", "D", "causal", "fused")))
            for label, change in variants]


def probe_flash(attention, reference, smoke: bool, device, dtype) -> list[dict]:
    import triton

    if smoke:
        fwd_configs = [triton.Config(dict(BLOCK_M=32, BLOCK_N=16, FOLD_SCALE=True, WARP_SPEC=True), num_warps=4)]
        dq_configs = [triton.Config(dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True), num_warps=4)]
        dkdv_configs = [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, ONE_LOOP=True, WARP_SPEC=True), num_warps=4)]
    else:
        ws = lambda configs: [c for c in configs if c.kwargs["WARP_SPEC"]]   # noqa: E731
        fwd_configs, dq_configs = ws(attention._GPU_FWD_CONFIGS), ws(attention._GPU_DQ_CONFIGS)
        dkdv_configs = ws(attention._GPU_DKDV_CONFIGS)
    # Pointer-load configs for the other kernel of each call (the autotuner, switched on here, might
    # pick a warp-specialized one); None under the interpreter: its fixed configs are those.
    plain_fwd, plain_dkdv, plain_dq = ((None, None, None) if smoke else (
        attention._GPU_FWD_CONFIGS[0], attention._GPU_DKDV_CONFIGS[0], attention._GPU_DQ_CONFIGS[0]))
    rows = []
    for label, B, T, H, Hkv, D, causal, fused in flash_cases(smoke):
        q, k, v = _flash_inputs(B, T, H, Hkv, D, fused, dtype, device, seed=T + D)
        scale = D ** -0.5
        if not attention._ws_ok(q, k, v):
            rows.append({"kernel": "forward", "case": label, "config": "-", "error": "layout refused (_ws_ok)"})
            continue
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        want = reference.attention(q32, k32, v32, causal=causal, sm_scale=scale)
        dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        want.backward(dout.float())
        # The backward's inputs from the pointer-load forward, so a backward row is judged alone.
        out_plain, lse_plain = attention.flash_attention_fwd(q, k, v, causal, scale, config=plain_fwd)
        for kernel, configs in (("forward", fwd_configs), ("dQ", dq_configs), ("dK/dV", dkdv_configs)):
            for config in configs:
                record = {"kernel": kernel, "case": label, "config": _config_label(config)}
                try:
                    if kernel == "forward":
                        got, ref = attention.flash_attention_fwd(q, k, v, causal, scale, config=config)[0], want
                        block = config.kwargs["BLOCK_M"]
                    elif kernel == "dQ":
                        got = attention.flash_attention_bwd(dout, q, k, v, out_plain, lse_plain, causal, scale,
                                                            dkdv_config=plain_dkdv, dq_config=config)[0]
                        ref, block = q32.grad, config.kwargs["BLOCK_M"]
                    else:   # dK and dV both judged: two accumulators of one loop
                        _, dk, dv = attention.flash_attention_bwd(dout, q, k, v, out_plain, lse_plain, causal, scale,
                                                                  dkdv_config=config, dq_config=plain_dq)
                        got, ref = torch.cat([dk, dv], dim=2), torch.cat([k32.grad, v32.grad], dim=2)
                        block = config.kwargs["BLOCK_N"]
                    record.update(rel_err=_rel_err(got, ref), **bad_rows(got, ref, block, BAD_ROW_TOL))
                except Exception as err:  # noqa: BLE001 - recorded: a compile failure is a finding too
                    record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                rows.append(record)
    return rows


# The shapes bench_attention.py times: flash (B, H, T, D), causal with H == Hkv.
TIMED_FLASH_SHAPES = [(4, 32, 4096, 128), (8, 16, 2048, 64)]


def time_flash(attention, device, dtype) -> list[dict]:
    """Do the warp-specialized configs pay? At the benchmark's shapes, one forward and backward
    through the autotuner (warp-specialized configs included) records every config's time as the
    autotuner measured it; each warp-specialized config is then run alone and compared with SDPA's
    output and gradients (bf16 against bf16: a wrong config lands far above the others)."""
    import torch.nn.functional as F

    rows = []
    for B, H, T, D in TIMED_FLASH_SHAPES:
        gen = torch.Generator(device=device).manual_seed(T + D)
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        dout = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
        want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True).transpose(1, 2)
        want_grads = torch.autograd.grad(want, (q, k, v), dout)
        attention.flash_attention(q, k, v, causal=True).backward(dout)   # tunes all three kernels
        shape = f"B{B} H{H} T{T} D{D} causal"
        scale = D ** -0.5
        out, lse = attention.flash_attention_fwd(q.detach(), k.detach(), v.detach(), True, scale)
        for which, kernel in (("fwd", "forward"), ("dq", "dQ"), ("dkdv", "dK/dV")):
            tuner = attention._tuned(which)
            best = getattr(tuner, "best_config", None)
            for config, t in (getattr(tuner, "configs_timings", None) or {}).items():
                record = {"shape": shape, "kernel": kernel, "config": _config_label(config),
                          "warp_spec": bool(config.kwargs["WARP_SPEC"]),
                          "ms": t[0] if isinstance(t, (list, tuple)) else t, "chosen": config == best}
                if record["warp_spec"]:
                    try:
                        if which == "fwd":
                            pairs = [(attention.flash_attention_fwd(q.detach(), k.detach(), v.detach(), True,
                                                                    scale, config=config)[0], want)]
                        else:
                            grads = attention.flash_attention_bwd(
                                dout, q.detach(), k.detach(), v.detach(), out, lse, True, scale,
                                dkdv_config=config if which == "dkdv" else None,
                                dq_config=config if which == "dq" else None)
                            # dK/dV: both gradients judged (two accumulators of one loop)
                            pairs = list(zip(grads, want_grads))[:1] if which == "dq" else list(zip(grads, want_grads))[1:]
                        # the worst of them; NaN (a non-finite output) counts worst
                        record["rel_err_vs_sdpa"] = max((_rel_err(got, ref) for got, ref in pairs),
                                                        key=lambda err: math.inf if math.isnan(err) else err)
                    except Exception as err:  # noqa: BLE001 - recorded
                        record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                rows.append(record)
        del q, k, v, dout, want, want_grads
    return rows


def timing_markdown(rows: list[dict]) -> str:
    """Per shape and kernel: the best plain and the best warp-specialized time, then every row."""
    lines = ["## Do they pay? Times at the benchmark's shapes (the autotuner's ms)", "",
             "| shape | kernel | best plain ms | best warp-specialized ms | plain / warp-specialized | "
             "warp-specialized errors |", "|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["kernel"]), []).append(r)
    for (shape, kernel), group in groups.items():
        plain = [r["ms"] for r in group if not r["warp_spec"] and isinstance(r.get("ms"), float)]
        ws = [r for r in group if r["warp_spec"]]
        ws_ms = [r["ms"] for r in ws if isinstance(r.get("ms"), float)]
        errs = ", ".join(f"{r['rel_err_vs_sdpa']:.3g}" if isinstance(r.get("rel_err_vs_sdpa"), float)
                         else str(r.get("error")) for r in ws)
        best_plain, best_ws = (min(plain) if plain else None), (min(ws_ms) if ws_ms else None)
        ratio = best_plain / best_ws if best_plain and best_ws else None
        lines.append(f"| {shape} | {kernel} | {best_plain} | {best_ws} | {ratio} | {errs} |")
    lines += ["", "| shape | kernel | config | warp-specialized | ms | chosen | rel err |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("rel_err_vs_sdpa", r.get("error", ""))
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['config']} | {r['warp_spec']} | {r['ms']} | "
                     f"{'yes' if r['chosen'] else ''} | {err} |")
    return "\n".join(lines)


def _config_label(config) -> str:
    kw = {k: v for k, v in config.kwargs.items() if k not in ("WARP_SPEC",)}
    return ", ".join(f"{k}={v}" for k, v in kw.items()) + f", warps={config.num_warps}, stages={config.num_stages}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--cpu-smoke", action="store_true", help="interpreter tiles on the CPU, float32")
    parser.add_argument("--parts", nargs="+", choices=("flash", "timing"), default=("flash", "timing"),
                        help="which to run: the flash cases, the timing at the benchmark's shapes (GPU only)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("probe_warp_spec: needs CUDA (--cpu-smoke checks the script under TRITON_INTERPRET=1)")
        return 0
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    os.environ["MTP_WARP_SPEC"] = "1"   # this process only: the probe is about these kernels
    from mtp_kernels import attention, reference

    rows = probe_flash(attention, reference, smoke, device, dtype) if "flash" in args.parts else []
    timing = time_flash(attention, device, dtype) if "timing" in args.parts and not smoke else []
    headers = ["kernel", "case", "config", "rel err", "bad rows", "of rows", "blocks", "halves", "error"]
    table = common.markdown_table(headers, [[r.get("kernel"), r.get("case"), r.get("config"), r.get("rel_err"),
                                             r.get("bad_rows"), r.get("of_rows"), r.get("blocks"), r.get("halves"),
                                             r.get("error")] for r in rows])
    name = common.device_name(device)
    md = "\n".join([f"# Warp-specialized kernels, case by case, on {name}", "",
                    f"Relative error against float32; a row is bad when it is not finite or its error passes "
                    f"{BAD_ROW_TOL} of the mean row norm; blocks: the query blocks holding "
                    f"bad rows; halves: which half of those blocks (the two consumer warpgroups' rows).", "", table]
                   + (["", timing_markdown(timing)] if timing else []))
    out = Path(args.out)
    slug = common.device_slug(device)
    parts = sorted(set(args.parts))
    stem = f"warp_spec_probe_{slug}" + ("" if parts == ["flash", "timing"] else "_" + "-".join(parts))
    common.write_json(out / f"{stem}.json", {"env": common.environment_info(device), "rows": rows, "timing": timing})
    common.write_markdown(out / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
