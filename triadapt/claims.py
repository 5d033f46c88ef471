"""Is a difference between two report rows larger than the seed noise, and which row is more stable?

:func:`compare` takes the runs of two rows of the report (methods, or any row labels it prints) and,
per task and on the paper's GLUE average, gives the mean difference A − B of the task score
(:func:`triadapt.report.task_scores`), a Student-t 95% confidence interval and a verdict:

* paired by seed when A and B ran the same seeds (t on the per-seed differences, n − 1 degrees of
  freedom), unpaired otherwise (Welch's t, Welch–Satterthwaite degrees of freedom), and said so;
* the paper's average: the mean over the common GLUE tasks of the per-task differences; paired on
  the per-seed averages when every task ran the same seeds, else the per-task standard errors
  combined (Welch–Satterthwaite);
* across tasks: a paired t-test over every (task, seed) pair both rows ran;
* "A better" / "B better" when the interval excludes 0, "within seed noise" when it does not, and
  "not enough seeds" (never a verdict) when a side has fewer than ``min_seeds`` seeds.

Under the t model a true difference of zero is called a difference in 5% of comparisons (1 − level).

Stability (:func:`stability`): per row and task the sample std and range over seeds, and the
collapsed-seed rate: the share of seeds below ``collapse`` × the row's own best seed on that task.
:func:`compare` says which row is more stable per task with a two-sided variance-ratio F test, and
across tasks with Fisher's combination of the per-task one-sided F tests and Fisher's exact test on the
collapsed-seed counts. The F test assumes normal scores: a collapsed seed is exactly what makes a
spread larger, so read it together with the collapsed counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from triadapt import report

MIN_SEEDS = 3
COLLAPSE = 0.9
LEVEL = 0.95
CI_METHOD = "Student t (paired: t on per-seed differences; unpaired: Welch)"


# ----------------------------------------------------------------------------------------- statistics


def difference_ci(a, b, paired: bool, level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """``(mean A − mean B, low, high, p, dof)`` of a Student-t interval at ``level``.

    ``paired``: ``a`` and ``b`` are aligned by seed, the interval is the one-sample t interval of
    ``a − b`` (n − 1 dof). Otherwise Welch's interval. With zero spread the interval is the point.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if paired:
        d = a - b
        diff, se, dof = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1.0
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        diff, se = float(a.mean() - b.mean()), float(math.sqrt(va + vb))
        dof = _welch_dof(va, vb, len(a), len(b))
    return _interval(diff, se, dof, level)


def _welch_dof(va: float, vb: float, na: int, nb: int) -> float:
    """Welch–Satterthwaite degrees of freedom of two samples' squared standard errors ``va``, ``vb``."""
    return (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1)) if va + vb > 0 else math.inf


def _interval(diff: float, se: float, dof: float, level: float) -> tuple[float, float, float, float, float]:
    if not se > 0:  # every seed the same difference: the interval is the point
        return diff, diff, diff, (1.0 if diff == 0 else 0.0), dof
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return diff, diff - half, diff + half, p, dof


def verdict(low: float, high: float, enough: bool = True) -> str:
    """The plain verdict of an interval on A − B (higher scores are better for every metric)."""
    if not enough or math.isnan(low):
        return "not enough seeds"
    if low > 0:
        return "A better"
    if high < 0:
        return "B better"
    return "within seed noise"


def variance_ratio_test(a, b) -> tuple[float, float]:
    """``(var A / var B, two-sided p)`` of the F test; NaN p when a spread is zero (no test)."""
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    if not (va > 0 and vb > 0):
        return (math.nan if vb == 0 else 0.0), math.nan
    ratio = float(va / vb)
    cdf = stats.f.cdf(ratio, len(a) - 1, len(b) - 1)
    return ratio, float(min(1.0, 2 * min(cdf, 1 - cdf)))


# ----------------------------------------------------------------------------------------- stability


