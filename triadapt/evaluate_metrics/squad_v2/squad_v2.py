"""The SQuAD 2.0 scorer as a local ``evaluate`` module, with the hub ``squad_v2`` metric's interface.

The arithmetic is the official ``evaluate-v2.0.py``'s (:func:`triadapt.squad_eval.squad_v2_metrics`).
No-answer probabilities (or null odds) are kept in float64, so ``best_*_thresh`` are exact.
"""

import datasets
import evaluate

from triadapt.squad_eval import squad_v2_metrics

_CITATION = """\
@inproceedings{rajpurkar2018know,
  title={Know What You Don't Know: Unanswerable Questions for {SQuAD}},
  author={Rajpurkar, Pranav and Jia, Robin and Liang, Percy},
  booktitle={ACL}, year={2018}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id", "prediction_text" ("" = no answer), "no_answer_probability"}.
    references: list of {"id", "answers": {"text": [...], "answer_start": [...]}} (no text = unanswerable).
    no_answer_threshold: questions whose no-answer probability exceeds it count as abstentions in
        exact/f1 (default 1.0, as the official script); None: the predictions alone decide.
Returns: exact, f1, total, HasAns_exact/f1/total, NoAns_exact/f1/total (groups with questions),
    best_exact, best_exact_thresh, best_f1, best_f1_thresh. Scores in percent.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class SquadV2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float64"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        gold = {ref["id"]: ref["answers"]["text"] for ref in references}
        texts = {pred["id"]: pred["prediction_text"] for pred in predictions}
        na_probs = {pred["id"]: pred["no_answer_probability"] for pred in predictions}
        return squad_v2_metrics(gold, texts, na_probs, no_answer_threshold)
