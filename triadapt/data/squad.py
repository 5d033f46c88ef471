"""SQuAD 2.0: loading, windowed features, post-processing of start/end logits, evaluation.

Examples are plain dicts ``{id, title, context, question, answers: {text: [...], answer_start: [...]}}``
(the hub's row format; official json files are flattened into it). A long context becomes several
overlapping windows ("features") of at most ``max_seq_length`` tokens, ``doc_stride`` tokens of
overlap; a window that does not hold the whole answer, and every unanswerable question, is
labelled at CLS (token 0). At evaluation the spans of all windows of a question compete with
the null answer, scored at CLS.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from triadapt.data import TaskData, resolve_data_dir
from triadapt.errors import ConfigError, DataError
from triadapt.metrics import compute_squad_v2
from triadapt.tracking import atomic_write_json, atomic_write_text

LOCAL_FILES = {"train": "train-v2.0.json", "eval": "dev-v2.0.json"}
HUB_SPLITS = {"train": "train", "eval": "validation"}
CLS_INDEX = 0
#: tokenizer calls take this many questions at a time (bounds peak memory on the 130k train set)
_TOKENIZE_CHUNK = 1000

Offsets = list[tuple[int, int] | None]


# --------------------------------------------------------------------------- loading


def load_official_json(path: Path) -> list[dict]:
    """Flatten an official-format SQuAD file into example dicts, in file order."""
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    return [
        {
            "id": qa["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def _local_file(task_cfg, root: Path, split: str) -> Path | None:
    # data.dir may be the data root (holding squad_v2/) or the squad_v2 folder itself.
    name = LOCAL_FILES[split]
    return next((p for p in (root / task_cfg["local_dir"] / name, root / name) if p.is_file()), None)


def _load_local(task_cfg, root: Path, split: str) -> list[dict]:
    name = LOCAL_FILES[split]
    candidates = [root / task_cfg["local_dir"] / name, root / name]
    path = _local_file(task_cfg, root, split)
    if path is not None:
        return load_official_json(path)
    hint = " (only the dev set offline? use task=squad_v2_devsplit)" if split == "train" else ""
    raise DataError(
        f"{name} not found at {candidates[0]} or {candidates[1]}; set data.dir (or TRIADAPT_DATA_DIR) "
        f"to the folder holding {task_cfg['local_dir']}/, or data.source=hub{hint}"
    )


def _load_hub(task_cfg, splits: Sequence[str]) -> dict[str, list[dict]]:
    import datasets  # slow import, only needed for the hub

    path = task_cfg["hub"]["path"]
    try:
        dataset = datasets.load_dataset(path, task_cfg["hub"].get("name"))
    except Exception as err:  # offline, unknown repo, bad cache: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"could not load {path} from the hub ({reason}); for local files set data.dir (or TRIADAPT_DATA_DIR)"
        ) from err
    return {
        split: [
            {
                "id": row["id"],
                "title": row["title"],
                "context": row["context"],
                "question": row["question"],
                "answers": {key: list(row["answers"][key]) for key in ("text", "answer_start")},
            }
            for row in dataset[HUB_SPLITS[split]]
        ]
        for split in splits
    }


def load_examples(task_cfg, data_cfg, splits: Sequence[str]) -> tuple[dict[str, list[dict]], str]:
    """Examples per split ("train", "eval") and a description of where they came from."""
    source = data_cfg.get("source") or "auto"
    if source not in ("auto", "local", "hub"):
        raise ConfigError(f"data.source must be auto, local or hub, not {source!r}")
    root = resolve_data_dir(data_cfg)
    if source == "hub" or (source == "auto" and root is None):
        return _load_hub(task_cfg, splits), f"hub:{task_cfg['hub']['path']}"
    if root is None:
        raise DataError("data.source=local needs data.dir (or TRIADAPT_DATA_DIR) pointing at the data root")
    return {split: _load_local(task_cfg, root, split) for split in splits}, f"local:{root}"


def split_by_title(examples: Sequence[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic article-level split: sort the titles, shuffle them with ``seed``, and the
    last ``round(eval_fraction · n_titles)`` titles are the eval part. Example order is kept."""
    titles = sorted({ex["title"] for ex in examples})
    n_eval = round(eval_fraction * len(titles))
    if not 0 < n_eval < len(titles):
        raise ConfigError(
            f"split.eval_fraction={eval_fraction} leaves no train or no eval titles ({len(titles)} titles in all)"
        )
    random.Random(seed).shuffle(titles)
    eval_titles = set(titles[-n_eval:])
    return (
        [ex for ex in examples if ex["title"] not in eval_titles],
        [ex for ex in examples if ex["title"] in eval_titles],
    )


