"""The benchmark's targets, Markdown tables, CSV files and summary."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from triadapt.bench.runner import paired_ratio, ratio_quantile

# Targets of the performance issue: (name, description, target).
TARGETS = [
    ("lora/floor", "lora ≤ 1.15 × floor", 1.15),
    ("lora/peft_lora", "lora ≤ 0.85 × peft_lora", 0.85),
    ("triadapt/lora", "triadapt ≤ 1.05 × lora (equal final rank)", 1.05),
    ("adalora/peft_adalora", "adalora ≤ 0.85 × peft_adalora", 0.85),
    ("adalora:growth/peft_adalora:growth", "adalora ≤ 0.85 × peft_adalora (budgeting phase)", 0.85),
    ("increlora/lora", "increlora ≤ 1.5 × lora (final rank)", 1.5),
    ("increlora:growth/lora", "increlora ≤ 1.5 × lora (growth phase)", 1.5),
]
# Targets of the overhead section (issue #16): the dispatch-bound regime.
OVERHEAD_TARGETS = [
    ("lora/floor", "lora ≤ 1.10 × floor", 1.10),
    *[(f"{m}/lora", f"{m} ≤ 1.15 × lora (final rank)", 1.15) for m in ("adalora", "increlora", "triadapt")],
    *[(f"{m}:growth/lora", f"{m} ≤ 1.3 × lora (allocation phase)", 1.3) for m in ("adalora", "increlora", "triadapt")],
]
# Whole-step capture (issue #19, `--capture`): captured steps against eager ones, one run.
CAPTURE_TARGETS = [
    *[(f"{m}+graph/full", f"{m} captured ≤ full fine-tuning's eager step", 1.0) for m in ("lora", "adalora", "increlora", "triadapt")],
    ("lora+graph/floor+graph", "lora captured ≤ 1.5 × the captured floor", 1.5),
    ("triadapt+graph/lora+graph", "triadapt captured ≤ 1.1 × lora captured", 1.1),
    *[(f"{m}+graph/{m}", f"{m} captured ≤ 0.5 × its eager step", 0.5) for m in ("full", "lora", "adalora", "increlora", "triadapt")],
]  # fmt: skip
GROWTH_EVENT_TARGET_MS = 50.0


def fmt(x, spec=".2f", none="–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def main_table(rows: list[dict], memory: dict[str, dict]) -> str:
    clock = rows[0]["clock"] if rows else "wall"
    peak = "peak CUDA MB" if any("peak_cuda_mb" in m for m in memory.values()) else "peak MB RSS / live"
    head = (f"| variant | wall median s | wall p25–p75 s | CPU median s | × floor ({clock}) | × lora ({clock}) "
            f"| hooks ms/step (median / max) | rank eff / computed | {peak} | gradient tensors / autograd nodes |"
            "\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mem = memory.get(r["variant"], {})
        lines.append(
            f"| {r['variant']} | {r['median_s']:.3f} | {r['p25_s']:.3f}–{r['p75_s']:.3f} | {r['cpu_median_s']:.3f} "
            f"| {fmt(r['ratio_floor'])} | {fmt(r['ratio_lora'])} | {r['hook_median_ms']:.1f} / {r['hook_max_ms']:.1f} "
            f"| {fmt(r['rank_effective'], '.1f')} / {fmt(r['rank_computed'], '.1f')} "
            f"| {fmt(mem.get('peak_cuda_mb', mem.get('peak_rss_mb')), '.0f')} / {fmt(mem.get('peak_live_mb'), '.0f')} "
            f"| {fmt(r['grad_tensors'], 'd')} / {fmt(r['autograd_nodes'], 'd')} |"
        )
    return "\n".join(lines)


def ratio_checks(rows: list[dict], targets: list[tuple[str, str, float]], section: str = "") -> list[dict]:
    """Paired time ratios against their limits (median and p25–p75 over rounds; the other clock alongside)."""
    by = {r["variant"]: r for r in rows}
    out = []
    for name, desc, target in targets:
        a, b = name.split("/")
        if a in by and b in by:
            value = paired_ratio(by[a]["_series"], by[b]["_series"])
            other = "_times" if by[a]["clock"] == "cpu" else "_cpu"
            out.append({"target": f"{section}: {desc}" if section else desc, "value": value, "limit": target,
                        "met": value <= target, "miss_pct": max(0.0, 100 * (value / target - 1)),
                        "p25": ratio_quantile(by[a]["_series"], by[b]["_series"], 0.25),
                        "p75": ratio_quantile(by[a]["_series"], by[b]["_series"], 0.75),
                        "other": paired_ratio(by[a][other], by[b][other]), "clock": by[a]["clock"]})
    return out


def check_targets(rows: list[dict], memory: dict[str, dict], growth: dict | None,
                  overhead: list[dict] | None = None) -> list[dict]:
    """The issues' targets: paired time ratios of the main and overhead sections, peak memory against
    ``full``, the growth event (CPU time; wall alongside)."""
    out = ratio_checks(rows, TARGETS) + ratio_checks(rows, CAPTURE_TARGETS)
    out += ratio_checks(overhead or [], OVERHEAD_TARGETS, "overhead")
    ref = memory.get("full", {})
    full = ref.get("peak_cuda_mb", ref.get("peak_rss_mb"))
    if full:
        for m, v in memory.items():
            peak = v.get("peak_cuda_mb", v.get("peak_rss_mb"))
            if m in ("full", "floor") or peak is None:
                continue
            live = (v.get("peak_live_mb") / ref["peak_live_mb"]) if v.get("peak_live_mb") and ref.get("peak_live_mb") else None
            out.append({"target": f"peak memory {m} ≤ full", "value": peak / full, "limit": 1.0,
                        "measure": "peak CUDA" if "peak_cuda_mb" in v else "peak RSS",
                        "met": peak <= full, "miss_pct": max(0.0, 100 * (peak / full - 1)), "live": live})
    if growth and "all_modules" in growth:
        g = growth["all_modules"]
        v = g["cpu_median_ms"]
        out.append({"target": f"one TriAdaptLoRA growth event on {g['modules']} modules ≤ 50 ms (CPU time)",
                    "value": v, "limit": GROWTH_EVENT_TARGET_MS, "met": v <= GROWTH_EVENT_TARGET_MS,
                    "miss_pct": max(0.0, 100 * (v / GROWTH_EVENT_TARGET_MS - 1)),
                    "wall": g["median_ms"]})
    return out


def overhead_table(rows: list[dict]) -> str:
    clock = rows[0]["clock"] if rows else "cpu"
    head = (f"| variant | {clock} median ms | × floor | × lora | hooks ms/step | rank eff / computed "
            "| gradient tensors | autograd nodes |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {1e3 * statistics.median(r['_series']):.1f} | {fmt(r['ratio_floor'])} "
            f"| {fmt(r['ratio_lora'])} | {r['hook_median_ms']:.1f} "
            f"| {fmt(r['rank_effective'], '.1f')} / {fmt(r['rank_computed'], '.1f')} "
            f"| {fmt(r['grad_tensors'], 'd')} | {fmt(r['autograd_nodes'], 'd')} |"
        )
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | measured | p25–p75 of rounds | other clock | met |", "|---|---|---|---|---|"]
    for c in checks:
        if "growth event" in c["target"]:
            value, spread, cpu = f"{c['value']:.1f} ms CPU", "–", f"wall {c['wall']:.1f} ms"
        elif "memory" in c["target"]:
            value, spread = f"{c['value']:.3f} × full ({c['measure']})", "–"
            cpu = "–" if c.get("live") is None else f"{c['live']:.3f} × full (peak live bytes)"
        else:
            other = "wall" if c["clock"] == "cpu" else "CPU"
            value, spread = f"{c['value']:.3f} ({c['clock']})", f"{c['p25']:.3f}–{c['p75']:.3f}"
            cpu = f"{c['other']:.3f} ({other})"
        met = "yes" if c["met"] else f"no (over by {c['miss_pct']:.1f}%)"
        if c.get("live") is not None:
            met += f"; live bytes: {'yes' if c['live'] <= 1 else 'no'}"
        lines.append(f"| {c['target']} | {value} | {spread} | {cpu} | {met} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})


def summary_markdown(result, rows, memory, growth, evals, checks, args, overhead=None) -> str:
    info = result["machine"]
    parts = [
        f"# triadapt bench — {args.model}, batch {args.batch_size} × seq {args.seq_len}, rank {args.rank}",
        "",
        f"`{result['command']}`",
        "",
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}, {info['torch_threads']} threads "
        f"({info.get('threads_reason')}), "
        f"load average {fmt(info['loadavg_start'][0] if info['loadavg_start'] else None, '.1f')} → "
        f"{fmt(info['loadavg_end'][0] if info.get('loadavg_end') else None, '.1f')}; "
        f"malloc {info.get('malloc')}; {args.steps} timed interleaved rounds after {args.warmup} warm-up; "
        f"ratios = median of per-round ratios of {args.clock} time. "
        f"Peak memory: {result['memory_measure']}.",
    ]
    if rows:
        parts += ["", main_table(rows, memory)]
    if overhead:
        title = (f"## Overhead: {args.overhead_model}, batch {args.overhead_batch} × seq {args.overhead_seq_len}, "
                 "1 thread (dispatch-bound)")
        parts += ["", title, "", overhead_table(overhead)]
    if checks:
        parts += ["", "## Targets", "", targets_table(checks)]
    if growth:
        parts += ["", "## TriAdaptLoRA growth event", ""]
        for case in ("all_modules", "first_event"):
            g = growth[case]
            parts.append(f"- {case}: {g['median_ms']:.1f} ms (min {g['min_ms']:.1f}) on {growth['model']} "
                         f"({g['modules']} modules), {g['modules_grown']} modules grown, +{g['ranks_added']} ranks")
    if evals:
        parts += ["", "## Evaluation throughput (MRPC dev, LoRA model)", "",
                  "| mode | examples/s | × max_length | padding |", "|---|---|---|---|"]
        for e in evals:
            parts.append(f"| {e['mode']} | {e['examples_per_s']:.1f} | {e['speedup_vs_max_length']:.2f} "
                         f"| {e['padding_pct']:.0f}% |")
    if result["scaling"]:
        parts += ["", "## Scaling (× floor)", "", "| sweep | x | method | median s | × floor |", "|---|---|---|---|---|"]
        for s in result["scaling"]:
            parts.append(f"| {s['sweep']} | {s['x']} | {s['method']} | {s['median_s']:.3f} | {fmt(s['ratio_floor'])} |")
    return "\n".join(parts) + "\n"
