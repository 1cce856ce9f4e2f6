"""n-head linear + cross-entropy, forward + backward: our fused kernel vs eager PyTorch and peers.

Every contender computes the same loss from the same inputs, the MTP training loss
    L = sum_i mean_{t not ignored} CE(hidden[i, t] @ weight.T, targets[i, t])
for hidden (n, N, D) and weight (V, D) in bf16 (both requiring grad) and targets (n, N) int64, then
runs L.backward(). Each head has exactly the same number of ignored targets (round(5% of N),
ignore_index=-100), so a contender that reduces over all n*N tokens at once ("concat": one call on
the (n*N, D) flattened input) gives L / n exactly; it is multiplied by n and then computes the very
same L and the same gradients.

Contenders (a peer that is not importable, or needs CUDA on a CPU run, is recorded as skipped):
  eager_all_heads      logits = hidden @ weight.T for all heads at once (bf16), then
                       F.cross_entropy(logits.float().view(-1, V), targets.view(-1)) * n: the usual
                       "upcast the logits to float32, then cross-entropy" recipe.
  eager_per_head       the same per head. Also the correctness reference for every other contender.
  Every *_per_head contender runs as the paper runs heads: each head's forward, then its backward,
  before the next head's forward (`per_head_backward`), so one head's buffers are alive at a time.
  torch_lce_per_head   torch.nn.functional.linear_cross_entropy per head (only in torch builds that
                       have it), with its chunked path (options=LinearCrossEntropyOptions()) when
                       the signature offers one.
  liger_per_head / liger_concat
                       liger_kernel.transformers.functional.liger_fused_linear_cross_entropy
                       (liger-kernel 0.8.5; defaults, so bf16 gradient accumulation).
  cce_per_head / cce_concat
                       cut_cross_entropy.linear_cross_entropy (25.1.1; defaults, so impl="cce" and
                       gradient filtering filter_eps="high").
  ours                 mtp_kernels.fused_linear_cross_entropy(hidden, weight, targets), all heads
                       in one call (defaults: 256 MiB of logits scratch asked for, dW summed in
                       float32; the driver raises the scratch to V*D*2 bytes when that is larger,
                       since the final cast of dW takes that much anyway: `scratch_budget`).
  ours_native_accum    the same with accum_dtype=None: dW summed in bf16 across row chunks, as
                       Liger does by default (V*D*2 bytes lighter). ours_scratch{64,128,512}: other
                       scratch budgets asked for; the "scratch MiB" column gives the one that ran.

Reported per contender: median ms, peak MiB above the memory allocated before the call (gradients
included), time / floor where floor = 3 matmuls (logits, dH, dW) of 2*n*N*D*V FLOPs at the matmul
rate measured in the same run, ours/peer ratios of time and memory, and errors vs eager_per_head:
relative loss error, ||g - g_ref|| / ||g_ref|| for dH and dW, and for ours also the largest
relative error of any one head's mean loss (from reduction="none").

Inputs: hidden ~ N(0, 1), weight ~ N(0, 1/D), so logits have unit scale and the softmax is nearly
flat; Cut Cross-Entropy's gradient filtering skips little on such inputs (trained models have
peaked softmaxes), so its times here are closer to its worst case.

Usage:
  python benchmarks/bench_fused_ce.py --out benchmarks/results            # all shapes, CUDA
  python benchmarks/bench_fused_ce.py --shapes small,v32k --out DIR
  python benchmarks/bench_fused_ce.py --device cpu --quick --out /tmp/x   # pipeline smoke test
Writes fused_ce_<device-slug>.json / .md / .png into --out and prints the markdown table.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IGNORE_INDEX = -100
IGNORE_FRACTION = 0.05


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # heads
    N: int  # tokens per head
    D: int  # model dim
    V: int  # vocabulary

    def floor_flops(self) -> float:
        """Logits, dH and dW matmuls: 3 x 2 n N D V."""
        return 3 * 2 * self.n * self.N * self.D * self.V

    def label(self) -> str:
        return f"n={self.n} N={self.N} D={self.D} V={self.V}"


# Cheapest first: results are written after every shape, so a run cut short keeps what it measured.
SHAPES = {
    "small": Shape("small", n=4, N=16384, D=1024, V=32000),
    "v32k": Shape("v32k", n=4, N=8192, D=4096, V=32000),
    "v128k": Shape("v128k", n=4, N=8192, D=4096, V=128256),
}
QUICK_SHAPES = {
    "quick": Shape("quick", n=4, N=256, D=64, V=1001),
    "quick_odd": Shape("quick_odd", n=3, N=37, D=48, V=517),
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """hidden (n, N, D) dtype, weight (V, D) dtype, both leaf tensors requiring grad; targets
    (n, N) int64 with exactly round(IGNORE_FRACTION * N) entries per head set to IGNORE_INDEX."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, N, D, V = shape.n, shape.N, shape.D, shape.V
    hidden = torch.randn(n, N, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    weight = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * D**-0.5).requires_grad_(True)
    targets = torch.randint(0, V, (n, N), device=device, generator=gen)
    n_ignored = int(round(IGNORE_FRACTION * N))
    if n_ignored:
        ignored = torch.rand(n, N, device=device, generator=gen).argsort(dim=1)[:, :n_ignored]
        targets.scatter_(1, ignored, IGNORE_INDEX)
    return hidden, weight, targets


