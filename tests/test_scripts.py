"""scripts/prepare_data.py and scripts/prefetch_models.py: their logic with a fake hub, and the one-line
error they give offline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import CONF, REPO
from omegaconf import OmegaConf


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_offline(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``scripts/<script>`` with the hub offline and an empty HF cache (nothing can come from an
    earlier download)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                        "PYTHONPATH": str(REPO)}  # fmt: skip
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


GLUE_ROWS = {
    "mrpc": [
        {"sentence1": "a b", "sentence2": 'he said "no', "label": 1},
        {"sentence1": "c\td", "sentence2": "e", "label": 0},
    ],
    "cola": [{"sentence": "The cat sat.", "label": 1}, {"sentence": "Cat the sat.", "label": 0}],
    "stsb": [{"sentence1": "x", "sentence2": "y", "label": 3.8}, {"sentence1": "z", "sentence2": "w", "label": 0.0}],
    "mnli": [{"premise": "p", "hypothesis": "h", "label": 2}, {"premise": "q", "hypothesis": "i", "label": 0}],
}
SQUAD_ROWS = [
    {"id": "q1", "title": "T1", "context": "abc def", "question": "what?", "answers": {"text": ["def"], "answer_start": [4]}},
    {"id": "q2", "title": "T1", "context": "abc def", "question": "who?", "answers": {"text": [], "answer_start": []}},
    {"id": "q3", "title": "T2", "context": "ghi", "question": "when?", "answers": {"text": ["ghi", "ghi"], "answer_start": [0, 0]}},
]  # fmt: skip


def fake_load_dataset(calls):
    def load(path, name=None):
        calls.append((path, name))
        if path == "rajpurkar/squad_v2":
            return {"train": SQUAD_ROWS, "validation": SQUAD_ROWS[1:]}
        rows = GLUE_ROWS[name]
        splits = ["validation_matched", "validation_mismatched"] if name == "mnli" else ["validation"]
        return {"train": rows, **{s: rows[::-1] for s in splits}}

    return load


def test_prepare_data_writes_what_the_harness_reads(tmp_path):
    from triadapt.data.glue import _load_local
    from triadapt.data.squad import load_official_json

    prepare_data = script("prepare_data")
    calls, lines = [], []
    written = prepare_data.prepare(tmp_path, [*GLUE_ROWS, "squad_v2"], fake_load_dataset(calls), log=lines.append)
    assert len(written) == 2 + 2 + 2 + 3 + 2
    for task, rows in GLUE_ROWS.items():
        cfg = OmegaConf.load(CONF / "task" / "glue" / f"{task}.yaml")
        for split, stem in {"train": "train", **cfg.splits.eval}.items():
            texts, labels = _load_local(cfg, tmp_path / "glue", stem)  # the harness's own reader
            expected = rows if split == "train" else rows[::-1]
            assert labels == [float(r["label"]) for r in expected], (task, split)
            assert texts == [tuple(" ".join(str(r[k]).split()) for k in cfg.text_keys) for r in expected]
    assert load_official_json(tmp_path / "squad_v2" / "train-v2.0.json") == SQUAD_ROWS
    assert load_official_json(tmp_path / "squad_v2" / "dev-v2.0.json") == SQUAD_ROWS[1:]
    assert ("nyu-mll/glue", "mrpc") in calls and ("rajpurkar/squad_v2", None) in calls

    # Files already there are kept, and nothing is downloaded for them.
    (tmp_path / "glue" / "MRPC" / "dev.tsv").write_text("mine")
    calls.clear()
    assert prepare_data.prepare(tmp_path, ["mrpc", "squad_v2"], fake_load_dataset(calls), log=lines.append) == []
    assert calls == [] and (tmp_path / "glue" / "MRPC" / "dev.tsv").read_text() == "mine"
    with pytest.raises(prepare_data.PrepareError, match="unknown task"):
        prepare_data.prepare(tmp_path, ["mrcp"], fake_load_dataset(calls))


def test_prepare_data_offline_is_one_line(tmp_path):
    done = run_offline(tmp_path, "prepare_data.py", str(tmp_path / "out"), "--tasks", "mrpc")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot download nyu-mll/glue/mrpc from the hub"), done.stderr[-2000:]
    assert "internet" in lines[-1] and not (tmp_path / "out" / "glue" / "MRPC" / "train.tsv").exists()


def test_prefetch_models_finds_the_sweeps_hub_models():
    prefetch_models = script("prefetch_models")
    assert prefetch_models.models_of(["experiment=paper_glue_r8"]) == ["deberta_v3_base"]
    assert prefetch_models.models_of(["model=bert_base_uncased,deberta_v3_base", "method=lora"]) == [
        "bert_base_uncased",
        "deberta_v3_base",
    ]
    fetched, lines = [], []
    assert prefetch_models.prefetch(["model=bert_base_uncased,minilm_l6"], fetched.append, lines.append) == [
        "google-bert/bert-base-uncased"
    ]
    assert fetched == ["google-bert/bert-base-uncased"] and "minilm_l6: nothing to fetch (package model)" in lines
    assert prefetch_models.prefetch(["experiment=cpu_glue"], fetched.append, lines.append) == []
    with pytest.raises(prefetch_models.PrefetchError, match="unknown model 'bert'; choose from .*bert_base_uncased"):
        prefetch_models.prefetch(["model=deberta_v3_base,bert"], fetched.append)
    with pytest.raises(prefetch_models.PrefetchError, match="cannot compose experiment=nope: .*experiment/nope"):
        prefetch_models.prefetch(["experiment=nope"], fetched.append)


def test_prefetch_models_offline_is_one_line(tmp_path):
    done = run_offline(tmp_path, "prefetch_models.py", "model=bert_base_uncased")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot fetch google-bert/bert-base-uncased"), done.stderr[-2000:]
    assert "internet" in last
