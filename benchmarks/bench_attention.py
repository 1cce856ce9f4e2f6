"""Attention kernels vs torch SDPA (and eager PyTorch), bf16, on one GPU.

    python benchmarks/bench_attention.py --out DIR

1. Flash attention, causal, MHA: B4 H32 T4096 D128 and B8 H16 T2048 D64. TFLOP/s forward and
   forward+backward. Causal forward FLOPs = 4*B*H*T*T*D / 2; backward counted as 2.5x forward.
   Contenders: ours (mtp_kernels.attention.flash_attention), torch SDPA (on (B, H, T, D) views of
   the same tensors; the targets' reference), SDPA held to its FlashAttention-2 and its cuDNN
   backend (so the table says which kernel "sdpa" is), eager (bf16 matmuls, float32 softmax;
   recorded as OOM where it does not fit).
2. Decode (Tq = 1) against a KV cache, H32 Hkv8 D128, B in {1, 8, 64}, S in {1024, 8192} cached
   tokens per sequence. GB/s = bytes of cache the call must read (2 * B * (S + Tq) * Hkv * D * 2)
   / time, and the ratio to the device copy bandwidth measured here (one large device-to-device
   copy, read + write counted). Contender: SDPA on the cache sliced to the live length.
3. Tree verification on the same caches: Tq in {16, 64} nodes with a 4-ary tree mask (packed once,
   as the model does), time as a multiple of the Tq = 1 decode.
Floors (count them first): flash forward = its FLOPs at the matmul rate measured here (bf16
8192^3 torch.mm), forward+backward = 3.5x that; KV-cache attention at Tq new tokens =
max(cache bytes / copy bandwidth, 4 * B * H * D * (Tq * S + the tree pairs the mask keeps) FLOPs /
matmul rate) (before 2026-11-27, Tq * (S + Tq): every node seeing every tree slot). A 64-node
tree over H/Hkv = 4 query heads per KV head does 256 FLOPs per cache byte, more than the H200's
~185 (794 TFLOP/s over 4.28 TB/s, measured in session 1): it is compute bound, and its floor is above the Tq = 1 floor,
so the best reachable tree/decode ratio is that of the floors (the "floor ratio" columns).
Timing: triton.testing.do_bench, median, of eager calls ("launch": includes the host cost of the
Python launcher, which dominates small calls) and, for decode and tree verification, of the call
replayed as a CUDA graph ("graph": the generator's condition, where decode and verify steps replay
graphs; this is the kernel time the bandwidth and tree targets are judged on). The range check of
cache_seqlens (one host sync per call) is switched off while timing, as a generator that owns its
lengths would do. Timed calls cycle through copies of the cache that together hold twice the L2
(launch_tuner.rotating_copies), so every call reads its cache from HBM, as in a real decode step
(where 31 other layers' caches and weights pass through L2 between two uses of one). KV-cache
launches are tuned per shape before timing (kernels/kv_cache_attention.py,
tune_kv_launch); a table lists every candidate launch's time, the heuristic's and the tuned one.
Writes attention_<device-slug>.json and .md into DIR and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charts  # noqa: E402
import common  # noqa: E402

FLASH_SHAPES = [(4, 32, 4096, 128), (8, 16, 2048, 64)]          # B, H, T, D (causal, H == Hkv)
DECODE_BATCHES = (1, 8, 64)
DECODE_LENGTHS = (1024, 8192)
DECODE_HEADS = (32, 8, 128)                                     # H, Hkv, D
TREE_SIZES = (16, 64)


def _import_attention():
    """(attention, kv_cache_attention): the flash and the KV-cache attention modules."""
    try:
        from mtp_kernels import attention, kv_cache_attention
    except ModuleNotFoundError:  # a bare checkout: `kernels/` is the package
        import importlib.util

        init = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "__init__.py")
        spec = importlib.util.spec_from_file_location("mtp_kernels", init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mtp_kernels"] = module
        spec.loader.exec_module(module)
        from mtp_kernels import attention, kv_cache_attention
    return attention, kv_cache_attention


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def _timing_error(err: Exception) -> str:
    """What a contender's table cell says when timing it failed: "OOM", or the error's first line."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def _bench_ms(fn, rep: int = 100) -> float | str:
    """Median ms (CUDA: do_bench; the CPU smoke run: one timed call), or "OOM" / "error: ..." so
    one failing contender does not end the run."""
    try:
        fn()
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench

        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))
    except Exception as err:  # noqa: BLE001 - recorded in the table
        return _timing_error(err)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _bench_back_to_back_ms(fn, calls: int = 10, reps: int = 5) -> float | str | None:
    """Median over `reps` of the mean ms of `calls` back-to-back calls between two CUDA events, no
    cache flush between them: the host queues the next call while the GPU runs this one, as in a
    training step, so a call's Python and launch overhead is hidden when its kernels take longer.
    do_bench (`_bench_ms`) instead flushes the L2 before every call and times each one alone, so the
    GPU waits for whatever host time exceeds the flush. None off CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return float(sorted(times)[len(times) // 2])
    except Exception as err:  # noqa: BLE001 - recorded in the table
        return _timing_error(err)


def _bench_graph_ms(fn, rep: int = 50) -> float | str:
    """Median ms of `fn` replayed from a CUDA graph (the CPU smoke run: one timed eager call)."""
    if not torch.cuda.is_available():
        return _bench_ms(fn, rep)
    from triton.testing import do_bench_cudagraph

    try:
        fn()   # compile outside the capture
        torch.cuda.synchronize()
        try:
            return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except TypeError:  # a Triton whose do_bench_cudagraph has no return_mode
            return float(do_bench_cudagraph(fn, rep=rep))
    except Exception as err:  # noqa: BLE001 - recorded in the table
        return _timing_error(err)
    finally:
        torch.cuda.empty_cache()


def _kv_floor_ms(B, S, Tq, H, Hkv, D, element_size, copy_gbps, matmul_tflops, tree_pairs=None):
    """max(cache read time, matmul time) of attending Tq new queries per sequence to the S cached
    slots and to the new slots each may see: tree_pairs (query, new slot) pairs, the tree mask's
    true entries (default Tq, each query itself), so the matmul time counts only scores the mask keeps
    (a lower bound: a kernel computes whole tiles)."""
    nbytes = 2 * B * (S + Tq) * Hkv * D * element_size
    flops = 4 * B * H * D * (Tq * S + (Tq if tree_pairs is None else tree_pairs))
    return max(nbytes / (copy_gbps * 1e6), flops / (matmul_tflops * 1e9))


def _eager_attention(q, k, v):
    """(B, T, H, D) bf16; the usual eager recipe: bf16 matmuls, float32 softmax."""
    T, D = q.shape[1], q.shape[3]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)).float() * D ** -0.5
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(q.dtype)
    return (probs @ vh).transpose(1, 2)


def _sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def _sdpa_on_backend(backend_name: str):
    """SDPA held to one backend (torch.nn.attention.SDPBackend name); the backward follows the
    forward's kernel. A backend this torch or GPU lacks is recorded as that contender's error."""
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return _sdpa_attention(q, k, v)
    return run


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def bench_flash(attention, matmul_tflops: float, shapes=FLASH_SHAPES, device="cuda", dtype=torch.bfloat16
                ) -> list[dict]:
    rows = []
    for B, H, T, D in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        dout = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
        fwd_flops = 4 * B * H * T * T * D / 2
        contenders = [("ours", lambda q, k, v: attention.flash_attention(q, k, v, causal=True)),
                      ("sdpa", _sdpa_attention)]
        if device == "cuda":   # which kernel "sdpa" is: each of its GPU backends on its own
            contenders += [("sdpa_flash2", _sdpa_on_backend("FLASH_ATTENTION")),
                           ("sdpa_cudnn", _sdpa_on_backend("CUDNN_ATTENTION"))]
        contenders.append(("eager", _eager_attention))
        for name, fn in contenders:
            with torch.no_grad():
                fwd = _bench_ms(lambda: fn(q, k, v))
                fwd_b2b = _bench_back_to_back_ms(lambda: fn(q, k, v)) if isinstance(fwd, float) else None
                # Per-kernel CUDA time of one forward (torch.profiler): says whether a gap between the
                # call's time and its kernel's autotuned time is the kernel or work around it.
                fwd_kernels = (common.cuda_kernel_ms(lambda: fn(q, k, v), lambda kernel: kernel)
                               if device == "cuda" and name in ("ours", "sdpa") and isinstance(fwd, float) else None)

            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(dout)

            fb = _bench_ms(fwd_bwd)
            fb_b2b = _bench_back_to_back_ms(fwd_bwd) if isinstance(fb, float) else None
            deterministic = (_backward_is_deterministic(fn, q, k, v, dout)
                             if name != "eager" and isinstance(fb, float) else None)
            q.grad = k.grad = v.grad = None
            rows.append({
                "shape": f"B{B} H{H} T{T} D{D} causal", "impl": name,
                "fwd_ms": fwd, "fwd_tflops": fwd_flops / fwd / 1e9 if isinstance(fwd, float) else None,
                "fwd_bwd_ms": fb, "fwd_bwd_tflops": 3.5 * fwd_flops / fb / 1e9 if isinstance(fb, float) else None,
                "fwd_x_floor": _ratio(fwd, fwd_flops / (matmul_tflops * 1e9)),
                "fwd_bwd_x_floor": _ratio(fb, 3.5 * fwd_flops / (matmul_tflops * 1e9)),
                "bwd_bitwise_deterministic": deterministic, "fwd_kernels_ms": fwd_kernels,
                "fwd_ms_back_to_back": fwd_b2b, "fwd_bwd_ms_back_to_back": fb_b2b,
            })
        shape_rows = rows[-len(contenders):]
        ours = next(r for r in shape_rows if r["impl"] == "ours")
        ours["tuned_configs"] = _tuned_configs(attention)
        sdpa = next(r for r in shape_rows if r["impl"] == "sdpa")
        for r in shape_rows:
            r["fwd_vs_sdpa"] = _ratio(r["fwd_tflops"], sdpa["fwd_tflops"])
            r["fwd_bwd_vs_sdpa"] = _ratio(r["fwd_bwd_tflops"], sdpa["fwd_bwd_tflops"])
            # speed ratios (SDPA's time over ours) of the back-to-back timings
            r["fwd_vs_sdpa_back_to_back"] = _ratio(sdpa.get("fwd_ms_back_to_back"), r.get("fwd_ms_back_to_back"))
            r["fwd_bwd_vs_sdpa_back_to_back"] = _ratio(sdpa.get("fwd_bwd_ms_back_to_back"),
                                                       r.get("fwd_bwd_ms_back_to_back"))
        del q, k, v, dout
    return rows


def _backward_is_deterministic(fn, q, k, v, dout) -> bool:
    """Whether two backward passes over the same inputs give bit-identical gradients. A backward
    that sums dQ with float atomics (FlashAttention-2's) generally does not; ours must."""
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def _tuned_configs(attention) -> dict:
    """The autotuner's pick for each flash kernel after the shape just run (what to tune from next),
    and every config's time (ms, median) from its latest tuning run."""
    picks = {}
    for which in ("fwd", "dkdv", "dq"):
        tuner = attention._tuned(which)
        best = getattr(tuner, "best_config", None)   # None until a GPU run tuned it
        picks[which] = None if best is None else str(best)
        timings = getattr(tuner, "configs_timings", None) or {}
        picks[which + "_timings_ms"] = {str(config): (t[0] if isinstance(t, (list, tuple)) else t)
                                        for config, t in timings.items()}
    return picks


def _tree_mask(n: int, device) -> torch.Tensor:
    """Ancestor-or-self mask of a 4-ary tree in breadth-first order."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        a = (i - 1) // 4
        while True:
            mask[i, a] = True
            if a == 0:
                break
            a = (a - 1) // 4
    return mask.to(device)


def _one_call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _tune_record(kv_attention, q, k_cache, v_cache, seqlens, mask) -> dict:
    """Tune the KV launch for this shape (as the first real call would) and record every candidate's
    CUDA-graph time, the heuristic's choice and the tuned one (ms, full cache). The CPU smoke run
    times one interpreted call per candidate instead (a failing one raises: it is the pipeline check)."""
    timer = None if q.is_cuda else _one_call_ms
    times = kv_attention.tune_kv_launch(q, k_cache, v_cache, seqlens, mask, q.shape[-1] ** -0.5, timer=timer)
    heuristic = kv_attention._kv_heuristic(*kv_attention.kv_problem(q, k_cache), q.device)
    best = min(times, key=times.get)   # the same pick as the tuner's
    return {"times_ms": {k.label(): v for k, v in times.items()},
            "heuristic": heuristic.label(), "heuristic_ms": times.get(heuristic),
            "tuned": best.label(), "tuned_ms": times[best]}


def bench_decode(kv_attention, copy_gbps: float, matmul_tflops: float, batches=DECODE_BATCHES, lengths=DECODE_LENGTHS,
                 heads=DECODE_HEADS, device="cuda", dtype=torch.bfloat16) -> list[dict]:
    from mtp_kernels.launch_tuner import l2_cache_bytes, rotating_copies, rotation_count

    H, Hkv, D = heads
    rows = []
    for S in lengths:
        for B in batches:
            S_max = S + max(TREE_SIZES)
            gen = torch.Generator(device=device).manual_seed(1)
            k_cache = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype, generator=gen)
            v_cache = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype, generator=gen)
            seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
            # K and V copies in lockstep (same size, same count); up to 64, as a graph replays many calls
            next_k, next_v = rotating_copies(k_cache, calls=64), rotating_copies(v_cache, calls=64)
            copies = rotation_count(k_cache.numel() * k_cache.element_size(), l2_cache_bytes(k_cache.device), 64)
            row = {"B": B, "S": S, "cache_copies": copies}
            for Tq in (1,) + TREE_SIZES:
                q = torch.randn(B, Tq, H, D, device=device, dtype=dtype, generator=gen)
                mask = None if Tq == 1 else kv_attention.pack_tree_mask(_tree_mask(Tq, device))

                def ours():
                    return kv_attention.kv_cache_attention(q, next_k(), next_v(), seqlens, mask, check_seqlens=False)

                with torch.no_grad():
                    row[f"tq{Tq}_launches"] = _tune_record(kv_attention, q, k_cache, v_cache, seqlens, mask)
                    row[f"ours_tq{Tq}_launch_ms"] = _bench_ms(ours, rep=50)
                    ms = row[f"ours_tq{Tq}_ms"] = _bench_graph_ms(ours)
                floor = row[f"floor_tq{Tq}_ms"] = _kv_floor_ms(B, S, Tq, H, Hkv, D, k_cache.element_size(),
                                                             copy_gbps, matmul_tflops,
                                                             None if mask is None else int(mask.mask.sum()))
                row[f"ours_tq{Tq}_x_floor"] = _ratio(ms, floor)
                if Tq == 1:
                    nbytes = 2 * B * (S + Tq) * Hkv * D * k_cache.element_size()
                    row["cache_MB"] = nbytes / 1e6
                    row["ours_GBps"] = nbytes / ms / 1e6 if isinstance(ms, float) else None
                    row["ours_frac_of_copy_bw"] = _ratio(row["ours_GBps"], copy_gbps)
                    qh = q.transpose(1, 2)

                    def sdpa():
                        kh, vh = (x[:, :S + 1].transpose(1, 2) for x in (next_k(), next_v()))
                        try:
                            return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
                        except TypeError:  # torch without enable_gqa
                            g = H // Hkv
                            return F.scaled_dot_product_attention(qh, kh.repeat_interleave(g, 1),
                                                                  vh.repeat_interleave(g, 1))

                    with torch.no_grad():
                        sms = _bench_graph_ms(sdpa)
                    row["sdpa_tq1_ms"] = sms
                    row["sdpa_GBps"] = nbytes / sms / 1e6 if isinstance(sms, float) else None
                    row["sdpa_frac_of_copy_bw"] = _ratio(row["sdpa_GBps"], copy_gbps)
                else:
                    row[f"tree{Tq}_vs_decode"] = _ratio(ms, row["ours_tq1_ms"])
                    row[f"tree{Tq}_floor_ratio"] = floor / row["floor_tq1_ms"]
            rows.append(row)
            del k_cache, v_cache, next_k, next_v
    return rows


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def to_markdown(result: dict) -> str:
    lines = [f"# Attention on {result['device']} (torch {result['torch']}, triton {result['triton']})", "",
             f"Measured here: device copy bandwidth (read + write) {result['copy_GBps']:.0f} GB/s, "
             f"{result.get('matmul_dtype', 'bf16')} matmul {result.get('matmul_TFLOPs', float('nan')):.0f} TFLOP/s.", "",
             f"## Flash attention, {result['dtype']}, causal", "",
             "| shape | impl | fwd ms | fwd TFLOP/s | fwd x floor | fwd vs SDPA | fwd+bwd ms | fwd+bwd TFLOP/s | "
             "fwd+bwd x floor | fwd+bwd vs SDPA | bwd bit-identical in 2 runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["flash"]:
        lines.append(f"| {r['shape']} | {r['impl']} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_tflops'])} | "
                     f"{_fmt(r.get('fwd_x_floor'))} | {_fmt(r['fwd_vs_sdpa'])} | {_fmt(r['fwd_bwd_ms'])} | "
                     f"{_fmt(r['fwd_bwd_tflops'])} | {_fmt(r.get('fwd_bwd_x_floor'))} | {_fmt(r['fwd_bwd_vs_sdpa'])} | "
                     f"{_fmt(r.get('bwd_bitwise_deterministic'))} |")
    pipelined = [r for r in result["flash"] if isinstance(r.get("fwd_ms_back_to_back"), float)]
    if pipelined:
        lines += ["", "### Back-to-back calls (10 calls between two events, no L2 flush: the host queues the next "
                  "call while the GPU runs this one, as in training; the table above times each call alone "
                  "after an L2 flush, host overhead included where it outlasts the flush)", "",
                  "| shape | impl | fwd ms | fwd vs SDPA | fwd+bwd ms | fwd+bwd vs SDPA |", "|---|---|---|---|---|---|"]
        for r in pipelined:
            lines.append(f"| {r['shape']} | {r['impl']} | {_fmt(r['fwd_ms_back_to_back'])} | "
                         f"{_fmt(r.get('fwd_vs_sdpa_back_to_back'))} | {_fmt(r.get('fwd_bwd_ms_back_to_back'))} | "
                         f"{_fmt(r.get('fwd_bwd_vs_sdpa_back_to_back'))} |")
    profiled = [r for r in result["flash"] if r.get("fwd_kernels_ms")]
    if profiled:
        lines += ["", "### Forward kernels (torch.profiler, CUDA ms per call)", "",
                  "| shape | impl | call ms | kernels |", "|---|---|---|---|"]
        for r in profiled:
            kernels = ", ".join(f"{name[:60]}: {_fmt(ms)}" for name, ms in
                                sorted(r["fwd_kernels_ms"].items(), key=lambda item: -item[1]))
            lines.append(f"| {r['shape']} | {r['impl']} | {_fmt(r['fwd_ms'])} | {kernels} |")
    for which, title in (("fwd", "Forward"), ("dq", "dQ"), ("dkdv", "dK/dV")):   # WARP_SPEC: warp-specialized
        tuned_flash = [r for r in result["flash"] if (r.get("tuned_configs") or {}).get(f"{which}_timings_ms")]
        if not tuned_flash:
            continue
        lines += ["", f"### {title} configs (the autotuner's median ms for each)", "",
                  "| shape | config | ms | chosen |", "|---|---|---|---|"]
        for r in tuned_flash:
            picks = r["tuned_configs"]
            for config, ms in sorted(picks[f"{which}_timings_ms"].items(), key=lambda item: item[1]):
                lines.append(f"| {r['shape']} | {config} | {_fmt(ms)} | {'yes' if config == picks[which] else ''} |")
    H, Hkv, D = result["decode_heads"]
    lines += ["", f"## KV-cache attention, {result['dtype']}, H{H} Hkv{Hkv} D{D} (cache bytes read / time; "
              f"cache_seqlens range check off)", "",
              ("CPU smoke run: each time is one eager call under the Triton interpreter, a check that the "
               "pipeline runs, not a speed." if result.get("smoke") else
               "Times are CUDA-graph replays (the generator's condition); \"launch\" is the same call launched "
               "eagerly from Python, host cost included. Calls cycle through \"copies\" of the cache (together "
               "twice the L2), so each reads its cache from HBM."), "",
              "| B | S | cache MB | copies | ours Tq=1 launch ms | ours Tq=1 ms | x floor | ours GB/s | ours / copy bw | "
              "SDPA ms | SDPA GB/s | SDPA / copy bw | "
              + " | ".join(f"tree Tq={t} ms | x floor | Tq={t} / Tq=1 | floor ratio" for t in TREE_SIZES) + " |",
              "|" + "---|" * (12 + 4 * len(TREE_SIZES))]
    for r in result["decode"]:
        cells = [r["B"], r["S"], r["cache_MB"], r.get("cache_copies", 1), r.get("ours_tq1_launch_ms"), r["ours_tq1_ms"],
                 r.get("ours_tq1_x_floor"), r["ours_GBps"], r["ours_frac_of_copy_bw"], r["sdpa_tq1_ms"],
                 r["sdpa_GBps"], r["sdpa_frac_of_copy_bw"]]
        for t in TREE_SIZES:
            cells += [r[f"ours_tq{t}_ms"], r.get(f"ours_tq{t}_x_floor"), r[f"tree{t}_vs_decode"],
                      r.get(f"tree{t}_floor_ratio")]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    tuned = [(r, t) for r in result["decode"] for t in (1,) + TREE_SIZES if r.get(f"tq{t}_launches")]
    if tuned:
        lines += ["", "### Launch tuning (tune_kv_launch: CUDA-graph ms per candidate on a full cache; "
                  "M = query rows per tile, x = KV splits, +last = the last split combines)", "",
                  "| B | S | Tq | heuristic | ms | tuned | ms | heuristic / tuned | all candidates |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, t in tuned:
            rec = r[f"tq{t}_launches"]
            every = ", ".join(f"{k}: {_fmt(v)}" for k, v in rec["times_ms"].items())
            lines.append(f"| {r['B']} | {r['S']} | {t} | {rec['heuristic']} | {_fmt(rec['heuristic_ms'])} | "
                         f"{rec['tuned']} | {_fmt(rec['tuned_ms'])} | {_fmt(_ratio(rec['heuristic_ms'], rec['tuned_ms']))} "
                         f"| {every} |")
    return "\n".join(lines) + "\n"


def _write(out_dir: str, stem_name: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    text = to_markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    charts.try_chart_for(stem + ".json")


def _measure(out_dir: str, stem: str, result: dict, attention, kv_attention, flash_kwargs: dict,
             decode_kwargs: dict) -> dict:
    """Flash attention, then KV-cache attention, writing the files after each: a run cut off by its
    time limit during the second keeps the first."""
    result["flash"] = bench_flash(attention, result["matmul_TFLOPs"], **flash_kwargs)
    result["decode"] = []
    _write(out_dir, stem, result)
    result["decode"] = bench_decode(kv_attention, result["copy_GBps"], result["matmul_TFLOPs"], **decode_kwargs)
    _write(out_dir, stem, result)
    return result


def main(out_dir: str) -> dict | None:
    """The GPU benchmark; writes attention_<device-slug>.json/.md into out_dir."""
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device; nothing measured")
        return None
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.pop("MTP_BACKEND", None)
    import triton

    attention, kv_attention = _import_attention()
    name = torch.cuda.get_device_name()
    ceilings = common.measure_ceilings("cuda")
    copy_gbps, tflops = ceilings["copy_gbps"], ceilings["matmul_tflops"]
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "copy_GBps": copy_gbps,
              "matmul_TFLOPs": tflops, "matmul_dtype": ceilings["matmul_dtype"], "dtype": "bf16",
              "decode_heads": DECODE_HEADS}
    return _measure(out_dir, f"attention_{_slug(name)}", result, attention, kv_attention, {}, {})


def cpu_smoke(out_dir: str) -> dict:
    """Pipeline check without a GPU: tiny fp32 shapes through the interpreted Triton kernels.
    Needs TRITON_INTERPRET=1 and MTP_BACKEND=triton in the environment before start-up."""
    import triton

    attention, kv_attention = _import_attention()
    ceilings = common.measure_ceilings("cpu", rep_ms=20)
    copy_gbps, tflops = ceilings["copy_gbps"], ceilings["matmul_tflops"]
    result = {"smoke": True, "device": "cpu (interpreter smoke run)", "torch": torch.__version__, "triton": triton.__version__,
              "copy_GBps": copy_gbps, "matmul_TFLOPs": tflops, "matmul_dtype": ceilings["matmul_dtype"],
              "dtype": "fp32", "decode_heads": (4, 2, 16)}
    return _measure(out_dir, "attention_cpu-smoke", result, attention, kv_attention,
                    dict(shapes=[(1, 2, 40, 16)], device="cpu", dtype=torch.float32),
                    dict(batches=(2,), lengths=(40,), heads=(4, 2, 16), device="cpu", dtype=torch.float32))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU through the interpreter (set TRITON_INTERPRET=1 MTP_BACKEND=triton)")
    args = parser.parse_args()
    cpu_smoke(args.out) if args.cpu_smoke else main(args.out)
