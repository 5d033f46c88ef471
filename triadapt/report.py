"""Paper-style tables and plots from the ``result.json`` files that runs write.

Every run leaves ``<run dir>/result.json``; this module globs them into one pandas frame
(:func:`load_results`), aggregates seeds into the AdaLoRA paper's table layout (:func:`glue_table`,
:func:`squad_table`), and draws metric-versus-parameters and rank-allocation plots
(:func:`plot_metric_vs_params`, :func:`rank_heatmap`). ``python -m triadapt.report`` is the CLI.

Tables come in two shapes: a *summary* (tidy numbers, one row per table cell: what the CSV holds)
and a *table* (formatted strings, rows = method × budget, columns = the paper's metrics: what the
Markdown and LaTeX hold). Runs that did not complete are listed, never averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

Which = Literal["best", "final"]
Agg = Literal["mean", "median"]

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "results" / "reference" / "adalora_paper.csv"
REFERENCE_SOURCE = "arXiv:2303.10512"

RUN_COLUMNS = [
    "task", "task_group", "method", "model", "seed", "budget_name", "target_rank", "adapter_params",
    "head_params", "status", "error", "main_metric", "best_step", "train_s", "steps", "step_s_median",
    "peak_mem_mb", "run_dir", "ranks",
]  # fmt: skip

# (column header, task, metric key) in the order of the AdaLoRA paper's Table 1.
GLUE_COLUMNS = [
    ("MNLI-m", "mnli", "accuracy"),
    ("MNLI-mm", "mnli", "accuracy_mm"),
    ("SST-2", "sst2", "accuracy"),
    ("CoLA", "cola", "matthews_correlation"),
    ("QQP acc", "qqp", "accuracy"),
    ("QQP F1", "qqp", "f1"),
    ("QNLI", "qnli", "accuracy"),
    ("RTE", "rte", "accuracy"),
    ("MRPC", "mrpc", "accuracy"),
    ("STS-B", "stsb", "pearson_spearman_mean"),
]
GLUE_TASKS = list(dict.fromkeys(task for _, task, _ in GLUE_COLUMNS))
# The number each task contributes to "All Ave." (methods.md §1.4): averaging MNLI m/mm and QQP
# acc/F1 is what makes every row of the paper's Table 1 recompute to within ±0.01.
GLUE_TASK_SCORE = {
    "mnli": ("accuracy", "accuracy_mm"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson_spearman_mean",),
    "mrpc": ("accuracy",),
    "sst2": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "cola": ("matthews_correlation",),
}
GLUE_CONVENTION = "MNLI = mean(m, mm), QQP = mean(acc, F1), STS-B = mean(Pearson, Spearman), MRPC = acc"
SQUAD_NAMES = {"squad_v1": "SQuAD v1.1", "squad_v2": "SQuAD v2.0", "squad": "SQuAD"}
PLOT_TITLES = {"mnli": "MNLI (mean of m/mm acc)", "sst2": "SST-2 (acc)", "cola": "CoLA (Mcc)",
               "qqp": "QQP (mean of acc/F1)", "qnli": "QNLI (acc)", "rte": "RTE (acc)", "mrpc": "MRPC (acc)",
               "stsb": "STS-B (mean corr.)", "squad_v1": "SQuAD v1.1 F1", "squad_v2": "SQuAD v2.0 F1"}  # fmt: skip
MATRIX_TYPES = ("query", "key", "value", "attention.output", "intermediate", "output")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.(.+)$")  # BERT layer.N, LLaMA/Qwen2 layers.N, BLOOM h.N


# ----------------------------------------------------------------------------------------- loading


def load_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, list[dict]]:
    """Read every ``result.json`` under ``paths`` (searched recursively) into one row per run.

    Columns: :data:`RUN_COLUMNS` (``run_dir`` is where the file was found, ``ranks`` the
    ``budget.ranks`` dict) plus one ``best.<key>`` / ``final.<key>`` column per numeric metric.
    Returns ``(df, problems)``: files that cannot be read or parsed are skipped and described in
    ``problems`` as ``{"path": ..., "problem": ...}`` dicts; runs of any status are kept.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows, problems = [], []
    for root in map(Path, paths):
        if root.is_dir():
            files = sorted(root.rglob("result.json"))
        elif root.is_file():
            files = [root]
        else:
            problems.append({"path": str(root), "problem": "no such file or directory"})
            continue
        for file in files:
            try:
                rows.append(_flatten(json.loads(file.read_text(encoding="utf-8")), file))
            except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                problems.append({"path": str(file), "problem": f"{type(e).__name__}: {e}"})
    df = pd.DataFrame(rows)
    extra = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    return df.reindex(columns=RUN_COLUMNS + extra), problems


