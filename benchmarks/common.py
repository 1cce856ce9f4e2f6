"""Shared benchmark helpers: device naming, hardware ceilings, one timing/memory protocol, writers.

Every contender in every benchmark goes through `time_and_peak`, so times and peaks are comparable:
the same warm-up, the same timer (triton.testing.do_bench median on CUDA, time.perf_counter median
on CPU) and the same definition of peak memory (bytes allocated above what was allocated right
before the call). Nothing here touches the GPU driver at import time; matplotlib and Triton are
imported only when used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    """Human-readable name: "NVIDIA H200" on CUDA, the CPU model (or "cpu") otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model_name() or platform.processor() or "cpu"


def _cpu_model_name() -> Optional[str]:
    """The "model name" line of /proc/cpuinfo (Linux, where platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def device_slug(device: torch.device | str) -> str:
    """File-name-safe device name, e.g. "nvidia-h200"; every CPU is "cpu"."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug or "cuda"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(name: str) -> Optional[str]:
    """Installed distribution version, or None (works for `pip install --target` dirs on sys.path)."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def environment_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": utc_now(),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "MTP_BACKEND": os.environ.get("MTP_BACKEND"),
        "MTP_WARP_SPEC": os.environ.get("MTP_WARP_SPEC"),
        "MTP_PDL": os.environ.get("MTP_PDL"),
        "MTP_SKINNY_WS": os.environ.get("MTP_SKINNY_WS"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def import_mtp_kernels():
    """Import the project's `mtp_kernels` package; if it is not installed (a bare checkout on a
    benchmark machine), load it from `<repo>/kernels` under its package name instead."""
    try:
        return importlib.import_module("mtp_kernels")
    except ModuleNotFoundError as err:
        if err.name != "mtp_kernels":
            raise
    init = REPO_ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "mtp_kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtp_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["mtp_kernels"]
        raise
    return module


# --------------------------------------------------------------------------------------------
# Memory hygiene
# --------------------------------------------------------------------------------------------
def free_memory() -> None:
    """Drop unreachable tensors and return cached CUDA blocks, so one case cannot inflate the next."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    return isinstance(err, oom_types) or "out of memory" in str(err).lower()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timing protocol
# --------------------------------------------------------------------------------------------
def _cpu_median_ms(call: Callable[[], Any], rep_ms: float, min_runs: int = 3, max_runs: int = 50) -> float:
    samples = []
    budget_end = time.perf_counter() + rep_ms / 1e3
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < budget_end):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def saved_activation_bytes(module: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """Bytes autograd keeps for the backward while `fn` (a forward) runs: the distinct storages its
    saved tensors use, the module's parameters left out. The same count on every device; not the
    peak, which adds what a step holds for a moment (the fused loss's logit scratch, the backward's
    own tensors). A checkpointed region's inner tensors go to the checkpoint's own hooks, which keep
    none; a compiled graph's saved tensors (what its partitioner chose) pass through these hooks too."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def time_and_peak(
    fn: Callable[[], Any],
    setup: Optional[Callable[[], Any]] = None,
    *,
    device: torch.device | str = "cuda",
    rep_ms: float = 150.0,
    warmup_ms: float = 25.0,
    min_samples: int = 3,
    max_rep_ms: float = 2000.0,
) -> dict[str, Any]:
    """Median time (ms) and peak memory (MiB) of `fn`, with the same protocol for every contender.

    `setup` (cheap, e.g. setting `.grad = None`) runs before every call of `fn`, timed calls
    included, so each call starts from the same state. Protocol: two warm-up calls (the first
    compiles and autotunes, the second sizes the repeats), then the median over repeated calls (CUDA: triton.testing.do_bench with
    return_mode="median", its repetition budget raised so that at least `min_samples` calls are
    timed, up to `max_rep_ms`; CPU: time.perf_counter), then one more call whose peak memory above the bytes allocated
    right before it is the reported peak (CUDA only; "n/a" elsewhere).

    Returns {"status": "ok", "ms", "peak_mib", "result"} where result is what the measured call
    returned, or {"status": "OOM"} / {"status": "error", "error": text}. Never raises for a failure
    inside `fn`: one contender failing must not stop a run.
    """
    device = torch.device(device)
    setup = setup or (lambda: None)

    def call():
        setup()
        return fn()

    try:
        call()  # compiles / autotunes: not representative, not timed
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        warm_ms = (time.perf_counter() - start) * 1e3

        if device.type == "cuda":
            from triton.testing import do_bench

            # do_bench sizes its loop from a 5-call estimate; a fn slower than rep/min_samples
            # would otherwise be timed only once. Capped so one slow contender cannot eat the run.
            rep = min(max(rep_ms, min_samples * warm_ms), max(rep_ms, max_rep_ms))
            ms = float(do_bench(call, warmup=warmup_ms, rep=rep, return_mode="median"))
        else:
            ms = _cpu_median_ms(call, rep_ms, min_runs=min_samples)

        setup()
        _synchronize(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            result = fn()
            torch.cuda.synchronize(device)
            peak_mib: Any = (torch.cuda.max_memory_allocated(device) - before) / MIB
        else:
            result = fn()
            peak_mib = "n/a"
        return {"status": "ok", "ms": ms, "peak_mib": peak_mib, "result": result}
    except Exception as err:  # noqa: BLE001 - any failure is recorded, the run goes on
        if is_oom(err):
            return {"status": "OOM", "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        return {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
    finally:
        try:
            setup()
        except Exception:
            pass
        free_memory()


# --------------------------------------------------------------------------------------------
# Hardware ceilings
# --------------------------------------------------------------------------------------------
def cuda_profile(call: Callable[[], Any], calls: int = 1):
    """torch.profiler's record of the CUDA work of `calls` calls of `call` (after the caller's
    warm-up), from an idle device to the last kernel's end."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return prof