# --------------------------------------------------------------------------------------------
# Contenders: each builds loss_fn(hidden, weight, targets) -> scalar L (definition in the module
# docstring), or raises ImportError / RuntimeError("skipped: ...") when it cannot run here.
# --------------------------------------------------------------------------------------------
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Skip(Exception):
    """A contender that does not apply to this run (missing package, needs CUDA, ...)."""


def eager_all_heads(device: torch.device) -> LossFn:
    def loss_fn(hidden, weight, targets):
        n, N, _ = hidden.shape
        V = weight.shape[0]
        logits = hidden @ weight.T
        return F.cross_entropy(logits.float().view(-1, V), targets.view(-1), ignore_index=IGNORE_INDEX) * n

    return loss_fn


def per_head_backward(head_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFn:
    """A per-head contender: head i's loss head_loss(hidden[i], weight, targets[i]), then its backward,
    before head i+1's forward (the paper's order: one head's logits and buffers alive at a time).
    Returns the summed loss detached: its backward has run (`forward_backward`)."""
    def loss_fn(hidden, weight, targets):
        total = None
        for i in range(hidden.shape[0]):
            head = head_loss(hidden[i], weight, targets[i])
            head.backward()
            total = head.detach() if total is None else total + head.detach()
        return total

    return loss_fn


def forward_backward(loss_fn: LossFn, hidden, weight, targets) -> torch.Tensor:
    """One contender step: the loss, and its backward unless the contender ran it per head."""
    loss = loss_fn(hidden, weight, targets)
    if loss.requires_grad:
        loss.backward()
    return loss.detach()


def eager_per_head(device: torch.device) -> LossFn:
    def head_loss(hidden, weight, targets):
        return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)

    return per_head_backward(head_loss)


def torch_lce_per_head(device: torch.device) -> LossFn:
    lce = getattr(F, "linear_cross_entropy", None)
    if lce is None:
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    params = inspect.signature(lce).parameters
    kwargs: dict[str, Any] = {}
    if "ignore_index" in params:
        kwargs["ignore_index"] = IGNORE_INDEX
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if "options" in params and options_cls is not None:
        # options=None is the reference (logits-materializing) path; the default options object
        # selects the chunked, memory-saving one, which is the point of this function.
        kwargs["options"] = options_cls()

    return per_head_backward(lambda hidden, weight, targets: lce(hidden, weight, targets, **kwargs))