def _flatten(result: object, file: Path) -> dict:
    if not isinstance(result, dict):
        raise ValueError("result.json does not hold a JSON object")
    missing = [key for key in ("task", "method", "status") if not result.get(key)]
    if missing:
        raise ValueError(f"result.json lacks {', '.join(missing)}")
    metrics = _as_dict(result.get("metrics"))
    budget = _as_dict(result.get("budget"))
    timing = _as_dict(result.get("timing"))
    error = result.get("error")
    if isinstance(error, dict):
        error = f"{error.get('type', 'Error')}: {error.get('message', '')}"
    row = {
        **{key: result.get(key) for key in ("task", "task_group", "method", "model", "seed", "budget_name")},
        **{key: budget.get(key) for key in ("target_rank", "adapter_params", "head_params")},
        "status": result["status"],
        "error": error,
        "main_metric": result.get("main_metric"),
        "best_step": metrics.get("best_step"),
        **{key: timing.get(key) for key in ("train_s", "steps", "step_s_median", "peak_mem_mb")},
        "run_dir": str(file.parent),
        "ranks": budget.get("ranks"),
    }
    for which in ("best", "final"):
        for key, value in _as_dict(metrics.get(which)).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{which}.{key}"] = float(value)
    return row


def _as_dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def runs_not_included(df: pd.DataFrame) -> pd.DataFrame:
    """The runs whose status is not ``completed``: listed by the report, excluded from every number."""
    columns = ["status", "task", "method", "budget_name", "seed", "error", "run_dir"]
    return df.loc[df["status"] != "completed", columns].reset_index(drop=True)


def load_reference(path: str | os.PathLike = REFERENCE_CSV) -> pd.DataFrame:
    """The published numbers in long format (see ``results/reference/README.md``)."""
    return pd.read_csv(path, dtype={"budget_label": str})


# ----------------------------------------------------------------------------------------- scores


def task_scores(df: pd.DataFrame, which: Which = "best") -> pd.Series:
    """Per-run score in percent points: the number a run contributes to an average or a plot.

    GLUE follows the paper's "All Ave." convention (:data:`GLUE_TASK_SCORE`, ×100), SQuAD uses F1
    (already in percent), any other task its ``main_metric`` ×100. NaN where a metric is missing.
    """
    scores = pd.Series(np.nan, index=df.index, dtype=float)
    for task, runs in df.groupby("task"):
        if task in GLUE_TASK_SCORE:
            scores.loc[runs.index] = _mean_of(runs, [f"{which}.{key}" for key in GLUE_TASK_SCORE[task]]) * 100
        elif _is_squad(runs).all():
            scores.loc[runs.index] = _mean_of(runs, [f"{which}.f1"])
        else:
            for main, sub in runs.groupby("main_metric"):
                scores.loc[sub.index] = _mean_of(sub, [f"{which}.{main}"]) * 100
    return scores


def _mean_of(runs: pd.DataFrame, columns: list[str]) -> pd.Series:
    # skipna=False: MNLI-m alone would pass for the MNLI score and inflate it (methods.md §1.4).
    return runs.reindex(columns=columns).astype(float).mean(axis=1, skipna=False)