def cuda_kernel_ms(call: Callable[[], Any], group: Callable[[str], str], calls: int = 5) -> dict[str, float]:
    """CUDA kernel time per call (ms) of `call`, summed by group(kernel name), from torch.profiler
    over `calls` calls (after the caller's warm-up). Time between kernels (launch gaps, host work
    the GPU waits for) is not in it: compare the sum with the wall time."""
    prof = cuda_profile(call, calls)
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if dev_us:
            name = group(evt.key)
            groups[name] = groups.get(name, 0.0) + dev_us / 1000.0 / calls
    return groups


def idle_gaps(intervals: list[tuple[float, float, str]], top: int = 3) -> dict[str, Any]:
    """From the device intervals (start_us, end_us, kernel name) of one call: its span (first start to
    last end), the busy time (union of the intervals) and the idle time in ms, and the `top` largest
    gaps between kernels, each with the kernels before and after it (where the GPU waited for the host)."""
    if not intervals:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    intervals = sorted(intervals)
    busy_us, gaps = 0.0, []
    cur_start, cur_end, cur_name = intervals[0]
    for start, end, name in intervals[1:]:
        if start > cur_end:
            busy_us += cur_end - cur_start
            gaps.append({"ms": (start - cur_end) / 1000.0, "after": cur_name, "before": name})
            cur_start, cur_end, cur_name = start, end, name
        elif end > cur_end:
            cur_end, cur_name = end, name
    busy_us += cur_end - cur_start
    span_us = cur_end - intervals[0][0]
    gaps.sort(key=lambda g: -g["ms"])
    return {"span_ms": span_us / 1000.0, "busy_ms": busy_us / 1000.0, "idle_ms": (span_us - busy_us) / 1000.0,
            "gaps": gaps[:top]}


def cuda_idle_gaps(call: Callable[[], Any], top: int = 3) -> dict[str, Any]:
    """`idle_gaps` of one call() (after the caller's warm-up), from torch.profiler's CUDA events."""
    prof = cuda_profile(call)
    intervals = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return idle_gaps(intervals, top)


def measure_ceilings(
    device: torch.device | str = "cuda",
    *,
    matmul_size: Optional[int] = None,
    copy_bytes: Optional[int] = None,
    rep_ms: float = 100.0,
) -> dict[str, Any]:
    """Matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + write counted) measured now.

    CUDA defaults: bf16 8192^3 torch.mm and a 2 GiB copy, each the do_bench median. CPU (for smoke
    runs only): float32 1024^3 and a 64 MiB copy, perf_counter median.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    size = matmul_size or (8192 if on_cuda else 1024)
    nbytes = copy_bytes or (2 * 2**30 if on_cuda else 64 * MIB)

    def median_ms(call):
        if on_cuda:
            from triton.testing import do_bench

            return float(do_bench(call, rep=rep_ms, return_mode="median"))
        call()
        return _cpu_median_ms(call, rep_ms)

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: torch.mm(a, b))
    del a, b
    free_memory()

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    free_memory()

    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_size": size,
        "matmul_ms": mm_ms,
        "matmul_tflops": 2 * size**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": nbytes,
        "copy_ms": copy_ms,
        "copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9,
    }


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    return path


def format_cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path | str, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (the scripts' counts, sizes and budgets)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def write_results(out: Path | str, stem: str, result: dict[str, Any], text: str) -> None:
    """A benchmark's results: `stem`.json (result) and `stem`.md (text) in `out`, and the text printed."""
    write_json(Path(out) / f"{stem}.json", result)
    write_markdown(Path(out) / f"{stem}.md", text)
    print(text)


