import math

import pytest

from triadapt.errors import ConfigError
from triadapt.metrics import compute_metrics


def test_accuracy_and_f1_by_hand():
    # tp=2, fp=1, fn=1, tn=1 → acc 3/5, precision 2/3, recall 2/3, f1 2/3
    m = compute_metrics(["accuracy", "f1"], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 / 3)


def test_matthews_by_hand():
    # tp=2 tn=1 fp=1 fn=1: (2·1 − 1·1)/sqrt(3·3·2·2) = 1/6
    m = compute_metrics(["matthews_correlation"], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["matthews_correlation"] == pytest.approx(1 / 6)


def test_correlations_by_hand():
    preds, refs = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    m = compute_metrics(["pearson", "spearmanr", "pearson_spearman_mean"], preds, refs)
    # pearson: cov = (−1.5·−1.5 + −0.5·0.5 + 0.5·−0.5 + 1.5·1.5)/4 = 1.0, var = 1.25 each → 0.8
    assert m["pearson"] == pytest.approx(0.8)
    # spearman: ranks are the values themselves → same 0.8
    assert m["spearmanr"] == pytest.approx(0.8)
    assert m["pearson_spearman_mean"] == pytest.approx(0.8)


def test_constant_regression_prediction_is_zero_not_nan():
    m = compute_metrics(["pearson", "spearmanr", "pearson_spearman_mean"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert not any(math.isnan(v) for v in m.values()) and m["pearson"] == 0.0


def test_unknown_metric_is_rejected():
    with pytest.raises(ConfigError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])
