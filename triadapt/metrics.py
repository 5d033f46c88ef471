"""GLUE metrics computed offline with scikit-learn and scipy.

``evaluate.load("glue", …)`` fetches its metric script from the hub at run time and fails
offline, so the harness computes the same numbers directly, under the key names
``evaluate`` uses (``accuracy``, ``f1``, ``matthews_correlation``, ``pearson``,
``spearmanr``), plus ``pearson_spearman_mean``, the STS-B number the papers report.
SQuAD 2.0 scoring lives in :mod:`triadapt.squad_eval`.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from triadapt.errors import ConfigError

METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "pearson_spearman_mean")


def compute_metrics(names: list[str], predictions, references) -> dict[str, float]:
    """Metric name → value for class ids (classification) or scores (regression)."""
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    out: dict[str, float] = {}
    if "accuracy" in names:
        out["accuracy"] = float(accuracy_score(refs, preds))
    if "f1" in names:
        out["f1"] = float(f1_score(refs, preds))
    if "matthews_correlation" in names:
        out["matthews_correlation"] = float(matthews_corrcoef(refs, preds))
    if {"pearson", "spearmanr", "pearson_spearman_mean"} & set(names):
        # A constant prediction has no correlation; report 0 rather than NaN so runs stay comparable.
        constant = np.all(preds == preds[0])
        p = 0.0 if constant else float(pearsonr(preds, refs)[0])
        s = 0.0 if constant else float(spearmanr(preds, refs)[0])
        out |= {"pearson": p, "spearmanr": s, "pearson_spearman_mean": (p + s) / 2}
    return {k: out[k] for k in names}
