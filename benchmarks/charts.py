"""PNG charts of the attention and generation benchmarks, drawn from their JSON results.

    python benchmarks/charts.py benchmarks/results/attention_*.json benchmarks/results/generate_*.json

bench_attention.py and bench_generate.py call these after writing their JSON, so a GPU run brings
its charts back; this command redraws them from results already committed. Each chart is the
table's numbers, nothing else: the panels are built by `attention_panels` / `generate_panels`
(tested on CPU) and drawn by common.write_bar_chart (matplotlib; skipped with a note without it).
bench_fused_ce.py draws its own chart.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

Panels = list[tuple[str, list[str], dict[str, list[Optional[float]]]]]   # (y label, groups, series)


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def attention_panels(result: dict) -> Panels:
    """Flash TFLOP/s by shape and pass; decode share of copy bandwidth; tree-verify / decode time."""
    panels: Panels = []
    shapes = list(dict.fromkeys(r["shape"] for r in result["flash"]))
    impls = list(dict.fromkeys(r["impl"] for r in result["flash"]))
    groups = [f"{s.replace(' causal', '')}\n{p}" for s in shapes for p in ("fwd", "fwd+bwd")]
    series = {}
    for impl in impls:
        rows = {r["shape"]: r for r in result["flash"] if r["impl"] == impl}
        series[impl] = [_number(rows.get(s, {}).get(key)) for s in shapes for key in ("fwd_tflops", "fwd_bwd_tflops")]
    panels.append(("flash attention TFLOP/s (causal)", groups, series))

    decode = result.get("decode") or []
    if decode:
        groups = [f"B{r['B']} S{r['S']}" for r in decode]
        panels.append(("decode (Tq=1): share of copy bandwidth\n(target 0.8)", groups, {
            "ours": [_number(r.get("ours_frac_of_copy_bw")) for r in decode],
            "sdpa": [_number(r.get("sdpa_frac_of_copy_bw")) for r in decode]}))
        sizes = sorted({int(m.group(1)) for r in decode for k in r if (m := re.fullmatch(r"tree(\d+)_vs_decode", k))})
        tree = {f"Tq={t} / Tq=1": [_number(r.get(f"tree{t}_vs_decode")) for r in decode] for t in sizes}
        if sizes:
            tree[f"floor ratio Tq={sizes[-1]}"] = [_number(r.get(f"tree{sizes[-1]}_floor_ratio")) for r in decode]
            panels.append(("tree verify time / decode time\n(target 1.2 at 64 nodes)", groups, tree))
    return panels


def generate_panels(result: dict) -> Panels:
    """Step costs (plain step over its bytes floor; verify step over plain by tree size) and the
    end-to-end tokens/s of each mode over plain decoding, by batch."""
    panels: Panels = []
    steps = result.get("step_costs") or []
    if steps:
        groups = [f"batch {r['batch']}" for r in steps]
        panels.append(("plain decode step / bytes floor\n(target 1.2)", groups,
                       {"plain": [_number(r.get("plain_x_floor")) for r in steps]}))
        sizes = sorted({int(m.group(1)) for r in steps for k in r if (m := re.fullmatch(r"ratio(\d+)", k))})
        panels.append(("verify step / plain step\n(target 1.25 at batch 1)", groups,
                       {f"{t} nodes": [_number(r.get(f"ratio{t}")) for r in steps] for t in sizes}))
    e2e = result.get("end_to_end") or []
    if e2e:
        batches = list(dict.fromkeys(r["batch"] for r in e2e))
        modes = [m for m in dict.fromkeys(r["mode"] for r in e2e) if m != "plain"]
        rows = {(r["batch"], r["mode"]): r for r in e2e}
        model = str(result.get("e2e_model", "")).split("/")[-1] or "model"
        panels.append((f"end to end ({model}):\ntokens/s over plain", [f"batch {b}" for b in batches],
                       {m: [_number(rows.get((b, m), {}).get("speedup")) for b in batches] for m in modes}))
    return panels


def draw(panels: Panels, path: Path, title: str) -> Optional[Path]:
    """One PNG with a panel per entry; None (and a note) without matplotlib or without panels."""
    if not panels:
        return None
    return common.write_bar_chart(path, panels[0][1], {}, title=title,
                                  panels=[(label, series) for label, _, series in panels],
                                  panel_groups=[groups for _, groups, _ in panels])


def try_chart_for(json_path) -> Optional[Path]:
    """`chart_for`, for the benchmarks: a chart that fails is reported, never fatal (the numbers are
    already written)."""
    try:
        return chart_for(json_path)
    except Exception as err:  # noqa: BLE001
        print(f"note: chart failed: {type(err).__name__}: {err}")
        return None


def chart_for(json_path: Path) -> Optional[Path]:
    """Redraw the chart of one attention_*.json or generate_*.json next to it."""
    result = json.loads(Path(json_path).read_text())
    name = Path(json_path).name
    if name.startswith("attention_"):
        device = result.get("device", "")
        return draw(attention_panels(result), Path(json_path).with_suffix(".png"), f"attention, {result.get('dtype', 'bf16')}, {device}")
    if name.startswith("generate_"):
        device = (result.get("env") or {}).get("device", "")
        return draw(generate_panels(result), Path(json_path).with_suffix(".png"), f"generation, {device}")
    raise ValueError(f"{json_path}: not an attention_*.json or generate_*.json result")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(chart_for(Path(arg)) or f"no chart for {arg}")