def stability(runs: pd.DataFrame, collapse: float = COLLAPSE) -> pd.DataFrame:
    """Per row and task of :func:`triadapt.report.included_runs`: ``n``, ``mean``, ``std`` (sample),
    ``range`` (max − min), ``best`` and ``collapsed`` (seeds below ``collapse`` × best; NaN when the
    best seed is not above 0, where a fraction of it means nothing) and ``collapsed_rate``."""
    records = []
    for (row, task), cell in runs.groupby(["row", "task"], sort=False):
        scores = cell["score"].to_numpy(float)
        best = scores.max()
        collapsed = _collapsed(scores, collapse)
        records.append({
            "row": row, "task": task, "n": len(scores), "mean": scores.mean(),
            "std": scores.std(ddof=1) if len(scores) > 1 else math.nan, "range": best - scores.min(),
            "best": best, "collapsed": collapsed, "collapsed_rate": collapsed / len(scores),
        })  # fmt: skip
    return pd.DataFrame(records, columns=["row", "task", "n", "mean", "std", "range", "best", "collapsed",
                                          "collapsed_rate"])  # fmt: skip


def _collapsed(scores: np.ndarray, collapse: float) -> float:
    """Seeds below ``collapse`` × the best one; NaN when the best is not above 0."""
    best = scores.max()
    return int((scores < collapse * best).sum()) if best > 0 else math.nan


def stability_table(df: pd.DataFrame, which: report.Which = "best", collapse: float = COLLAPSE) -> pd.DataFrame:
    """Rows × tasks, each cell ``std s · range r · collapsed k/n`` (the stability columns of the report)."""
    runs = report.included_runs(df, which) if len(df) else pd.DataFrame()
    if runs.empty:
        return pd.DataFrame()
    table = stability(runs, collapse)
    tasks = _task_order(table["task"])
    rows = sorted(dict.fromkeys(table["row"]))
    cells = {(r.row, r.task): _stability_cell(r) for r in table.itertuples(index=False)}
    out = pd.DataFrame([[cells.get((row, t), "–") for t in tasks] for row in rows], index=rows,
                       columns=[report.PLOT_TITLES.get(t, t) for t in tasks])  # fmt: skip
    out.index.name = "method / budget"
    out.attrs["notes"] = [
        (
            f"Stability of the {which} checkpoint's score (×100, the table's task score) over seeds: sample std, "
            f"range (max − min), and collapsed seeds: below {collapse:g} × the row's own best seed on that task "
            "(– where the best seed is not above 0)."
        )
    ]
    return out


def _stability_cell(r) -> str:
    std = "–" if pd.isna(r.std) else f"{r.std:.2f}"
    collapsed = "–" if pd.isna(r.collapsed) else f"{int(r.collapsed)}/{r.n}"
    return f"std {std} · range {r.range:.2f} · collapsed {collapsed}"


def _task_order(tasks) -> list[str]:
    present = list(dict.fromkeys(tasks))
    return [t for t in report.GLUE_TASKS if t in present] + sorted(t for t in present if t not in report.GLUE_TASKS)


# ----------------------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """What :func:`compare` found; :func:`format_comparison` prints it, :func:`plot_comparison` draws it."""

    a: str
    b: str
    which: str
    min_seeds: int
    collapse: float
    level: float
    differences: pd.DataFrame  # one row per task, then the average
    pooled: dict
    stability: pd.DataFrame  # one row per common task
    stability_overall: dict
    settings: list[str] = field(default_factory=list)
    only: dict = field(default_factory=dict)  # tasks only one side ran


def resolve_row(runs: pd.DataFrame, name: str) -> str:
    """A row label from a label as printed, the label without its model prefix, or a method name
    that has one row; ``ValueError`` naming the choices otherwise."""
    rows = list(dict.fromkeys(runs["row"]))
    if name in rows:
        return name
    by_suffix = [r for r in rows if r.split(": ", 1)[-1] == name]
    if len(by_suffix) == 1:
        return by_suffix[0]
    by_method = list(dict.fromkeys(runs.loc[runs["method"] == name, "row"]))
    if len(by_method) == 1:
        return by_method[0]
    if by_method:
        raise ValueError(f"{name!r} names several rows: {', '.join(map(repr, by_method))}; pass one of these labels")
    raise ValueError(f"no row {name!r}; rows: {', '.join(map(repr, rows)) or 'none'}")


