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
    ``budget.ranks`` dict, ``settings`` the run's settings (:func:`run_settings`), ``field_problems``
    the fields read as missing because they were not numbers, ``metric_problems`` the metrics that
    are null, NaN or not numbers) plus one ``best.<key>`` / ``final.<key>`` column per numeric metric.
    Returns ``(df, problems)``: files that cannot be read or parsed, or lack task, method or status,
    are skipped and described in ``problems`` as ``{"path": ..., "problem": ...}`` dicts; runs of any
    status are kept.
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
    df = df.reindex(columns=RUN_COLUMNS + extra)
    for column in _NUMERIC_FIELDS:
        df[column] = df[column].astype(float)
    return df, problems


_TEXT_FIELDS = ("task_group", "model", "budget_name", "main_metric")
_NUMERIC_FIELDS = ("seed", "target_rank", "adapter_params", "head_params", "best_step", "train_s", "steps",
                   "step_s_median", "peak_mem_mb")  # fmt: skip


def _flatten(result: object, file: Path) -> dict:
    if not isinstance(result, dict):
        raise ValueError("result.json does not hold a JSON object")
    missing = [key for key in ("task", "method", "status") if not isinstance(result.get(key), str) or not result[key]]
    if missing:
        raise ValueError(f"result.json lacks {', '.join(missing)} (or they are not text)")
    field_problems: list[str] = []
    metrics = _as_dict(result.get("metrics"))
    budget = _as_dict(result.get("budget"))
    timing = _as_dict(result.get("timing"))
    error = result.get("error")
    if isinstance(error, dict):
        error = f"{error.get('type', 'Error')}: {error.get('message', '')}"
    elif error is not None and not isinstance(error, str):
        error = str(error)
    row = {
        "task": result["task"],
        "method": result["method"],
        **{key: _text(result.get(key), key, field_problems) for key in _TEXT_FIELDS},
        "seed": _seed(result.get("seed"), field_problems),
        **{key: _number(budget.get(key), f"budget.{key}", field_problems)
           for key in ("target_rank", "adapter_params", "head_params")},
        "status": result["status"],
        "error": error,
        "best_step": _number(metrics.get("best_step"), "metrics.best_step", field_problems),
        **{key: _number(timing.get(key), f"timing.{key}", field_problems)
           for key in ("train_s", "steps", "step_s_median", "peak_mem_mb")},
        "run_dir": str(file.parent),
        "ranks": _ranks(budget.get("ranks"), field_problems),
        "settings": run_settings(result),
    }  # fmt: skip
    metric_problems = {}
    for which in ("best", "final"):
        values = metrics.get(which)
        if values is not None and not isinstance(values, dict):
            metric_problems[which] = f"metrics.{which} is not an object ({_short(values)})"
        for key, value in _as_dict(values).items():
            name = f"{which}.{key}"
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[name] = float(value)
            elif "reason" not in key and not isinstance(value, (dict, list)):
                what = "null" if value is None else "NaN" if _is_nan(value) else f"not a number ({_short(value)})"
                reason = _metric_reason(metrics, which, key)
                metric_problems[name] = f"{name} is {what}" + (f": {reason}" if reason else "")
    row["field_problems"] = field_problems
    row["metric_problems"] = metric_problems
    return row


def _ranks(ranks: object, problems: list[str]) -> dict | None:
    """``budget.ranks`` as ``{module: rank}``; a non-numeric rank is dropped and named."""
    if ranks is None:
        return None
    if not isinstance(ranks, dict):
        problems.append(f"budget.ranks {_short(ranks)} is not an object (read as missing)")
        return None
    good = {str(k): v for k, v in ranks.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(good) < len(ranks):
        problems.append(f"budget.ranks: {len(ranks) - len(good)} ranks are not numbers (left out)")
    return good


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _metric_reason(metrics: dict, which: str, key: str) -> str | None:
    """The reason a run recorded for a missing metric, wherever it put it: ``<key>_reason`` beside the
    value, or a ``reasons``/``null_reasons``/``notes``-style dict (keyed by metric) in ``metrics`` or
    ``metrics[which]``."""
    for holder in (_as_dict(metrics.get(which)), metrics):
        for name, value in holder.items():
            if "reason" not in str(name) and "note" not in str(name):
                continue
            if isinstance(value, str) and name in (f"{key}_reason", f"{key}.reason"):
                return value
            if isinstance(value, dict):
                hit = value.get(key, value.get(f"{which}.{key}"))
                if isinstance(hit, str):
                    return hit
    return None


def _text(value: object, name: str, problems: list[str]) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(f"{name} {_short(value)} is not text (read as missing)")
    return None


def _number(value: object, name: str, problems: list[str]) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    problems.append(f"{name} {_short(value)} is not a number (read as missing)")
    return math.nan


def _seed(value: object, problems: list[str]) -> float:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
    ):
        return float(value)
    problems.append(f"seed {_short(value)} is not an integer")
    return math.nan


