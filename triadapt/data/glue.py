"""GLUE: hub (``nyu-mll/glue``) or a local folder in the original GLUE TSV layout.

The local files are the ones ``download_glue_data.py`` writes (``MRPC/train.tsv``,
``CoLA/dev.tsv``, ``MNLI/dev_matched.tsv``, …): UTF-8 (a BOM allowed), one example per
line, fields split on every tab, no quoting (QNLI and MRPC hold stray ``"`` characters that
are text). Malformed files are refused, never reinterpreted: every row must have exactly the
header's number of fields (a tab inside a field, even a quoted one, shows up as an extra
field), every line must decode as UTF-8, and blank lines are errors, except blank lines at
the very end of the file, which are ignored. Each error names the file and line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from triadapt.data import TaskData, data_layouts, family_dir
from triadapt.errors import ConfigError, DataError
from triadapt.metrics import compute_metrics


@dataclass(frozen=True)
class LocalFormat:
    """Where the text and label live in a task's TSV files."""

    text_columns: tuple[str | int, ...]
    label_column: str | int
    labels: dict[str, int] | None  # raw label → id; None for regression
    header: bool = True
    columns: int | None = None  # fields per row of a file without header


_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_NLI2 = {"entailment": 0, "not_entailment": 1}
_BINARY = {"0": 0, "1": 1}

LOCAL_FORMATS = {
    "cola": LocalFormat((3,), 1, _BINARY, header=False, columns=4),
    "sst2": LocalFormat(("sentence",), "label", _BINARY),
    "mrpc": LocalFormat(("#1 String", "#2 String"), "Quality", _BINARY),
    "qqp": LocalFormat(("question1", "question2"), "is_duplicate", _BINARY),
    "stsb": LocalFormat(("sentence1", "sentence2"), "score", None),
    "mnli": LocalFormat(("sentence1", "sentence2"), "gold_label", _NLI3),
    "qnli": LocalFormat(("question", "sentence"), "label", _NLI2),
    "rte": LocalFormat(("sentence1", "sentence2"), "label", _NLI2),
    "wnli": LocalFormat(("sentence1", "sentence2"), "label", _BINARY),
}