def probe_command_line(doc: str, main: Callable[[str], Any]) -> None:
    """A probe script's command line (its docstring's first line as the description): --out DIR,
    made if missing, then main(DIR)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    main(out)


def refuse_interpreter(script: str) -> None:
    """A compile probe builds sm_90 code on a CPU: under TRITON_INTERPRET the interpreter would
    replace the kernels it compiles."""
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        raise SystemExit(f"{script} compiles for sm_90: run it without TRITON_INTERPRET (the interpreter "
                         "replaces the kernels it compiles)")


def compile_sm90(src, num_warps: int, num_stages: int):
    """(compiled, None) for a Triton ASTSource compiled for sm_90 on any machine (nothing runs), or
    (None, "ErrorType: the compiler's last line"): for a probe a failed compile is a finding."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages)), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:200]}"


def write_probe(out: str, stem: str, title: str, script: str, rows: list, headers: list, cells: list) -> None:
    """A compile probe's results: <out>/<stem>_triton-<major.minor>.json ({"triton", "rows"}) and .md (a
    title, the script, the table), and the table on stdout. (with_suffix takes the version's last
    ".N" for the suffix it replaces: 3.9.0 names the files 3.9, as the committed tables are named.)"""
    import triton

    path = Path(out) / f"{stem}_triton-{triton.__version__}"
    path.with_suffix(".json").write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1) + "\n")
    table = markdown_table(headers, cells)
    path.with_suffix(".md").write_text(f"# {title} (sm_90, Triton {triton.__version__}, compiled on a CPU)\n\n"
                                       f"`benchmarks/{script}`.\n\n{table}\n")
    print(table)


def write_bar_chart(
    path: Path | str,
    groups: list[str],
    series: dict[str, list[Optional[float]]],
    *,
    panels: Optional[list[tuple[str, dict[str, list[Optional[float]]]]]] = None,
    panel_groups: Optional[list[list[str]]] = None,
    title: str = "",
) -> Optional[Path]:
    """Grouped bar chart: one group per entry of `groups`, one bar per series; missing values
    (None: failed or not run) leave a gap. `panels` draws several such charts stacked, each
    (y-label, series), over `groups` or, per panel, over `panel_groups`. Returns None, with a
    printed note, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipping the chart {path}")
        return None

    panels = panels or [("", series)]
    panel_groups = panel_groups or [groups] * len(panels)
    widest = max(len(g) for g in panel_groups)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.9 * widest + 4), 4.2 * len(panels)), squeeze=False)
    for ax, (ylabel, panel_series), groups in zip(axes[:, 0], panels, panel_groups):
        names = list(panel_series)
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            xs, ys = [], []
            for g, value in enumerate(panel_series[name]):
                if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
                    xs.append(g - 0.4 + width * (k + 0.5))
                    ys.append(value)
            ax.bar(xs, ys, width=width, label=name)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# The GPU tests whose failure means a warp-specialized kernel computes wrong results on this device
# (`tests/test_attention.py`: every flash config of the three kernels against float32, and the
# warp-specialized ones with a NaN neighbour sequence).
WARP_SPEC_GUARD_TESTS = ("test_flash_attention_gpu_every_config",
                         "test_flash_attention_gpu_warp_specialized_sequences_stay_apart")


# The GPU test whose failure means programmatic dependent launches (kernels/dependent_launch.py)
# give wrong results on this device (`tests/test_dependent_launch.py`: a decode step, eagerly and
# from a CUDA graph).
PROGRAMMATIC_GUARD_TESTS = ("test_gpu_programmatic_decode_step_in_a_graph",)


# The GPU test of the skinny GEMM's warp-specialized TMA tiles (kernels/skinny_ws.py;
# `tests/test_skinny_linear.py`: per tile, its plain, SwiGLU and rotary launches against float64, the
# same bits eagerly and from a CUDA graph): a tile is offered on this device where its cases passed.
SKINNY_WS_GUARD_TESTS = ("test_gpu_bf16_warp_specialized_tiles",)


def _junit_outcomes(junit_xml: str, names: tuple):
    """{test case name: "passed", "failed" (a failure or an error) or "skipped"} of the JUnit file's
    cases whose names start with one of `names`, or None when the file is missing or unreadable (the
    run hung or died before writing it)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(junit_xml).getroot()
    except (OSError, ET.ParseError):
        return None
    return {case.get("name"): ("failed" if case.find("failure") is not None or case.find("error") is not None
                               else "skipped" if case.find("skipped") is not None else "passed")
            for case in root.iter("testcase") if case.get("name", "").startswith(names)}