def compare(
    df: pd.DataFrame,
    a: str,
    b: str,
    which: report.Which = "best",
    min_seeds: int = MIN_SEEDS,
    collapse: float = COLLAPSE,
    level: float = LEVEL,
) -> Comparison:
    """Compare rows ``a`` and ``b`` (see :func:`resolve_row`) of the report over ``df``'s runs."""
    if min_seeds < 2:
        raise ValueError("min_seeds must be at least 2: one seed has no spread")
    runs = report.included_runs(df, which) if len(df) else pd.DataFrame(columns=["row", "method"])
    a, b = resolve_row(runs, a), resolve_row(runs, b)
    if a == b:
        raise ValueError(f"A and B are the same row ({a!r})")
    runs_a, runs_b = runs[runs["row"] == a], runs[runs["row"] == b]
    scores = {side: {t: dict(zip(cell["seed"].astype(int), cell["score"])) for t, cell in part.groupby("task")}
              for side, part in (("A", runs_a), ("B", runs_b))}  # fmt: skip
    common = _task_order(set(scores["A"]) & set(scores["B"]))
    only = {side: _task_order(set(scores[side]) - set(scores[other]))
            for side, other in (("A", "B"), ("B", "A"))}  # fmt: skip
    records = [_task_difference(t, scores["A"][t], scores["B"][t], min_seeds, level) for t in common]
    glue = [r for r in records if r["task"] in report.GLUE_TASK_SCORE]
    if glue:
        records.append(_average_difference(glue, scores, min_seeds, level))
    differences = pd.DataFrame(records)
    pooled = _pooled_test(common, scores, min_seeds, level)
    stab = _stability_comparison(common, scores, collapse, min_seeds)
    both = pd.concat([runs_a, runs_b])
    settings = report.settings_differences(both[both["task"].isin(common)])
    return Comparison(a, b, which, min_seeds, collapse, level, differences, pooled, stab["per_task"],
                      stab["overall"], settings, only)  # fmt: skip


def _task_difference(task: str, a: dict, b: dict, min_seeds: int, level: float) -> dict:
    paired = set(a) == set(b)
    seeds_a, seeds_b = sorted(a), sorted(b)
    xa = np.array([a[s] for s in seeds_a])
    xb = np.array([b[s] for s in (seeds_a if paired else seeds_b)])
    enough = min(len(xa), len(xb)) >= min_seeds
    if min(len(xa), len(xb)) >= 2:
        diff, low, high, p, _ = difference_ci(xa, xb, paired, level)
    else:
        diff, low, high, p = float(xa.mean() - xb.mean()), math.nan, math.nan, math.nan
    pairing = (f"paired by seed ({_seeds(seeds_a)})" if paired
               else f"unpaired: seeds differ (A {_seeds(seeds_a)}; B {_seeds(seeds_b)})")  # fmt: skip
    return {"task": task, "column": report.PLOT_TITLES.get(task, task), "mean_a": xa.mean(), "mean_b": xb.mean(),
            "diff": diff, "low": low, "high": high, "p": p, "n_a": len(xa), "n_b": len(xb), "paired": paired,
            "pairing": pairing, "verdict": verdict(low, high, enough)}  # fmt: skip