def read_glue_tsv(path: Path, task: str) -> tuple[list[tuple[str, ...]], list[float]]:
    """Texts and labels of one local GLUE split, validated against the task's format."""
    fmt = LOCAL_FORMATS[task]
    if not path.is_file():
        raise DataError(f"GLUE file {path} not found; data.dir must hold the GLUE folders ({path.parent.name}/…)")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} is empty")
    if fmt.header:
        header, rows = rows[0], rows[1:]
        wanted = [*fmt.text_columns, fmt.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; expected {wanted} in the header, found {header}")
        text_idx = [header.index(c) for c in fmt.text_columns]
        label_idx = header.index(fmt.label_column)
    else:
        text_idx, label_idx = list(fmt.text_columns), fmt.label_column
    width = len(header) if fmt.header else fmt.columns
    texts, labels = [], []
    for line_no, row in enumerate(rows, start=2 if fmt.header else 1):
        if len(row) != width:
            where = "the header has" if fmt.header else f"{task} files have"
            raise DataError(
                f"{path}:{line_no} has {len(row)} tab-separated fields, {where} {width}"
                + (" (a tab inside a field?)" if len(row) > width else "")
            )
        raw = row[label_idx].strip()
        if fmt.labels is None:
            try:
                labels.append(float(raw))
            except ValueError:
                raise DataError(f"{path}:{line_no} label {raw!r} is not a number") from None
        elif raw in fmt.labels:
            labels.append(fmt.labels[raw])
        else:
            raise DataError(f"{path}:{line_no} label {raw!r} is not one of {sorted(fmt.labels)}")
        texts.append(tuple(row[i] for i in text_idx))
    return texts, labels


def _read_rows(path: Path) -> list[list[str]]:
    """Lines split on tabs; undecodable bytes and inner blank lines are errors naming the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line_no} is not valid UTF-8 (byte 0x{data[e.start]:02x}); GLUE files are UTF-8"
        ) from None
    lines = text.split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    while lines and not lines[-1].strip():  # a final newline, or blank lines at the end
        lines.pop()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{line_no} is blank; only blank lines at the end of a file are ignored")
    return [line.split("\t") for line in lines]


def _load_local(task_cfg, root: Path, split_stem: str):
    folder = root / task_cfg.local_dir
    if not folder.is_dir():
        raise DataError(
            f"task folder {folder} not found; {data_layouts(task_cfg.local_dir + '/')}"
        )
    return read_glue_tsv(folder / f"{split_stem}.tsv", task_cfg.name)


def _load_hub(task_cfg, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(task_cfg.hub.path, task_cfg.hub.name, split=split)
    except Exception as e:  # datasets raises many types when offline
        raise DataError(
            f"could not load GLUE {task_cfg.name!r} from the hub ({type(e).__name__}); "
            "point data.dir=… or TRIADAPT_DATA_DIR at a local GLUE folder (e.g. ../shared/data/glue)"
        ) from None
    keys = list(task_cfg.text_keys)
    return [tuple(ex[k] for k in keys) for ex in ds], [float(x) if task_cfg.is_regression else x for x in ds["label"]]


class TokenizedDataset(Dataset):
    def __init__(self, features: list[dict]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


def tokenize(tokenizer, texts, labels, max_length: int, is_regression: bool) -> TokenizedDataset:
    columns = list(zip(*texts))
    enc = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    label_dtype = float if is_regression else int
    features = [
        {k: enc[k][i] for k in enc.keys()} | {"labels": label_dtype(labels[i])} for i in range(len(labels))
    ]
    return TokenizedDataset(features)


def make_collator(tokenizer):
    """Dynamic padding: each batch is padded to its own longest sequence."""

    def collate(features: list[dict]) -> dict:
        labels = [f["labels"] for f in features]
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
        batch["labels"] = torch.tensor(labels)
        return dict(batch)

    return collate


def _limit(texts, labels, limit, what: str, task: str, limit_key: str):
    if not texts:
        raise DataError(f"{task} {what} split is empty: its file has no examples")
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    if not texts:
        raise DataError(f"{task} {what} split is empty after data.{limit_key}={limit}")
    return texts, labels


def build_glue_task(task_cfg, data_cfg, tokenizer, seed: int = 0) -> TaskData:
    if task_cfg.name not in LOCAL_FORMATS:
        raise ConfigError(f"unknown GLUE task {task_cfg.name!r}; choose one of {', '.join(LOCAL_FORMATS)}")
    source = data_cfg.get("source", "auto")
    root = family_dir(data_cfg, "glue")
    if source == "local" and root is None:
        raise DataError("data.source=local needs data.dir=… or TRIADAPT_DATA_DIR")
    use_local = source == "local" or (source == "auto" and root is not None)
    if use_local and not root.is_dir():
        raise DataError(f"data dir {root} does not exist; {data_layouts()}")

    def load(split_hub: str, split_stem: str):
        return _load_local(task_cfg, root, split_stem) if use_local else _load_hub(task_cfg, split_hub)

    train_texts, train_labels = _limit(
        *load(task_cfg.splits.train, task_cfg.splits.train),
        data_cfg.get("max_train_samples"),
        "train",
        task_cfg.name,
        "max_train_samples",
    )
    max_len = int(task_cfg.max_seq_length)
    train = tokenize(tokenizer, train_texts, train_labels, max_len, task_cfg.is_regression)
    eval_sets = {}
    for split_hub, split_stem in task_cfg.splits.eval.items():
        texts, labels = _limit(
            *load(split_hub, split_stem), data_cfg.get("max_eval_samples"), split_hub, task_cfg.name, "max_eval_samples"
        )
        eval_sets[split_hub] = tokenize(tokenizer, texts, labels, max_len, task_cfg.is_regression)
    collate = make_collator(tokenizer)

    def evaluate(model, device, batch_size: int, output_dir=None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for i, (split, ds) in enumerate(eval_sets.items()):
            preds, refs = predict(model, ds, collate, device, batch_size, task_cfg.is_regression, split)
            # Second eval set (MNLI mismatched) gets the ``_mm`` suffix, as in the papers' tables.
            suffix = "" if i == 0 else "_mm"
            metrics |= {k + suffix: v for k, v in compute_metrics(list(task_cfg.metrics), preds, refs).items()}
        return metrics

    return TaskData(
        train=train,
        collate=collate,
        model_kind="sequence_classification",
        num_labels=int(task_cfg.num_labels),
        evaluate=evaluate,
        train_lengths=[len(f["input_ids"]) for f in train.features],
        info={"source": f"local:{root}" if use_local else "hub", "eval_sizes": {k: len(v) for k, v in eval_sets.items()}},
    )


@torch.no_grad()
def predict(model, ds: TokenizedDataset, collate, device, batch_size: int, is_regression: bool, desc: str = "eval"):
    """Predictions in dataset order; batches are length-sorted so padding stays minimal."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(f["input_ids"]) for f in ds.features], kind="stable")
    out = np.empty(len(ds), dtype=np.float64 if is_regression else np.int64)
    refs = np.array([f["labels"] for f in ds.features])
    n_batches = math.ceil(len(ds) / batch_size)
    for b in tqdm(range(n_batches), desc=desc, leave=False, disable=None):
        idx = order[b * batch_size : (b + 1) * batch_size]
        batch = collate([ds.features[i] for i in idx])
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        out[idx] = logits[:, 0].numpy() if is_regression else logits.argmax(-1).numpy()
    model.train(was_training)
    return out, refs