# --------------------------------------------------------------------------- features


def check_feature_settings(tokenizer, max_seq_length: int, doc_stride: int) -> int:
    """Validate the window settings; returns the most question tokens a window can hold."""
    if doc_stride >= max_seq_length:
        raise ConfigError(
            f"task.doc_stride ({doc_stride}) must be smaller than task.max_seq_length ({max_seq_length})"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"SQuAD features need a fast tokenizer (offset mappings), got {type(tokenizer).__name__}"
        )
    # The tokenizer panics unless each window keeps more than doc_stride context tokens.
    max_question_tokens = max_seq_length - doc_stride - 1 - tokenizer.num_special_tokens_to_add(pair=True)
    if max_question_tokens < 1:
        raise ConfigError(
            f"task.max_seq_length ({max_seq_length}) leaves no room for a question with task.doc_stride ({doc_stride})"
        )
    return max_question_tokens


def _fit_questions(examples: Sequence[dict], tokenizer, max_tokens: int) -> list[str]:
    """Questions without leading whitespace (some SQuAD questions have lots), cut to ``max_tokens``."""
    questions = [ex["question"].lstrip() for ex in examples]
    offsets = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [q[: offs[max_tokens - 1][1]] if len(offs) > max_tokens else q for q, offs in zip(questions, offsets)]