def _average_difference(glue: list[dict], scores: dict, min_seeds: int, level: float) -> dict:
    """The paper's average (mean over the common GLUE tasks), A − B with its interval."""
    tasks = [r["task"] for r in glue]
    n = len(tasks)
    header = "All Ave." if n == len(report.GLUE_TASKS) else f"Ave. ({n} task{'s' if n != 1 else ''})"
    mean_a = float(np.mean([r["mean_a"] for r in glue]))
    mean_b = float(np.mean([r["mean_b"] for r in glue]))
    seed_sets = {frozenset(scores["A"][t]) for t in tasks} | {frozenset(scores["B"][t]) for t in tasks}
    enough = all(min(r["n_a"], r["n_b"]) >= min_seeds for r in glue)
    record = {"task": "average", "column": header, "mean_a": mean_a, "mean_b": mean_b,
              "n_a": min(r["n_a"] for r in glue), "n_b": min(r["n_b"] for r in glue)}  # fmt: skip
    if len(seed_sets) == 1:  # every task ran the same seeds on both sides: pair the per-seed averages
        seeds = sorted(next(iter(seed_sets)))
        per_seed_a = [np.mean([scores["A"][t][s] for t in tasks]) for s in seeds]
        per_seed_b = [np.mean([scores["B"][t][s] for t in tasks]) for s in seeds]
        if len(seeds) >= 2:
            diff, low, high, p, _ = difference_ci(per_seed_a, per_seed_b, True, level)
        else:
            diff, low, high, p = mean_a - mean_b, math.nan, math.nan, math.nan
        pairing = f"paired by seed on the per-seed average ({_seeds(seeds)})"
        paired = True
    else:  # combine the per-task intervals: var(mean of T differences) = sum of var / T²
        variances, dofs = [], []
        for r in glue:
            xa = np.array(list(scores["A"][r["task"]].values()))
            xb = np.array(list(scores["B"][r["task"]].values()))
            if min(len(xa), len(xb)) < 2:
                variances = None
                break
            if r["paired"]:
                d = xa - np.array([scores["B"][r["task"]][s] for s in scores["A"][r["task"]]])
                variances.append(d.var(ddof=1) / len(d))
                dofs.append(len(d) - 1)
            else:
                va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
                variances.append(va + vb)
                dofs.append(_welch_dof(va, vb, len(xa), len(xb)))
        diff = mean_a - mean_b
        if variances is None:
            low = high = p = math.nan
        else:
            var = sum(variances) / n**2
            denominator = sum((v / n**2) ** 2 / d for v, d in zip(variances, dofs) if v > 0 and d > 0)
            dof = var**2 / denominator if denominator > 0 else math.inf
            diff, low, high, p, _ = _interval(diff, math.sqrt(var), dof, level)
        pairing = "per-task intervals combined (seed sets differ between tasks or sides)"
        paired = False
    record.update({"diff": diff, "low": low, "high": high, "p": p, "paired": paired, "pairing": pairing,
                   "verdict": verdict(low, high, enough)})  # fmt: skip
    return record


def _pooled_test(common: list[str], scores: dict, min_seeds: int, level: float) -> dict:
    """Paired t-test over every (task, seed) pair both sides ran."""
    pairs = [(t, s) for t in common for s in sorted(set(scores["A"][t]) & set(scores["B"][t]))]
    d = np.array([scores["A"][t][s] - scores["B"][t][s] for t, s in pairs])
    out = {"pairs": len(pairs), "tasks": len({t for t, _ in pairs}), "a_ahead": int((d > 0).sum()),
           "b_ahead": int((d < 0).sum())}  # fmt: skip
    if len(d) >= 2:
        diff, low, high, p, _ = difference_ci(d, np.zeros_like(d), True, level)
    else:
        diff, low, high, p = (float(d.mean()) if len(d) else math.nan), math.nan, math.nan, math.nan
    enough = len({s for _, s in pairs}) >= min_seeds  # many tasks do not make up for few seeds
    out.update({"diff": diff, "low": low, "high": high, "p": p, "verdict": verdict(low, high, enough)})
    return out


