"""Step time versus rank, sequence length and model size (CSV rows and a PNG)."""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path
from typing import Any

from triadapt.bench.config import model_config
from triadapt.bench.runner import Runner, Spec, build_base, interleave, make_batch, paired_ratio, series


def scaling_plan(args) -> list[tuple[str, str, Any, Spec, dict]]:
    """(sweep, x-label, x, spec, settings) for every point of the scaling curves."""
    full = args.full
    ranks = [1, 2, 4, 8, 16, 32, 64] if full else [1, 8, 64]
    seqs = [32, 64, 128, 256, 512] if full else [32, 128, 512]
    if args.scaling_models:
        models = [m.strip() for m in args.scaling_models.split(",") if m.strip()]
    else:
        models = ["tiny_bert", args.model if args.model != "tiny_bert" else "minilm_l6", "bert_base_shape"]
        if full:
            models += ["deberta_v3_base_shape", "llama_1b_shape"]
    rank_methods = ["lora", "peft_lora", "triadapt"] if full else ["lora", "triadapt"]
    seq_methods = ["floor", "lora", "peft_lora", "triadapt"] if full else ["floor", "lora"]
    model_methods = ["floor", "lora", "peft_lora", "triadapt"] if full else ["floor", "lora"]
    sb = args.batch_size if full else min(args.batch_size, args.scaling_batch)
    plan = []
    base = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len}
    plan.append(("rank", "rank", 0, Spec("floor", label="floor"), base))
    width = min(model_config(args.model).get("architecture", {}).get("hidden_size", 10**9), 10**9)
    for r in [r for r in ranks if r <= width]:
        for m in rank_methods:
            plan.append(("rank", "rank", r, Spec(m, "steady", r, label=f"{m}@r{r}"), base))
    for s in seqs:
        for m in seq_methods:
            plan.append(("seq_len", "seq_len", s, Spec(m, "steady", args.rank, label=f"{m}@s{s}"),
                         {"model": args.model, "batch_size": sb, "seq_len": s}))
    for name in dict.fromkeys(models):
        for m in model_methods:
            plan.append(("model", "model", name, Spec(m, "steady", args.rank, label=f"{m}@{name}"),
                         {"model": name, "batch_size": sb, "seq_len": args.seq_len}))
    return plan


def run_scaling(args, device, log) -> list[dict]:
    rows = []
    plan = scaling_plan(args)
    bases: dict[str, Any] = {}
    for sweep in ("rank", "seq_len", "model"):
        points = [p for p in plan if p[0] == sweep]
        # One interleaved group per distinct (model, batch, seq) setting, floor included in each.
        settings = list(dict.fromkeys(json.dumps(p[4], sort_keys=True) for p in points))
        for s in settings:
            st = json.loads(s)
            group = [p for p in points if json.dumps(p[4], sort_keys=True) == s]
            if st["model"] not in bases:
                cfg = model_config(st["model"])
                bases[st["model"]] = (cfg, build_base(cfg, args.seed)[0])
            cfg, base = bases[st["model"]]
            batch = make_batch(base, st["batch_size"], st["seq_len"], device, args.seed)
            runners = [Runner(p[3], base, cfg, batch, device, args.run_steps, 1, args.seed, args.autocast) for p in group]
            floor = next((r for r in runners if r.spec.method == "floor"), None)
            if floor is None:
                floor = Runner(Spec("floor"), base, cfg, batch, device, args.run_steps, 1, args.seed, args.autocast)
                runners.insert(0, floor)
            log(f"scaling {sweep}: {st} — {len(runners)} variants")
            interleave(runners, args.repeats, 1, log=lambda *_: None)
            for p in group:
                r = next(r for r in runners if r.spec is p[3])
                rows.append({
                    "sweep": sweep, "x": p[2], "method": r.spec.method, "model": st["model"],
                    "batch_size": st["batch_size"], "seq_len": st["seq_len"],
                    "rank": r.spec.rank if r.spec.method != "floor" else None,
                    "n": len(r.times), "median_s": statistics.median(r.times), "min_s": min(r.times),
                    "cpu_median_s": statistics.median(r.cpu), "clock": args.clock,
                    "ratio_floor": paired_ratio(series(r, args.clock), series(floor, args.clock)),
                })
            del runners
            gc.collect()
        if sweep == "model":
            bases.clear()
    return rows


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in ("rank", "seq_len", "model") if any(r["sweep"] == s for r in rows)]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 7), squeeze=False)
    colors: dict[str, str] = {"floor": "C0"}
    for j, sweep in enumerate(sweeps):
        sub = [r for r in rows if r["sweep"] == sweep]
        xs = list(dict.fromkeys(r["x"] for r in sub))
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = [r for r in sub if r["method"] == method]
            pos = [xs.index(r["x"]) for r in pts] if sweep == "model" else [r["x"] for r in pts]
            color = colors.setdefault(method, f"C{len(colors)}")
            if sweep == "rank" and method == "floor":  # rank-independent: a line
                axes[0][j].axhline(pts[0]["median_s"], color=color, label=method, linestyle="--")
                continue
            axes[0][j].plot(pos, [r["median_s"] for r in pts], marker="o", label=method, color=color)
            if method != "floor":
                axes[1][j].plot(pos, [r["ratio_floor"] for r in pts], marker="o", label=method, color=color)
        for i in range(2):
            ax = axes[i][j]
            if sweep == "model":
                ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=15)
            else:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][j].set_ylabel("step time (s, median)")
        if sweep != "rank":
            axes[0][j].set_yscale("log")
            axes[0][j].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        axes[1][j].set_ylabel("× floor")
    fig.suptitle("step time scaling (CPU)" if rows else "")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
