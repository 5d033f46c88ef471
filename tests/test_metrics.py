import math

import pytest

from triadapt.errors import ConfigError
from triadapt.metrics import GLUE_CONFIGS, compute_metrics


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


# --------------------------------------------------------------------------- evaluate modules

GLUE_TASKS = {"mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "sst2": "SST-2", "rte": "RTE", "qnli": "QNLI"}


def todays_glue(names: list[str], preds, refs) -> dict[str, float]:
    """The harness's computation before the evaluate modules (scikit-learn / scipy directly)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    if "accuracy" in names:
        out["accuracy"] = float(accuracy_score(refs, preds))
    if "f1" in names:
        out["f1"] = float(f1_score(refs, preds))
    if "matthews_correlation" in names:
        out["matthews_correlation"] = float(matthews_corrcoef(refs, preds))
    if {"pearson", "spearmanr", "pearson_spearman_mean"} & set(names):
        constant = np.all(preds == preds[0])
        p = 0.0 if constant else float(pearsonr(preds, refs)[0])
        s = 0.0 if constant else float(spearmanr(preds, refs)[0])
        out |= {"pearson": p, "spearmanr": s, "pearson_spearman_mean": (p + s) / 2}
    return {k: out[k] for k in names}


def test_modules_load_offline_with_the_hub_metrics_names():
    import evaluate

    from triadapt.evaluate_metrics import path

    mrpc = evaluate.load(path("glue"), "mrpc")
    assert mrpc.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    assert set(evaluate.load(path("glue"), "cola").compute(predictions=[1, 0], references=[1, 0])) == {
        "matthews_correlation"}
    stsb = evaluate.load(path("glue"), "stsb").compute(predictions=[1.0, 2.5, 2.0], references=[1.0, 2.0, 3.0])
    assert set(stsb) == {"pearson", "spearmanr"}
    with pytest.raises(KeyError, match="glue configuration 'mrcp'"):
        evaluate.load(path("glue"), "mrcp")
    squad = evaluate.load(path("squad_v2")).compute(
        predictions=[{"id": "q1", "prediction_text": "the cat", "no_answer_probability": 0.1},
                     {"id": "q2", "prediction_text": "", "no_answer_probability": 0.9}],
        references=[{"id": "q1", "answers": {"text": ["cat"], "answer_start": [4]}},
                    {"id": "q2", "answers": {"text": [], "answer_start": []}}],
    )  # fmt: skip
    assert squad["exact"] == 100.0 and squad["total"] == 2 and squad["HasAns_total"] == squad["NoAns_total"] == 1
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} <= set(squad)


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_glue_module_gives_todays_numbers_on_real_dev_sets(task, glue_dir):
    import evaluate
    import numpy as np
    from conftest import CONF
    from omegaconf import OmegaConf

    from triadapt.data.glue import read_glue_tsv
    from triadapt.evaluate_metrics import path

    _, labels = read_glue_tsv(glue_dir / GLUE_TASKS[task] / "dev.tsv", task)
    refs = np.asarray(labels)
    rng = np.random.default_rng(0)
    if task == "stsb":
        preds = (refs + rng.normal(0, 1.0, len(refs))).astype(np.float32).astype(np.float64)  # as the model gives
    else:
        preds = np.where(rng.random(len(refs)) < 0.3, 1 - refs, refs).astype(np.int64)  # 30% wrong
    names = list(OmegaConf.load(CONF / "task" / "glue" / f"{task}.yaml").metrics)
    expected = todays_glue(names, preds, refs)
    assert compute_metrics(names, preds, refs) == expected  # the harness, through the module: identical
    direct = evaluate.load(path("glue"), task).compute(predictions=preds, references=refs)
    assert direct == todays_glue(list(GLUE_CONFIGS[task]), preds, refs)  # the hub glue metric's keys


def test_squad_module_gives_todays_numbers_on_the_real_dev_set(shared_data):
    import json

    import numpy as np

    from triadapt.data.squad import load_official_json
    from triadapt.metrics import compute_squad_v2
    from triadapt.squad_eval import squad_v2_metrics

    dev = shared_data / "squad_v2" / "dev-v2.0.json"
    if not dev.is_file():
        pytest.skip(f"{dev} not found")
    examples = load_official_json(dev)
    gold = {ex["id"]: ex["answers"]["text"] for ex in examples}
    abstain = dict.fromkeys(gold, "")
    always = compute_squad_v2(examples, abstain, dict.fromkeys(gold, 1.0))
    assert always["total"] == 11873 and round(always["exact"], 2) == round(always["f1"], 2) == 50.07
    assert always["exact"] == squad_v2_metrics(gold, abstain)["exact"]

    rng = np.random.default_rng(0)
    odds = dict(zip(gold, rng.normal(0.0, 3.0, len(gold)).tolist()))
    texts = {}
    for i, ex in enumerate(examples):  # right, partly right, abstaining and wrong answers
        answer = ex["answers"]["text"][0] if ex["answers"]["text"] else ""
        texts[ex["id"]] = [answer, f"the {answer} of", "", ex["context"][:12]][i % 4]
    for threshold in (1.0, 0.0, None):
        got = compute_squad_v2(examples, texts, odds, no_answer_threshold=threshold)
        assert got == squad_v2_metrics(gold, texts, odds, threshold), threshold
    assert 0 < got["f1"] < 100 and got["best_f1_thresh"] != 0.0
    assert json.loads(json.dumps(got)) == got