# Settings that name or locate a run, or only change how it is logged, checkpointed or placed: they do
# not change what is measured, so runs that differ only in them share a row (and are duplicates when
# the seed is the same too).
PER_RUN_KEYS = ("seed", "paths", "run_dir", "logger", "resume", "debug", "data.dir", "experiment_name",
                "train.device", "train.eval_batch_size", "train.fused_optimizer", "train.cuda_graphs", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints", "train.save_adapter", "hydra")  # fmt: skip


def run_settings(result: Mapping) -> dict[str, str]:
    """A run's settings as ``{dotted key: JSON text}``: its ``config`` flattened, plus the entries of a
    top-level ``protocol`` dict (as ``protocol.<key>``), without :data:`PER_RUN_KEYS`."""
    settings = {}
    for prefix, tree in (("", result.get("config")), ("protocol.", result.get("protocol"))):
        for key, value in _flat_items(_as_dict(tree)):
            if not any(key == k or key.startswith(k + ".") for k in PER_RUN_KEYS):
                settings[prefix + key] = json.dumps(value, sort_keys=True)
    return settings


def _flat_items(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _as_dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def runs_not_included(df: pd.DataFrame, which: Which = "best") -> pd.DataFrame:
    """The runs that no number includes, with the reason: runs whose status is not ``completed``,
    completed runs without a numeric score for the ``which`` checkpoint, runs without an integer seed,
    and second copies of a seed (same task, method, budget, model and settings)."""
    columns = ["status", "task", "method", "budget_name", "seed", "error", "run_dir", "reason"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    _, excluded = _split_included(df, which)
    return excluded.reindex(columns=columns).reset_index(drop=True)


def field_notes(df: pd.DataFrame) -> list[str]:
    """One line per run with fields read as missing because they held something else."""
    if df.empty or "field_problems" not in df:
        return []
    return [f"{run_dir}: {'; '.join(p)}" for run_dir, p in zip(df["run_dir"], df["field_problems"])
            if isinstance(p, list) and p]  # fmt: skip


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


# ----------------------------------------------------------------------------------------- included runs


def included_runs(df: pd.DataFrame, which: Which = "best") -> pd.DataFrame:
    """The runs every table, plot and comparison counts, one per (row, task, seed).

    Completed runs with an integer seed and a numeric score (:func:`task_scores`) for the ``which``
    checkpoint, with a second copy of a seed dropped (same model, method, budget, task, seed and
    settings: the first by folder path is kept). Added columns: ``score``, ``variant`` (the settings
    that split a method × budget into several rows, ``""`` when none) and ``row`` (the table's label,
    prefixed by the model when there are several). :func:`runs_not_included` lists the rest.
    """
    return _split_included(df, which)[0]


def _split_included(df: pd.DataFrame, which: Which) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = df.copy()
    df["reason"] = None
    incomplete = df["status"] != "completed"
    df.loc[incomplete, "reason"] = [_incomplete_reason(run) for run in df[incomplete].itertuples()]
    df["score"] = math.nan
    done = ~incomplete
    df.loc[done, "score"] = task_scores(df[done], which)
    no_seed = done & df["seed"].isna()
    df.loc[no_seed, "reason"] = "completed, but its seed is not an integer"
    no_score = done & ~no_seed & df["score"].isna()
    df.loc[no_score, "reason"] = [_score_problem(run, which) for _, run in df[no_score].iterrows()]
    runs = df[df["reason"].isna()].sort_values("run_dir", kind="stable")
    signature = runs["settings"].map(_signature)
    parts = [runs[c].astype(str) for c in ("model", "method", "budget_name", "task", "seed")] + [signature]
    keys = pd.Series(list(zip(*parts)), index=runs.index, dtype=object)
    kept: dict[tuple, str] = {}
    for index, key in keys.items():
        if key in kept:
            df.loc[index, "reason"] = (f"duplicate of {kept[key]} (same model, method, budget, task, seed and "
                                       "settings): counted once, there")  # fmt: skip
        else:
            kept[key] = runs.loc[index, "run_dir"]
    runs = _with_rows(df[df["reason"].isna()].drop(columns="reason"))
    excluded = df[df["reason"].notna()]
    return runs, excluded


def _incomplete_reason(run) -> str:
    error = f": {run.error}" if isinstance(run.error, str) and run.error else ""
    return f"{run.status}{error}"


def _score_problem(run: pd.Series, which: Which) -> str:
    """Why a completed run has no score: the metrics its score needs, and what they hold instead."""
    task = run["task"]
    if task in GLUE_TASK_SCORE:
        keys = GLUE_TASK_SCORE[task]
    elif _is_squad(run.to_frame().T).iloc[0]:
        keys = ("f1",)
    else:
        keys = (run["main_metric"],) if isinstance(run["main_metric"], str) else ()
    if not keys:
        return "completed, but it names no main_metric"
    problems = run["metric_problems"] if isinstance(run.get("metric_problems"), dict) else {}
    found = []
    for key in keys:
        name = f"{which}.{key}"
        if name in problems:
            found.append(problems[name])
        elif pd.isna(run.get(name, math.nan)):
            found.append(problems.get(which) or f"{name} is missing")
    return "completed, but " + "; ".join(dict.fromkeys(found))


def _signature(settings: object) -> str:
    return json.dumps(settings if isinstance(settings, dict) else {}, sort_keys=True)


def _with_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``variant`` and ``row``. Within one model × method × budget, a setting that differs between
    runs of the same task splits the runs into rows (``variant`` names it), so that seeds are never
    averaged across settings; settings that only differ between tasks (per-task recipes) do not."""
    runs = runs.assign(variant="", row="")
    for _, group in runs.groupby(["model", "method", "budget_name"], dropna=False, sort=False):
        settings = {i: s if isinstance(s, dict) else {} for i, s in group["settings"].items()}
        split = set()
        for _, cell in group.groupby("task"):
            keys = set().union(*(settings[i] for i in cell.index))
            split |= {k for k in keys if len({settings[i].get(k, "absent") for i in cell.index}) > 1}
        if split:
            for i in group.index:
                runs.loc[i, "variant"] = " ".join(f"{k}={_plain(settings[i].get(k, 'absent'))}" for k in sorted(split))
    for _, group in runs.groupby(["model", "method", "budget_name", "variant"], dropna=False, sort=False):
        first = group.iloc[0]
        params = group["adapter_params"].median()  # adapter counts can differ slightly between runs
        label = _row_label(first["method"], first["budget_name"], params, not _all_weights(group))
        runs.loc[group.index, "row"] = label + (f" [{first['variant']}]" if first["variant"] else "")
    models = runs["model"].map(_model_name)
    if models.nunique() > 1:  # name the model only when several are present
        runs["row"] = models + ": " + runs["row"]
    return runs


def _model_name(model: object) -> str:
    return "(no model)" if pd.isna(model) else str(model)


def _plain(value: str) -> str:
    return value[1:-1] if value.startswith('"') and value.endswith('"') else value


def settings_differences(runs: pd.DataFrame) -> list[str]:
    """What differs between the rows of a table, one line per setting, e.g.
    ``train.lr: 5e-05 (full (all weights)); 0.001 (lora r2 (0.08M), ...)``.

    Compared per task (rows of one task column); a setting whose split between rows is the same in
    every task is printed once, otherwise per task. ``method.*`` and ``budget.*`` settings are left
    out: they are what makes a row that method and budget. ``runs`` is :func:`included_runs` output.
    """
    per_key: dict[str, dict[str, tuple]] = {}
    for task, by_task in runs.groupby("task", sort=False):
        values: dict[str, dict[str, str]] = {}
        for row, cell in by_task.groupby("row", sort=False):
            settings = cell["settings"].iloc[0] if isinstance(cell["settings"].iloc[0], dict) else {}
            values[row] = settings
        keys = sorted(set().union(*values.values())) if values else []
        for key in keys:
            if key.startswith(("method.", "budget.", "protocol.recipe.method.")):
                continue
            by_row = {row: _plain(s.get(key, "absent")) for row, s in values.items()}
            if len(set(by_row.values())) > 1:
                per_key.setdefault(key, {})[task] = tuple(sorted(by_row.items()))
    lines, seen = [], set()
    for key, by_task in sorted(per_key.items(), key=lambda kv: kv[0].startswith("protocol.")):
        splits = set(by_task.values())
        # A protocol entry that groups the rows as the config setting of the same name does restates
        # that setting: printed once.
        partition = (key.rsplit(".", 1)[-1], tuple(sorted((t, _partition(v)) for t, v in by_task.items())))
        if key.startswith("protocol.") and partition in seen:
            continue
        seen.add(partition)
        if len(splits) == 1:
            lines.append(f"{key}: {_describe_split(next(iter(splits)))}")
        else:
            lines.append(f"{key}: " + " | ".join(f"{t}: {_describe_split(v)}" for t, v in by_task.items()))
    return lines


def _rows_by_value(by_row: tuple) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for row, value in by_row:
        groups.setdefault(value, []).append(row)
    return groups


def _partition(by_row: tuple) -> tuple:
    return tuple(sorted(tuple(rows) for rows in _rows_by_value(by_row).values()))


def _describe_split(by_row: tuple) -> str:
    return "; ".join(f"{value} ({', '.join(rows)})" for value, rows in _rows_by_value(by_row).items())


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
    runs = _included(df, which)
    runs = runs[runs["task"].isin(GLUE_TASKS)]
    records = _metric_records(runs, GLUE_COLUMNS, which, agg, scale=100.0)
    ours_tasks = {r["task"] for r in records}
    covered = [t for t in GLUE_TASKS if t in ours_tasks]
    ave_header = "All Ave." if len(covered) == len(GLUE_TASKS) else f"Ave. ({_count(len(covered), 'task')})"
    for _, group in _groups(runs):
        per_task = [_aggregate(group.loc[group["task"] == t, "score"], agg)[0] for t in covered]
        if covered and not any(math.isnan(v) for v in per_task):
            average = float(np.mean(per_task))
            records.append(_record(group, ave_header, "glue", "all_average", average, math.nan, len(covered)))
    if include_reference and covered:
        records += _glue_reference_records(load_reference(reference_path), covered, ave_header)
    summary = _summary_frame(records, [h for h, t, _ in GLUE_COLUMNS if t in covered] + [ave_header])
    value_word = "median over seeds" if agg == "median" else "mean ± sample std over seeds"
    notes = [
        (
            f"Cells: {value_word} of the {which} checkpoint's dev metric (--which {_other(which)}: the "
            f"{_other(which)} checkpoint's), ×100; n = seeds."
        )
    ]
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
    notes += _difference_notes(runs)
    summary.attrs["notes"] = notes
    return summary


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _other(which: Which) -> str:
    return "final" if which == "best" else "best"


def _included(df: pd.DataFrame, which: Which) -> pd.DataFrame:
    if df.empty:
        return df.assign(score=pd.Series(dtype=float), variant="", row="")
    return included_runs(df, which)


def _difference_notes(runs: pd.DataFrame) -> list[str]:
    if runs["row"].nunique() < 2:
        return []
    lines = settings_differences(runs)
    if not lines:
        return ["Settings: the rows' runs share every setting but the method's own (method.*, budget.*)."]
    return ["Settings that differ between rows (besides method.* and budget.*): " + " · ".join(lines)]


def squad_summary(
    df: pd.DataFrame,
    which: Which = "best",
    agg: Agg = "mean",
    include_reference: bool = False,
    reference_path: str | os.PathLike = REFERENCE_CSV,
) -> pd.DataFrame:
    """SQuAD EM/F1 per task in tidy form, same columns as :func:`glue_summary` (values already in %)."""
    runs = _included(df, which)
    runs = runs[_is_squad(runs)] if len(runs) else runs
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
    notes = [
        (
            f"Cells: {value_word} of the {which} checkpoint's EM / F1 (percent; --which {_other(which)}: the "
            f"{_other(which)} checkpoint's); n = seeds."
        )
    ]
    if include_reference:
        notes.append(f"paper: rows are {REFERENCE_SOURCE} Table 2 (DeBERTaV3-base; budget as a fraction of 184M).")
    notes += _difference_notes(runs)
    summary.attrs["notes"] = notes
    return summary


def _groups(runs: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Runs grouped by table row, ordered by model, method, adapter size, then variant."""
    groups = list(runs.groupby(["model", "method", "budget_name", "variant"], dropna=False, sort=False))
    return sorted(groups, key=lambda kv: (str(kv[0][0]), str(kv[0][1]), _nan_last(kv[1]["adapter_params"].median()),
                                          str(kv[0][3])))  # fmt: skip


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
    params = group["adapter_params"].median()
    return {
        "row": first["row"],
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


def _all_weights(runs: pd.DataFrame) -> bool:
    """No rank target and no adapter: full fine-tuning (its row names no budget, its plot is a level)."""
    return bool(runs["target_rank"].isna().all() and runs["adapter_params"].median() == 0)


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
    one line per model × method (× settings variant), one point per budget (error bars: sample std
    over seeds for ``mean``). Points of different backbones are never joined: each model has its own
    lines, labelled ``model: method`` when there are several. Full fine-tuning (no rank budget, no
    adapter) is a dashed level with a ±std band, not a point at 0 adapter parameters."""
    runs = _included(df, which)
    tasks = [t for t in GLUE_TASKS if t in set(runs["task"])] + sorted(set(runs["task"]) - set(GLUE_TASKS))
    ncols = max(1, min(4, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    several_models = runs["model"].map(_model_name).nunique() > 1
    lines = ["model", "method", "variant"]
    names = sorted({_line_name(key, several_models) for key, _ in runs.groupby(lines, dropna=False)})
    # One colour and marker per line across all subplots, so a method is recognisable everywhere.
    styles = {name: (f"C{i % 10}", "osD^vP*X"[i % 8]) for i, name in enumerate(names)}
    for ax, task in zip(axes, tasks):
        for key, by_line in runs[runs["task"] == task].groupby(lines, dropna=False):
            name = _line_name(key, several_models)
            color, marker = styles[name]
            if _all_weights(by_line):
                # Full fine-tuning trains every weight, not "0 adapter parameters": a reference
                # level (± its spread) across the axis rather than a point at x = 0.
                value, std, _ = _aggregate(by_line["score"], agg)
                ax.axhline(value, color=color, linestyle="--", label=f"{name} (all weights)")
                if not np.isnan(std):
                    ax.axhspan(value - std, value + std, color=color, alpha=0.12, linewidth=0)
                continue
            points = []
            for _, budget_runs in by_line.groupby("budget_name", dropna=False):
                value, std, _ = _aggregate(budget_runs["score"], agg)
                points.append((budget_runs["adapter_params"].median() / 1e6, value, std))
            x, y, err = map(np.array, zip(*sorted(points)))
            yerr = None if np.isnan(err).all() else err
            ax.errorbar(x, y, yerr=yerr, color=color, marker=marker, capsize=3, label=name)
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


def _line_name(key: tuple, several_models: bool) -> str:
    model, method, variant = key
    name = f"{_model_name(model)}: {method}" if several_models else str(method)
    return f"{name} [{variant}]" if variant else name


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
    parser.add_argument(
        "--compare",
        type=_pair,
        action="append",
        metavar="A,B",
        help="instead of the tables: is row A better than row B beyond seed noise, and which is "
        "more stable (methods or row labels as printed; repeatable); writes nothing",
    )
    parser.add_argument(
        "--min-seeds", type=int, default=3, help="seeds per side below which --compare gives no verdict (default: 3)"
    )
    parser.add_argument(
        "--collapse",
        type=float,
        default=0.9,
        help="a seed below this fraction of its row's best seed on a task counts as collapsed (default: 0.9)",
    )
    args = parser.parse_args(argv)
    if args.min_seeds < 2:
        parser.error("--min-seeds must be at least 2")
    if not 0 < args.collapse <= 1:
        parser.error("--collapse must be in (0, 1]")

    df, problems = load_results(args.results)
    if df.empty and not problems:
        print(f"no result.json under {', '.join(map(str, args.results))}", file=sys.stderr)
        return 1
    if not df.empty:
        print(_run_counts(df) + "\n")
    if args.compare:
        from triadapt import claims  # imports scipy: only when comparing

        for a, b in args.compare:
            try:
                comparison = claims.compare(df, a, b, args.which, args.min_seeds, args.collapse)
            except ValueError as e:
                print(f"error: --compare {a},{b}: {e}", file=sys.stderr)
                return 2
            print(claims.format_comparison(comparison))
        _print_not_included(df, args.which, problems)
        return 0
    out = args.out or args.results[0]
    out.mkdir(parents=True, exist_ok=True)

    summaries = {
        "glue": ("GLUE", glue_summary(df, args.which, args.agg, args.reference)),
        "squad": ("SQuAD", squad_summary(df, args.which, args.agg, args.reference)),
    }
    summaries = {name: (title, summary) for name, (title, summary) in summaries.items() if not summary.empty}
    written = []
    for name, (title, summary) in summaries.items():
        written += _emit_table(out, name, f"{title} ({args.which} checkpoint)", format_table(summary), summary,
                               args.format)  # fmt: skip
    if summaries:
        from triadapt import claims

        table = claims.stability_table(df, args.which, args.collapse)
        tidy = claims.stability(included_runs(df, args.which), args.collapse)
        written += _emit_table(out, "stability", f"Stability ({args.which} checkpoint)", table, tidy, args.format)
    if len(_included(df, args.which)):
        fig = plot_metric_vs_params(df, args.which, args.agg)
        _atomic_write(out / "metric_vs_params.png", lambda fh: fig.savefig(fh, format="png", dpi=120))
        written.append("metric_vs_params.png")

    _print_not_included(df, args.which, problems)
    if written:
        print(f"\nwrote {', '.join(written)} to {out}")
    return 0


def _emit_table(out: Path, name: str, title: str, table: pd.DataFrame, tidy: pd.DataFrame,
                formats: list[str]) -> list[str]:
    """Print ``table`` under ``## title`` and write it as ``table_<name>.<fmt>`` (csv: the tidy frame);
    returns the names of the files written."""
    print(f"## {title}\n\n{to_markdown(table)}")
    render = {"md": lambda: to_markdown(table), "tex": lambda: to_latex(table),
              "csv": lambda: tidy.to_csv(index=False)}  # fmt: skip
    for fmt in formats:
        _write_text(out / f"table_{name}.{fmt}", render[fmt]())
    return [f"table_{name}.{fmt}" for fmt in formats]


def _pair(value: str) -> tuple[str, str]:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--compare takes two rows as A,B, got {value!r}")
    return parts[0], parts[1]


def _print_not_included(df: pd.DataFrame, which: Which, problems: list[dict]) -> None:
    skipped = runs_not_included(df, which)
    if len(skipped) or problems:
        print(f"## Not included ({_count(len(skipped), 'run')}, {_count(len(problems), 'unreadable file')})\n")
        for run in skipped.itertuples(index=False):
            print(
                f"- {run.status}: {run.task} {run.method} {run.budget_name} seed={_seed_text(run.seed)} "
                f"({run.run_dir}) — {run.reason}"
            )
        for problem in problems:
            print(f"- unreadable: {problem['path']} — {problem['problem']}")
    notes = field_notes(df)
    if notes:
        print("\n## Fields read as missing\n")
        print("\n".join(f"- {note}" for note in notes))


def _seed_text(seed: object) -> str:
    return "?" if pd.isna(seed) else f"{int(seed)}" if float(seed) == int(seed) else str(seed)


def _run_counts(df: pd.DataFrame) -> str:
    """``60 result.json files: 60 completed; methods: adalora (12), ...``: every job the folder holds."""
    status = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    methods = ", ".join(f"{m} ({n})" for m, n in sorted(df["method"].value_counts().items()))
    return f"{_count(len(df), 'result.json file')}: {status}; methods: {methods}"


if __name__ == "__main__":
    sys.exit(main())
