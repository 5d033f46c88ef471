"""Task metrics, computed through the local ``evaluate`` modules in :mod:`triadapt.evaluate_metrics`.

``evaluate.load("glue", …)`` fetches its script from the hub at run time and fails offline, so the
package ships its own ``glue`` and ``squad_v2`` modules with the hub metrics' input and output
names; they load offline with ``evaluate.load(triadapt.evaluate_metrics.path("glue"), "mrpc")``.
The numbers come from :func:`glue_scores` (scikit-learn / scipy) and
:func:`triadapt.squad_eval.squad_v2_metrics` (the official SQuAD 2.0 script's arithmetic).
The harness adds ``pearson_spearman_mean``, the STS-B number the papers report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from triadapt.errors import ConfigError

METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "pearson_spearman_mean")
#: the glue module's configurations and what each returns (as the hub's ``glue`` metric)
GLUE_CONFIGS = {
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    **{
        name: ("accuracy",)
        for name in ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
    },
}
#: metric name → the glue configuration that computes it
_CONFIG_OF = {"accuracy": "sst2", "f1": "mrpc", "matthews_correlation": "cola", "pearson": "stsb", "spearmanr": "stsb"}


def glue_scores(config_name: str, predictions, references) -> dict[str, float]:
    """The ``glue`` metric of one configuration: class ids (classification) or scores (STS-B)."""
    if config_name not in GLUE_CONFIGS:
        raise KeyError(f"glue configuration {config_name!r}; choose one of {', '.join(GLUE_CONFIGS)}")
    preds, refs = np.asarray(predictions), np.asarray(references)
    wanted = GLUE_CONFIGS[config_name]
    if "pearson" in wanted:
        # A constant prediction has no correlation; 0 rather than NaN keeps runs comparable.
        if np.all(preds == preds[0]):
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}
    if "matthews_correlation" in wanted:
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    out = {"accuracy": float(accuracy_score(refs, preds))}
    if "f1" in wanted:
        out["f1"] = float(f1_score(refs, preds))
    return out


def compute_metrics(names: list[str], predictions, references) -> dict[str, float]:
    """Metric name → value, through the local ``glue`` evaluate module."""
    from triadapt.evaluate_metrics import load

    unknown = set(names) - set(METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    configs = {_CONFIG_OF.get(n, "stsb") for n in names}
    if "mrpc" in configs:
        configs.discard("sst2")  # mrpc returns accuracy too
    out: dict[str, float] = {}
    for config in sorted(configs):
        out |= load("glue", config).compute(predictions=list(predictions), references=list(references))
    if "pearson_spearman_mean" in names:
        out["pearson_spearman_mean"] = (out["pearson"] + out["spearmanr"]) / 2
    return {k: float(out[k]) for k in names}


def compute_squad_v2(
    examples: Sequence[Mapping],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float],
    no_answer_threshold: float | None = 1.0,
) -> dict[str, float]:
    """SQuAD 2.0 metrics of ``examples`` (hub-format rows: id, answers) through the local
    ``squad_v2`` evaluate module; ``null_odds`` are the no-answer scores."""
    from triadapt.evaluate_metrics import load

    missing = [ex["id"] for ex in examples if ex["id"] not in predictions]
    if missing:
        from triadapt.errors import DataError

        raise DataError(f"{len(missing)} of {len(examples)} questions have no prediction (first: {missing[0]})")
    metrics = load("squad_v2").compute(
        predictions=[
            {"id": ex["id"], "prediction_text": predictions[ex["id"]], "no_answer_probability": null_odds[ex["id"]]}
            for ex in examples
        ],
        references=[
            {
                "id": ex["id"],
                "answers": {"text": list(ex["answers"]["text"]), "answer_start": list(ex["answers"]["answer_start"])},
            }
            for ex in examples
        ],
        no_answer_threshold=no_answer_threshold,
    )
    return {key: float(value) for key, value in metrics.items()}
