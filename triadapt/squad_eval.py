"""SQuAD 2.0 scorer, equivalent to the official ``evaluate-v2.0.py`` (Rajpurkar et al., 2018).

Offline and in-repo, with the key names of HF ``evaluate``'s ``squad_v2`` metric: ``exact``,
``f1``, ``total``, ``HasAns_*``, ``NoAns_*`` (percent) and, given no-answer scores (probabilities
or null odds), ``best_exact``/``best_f1`` with their thresholds.

Command line, with the official interface::

    python -m triadapt.squad_eval dev-v2.0.json predictions.json [--na-prob-file null_odds.json]

``--predicted-only`` scores just the questions that have a prediction (a run on
``squad_v2_devsplit`` or with ``data.max_eval_samples`` predicts a subset of the dev set); the
output then says so (``scored_subset``, ``dataset_total``) and a note goes to stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
from collections.abc import Mapping, Sequence

from triadapt.errors import DataError, TriadaptError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        # The null answer scores 1 only against the null answer.
        return float(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(dataset: Sequence[Mapping]) -> dict[str, list[str]]:
    """Question id → reference answer texts (empty = unanswerable), from the official ``data`` list."""
    return {
        qa["id"]: [answer["text"] for answer in qa["answers"]]
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }


def _mean_percent(scores: Mapping[str, float], qids: Sequence[str]) -> float:
    return 100.0 * sum(scores[qid] for qid in qids) / len(qids)


def _find_best_thresh(
    preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool]
) -> tuple[float, float]:
    """Best score over no-answer thresholds: answer the questions with na-score ≤ threshold.

    Starts from "abstain everywhere" and answers questions in increasing na-score order,
    keeping the running best, exactly as the official script does (ties keep its order).
    """
    cur_score = best_score = sum(not has_ans[qid] for qid in scores)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            cur_score += scores[qid]
        elif preds[qid]:
            cur_score -= 1  # answering an unanswerable question loses its abstention point
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2_metrics(
    gold: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float | None = 1.0,
) -> dict[str, float | int]:
    """Official SQuAD 2.0 metrics over the questions in ``gold``.

    ``na_probs`` (question id → no-answer score, e.g. null odds) enables ``best_*``; questions
    with a score above ``na_prob_thresh`` also count as abstentions in ``exact``/``f1``, as the
    official script does (``None`` turns that off: the predictions already decide).
    """
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        raise DataError(f"{len(missing)} of {len(gold)} questions have no prediction (first: {missing[0]})")
    if na_probs is not None and (missing := [qid for qid in gold if qid not in na_probs]):
        raise DataError(f"{len(missing)} of {len(gold)} questions have no no-answer score (first: {missing[0]})")
    has_ans = {qid: bool(answers) for qid, answers in gold.items()}
    exact_raw, f1_raw = {}, {}
    for qid, answers in gold.items():
        # Answers that normalise to "" do not count; none left means the only gold is "".
        refs = [a for a in answers if normalize_answer(a)] or [""]
        exact_raw[qid] = max(compute_exact(a, predictions[qid]) for a in refs)
        f1_raw[qid] = max(compute_f1(a, predictions[qid]) for a in refs)

    exact, f1 = dict(exact_raw), dict(f1_raw)
    if na_probs is not None and na_prob_thresh is not None:
        for qid in gold:
            if na_probs[qid] > na_prob_thresh:
                exact[qid] = f1[qid] = float(not has_ans[qid])

    qids = list(gold)
    metrics: dict[str, float | int] = {
        "exact": _mean_percent(exact, qids),
        "f1": _mean_percent(f1, qids),
        "total": len(qids),
    }
    groups = {"HasAns": [q for q in qids if has_ans[q]], "NoAns": [q for q in qids if not has_ans[q]]}
    for prefix, subset in groups.items():
        if subset:  # like the official script, a group with no questions gets no keys
            metrics[f"{prefix}_exact"] = _mean_percent(exact, subset)
            metrics[f"{prefix}_f1"] = _mean_percent(f1, subset)
            metrics[f"{prefix}_total"] = len(subset)
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            best, thresh = _find_best_thresh(predictions, raw, na_probs, has_ans)
            metrics[f"best_{name}"] = best
            metrics[f"best_{name}_thresh"] = thresh
    return metrics


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def main(argv: Sequence[str] | None = None) -> dict[str, float | int]:
    parser = argparse.ArgumentParser(description="Official-equivalent SQuAD 2.0 evaluation.")
    parser.add_argument("data_file", help="dataset in the official format (e.g. dev-v2.0.json)")
    parser.add_argument("pred_file", help="question id → predicted answer text ('' = no answer)")
    parser.add_argument("--out-file", "-o", help="also write the metrics JSON here")
    parser.add_argument("--na-prob-file", "-n", help="question id → no-answer probability or null odds")
    parser.add_argument(
        "--na-prob-thresh", "-t", type=float, default=1.0, help="predict no answer above this na score (default 1.0)"
    )
    parser.add_argument(
        "--predicted-only",
        action="store_true",
        help="score only the questions that have a prediction (a run on a subset of the dev set); stated in the output",
    )
    args = parser.parse_args(argv)
    try:
        data = _load_json(args.data_file)
        if not isinstance(data, dict) or "data" not in data:
            raise DataError(f"{args.data_file} is not a SQuAD file (no 'data' list)")
        gold = gold_answers(data["data"])
        predictions = _load_json(args.pred_file)
        na_probs = _load_json(args.na_prob_file) if args.na_prob_file else None
        if args.predicted_only:
            unknown = [qid for qid in predictions if qid not in gold]
            if unknown:
                raise DataError(
                    f"{len(unknown)} predicted question ids are not in {args.data_file} (first: {unknown[0]})"
                )
            dataset_total = len(gold)
            gold = {qid: answers for qid, answers in gold.items() if qid in predictions}
            if not gold:
                raise DataError(f"{args.pred_file} holds no predictions")
        metrics = squad_v2_metrics(gold, predictions, na_probs, args.na_prob_thresh)
    except DataError as err:
        hint = "; pass --predicted-only to score just the predicted questions" if "no prediction" in str(err) else ""
        sys.exit(f"error: {err}{hint}")
    except TriadaptError as err:
        sys.exit(f"error: {err}")
    if args.predicted_only:
        metrics |= {"scored_subset": "predicted questions only", "dataset_total": dataset_total}
        print(
            f"note: scored the {len(gold)} predicted questions of the {dataset_total} in {args.data_file} "
            "(--predicted-only); not comparable to a full dev-set score",
            file=sys.stderr,
        )
    text = json.dumps(metrics, indent=2)
    if args.out_file:
        with open(args.out_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return metrics


if __name__ == "__main__":
    main()