def _is_squad(df: pd.DataFrame) -> pd.Series:
    return (df["task_group"] == "squad") | df["task"].astype(str).str.startswith("squad")


def _aggregate(values: pd.Series, agg: Agg) -> tuple[float, float, int]:
    """(value, std, n) over seeds; std is the sample std for ``mean`` and NaN for ``median``."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return math.nan, math.nan, 0
    if agg == "median":
        return float(values.median()), math.nan, len(values)
    return float(values.mean()), float(values.std(ddof=1)), len(values)  # std is NaN for one seed


# ----------------------------------------------------------------------------------------- summaries


def glue_summary(
    df: pd.DataFrame,
    which: Which = "best",
    agg: Agg = "mean",
    include_reference: bool = False,
    reference_path: str | os.PathLike = REFERENCE_CSV,
) -> pd.DataFrame:
    """GLUE numbers in tidy form, one row per table cell (the CSV output).

    Columns: ``row`` (the table's row label), ``source`` (``ours`` or ``paper``), ``model``,
    ``method``, ``budget_name``, ``adapter_params``, ``column`` (the table's header), ``task``,
    ``metric``, ``value`` (percent points), ``std``, ``n`` (seeds; for the average: tasks).
    Columns are the GLUE tasks present in our completed runs (none: an empty summary); the average
    covers them all, a row missing one of them gets none, and paper rows are recomputed over the same
    tasks unless all 8 are there. ``attrs["notes"]`` explains the conventions.
    """
    runs = _completed(df, GLUE_TASKS)
    runs = runs.assign(score=task_scores(runs, which))
    records = _metric_records(runs, GLUE_COLUMNS, which, agg, scale=100.0)
    ours_tasks = {r["task"] for r in records}
    covered = [t for t in GLUE_TASKS if t in ours_tasks]
    ave_header = "All Ave." if len(covered) == len(GLUE_TASKS) else f"Ave. ({len(covered)} tasks)"
    for _, group in _groups(runs):
        per_task = [_aggregate(group.loc[group["task"] == t, "score"], agg)[0] for t in covered]
        if covered and not any(math.isnan(v) for v in per_task):
            average = float(np.mean(per_task))
            records.append(_record(group, ave_header, "glue", "all_average", average, math.nan, len(covered)))
    if include_reference and covered:
        records += _glue_reference_records(load_reference(reference_path), covered, ave_header)
    summary = _summary_frame(records, [h for h, t, _ in GLUE_COLUMNS if t in covered] + [ave_header])
    value_word = "median over seeds" if agg == "median" else "mean ± sample std over seeds"
    notes = [f"Cells: {value_word} of the {which} checkpoint's dev metric, ×100; n = seeds."]
    if covered:
        scope = "the 8 GLUE tasks" if len(covered) == len(GLUE_TASKS) else ", ".join(covered)
        notes.append(
            f"{ave_header}: mean over {scope} with the paper's convention ({GLUE_CONVENTION}); "
            "rows missing one of these tasks have none."
        )
    if include_reference and covered:
        notes.append(
            f"paper: rows are {REFERENCE_SOURCE} Table 1 (DeBERTaV3-base, mean of 5 seeds)"
            + ("." if len(covered) == len(GLUE_TASKS) else f"; their {ave_header} is recomputed over the same tasks.")
        )
    summary.attrs["notes"] = notes
    return summary


def squad_summary(
    df: pd.DataFrame,
    which: Which = "best",
    agg: Agg = "mean",
    include_reference: bool = False,
    reference_path: str | os.PathLike = REFERENCE_CSV,
) -> pd.DataFrame:
    """SQuAD EM/F1 per task in tidy form, same columns as :func:`glue_summary` (values already in %)."""
    runs = df[(df["status"] == "completed") & _is_squad(df)]
    tasks = sorted(runs["task"].unique())
    pairs = [("EM", "exact"), ("F1", "f1")]
    columns = [(f"{SQUAD_NAMES.get(t, t)} {label}", t, key) for t in tasks for label, key in pairs]
    records = _metric_records(runs, columns, which, agg, scale=1.0)
    if include_reference:
        ref = load_reference(reference_path)
        ref = ref[(ref["table"] == "Table 2") & ref["task"].isin(tasks)]
        for (method, budget), group in ref.groupby(["method", "budget_label"], sort=False):
            label = f"paper: {method} {budget}"
            for header, task, key in columns:
                hit = group.loc[(group["task"] == task) & (group["metric"] == key), "value"]
                if len(hit):
                    records.append(_paper_record(label, method, budget, group, header, task, key, hit.iloc[0]))
    summary = _summary_frame(records, [header for header, _, _ in columns])
    value_word = "median over seeds" if agg == "median" else "mean ± sample std over seeds"
    notes = [f"Cells: {value_word} of the {which} checkpoint's EM / F1 (percent); n = seeds."]
    if include_reference:
        notes.append(f"paper: rows are {REFERENCE_SOURCE} Table 2 (DeBERTaV3-base; budget as a fraction of 184M).")
    summary.attrs["notes"] = notes
    return summary


def _completed(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    return df[(df["status"] == "completed") & df["task"].isin(tasks)]


def _groups(runs: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Runs grouped by (model, method, budget), ordered by model, method, then adapter size."""
    groups = list(runs.groupby(["model", "method", "budget_name"], dropna=False, sort=False))
    return sorted(groups, key=lambda kv: (str(kv[0][0]), str(kv[0][1]), _nan_last(kv[1]["adapter_params"].median())))


def _nan_last(x: float) -> float:
    return math.inf if pd.isna(x) else float(x)


def _metric_records(runs: pd.DataFrame, columns: list[tuple], which: Which, agg: Agg, scale: float) -> list[dict]:
    """One record per (method × budget group, column) that has at least one value."""
    records = []
    for _, group in _groups(runs):
        for header, task, key in columns:
            column = f"{which}.{key}"
            if column not in group:
                continue
            value, std, n = _aggregate(group.loc[group["task"] == task, column] * scale, agg)
            if n:
                records.append(_record(group, header, task, key, value, std, n))
    return records


def _record(group: pd.DataFrame, column, task, metric, value, std, n) -> dict:
    """A cell of ours; ``group`` holds the runs of its row."""
    first = group.iloc[0]
    # The label uses the median size: adapter counts can differ slightly between runs of a budget.
    params = group["adapter_params"].median()
    return {
        # No rank target and no adapter (full fine-tuning): the row names no budget.
        "row": _row_label(first["method"], first["budget_name"], params,
                          ranked=not (pd.isna(first["target_rank"]) and params == 0)),
        "source": "ours",
        "model": first["model"],
        "method": first["method"],
        "budget_name": first["budget_name"],
        "adapter_params": params,
        "column": column,
        "task": task,
        "metric": metric,
        "value": value,
        "std": std,
        "n": n,
    }


def _row_label(method, budget, params, ranked: bool = True) -> str:
    if not ranked:  # no rank budget (full fine-tuning): "r2 (0.00M)" would misdescribe it
        return f"{method} (all weights)"
    size = "" if pd.isna(params) else f" ({params / 1e6:.2f}M)"
    budget = "" if pd.isna(budget) else f" {budget}"
    return f"{method}{budget}{size}"


def _paper_record(label, method, budget, group, column, task, metric, value) -> dict:
    params_m = group["params_m"].dropna()
    return {
        "row": label,
        "source": "paper",
        "model": group["model"].iloc[0],
        "method": method,
        "budget_name": budget,
        "adapter_params": float(params_m.iloc[0]) * 1e6 if len(params_m) else math.nan,
        "column": column,
        "task": task,
        "metric": metric,
        "value": float(value),
        "std": math.nan,
        "n": math.nan,
    }


def _glue_reference_records(ref: pd.DataFrame, covered: list[str], ave_header: str) -> list[dict]:
    records = []
    ref = ref[ref["table"] == "Table 1"]
    for (method, budget), group in ref.groupby(["method", "budget_label"], sort=False):
        params = float(group["params_m"].iloc[0])
        label = f"paper: {method} ({params:.0f}M)" if params >= 10 else f"paper: {method} ({params:.2f}M)"
        value = {(t, m): v for t, m, v in group[["task", "metric", "value"]].itertuples(index=False)}
        for header, task, key in GLUE_COLUMNS:
            if task in covered:
                records.append(_paper_record(label, method, budget, group, header, task, key, value[task, key]))
        if len(covered) == len(GLUE_TASKS):
            average = value["glue", "all_average"]  # as printed
        else:
            average = np.mean([np.mean([value[t, k] for k in GLUE_TASK_SCORE[t]]) for t in covered])
        record = _paper_record(label, method, budget, group, ave_header, "glue", "all_average", average)
        records.append({**record, "n": len(covered)})
    return records


def _summary_frame(records: list[dict], column_order: list[str]) -> pd.DataFrame:
    columns = ["row", "source", "model", "method", "budget_name", "adapter_params", "column", "task", "metric",
               "value", "std", "n"]  # fmt: skip
    ours = [r for r in records if r["source"] == "ours"]
    if len({r["model"] for r in ours}) > 1:  # name the model only when several share a table
        for r in ours:
            r["row"] = f"{r['model']}: {r['row']}"
    summary = pd.DataFrame(records, columns=columns)
    summary["n"] = summary["n"].astype("Int64")
    summary.attrs["column_order"] = [c for c in column_order if c in set(summary["column"])]
    return summary


# ----------------------------------------------------------------------------------------- tables


def format_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Pivot a tidy summary into the paper's layout with formatted string cells ('–' where empty)."""
    order = summary.attrs.get("column_order") or list(dict.fromkeys(summary["column"]))
    cells = {(r.row, r.column): _cell(r) for r in summary.itertuples(index=False)}
    rows = list(dict.fromkeys(summary["row"]))
    table = pd.DataFrame([[cells.get((row, col), "–") for col in order] for row in rows], index=rows, columns=order)
    table.index.name = "method / budget"
    table.attrs["notes"] = list(summary.attrs.get("notes", []))
    return table


def _cell(r) -> str:
    if r.source == "paper" or r.metric == "all_average":
        return f"{r.value:.2f}"
    spread = "" if pd.isna(r.std) else f" ± {r.std:.2f}"
    return f"{r.value:.2f}{spread} (n={r.n})"


def glue_table(
    df: pd.DataFrame,
    which: Which = "best",
    agg: Agg = "mean",
    include_reference: bool = False,
    reference_path: str | os.PathLike = REFERENCE_CSV,
) -> pd.DataFrame:
    """The GLUE table in the AdaLoRA paper's Table 1 layout; see :func:`glue_summary` for the numbers."""
    return format_table(glue_summary(df, which, agg, include_reference, reference_path))


def squad_table(
    df: pd.DataFrame,
    which: Which = "best",
    agg: Agg = "mean",
    include_reference: bool = False,
    reference_path: str | os.PathLike = REFERENCE_CSV,
) -> pd.DataFrame:
    """The SQuAD EM/F1 table, one column pair per SQuAD task; see :func:`squad_summary`."""
    return format_table(squad_summary(df, which, agg, include_reference, reference_path))


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table followed by the table's notes."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(label), *map(str, row)]) + " |" for label, row in table.iterrows()]
    notes = table.attrs.get("notes", [])
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``) with the notes under the rule."""
    ncols = len(table.columns) + 1

    def row(cells) -> str:
        return " & ".join(_latex_escape(str(c)) for c in cells) + r" \\"

    lines = [rf"\begin{{tabular}}{{l{'r' * (ncols - 1)}}}", r"\toprule", row([table.index.name or "", *table.columns])]
    lines += [r"\midrule", *(row([label, *cells]) for label, cells in table.iterrows()), r"\bottomrule"]
    notes = table.attrs.get("notes", [])
    lines += [rf"\multicolumn{{{ncols}}}{{l}}{{\footnotesize {_latex_escape(note)}}} \\" for note in notes]
    return "\n".join(lines + [r"\end{tabular}"]) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "–": "--", "×": r"$\times$"}  # fmt: skip


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


# ----------------------------------------------------------------------------------------- plots


def plot_metric_vs_params(df: pd.DataFrame, which: Which = "best", agg: Agg = "mean") -> Figure:
    """One subplot per task: the task score (:func:`task_scores`) against adapter parameters,
    one line per method, one point per budget (error bars: sample std over seeds for ``mean``)."""
    runs = df[df["status"] == "completed"]
    runs = runs.assign(score=task_scores(runs, which)).dropna(subset=["score"])
    tasks = [t for t in GLUE_TASKS if t in set(runs["task"])] + sorted(set(runs["task"]) - set(GLUE_TASKS))
    ncols = max(1, min(4, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # One colour and marker per method across all subplots, so a method is recognisable everywhere.
    styles = {m: (f"C{i % 10}", "osD^vP*X"[i % 8]) for i, m in enumerate(sorted(runs["method"].unique()))}
    for ax, task in zip(axes, tasks):
        for method, by_method in runs[runs["task"] == task].groupby("method"):
            points = []
            for _, budget_runs in by_method.groupby("budget_name", dropna=False):
                value, std, _ = _aggregate(budget_runs["score"], agg)
                points.append((budget_runs["adapter_params"].median() / 1e6, value, std))
            x, y, err = map(np.array, zip(*sorted(points)))
            color, marker = styles[method]
            yerr = None if np.isnan(err).all() else err
            ax.errorbar(x, y, yerr=yerr, color=color, marker=marker, capsize=3, label=method)
        ax.set_title(PLOT_TITLES.get(task, task))
        ax.set_xlabel("adapter parameters (M)")
        ax.set_ylabel(f"{agg} over seeds, {which} ckpt (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    if not tasks:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def rank_heatmap(ranks: Mapping | pd.Series, ax=None, title: str | None = None) -> Figure:
    """Heatmap of ranks, layers × matrix type, from a ``{module_name: rank}`` dict.

    The layer is the number after ``layer.`` in the module name, the matrix type what follows it
    (``query``/``key``/``value``/``attention.output``/``intermediate``/``output``; DeBERTa's
    ``query_proj`` counts as ``query``). Modules without a layer index are left out. Also accepts
    a result dict (``budget.ranks``) or a :func:`load_results` row (``ranks``). Draws on ``ax`` when
    given and returns its figure.
    """
    ranks = _ranks_of(ranks)
    cells = {}
    for name, rank in ranks.items():
        match = _LAYER_RE.search(name)
        if match:
            cells[int(match.group(1)), _matrix_type(match.group(2))] = rank
    if not cells:
        raise ValueError("no module name with a 'layer.<index>.' part in the ranks")
    layers = sorted({layer for layer, _ in cells})
    present = {kind for _, kind in cells}
    kinds = [k for k in MATRIX_TYPES if k in present] + sorted(present - set(MATRIX_TYPES))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), rank in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = rank
    if ax is None:
        fig = Figure(figsize=(1.6 + 0.9 * len(kinds), 1.2 + 0.32 * len(layers)), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    vmax = max(np.nanmax(grid), 1)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    for (i, j), rank in np.ndenumerate(grid):
        if not np.isnan(rank):  # viridis is dark at the low end: white text there
            ax.text(j, i, f"{rank:g}", ha="center", va="center", fontsize=8, color="w" if rank < vmax / 2 else "k")
    ax.set_xticks(range(len(kinds)), labels=kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), labels=[str(layer) for layer in layers])
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    return fig


def _ranks_of(obj: Mapping | pd.Series) -> Mapping:
    if isinstance(obj, pd.Series):
        obj = obj.to_dict()
    if isinstance(obj.get("budget"), Mapping):
        return obj["budget"].get("ranks") or {}
    if isinstance(obj.get("ranks"), Mapping):
        return obj["ranks"]
    return obj


def _matrix_type(suffix: str) -> str:
    parts = suffix.split(".")
    if parts[:2] == ["attention", "output"]:
        return "attention.output"
    if parts[0] in ("intermediate", "output"):
        return parts[0]
    return parts[-1].removesuffix("_proj")


# ----------------------------------------------------------------------------------------- CLI


def _atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temp file beside ``path``, then rename it into place, so a
    reader never sees a half-written table (and a crash leaves the previous one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; tables are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _formats(value: str) -> list[str]:
    formats = [f.strip() for f in value.split(",") if f.strip()]
    unknown = sorted(set(formats) - {"md", "tex", "csv"})
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown}; choose from md, tex, csv")
    return formats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triadapt.report",
        description="Paper-style tables and plots from the result.json files under RESULTS_DIR.",
    )
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS_DIR")
    parser.add_argument("--which", choices=["best", "final"], default="best", help="checkpoint (default: best)")
    parser.add_argument("--agg", choices=["mean", "median"], default="mean", help="over seeds (default: mean)")
    parser.add_argument("--reference", action="store_true", help="add the AdaLoRA paper's rows")
    parser.add_argument("--out", type=Path, help="output folder (default: the first RESULTS_DIR)")
    parser.add_argument("--format", type=_formats, default="md,tex,csv", help="comma list of md, tex, csv")
    args = parser.parse_args(argv)

    df, problems = load_results(args.results)
    if df.empty and not problems:
        print(f"no result.json under {', '.join(map(str, args.results))}", file=sys.stderr)
        return 1
    out = args.out or args.results[0]
    out.mkdir(parents=True, exist_ok=True)

    summaries = {
        "glue": ("GLUE", glue_summary(df, args.which, args.agg, args.reference)),
        "squad": ("SQuAD", squad_summary(df, args.which, args.agg, args.reference)),
    }
    summaries = {name: (title, summary) for name, (title, summary) in summaries.items() if not summary.empty}
    for name, (title, summary) in summaries.items():
        table = format_table(summary)
        print(f"## {title}\n\n{to_markdown(table)}")
        render = {"md": lambda: to_markdown(table), "tex": lambda: to_latex(table),
                  "csv": lambda: summary.to_csv(index=False)}  # fmt: skip
        for fmt in args.format:
            _write_text(out / f"table_{name}.{fmt}", render[fmt]())
    written = [f"table_{name}.{fmt}" for name in summaries for fmt in args.format]
    if (df["status"] == "completed").any():
        fig = plot_metric_vs_params(df, args.which, args.agg)
        _atomic_write(out / "metric_vs_params.png", lambda fh: fig.savefig(fh, format="png", dpi=120))
        written.append("metric_vs_params.png")

    skipped = runs_not_included(df)
    if len(skipped) or problems:
        print(f"## Not included ({len(skipped)} incomplete runs, {len(problems)} unreadable files)\n")
        for run in skipped.itertuples(index=False):
            error = f" — {run.error}" if isinstance(run.error, str) else ""
            print(f"- {run.status}: {run.task} {run.method} {run.budget_name} seed={run.seed} ({run.run_dir}){error}")
        for problem in problems:
            print(f"- unreadable: {problem['path']} — {problem['problem']}")
    if written:
        print(f"\nwrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