def _stability_comparison(common: list[str], scores: dict, collapse: float, min_seeds: int) -> dict:
    records, p_a_more, p_b_more = [], [], []
    collapsed = {"A": [0, 0], "B": [0, 0]}  # [collapsed, seeds] over tasks where the rate is defined
    for task in common:
        xa, xb = np.array(list(scores["A"][task].values())), np.array(list(scores["B"][task].values()))
        record = {"task": task, "column": report.PLOT_TITLES.get(task, task), "n_a": len(xa), "n_b": len(xb)}
        for side, x in (("a", xa), ("b", xb)):
            k = _collapsed(x, collapse)
            record.update({f"std_{side}": x.std(ddof=1) if len(x) > 1 else math.nan,
                           f"range_{side}": x.max() - x.min(), f"collapsed_{side}": k})  # fmt: skip
            if not math.isnan(k):
                collapsed[side.upper()][0] += k
                collapsed[side.upper()][1] += len(x)
        enough = min(len(xa), len(xb)) >= min_seeds
        ratio, p = variance_ratio_test(xa, xb) if min(len(xa), len(xb)) >= 2 else (math.nan, math.nan)
        if not enough:
            word = "not enough seeds"
        elif math.isnan(p):
            word = "no test (a spread is zero)"
        elif p < 0.05:
            word = "A more stable" if ratio < 1 else "B more stable"
        else:
            word = "within seed noise"
        record.update({"var_ratio": ratio, "p": p, "verdict": word})
        if enough and not math.isnan(p):
            cdf = float(stats.f.cdf(ratio, len(xa) - 1, len(xb) - 1))
            p_a_more.append(max(cdf, 1e-300))
            p_b_more.append(max(1 - cdf, 1e-300))
        records.append(record)
    overall = {"tasks": len(p_a_more), "collapsed_a": collapsed["A"], "collapsed_b": collapsed["B"]}
    if p_a_more:
        # Fisher's method per direction, then ×2 for having looked both ways.
        pa = float(stats.chi2.sf(-2 * np.log(p_a_more).sum(), 2 * len(p_a_more)))
        pb = float(stats.chi2.sf(-2 * np.log(p_b_more).sum(), 2 * len(p_b_more)))
        p = min(1.0, 2 * min(pa, pb))
        overall.update({"p": p, "verdict": ("A more stable" if pa < pb else "B more stable") if p < 0.05
                        else "within seed noise"})  # fmt: skip
    else:
        overall.update({"p": math.nan, "verdict": "not enough seeds"})
    ka, na = collapsed["A"]
    kb, nb = collapsed["B"]
    if na and nb:
        overall["collapsed_p"] = float(stats.fisher_exact([[ka, na - ka], [kb, nb - kb]])[1])
    else:
        overall["collapsed_p"] = math.nan
    return {"per_task": pd.DataFrame(records), "overall": overall}


def _seeds(seeds) -> str:
    return ",".join(str(int(s)) for s in sorted(seeds))


# ----------------------------------------------------------------------------------------- output