def _needs_cuda(device: torch.device, who: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{who} needs CUDA")


def _import_peer(module: str, attribute: str, dist: str):
    """A peer's function; Skip when the package is absent (an import failing inside it is an error)."""
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == module.split(".")[0]:
            raise Skip(f"{dist} is not installed") from err
        raise


def _liger():
    return _import_peer("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", "liger-kernel")


def liger_per_head(device: torch.device) -> LossFn:
    liger = _liger()
    _needs_cuda(device, "liger-kernel")

    return per_head_backward(lambda hidden, weight, targets: liger(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                                                   reduction="mean"))


def liger_concat(device: torch.device) -> LossFn:
    liger = _liger()
    _needs_cuda(device, "liger-kernel")

    def loss_fn(hidden, weight, targets):
        n, N, D = hidden.shape
        flat = liger(hidden.reshape(n * N, D), weight, targets.reshape(n * N), ignore_index=IGNORE_INDEX, reduction="mean")
        return flat * n

    return loss_fn


def _cce():
    return _import_peer("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy")


def cce_per_head(device: torch.device) -> LossFn:
    cce = _cce()
    _needs_cuda(device, "cut-cross-entropy")

    return per_head_backward(lambda hidden, weight, targets: cce(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                                                 reduction="mean"))


def cce_concat(device: torch.device) -> LossFn:
    cce = _cce()
    _needs_cuda(device, "cut-cross-entropy")

    def loss_fn(hidden, weight, targets):
        # CCE flattens leading dims itself: (n, N, D) with (n, N) targets is one call.
        return cce(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="mean") * hidden.shape[0]

    return loss_fn


def _ours_fn():
    mtp_kernels = common.import_mtp_kernels()
    fn = getattr(mtp_kernels, "fused_linear_cross_entropy", None)
    if fn is None:
        from mtp_kernels.fused_linear_ce import fused_linear_cross_entropy as fn
    return fn


def ours(device: torch.device, scratch_mib: Optional[int] = None, accum_dtype=torch.float32) -> LossFn:
    fused = _ours_fn()
    budget = None if scratch_mib is None else scratch_mib * common.MIB
    def loss_fn(hidden, weight, targets):
        return fused(hidden, weight, targets, ignore_index=IGNORE_INDEX, max_scratch_bytes=budget,
                     accum_dtype=accum_dtype)

    return loss_fn


# Our variants: (logits scratch asked for in MiB, None = the default; dW accumulation dtype).
OUR_VARIANTS: dict[str, tuple[Optional[int], Optional[torch.dtype]]] = {
    "ours": (None, torch.float32),
    "ours_native_accum": (None, None),
    "ours_scratch64": (64, torch.float32),
    "ours_scratch128": (128, torch.float32),
    "ours_scratch512": (512, torch.float32),
}


def our_scratch_mib(name: str, shape: Shape, dtype: torch.dtype) -> float:
    """The logits scratch variant `name` runs with at `shape` (MiB): the budget asked for, raised by the
    driver to V*D bytes of the weight's dtype when dW is summed wider and cast at the end."""
    common.import_mtp_kernels()
    from mtp_kernels.linear_ce_driver import DEFAULT_SCRATCH_BYTES, scratch_budget

    mib, accum = OUR_VARIANTS[name]
    asked = DEFAULT_SCRATCH_BYTES if mib is None else mib * common.MIB
    element_size = torch.tensor([], dtype=dtype).element_size()
    wide = accum is not None and accum != dtype
    return scratch_budget(asked, shape.V, shape.D, element_size, wide) / common.MIB


REFERENCE = "eager_per_head"
OURS = "ours"
CONTENDERS: dict[str, Callable[[torch.device], LossFn]] = {
    "eager_per_head": eager_per_head,
    "eager_all_heads": eager_all_heads,
    "torch_lce_per_head": torch_lce_per_head,
    "liger_per_head": liger_per_head,
    "liger_concat": liger_concat,
    "cce_per_head": cce_per_head,
    "cce_concat": cce_concat,
    **{name: (lambda device, mib=mib, accum=accum: ours(device, mib, accum))
       for name, (mib, accum) in OUR_VARIANTS.items()},
}


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------
def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float32 (inf when the reference is zero)."""
    ref = reference.detach().float()
    diff = (value.detach().float() - ref).norm().item()
    denom = ref.norm().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def check_against_reference(row: dict[str, Any], result, reference) -> None:
    """Fill the error columns of `row` from result = (loss, dH, dW) vs the reference triple."""
    loss, d_hidden, d_weight = result
    if d_hidden is None or d_weight is None:
        row.update(status="error", error="backward produced no gradient for hidden or weight")
        return
    row["loss"] = loss.item()
    if reference is None:
        return
    ref_loss = reference[0].item()
    row["loss_rel_err"] = abs(row["loss"] - ref_loss) / abs(ref_loss) if ref_loss else math.inf
    row["dh_rel_err"] = relative_error(d_hidden, reference[1])
    row["dw_rel_err"] = relative_error(d_weight, reference[2])


@torch.no_grad()
def per_head_means_ours(hidden, weight, targets) -> torch.Tensor:
    """(n,) float32 per-head mean loss from ours' reduction="none" (0 at ignored tokens)."""
    per_token = _ours_fn()(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none").float()
    valid = (targets != IGNORE_INDEX).float()
    return per_token.sum(dim=1) / valid.sum(dim=1)


@torch.no_grad()
def per_head_means_eager(hidden, weight, targets) -> torch.Tensor:
    means = [
        F.cross_entropy((hidden[i] @ weight.T).float(), targets[i], ignore_index=IGNORE_INDEX)
        for i in range(hidden.shape[0])
    ]
    return torch.stack(means)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def run_shape(
    shape: Shape,
    contenders: list[str],
    device: torch.device,
    dtype: torch.dtype,
    rep_ms: float,
    ceilings: dict[str, Any],
) -> list[dict[str, Any]]:
    hidden, weight, targets = make_inputs(shape, device, dtype)
    floor_ms = shape.floor_flops() / (ceilings["matmul_tflops"] * 1e12) * 1e3

    def clear_grads():
        hidden.grad = None
        weight.grad = None

    reference: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    rows = []
    # The reference runs first whatever the order asked for: the others are checked against it.
    order = [REFERENCE] + [c for c in contenders if c != REFERENCE]
    for name in order:
        row: dict[str, Any] = {"shape": shape.name, **shape.__dict__, "contender": name, "floor_ms": floor_ms}
        if name in OUR_VARIANTS:
            row["scratch_mib"] = our_scratch_mib(name, shape, dtype)
        print(f"[{shape.name}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            loss_fn = CONTENDERS[name](device)
        except Skip as why:
            row.update(status="skipped", error=str(why))
        except Exception as err:  # noqa: BLE001 - import / construction failures are results too
            row.update(status="error", error=f"{type(err).__name__}: {err}"[:2000])
        if "status" in row:
            rows.append(row)
            print(f"    {describe(row)}", flush=True)
            continue

        def step(loss_fn=loss_fn):
            return forward_backward(loss_fn, hidden, weight, targets), hidden.grad, weight.grad

        measured = common.time_and_peak(step, clear_grads, device=device, rep_ms=rep_ms)
        result = measured.pop("result", None)
        row.update(measured)
        if row["status"] == "ok":
            row["x_floor"] = row["ms"] / floor_ms
            if name == REFERENCE:
                reference = result
                row.update(loss=result[0].item())
            check_against_reference(row, result, reference)
        del result
        if name == OURS and row["status"] == "ok":
            try:
                mine = per_head_means_ours(hidden, weight, targets)
                theirs = per_head_means_eager(hidden, weight, targets)
                row["head_loss_max_rel_err"] = ((mine - theirs).abs() / theirs.abs()).max().item()
            except Exception as err:  # noqa: BLE001
                row["head_loss_error"] = f"{type(err).__name__}: {err}"[:2000]
            common.free_memory()
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        print(f"    {describe(row)}", flush=True)
        del loss_fn, step
        clear_grads()
        common.free_memory()

    del hidden, weight, targets, reference
    common.free_memory()
    add_ratios(rows)
    return rows


def describe(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('error', '')}"[:300]
    peak = row["peak_mib"]
    peak = f"{peak:.0f} MiB" if isinstance(peak, (int, float)) else f"{peak} MiB"
    errs = ", ".join(f"{k} {row[k]:.2e}" for k in ("loss_rel_err", "dh_rel_err", "dw_rel_err") if k in row)
    return f"{row['ms']:.2f} ms, {peak}, {row['x_floor']:.2f}x floor; {errs} ({row['wall_s']:.1f} s)"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ours/peer time and memory for every contender of one shape (values < 1: ours is better)."""
    mine = next((r for r in rows if r["contender"] == OURS and r.get("status") == "ok"), None)
    if mine is None:
        return
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["ours_over_peer_time"] = mine["ms"] / row["ms"]
        if isinstance(row.get("peak_mib"), (int, float)) and row["peak_mib"] > 0:
            row["ours_over_peer_mem"] = mine["peak_mib"] / row["peak_mib"]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
TABLE_HEADERS = [
    "shape", "contender", "scratch MiB", "ms", "peak MiB", "x floor", "ours/peer time", "ours/peer mem",
    "loss rel err", "dH rel err", "dW rel err", "status",
]


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {r.get('error', '')}"[:160]
        elif "head_loss_max_rel_err" in r:
            status = f"ok; max head-loss rel err {common.format_cell(r['head_loss_max_rel_err'])}"
        elif "head_loss_error" in r:
            status = f"ok; head-loss check failed: {r['head_loss_error']}"[:160]
        out.append([
            r["shape"], r["contender"], r.get("scratch_mib", "-"), r.get("ms"), r.get("peak_mib"), r.get("x_floor"),
            r.get("ours_over_peer_time"), r.get("ours_over_peer_mem"),
            r.get("loss_rel_err"), r.get("dh_rel_err"), r.get("dw_rel_err"), status,
        ])
    return out


def render_markdown(meta: dict[str, Any], ceilings: dict[str, Any], shapes: list[Shape], rows: list[dict[str, Any]]) -> str:
    floors = {r["shape"]: r["floor_ms"] for r in rows}
    lines = [
        "# n-head fused linear cross-entropy, forward + backward",
        "",
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}; {meta['date_utc']}.",
        f"Peers: liger-kernel {meta.get('liger_kernel') or 'not installed'}, "
        f"cut-cross-entropy {meta.get('cut_cross_entropy') or 'not installed'}.",
        (f"Measured ceilings: {ceilings['matmul_dtype']} {ceilings['matmul_size']}^3 matmul "
         f"{ceilings['matmul_tflops']:.1f} TFLOP/s; copy {ceilings['copy_gbps']:.0f} GB/s (read + write)."
         if ceilings.get("measured", True) else "Ceilings not measured (--skip-ceilings): the floors assume a matmul rate "
         f"of {ceilings['matmul_tflops']:g} TFLOP/s, so the x floor column is not a ratio to this device's floor."),
        "",
        "Loss = sum over heads of the per-head mean CE (5% of targets ignored, equally per head); ms = median "
        "fwd+bwd; per-head contenders run each head's backward before the next head's forward; scratch = "
        "the logits scratch our variant ran with; peak = MiB allocated above the pre-call level (gradients "
        "included); floor = logits, dH, dW "
        "matmuls at the measured matmul rate; ours/peer < 1 means ours is faster / smaller; errors are "
        "relative to eager_per_head (matmul in the input dtype, CE in float32).",
        "",
    ]
    for shape in shapes:
        if shape.name in floors:
            lines.append(f"- {shape.name}: {shape.label()}; floor {floors[shape.name]:.2f} ms")
    lines += ["", common.markdown_table(TABLE_HEADERS, table_rows(rows)), ""]
    return "\n".join(lines)


def write_chart(path: Path, shapes: list[Shape], rows: list[dict[str, Any]], title: str):
    names = list(dict.fromkeys(r["contender"] for r in rows))
    groups = [s.name for s in shapes]

    def series(key):
        out = {}
        for name in names:
            values = []
            for g in groups:
                r = next((r for r in rows if r["shape"] == g and r["contender"] == name), None)
                v = r.get(key) if r and r.get("status") == "ok" else None
                values.append(v if isinstance(v, (int, float)) else None)
            if any(v is not None for v in values):
                out[name] = values
        return out

    panels = [("time / floor (fwd+bwd)", series("x_floor"))]
    mem = series("peak_mib")
    if mem:
        panels.append(("peak MiB", mem))
    return common.write_bar_chart(path, groups, {}, panels=panels, title=title)


def write_reports(out: Path, stem: str, meta, ceilings, shapes: list[Shape], rows) -> str:
    """JSON + markdown for the shapes measured so far; returns the markdown."""
    markdown = render_markdown(meta, ceilings, shapes, rows)
    payload = {"meta": meta, "ceilings": ceilings, "shapes": [s.__dict__ for s in shapes], "results": rows}
    common.write_json(out / f"{stem}.json", payload)
    common.write_markdown(out / f"{stem}.md", markdown)
    return markdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"), help="output folder")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="cuda (default when available) or cpu")
    p.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default all; --quick: tiny shapes)")
    p.add_argument("--contenders", default=None, help=f"comma list of {list(CONTENDERS)} (default all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short repeats: a smoke test")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per contender (default 150, quick 20)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 on CUDA, float32 on CPU")
    p.add_argument("--skip-ceilings", action="store_true", help="skip the matmul/copy measurement (uses 1 TFLOP/s)")
    args = p.parse_args(argv)
    if args.rep_ms is not None and not args.rep_ms > 0:
        p.error(f"--rep-ms must be > 0, got {args.rep_ms}")
    for option, known in (("shapes", {**SHAPES, **QUICK_SHAPES}), ("contenders", CONTENDERS)):
        names = (getattr(args, option) or "").split(",")
        if len(set(names)) != len(names):
            p.error(f"--{option} names one entry twice: {getattr(args, option)}")
        unknown = [name for name in names if name not in known]
        if getattr(args, option) and unknown:
            p.error(f"unknown --{option} {unknown}; choose from {sorted(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    table = {**SHAPES, **QUICK_SHAPES}
    if args.shapes:
        shapes = [table[s] for s in args.shapes.split(",")]
    else:
        shapes = list(QUICK_SHAPES.values()) if args.quick else list(SHAPES.values())
    contenders = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    rep_ms = args.rep_ms or (20.0 if args.quick else 150.0)

    started = time.perf_counter()
    meta = common.environment_info(device)
    meta.update(
        dtype=str(dtype).replace("torch.", ""),
        liger_kernel=common.package_version("liger-kernel"),
        cut_cross_entropy=common.package_version("cut-cross-entropy"),
        quick=args.quick,
        rep_ms=rep_ms,
        ignore_fraction=IGNORE_FRACTION,
        argv=sys.argv[1:] if argv is None else list(argv),
    )
    if device.type == "cuda" and meta["TRITON_INTERPRET"] not in (None, "", "0"):
        print("warning: TRITON_INTERPRET is set on a CUDA run; Triton kernels will be interpreted", flush=True)
    print(f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)

    if args.skip_ceilings:
        ceilings = {"measured": False, "matmul_dtype": "none", "matmul_size": 0, "matmul_tflops": 1.0,
                    "copy_gbps": float("nan")}
    else:
        ceilings = common.measure_ceilings(device, rep_ms=50.0 if args.quick else 100.0)
    print(f"ceilings: {ceilings['matmul_tflops']:.1f} TFLOP/s matmul, {ceilings['copy_gbps']:.0f} GB/s copy", flush=True)

    out = Path(args.out)
    stem = f"fused_ce_{meta['device_slug']}"
    rows: list[dict[str, Any]] = []
    done: list[Shape] = []
    for shape in shapes:
        rows += run_shape(shape, contenders, device, dtype, rep_ms, ceilings)
        done.append(shape)
        meta["wall_s"] = time.perf_counter() - started
        markdown = write_reports(out, stem, meta, ceilings, done, rows)
    try:
        chart = write_chart(out / f"{stem}.png", shapes, rows, f"fused linear CE fwd+bwd, {meta['device']}")
    except Exception as err:  # noqa: BLE001 - the numbers are already written
        print(f"note: chart failed: {type(err).__name__}: {err}")
        chart = None
    print()
    print(markdown)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {chart}" if chart else ""))
    print(f"total wall time {meta['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
