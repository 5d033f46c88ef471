"""Task data: what the training loop needs from a task, whatever the task is.

``build_task(task_cfg, data_cfg, tokenizer)`` returns a :class:`TaskData`; the loop never
looks inside examples. Each task family lives in its own module (``glue``, ``squad``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from triadapt.errors import ConfigError


@dataclass
class TaskData:
    train: Dataset
    #: list of feature dicts → batch of tensors (dynamic padding)
    collate: Callable[[list[dict]], dict]
    #: "sequence_classification" or "question_answering": which HF head to build
    model_kind: str
    num_labels: int
    #: evaluate(model, device, batch_size, output_dir) → flat metric dict
    evaluate: Callable[..., dict[str, float]]
    #: token count per training feature, for length-grouped batching
    train_lengths: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def resolve_data_dir(data_cfg) -> Path | None:
    """``data.dir`` (already defaulting to $TRIADAPT_DATA_DIR in the config) or the env var."""
    value = data_cfg.get("dir") or os.environ.get("TRIADAPT_DATA_DIR")
    return Path(value).expanduser() if value else None


def data_layouts(task_folders: str = "MRPC/, RTE/, …") -> str:
    """The two layouts data.dir may have, for error messages."""
    return (
        "data.dir / TRIADAPT_DATA_DIR must point at a data root holding glue/ and squad_v2/, "
        f"or at the GLUE root holding the task folders ({task_folders})"
    )


def family_dir(data_cfg, family: str) -> Path | None:
    """The folder of one task family (``glue``): ``<data.dir>/<family>`` when data.dir is the
    data root holding it, else data.dir itself (the family's own root, e.g. the GLUE root)."""
    root = resolve_data_dir(data_cfg)
    if root is not None and (root / family).is_dir():
        return root / family
    return root


def build_task(task_cfg, data_cfg, tokenizer, seed: int = 0) -> TaskData:
    if task_cfg.group == "glue":
        from triadapt.data.glue import build_glue_task

        return build_glue_task(task_cfg, data_cfg, tokenizer, seed)
    if task_cfg.group == "squad":
        from triadapt.data.squad import build_squad_task

        return build_squad_task(task_cfg, data_cfg, tokenizer, seed)
    raise ConfigError(f"unknown task group {task_cfg.group!r}; choose glue or squad")