def format_comparison(c: Comparison) -> str:
    """The comparison as Markdown: differences, the pooled test, stability, settings and notes."""
    pct = f"{c.level:.0%}"
    lines = [f"## Compare A = {c.a} vs B = {c.b} ({c.which} checkpoint)", "",
             f"| task | A | B | A − B | {pct} CI | p | seeds A/B | pairing | verdict |", "|" + "---|" * 9]  # fmt: skip
    for r in c.differences.itertuples(index=False):
        ci = "–" if math.isnan(r.low) else f"[{r.low:+.2f}, {r.high:+.2f}]"
        p = "–" if math.isnan(r.p) else f"{r.p:.3f}"
        seeds = f"{r.n_a}/{r.n_b}" if r.task != "average" else f"≥{r.n_a}/≥{r.n_b}"
        lines.append(f"| {r.column} | {r.mean_a:.2f} | {r.mean_b:.2f} | {r.diff:+.2f} | {ci} | {p} | {seeds} | "
                     f"{r.pairing} | **{r.verdict}** |")  # fmt: skip
    q = c.pooled
    if q["pairs"]:
        ci = "–" if math.isnan(q["low"]) else f"[{q['low']:+.2f}, {q['high']:+.2f}]"
        p = "–" if math.isnan(q["p"]) else f"{q['p']:.3f}"
        lines += ["", (f"Across tasks: paired t-test over {q['pairs']} (task, seed) pairs from {q['tasks']} tasks: "
                       f"mean A − B {q['diff']:+.2f}, {pct} CI {ci}, p = {p}; A ahead in {q['a_ahead']}, B in "
                       f"{q['b_ahead']}: **{q['verdict']}**.")]  # fmt: skip
    else:
        lines += ["", "Across tasks: no (task, seed) pair that both ran."]
    header = (
        "| task | std A | std B | range A | range B | collapsed A | collapsed B | var A / var B | p | more stable |"
    )
    lines += ["", header, "|" + "---|" * 10]
    for r in c.stability.itertuples(index=False):
        lines.append(f"| {r.column} | {_num(r.std_a)} | {_num(r.std_b)} | {r.range_a:.2f} | {r.range_b:.2f} | "
                     f"{_frac(r.collapsed_a, r.n_a)} | {_frac(r.collapsed_b, r.n_b)} | {_num(r.var_ratio)} | "
                     f"{_num(r.p, 3)} | **{r.verdict}** |")  # fmt: skip
    o = c.stability_overall
    (ka, na), (kb, nb) = o["collapsed_a"], o["collapsed_b"]
    lines += ["", (f"Stability across tasks: variance ratios over {o['tasks']} tasks (Fisher's combination, "
                   f"both directions) p = {_num(o['p'], 3)}: **{o['verdict']}**; collapsed seeds A {ka}/{na}, "
                   f"B {kb}/{nb} (Fisher's exact test p = {_num(o['collapsed_p'], 3)}).")]  # fmt: skip
    if c.only.get("A") or c.only.get("B"):
        lines += ["", "Not compared (one side only): " + "; ".join(
            f"{side} only: {', '.join(tasks)}" for side, tasks in c.only.items() if tasks)]  # fmt: skip
    lines += ["", "Settings that differ between A and B (besides method.* and budget.*): "
              + (" · ".join(c.settings) if c.settings else "none.")]  # fmt: skip
    lines += ["", (f"- Scores ×100 as in the table (GLUE: the paper's per-task convention). CI: {CI_METHOD}, "
                   f"{pct}. Verdict: \"A better\" / \"B better\" when the interval excludes 0, else \"within seed "
                   f"noise\"; a true difference of 0 is called a difference in {1 - c.level:.0%} of comparisons."),
              f"- Minimum seeds per claim: {c.min_seeds} on each side (--min-seeds); fewer: \"not enough seeds\".",
              (f"- Collapsed seed: below {c.collapse:g} × the row's own best seed on that task. More stable: "
               "two-sided variance-ratio F test at 5% (assumes normal scores).")]  # fmt: skip
    return "\n".join(lines) + "\n"


def _num(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _frac(k: float, n: int) -> str:
    return "–" if isinstance(k, float) and math.isnan(k) else f"{int(k)}/{n}"


def plot_comparison(c: Comparison, ax=None) -> Figure:
    """Per task and for the average: A − B with its interval, around a line at zero. Blue: A better,
    red: B better, grey: within seed noise, hollow: not enough seeds (interval still drawn)."""
    d = c.differences
    if ax is None:
        fig = Figure(figsize=(6.4, 0.9 + 0.45 * max(1, len(d))), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    colors = {"A better": "C0", "B better": "C3", "within seed noise": "0.4", "not enough seeds": "0.6"}
    for y, r in enumerate(d.itertuples(index=False)):
        color = colors[r.verdict]
        if not math.isnan(r.low):
            ax.plot([r.low, r.high], [y, y], color=color, lw=2, solid_capstyle="butt")
        face = "none" if r.verdict == "not enough seeds" else color
        ax.plot([r.diff], [y], "o", color=color, markerfacecolor=face, ms=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(d)), labels=[f"{r.column} ({r.verdict})" for r in d.itertuples(index=False)])
    ax.invert_yaxis()
    ax.set_xlabel(f"A − B, {c.which} ckpt (points ×100), {c.level:.0%} CI")
    ax.set_title(f"A = {c.a}  vs  B = {c.b}", fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return fig