def guard_tests_failed(junit_xml: str, names: tuple, skips_pass: bool = False) -> bool:
    """False only when the GPU test run's JUnit file shows every test named in `names` (by prefix:
    all its parameters) ran and none failed, errored or was skipped; True when one did, when one did
    not run (GPU_TESTS left it out), or when the file is missing or unreadable. skips_pass: a skipped
    case counts as passed, provided each test has at least one case that passed (for parameters
    that skip what the benchmarks would not launch either)."""
    outcomes = _junit_outcomes(junit_xml, names)
    if outcomes is None:
        return True
    for name in names:
        cases = [outcome for case, outcome in outcomes.items() if case.startswith(name)]
        if "passed" not in cases or "failed" in cases or ("skipped" in cases and not skips_pass):
            return True
    return False


def warp_spec_tests_failed(junit_xml: str) -> bool:
    """`guard_tests_failed` for WARP_SPEC_GUARD_TESTS. gpu_check.sh (unless MTP_WARP_SPEC=0 already)
    then runs the benchmarks with MTP_WARP_SPEC=0, so that no tuner can pick a fast warp-specialized
    config whose results no test has checked here."""
    return guard_tests_failed(junit_xml, WARP_SPEC_GUARD_TESTS)


def skinny_ws_selection(junit_xml: str, chosen: str = "") -> str:
    """MTP_SKINNY_WS for the benchmarks from the JUnit file of the warp-specialized tiles' GPU test
    (SKINNY_WS_GUARD_TESTS, one case per row count and tile, ids "<M>-<tile id>"): "1" when cases
    ran and every one passed; else the comma-separated ids of the tiles all of whose cases passed
    (a failure of some tiles, e.g. one ring depth, leaves the others measured); "0" when none did,
    or the file is missing or unreadable (the run hung or died). The tiles are not offered by
    default until a Triton version is validated (`skinny_ws.SKINNY_WS_VALIDATED_TRITON`).
    chosen: MTP_SKINNY_WS as set by hand ("" or "1": any tile; a list: those only), narrowed to the
    tiles that passed, as every guarded launch is."""
    cases = _junit_outcomes(junit_xml, SKINNY_WS_GUARD_TESTS)
    verdicts: dict = {}   # tile id -> every case of it passed
    for name, outcome in (cases or {}).items():
        ok = outcome == "passed"
        if "[" in name:
            tile = name[name.index("[") + 1:].rstrip("]").split("-", 1)[-1]
            verdicts[tile] = verdicts.get(tile, True) and ok
    picked = {t.strip() for t in chosen.split(",")} if chosen.strip() not in ("", "1") else None
    if picked is None and verdicts and all(verdicts.values()):
        return "1"
    return ",".join(tile for tile, ok in verdicts.items() if ok and (picked is None or tile in picked)) or "0"


def programmatic_tests_failed(junit_xml: str) -> bool:
    """`guard_tests_failed` for PROGRAMMATIC_GUARD_TESTS. gpu_check.sh (unless MTP_PDL=0 already) then
    runs the benchmarks with MTP_PDL=0, so that no capture keeps programmatic launches that no test
    has checked here. A skipped case passes (when another case passed): its parameters skip a
    warp-specialized tile that is not offered (it failed its own test), which the benchmarks then
    do not launch either; counting it as a failure turned programmatic launches off for the whole
    call whenever those tiles failed."""
    return guard_tests_failed(junit_xml, PROGRAMMATIC_GUARD_TESTS, skips_pass=True)
