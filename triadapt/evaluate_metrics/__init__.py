"""Local ``evaluate`` metric modules: ``glue/`` and ``squad_v2/``, with the input and output names of
the hub's ``glue`` and ``squad_v2`` metrics, loadable offline::

    import evaluate
    from triadapt.evaluate_metrics import path
    glue = evaluate.load(path("glue"), "mrpc")          # or evaluate.load("<site-packages>/triadapt/evaluate_metrics/glue", "mrpc")
    glue.compute(predictions=[1, 0], references=[1, 1])  # {'accuracy': 0.5, 'f1': 0.666…}
"""

from __future__ import annotations

import functools
from pathlib import Path

MODULES = ("glue", "squad_v2")


def path(name: str) -> str:
    """The folder of a metric module, for ``evaluate.load``."""
    if name not in MODULES:
        raise KeyError(f"no metric module {name!r}; choose one of {', '.join(MODULES)}")
    return str(Path(__file__).parent / name)


@functools.cache
def load(name: str, config_name: str | None = None):
    """The loaded module (once per process), computing in memory (no cache files)."""
    import evaluate

    return evaluate.load(path(name), config_name, keep_in_memory=True)