def _windows(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int):
    """Yield ``(example index, model inputs, offsets)`` per window; offsets are None outside the context."""
    questions = _fit_questions(examples, tokenizer, check_feature_settings(tokenizer, max_seq_length, doc_stride))
    for first in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[first : first + _TOKENIZE_CHUNK]
        enc = tokenizer(
            questions[first : first + _TOKENIZE_CHUNK],
            [ex["context"] for ex in chunk],
            truncation="only_second",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
            offsets = [tuple(o) if seq == 1 else None for o, seq in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]
            # Compact arrays: python int lists for 130k windows would take gigabytes.
            inputs = {"input_ids": np.asarray(enc["input_ids"][i], dtype=np.int32)}
            inputs["attention_mask"] = np.ones(len(inputs["input_ids"]), dtype=np.int8)
            if "token_type_ids" in enc:
                inputs["token_type_ids"] = np.asarray(enc["token_type_ids"][i], dtype=np.int8)
            yield first + sample, inputs, offsets


def answer_positions(offsets: Offsets, answers: dict) -> tuple[int, int]:
    """Token span of the first gold answer in one window, or (CLS, CLS) when the question is
    unanswerable or the window does not hold the whole answer."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not answers["text"] or not context:
        return CLS_INDEX, CLS_INDEX
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return CLS_INDEX, CLS_INDEX
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end


def prepare_train_features(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int) -> list[dict]:
    """One labelled feature dict per window: model inputs plus ``start_positions``/``end_positions``."""
    features = []
    for ex_idx, inputs, offsets in _windows(examples, tokenizer, max_seq_length, doc_stride):
        start, end = answer_positions(offsets, examples[ex_idx]["answers"])
        features.append({**inputs, "start_positions": start, "end_positions": end})
    return features


@dataclass
class EvalFeatures:
    #: model inputs per window
    inputs: list[dict]
    #: window → index of its question in the example list
    example_index: list[int]
    #: window → character span per token (None outside the context)
    offsets: list[Offsets]


def prepare_eval_features(examples: Sequence[dict], tokenizer, max_seq_length: int, doc_stride: int) -> EvalFeatures:
    features = EvalFeatures([], [], [])
    for ex_idx, inputs, offsets in _windows(examples, tokenizer, max_seq_length, doc_stride):
        features.inputs.append(inputs)
        features.example_index.append(ex_idx)
        features.offsets.append(offsets)
    return features


class FeatureDataset(Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


class QACollator:
    """Feature dicts → right-padded batch of long tensors (to the longest, rounded up to a multiple of 8)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features[0]:
                padded = torch.full((len(features), length), pad, dtype=torch.long)
                for row, feature in enumerate(features):
                    padded[row, : len(feature[key])] = torch.as_tensor(feature[key], dtype=torch.long)
                batch[key] = padded
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- post-processing


def _top_context_indices(logits: np.ndarray, in_context: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest logits among context tokens, best first."""
    order = np.argsort(np.where(in_context, logits, -np.inf))[::-1][:n]
    return order[in_context[order]]


def postprocess_predictions(
    examples: Sequence[dict],
    features: EvalFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Start/end logits per window → (question id → answer text, question id → null odds).

    Candidate spans pair the ``n_best_size`` best start and end tokens of each window's context
    (end ≥ start, at most ``max_answer_length`` tokens); the best span over all windows of a
    question is scored start + end logit. The null score is the smallest CLS score
    (start[0] + end[0]) over the windows; null odds = null score − best span score, and the
    answer is "" when the odds exceed ``null_score_diff_threshold``. A question without any
    valid span gets "" with odds +inf.
    """
    windows = defaultdict(list)
    for window, ex_idx in enumerate(features.example_index):
        windows[ex_idx].append(window)
    predictions, null_odds = {}, {}
    for ex_idx, example in enumerate(examples):
        null_score, best_score, best_chars = math.inf, -math.inf, None
        for w in windows[ex_idx]:
            start, end, offsets = start_logits[w], end_logits[w], features.offsets[w]
            null_score = min(null_score, float(start[CLS_INDEX] + end[CLS_INDEX]))
            in_context = np.array([o is not None for o in offsets])
            s_idx = _top_context_indices(start, in_context, n_best_size)[:, None]
            e_idx = _top_context_indices(end, in_context, n_best_size)[None, :]
            valid = (e_idx >= s_idx) & (e_idx < s_idx + max_answer_length)
            if not valid.any():
                continue
            scores = np.where(valid, start[s_idx] + end[e_idx], -np.inf)
            row, col = np.unravel_index(np.argmax(scores), scores.shape)
            if scores[row, col] > best_score:
                best_score = float(scores[row, col])
                best_chars = (offsets[s_idx[row, 0]][0], offsets[e_idx[0, col]][1])
        odds = null_score - best_score
        null_odds[example["id"]] = odds
        answer = example["context"][best_chars[0] : best_chars[1]] if best_chars else ""
        predictions[example["id"]] = "" if odds > null_score_diff_threshold else answer
    return predictions, null_odds


def write_predictions(output_dir: str | Path, predictions: dict[str, str], null_odds: dict[str, float]) -> None:
    """``predictions.json`` and ``null_odds.json``, readable by ``python -m triadapt.squad_eval``."""
    for name, content in (("predictions.json", predictions), ("null_odds.json", null_odds)):
        atomic_write_json(Path(output_dir) / name, content)


SCORING_SCRIPT = "score_predictions.sh"


def scoring_script(dev_file: Path | None, n_questions: int, subset: bool, threshold: float) -> str:
    """The shell script (written beside the predictions) that scores them with the official-equivalent
    scorer exactly as the run did: its abstention threshold, and ``--predicted-only`` for a subset."""
    data = shlex.quote(str(Path(dev_file).resolve())) if dev_file else "dev-v2.0.json"
    where = "" if dev_file else " (the run read the dev set from the hub: give the official file's path)"
    scope = f"the {n_questions} predicted dev questions (--predicted-only)" if subset else "the whole dev set"
    command = (
        f"python -m triadapt.squad_eval {data} predictions.json --na-prob-file null_odds.json "
        f"--na-prob-thresh {threshold!r}" + (" --predicted-only" if subset else "")
    )
    return (
        f"#!/bin/sh\n# Scores this run's predictions as the run did, over {scope}{where}.\n"
        f'cd "$(dirname "$0")" && {command}\n'
    )


# --------------------------------------------------------------------------- evaluation


def predict_logits(
    model, features: EvalFeatures, collate, device, batch_size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start/end logits per window (unpadded, float32); the model's train/eval mode is restored."""
    # Windows of similar length share a batch, so little compute goes into padding.
    order = sorted(range(len(features.inputs)), key=lambda i: len(features.inputs[i]["input_ids"]))
    starts: list[np.ndarray] = [np.empty(0)] * len(order)
    ends: list[np.ndarray] = [np.empty(0)] * len(order)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in tqdm(range(0, len(order), batch_size), desc="eval squad", unit="batch", disable=None):
                rows = order[first : first + batch_size]
                batch = collate([features.inputs[i] for i in rows])
                out = model(**{k: v.to(device) for k, v in batch.items()})
                start_batch = out.start_logits.float().cpu().numpy()
                end_batch = out.end_logits.float().cpu().numpy()
                for j, i in enumerate(rows):
                    length = len(features.inputs[i]["input_ids"])
                    starts[i], ends[i] = start_batch[j, :length], end_batch[j, :length]
    finally:
        model.train(was_training)
    return starts, ends


def evaluate_squad(
    model,
    device,
    batch_size: int,
    output_dir: str | Path | None = None,
    *,
    examples: Sequence[dict],
    features: EvalFeatures,
    collate,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    scoring_script: str | None = None,
) -> dict[str, float]:
    """Run the model over the eval windows, post-process, score; writes predictions.json,
    null_odds.json and ``scoring_script`` (as score_predictions.sh) into ``output_dir`` when one is given."""
    starts, ends = predict_logits(model, features, collate, device, batch_size)
    predictions, null_odds = postprocess_predictions(
        examples, features, starts, ends, n_best_size, max_answer_length, null_score_diff_threshold
    )
    if output_dir is not None:
        write_predictions(output_dir, predictions, null_odds)
        if scoring_script is not None:
            atomic_write_text(Path(output_dir) / SCORING_SCRIPT, scoring_script)
    # The predictions already abstain by null_score_diff_threshold, so no second threshold on the
    # odds (no_answer_threshold=None); the odds still drive best_exact / best_f1.
    return compute_squad_v2(examples, predictions, null_odds, no_answer_threshold=None)


def _dev_file(task_cfg, data_cfg, source: str) -> Path | None:
    """The local dev-v2.0.json the eval questions came from (None when they came from the hub)."""
    root = resolve_data_dir(data_cfg)
    return _local_file(task_cfg, root, "eval") if source.startswith("local:") and root is not None else None


def _cap(examples: list[dict], limit: int | None) -> list[dict]:
    return examples[:limit] if limit is not None else examples


def build_squad_task(task_cfg, data_cfg, tokenizer, seed: int = 0) -> TaskData:
    """SQuAD 2.0 (``task=squad_v2``) or its offline dev-set split (``task=squad_v2_devsplit``).

    ``seed`` is unused: the devsplit has its own fixed ``split.seed`` so every run shares one split.
    """
    max_seq_length, doc_stride = task_cfg["max_seq_length"], task_cfg["doc_stride"]
    check_feature_settings(tokenizer, max_seq_length, doc_stride)  # fail before loading any data
    split_cfg = task_cfg.get("split")
    info = {}
    if split_cfg is not None:
        if split_cfg["by"] != "title":
            raise ConfigError(f"task.split.by must be 'title', not {split_cfg['by']!r}")
        loaded, source = load_examples(task_cfg, data_cfg, ["eval"])
        train_examples, eval_examples = split_by_title(loaded["eval"], split_cfg["eval_fraction"], split_cfg["seed"])
        info["eval_titles"] = sorted({ex["title"] for ex in eval_examples})
    else:
        loaded, source = load_examples(task_cfg, data_cfg, ["train", "eval"])
        train_examples, eval_examples = loaded["train"], loaded["eval"]
    train_examples = _cap(train_examples, data_cfg.get("max_train_samples"))
    eval_examples = _cap(eval_examples, data_cfg.get("max_eval_samples"))

    train_features = prepare_train_features(train_examples, tokenizer, max_seq_length, doc_stride)
    eval_features = prepare_eval_features(eval_examples, tokenizer, max_seq_length, doc_stride)
    collate = QACollator(tokenizer.pad_token_id)
    evaluate = functools.partial(
        evaluate_squad,
        examples=eval_examples,
        features=eval_features,
        collate=collate,
        n_best_size=task_cfg["n_best_size"],
        max_answer_length=task_cfg["max_answer_length"],
        null_score_diff_threshold=task_cfg["null_score_diff_threshold"],
        scoring_script=scoring_script(
            _dev_file(task_cfg, data_cfg, source),
            len(eval_examples),
            subset=split_cfg is not None or data_cfg.get("max_eval_samples") is not None,
            threshold=float(task_cfg["null_score_diff_threshold"]),
        ),
    )
    info.update(
        source=source,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        train_features=len(train_features),
        eval_features=len(eval_features.inputs),
    )
    return TaskData(
        train=FeatureDataset(train_features),
        collate=collate,
        model_kind="question_answering",
        num_labels=2,
        evaluate=evaluate,
        train_lengths=[len(f["input_ids"]) for f in train_features],
        info=info,
    )
