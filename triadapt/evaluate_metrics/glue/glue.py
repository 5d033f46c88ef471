"""GLUE metrics as a local ``evaluate`` module, with the hub ``glue`` metric's interface.

Configurations: cola (matthews_correlation), stsb (pearson, spearmanr), mrpc and qqp (accuracy,
f1), sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans (accuracy). Inputs:
``predictions`` and ``references``, class ids (or STS-B scores, kept in float64). Unlike the hub
metric, a constant STS-B prediction scores 0 correlation rather than NaN.
"""

import datasets
import evaluate

from triadapt.metrics import GLUE_CONFIGS, glue_scores

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR}, year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (STS-B: scores).
    references: gold class ids (STS-B: scores).
Returns: accuracy; f1 (mrpc, qqp); matthews_correlation (cola); pearson and spearmanr (stsb).
Example:
    >>> glue = evaluate.load(triadapt.evaluate_metrics.path("glue"), "mrpc")
    >>> glue.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in GLUE_CONFIGS:
            raise KeyError(f"glue configuration {self.config_name!r}; choose one of {list(GLUE_CONFIGS)}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # python lists, not format="numpy": its formatter hands floats over as float32
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references):
        return glue_scores(self.config_name, predictions, references)
