"""The pretrained path users take: ``from_pretrained`` on a saved checkpoint (what the hub serves),
for every head kind and every paper preset — not only random-init models built from a config,
which accept any key and so once hid a crash of every paper preset."""

from __future__ import annotations

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import CONF
from triadapt.models import load_model, load_tokenizer

HEADS = [  # (model kind, num_labels, head dropout, transformers class suffix)
    ("sequence_classification", 2, 0.15, "ForSequenceClassification"),
    ("sequence_classification", 1, 0.2, "ForSequenceClassification"),  # regression (STS-B)
    ("question_answering", 2, None, "ForQuestionAnswering"),
]


def _hub_cfg(folder):
    return OmegaConf.create({"source": "hub", "pretrained": str(folder)})


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
@pytest.mark.parametrize("kind, num_labels, dropout, suffix", HEADS, ids=["classification", "regression", "qa"])
def test_every_head_loads_from_a_saved_checkpoint(arch, kind, num_labels, dropout, suffix, tiny_checkpoints):
    folder = tiny_checkpoints[arch]
    tokenizer = load_tokenizer(_hub_cfg(folder))
    model = load_model(_hub_cfg(folder), kind, num_labels, tokenizer, dropout)
    assert type(model).__name__.endswith(suffix) and model.config.model_type == arch
    if dropout is not None:
        assert model.dropout.p == dropout  # the head reads it under its architecture's own key
    # The backbone holds the saved weights, not a fresh initialisation.
    saved = load_file(folder / "model.safetensors")
    name = next(k for k in saved if "word_embeddings" in k)
    assert torch.equal(model.get_input_embeddings().weight, saved[name])
    batch = tokenizer(["a short sentence", "and another one"], ["paired text", "here"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None) if arch == "deberta-v2" else None
    out = model(**batch)
    if kind == "question_answering":
        assert out.start_logits.shape == batch["input_ids"].shape
    else:
        assert out.logits.shape == (2, num_labels)


def _paper_presets() -> list[tuple[str, str, str]]:
    """(method, task, budget) of every conf/preset/paper/<method>/<task>/<budget>.yaml."""
    root = CONF / "preset" / "paper"
    found = []
    for path in sorted(root.rglob("*.yaml")):
        method, *task, budget = path.relative_to(root).with_suffix("").parts
        if method != "common":  # included by the method presets
            found.append((method, "/".join(task), budget))
    return found


PRESETS = _paper_presets()


METHODS = sorted({m for m, _, _ in PRESETS})


def _load_presets(model: str, arch: str, presets, tiny_checkpoints) -> None:
    """Each preset composed as the paper sweeps compose it, its model loaded through the hub code
    with the saved tiny checkpoint in place of the hub id (``model.pretrained``)."""
    folder = tiny_checkpoints[arch]
    tokenizer = load_tokenizer(_hub_cfg(folder))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for method, task, budget in presets:
            overrides = [f"model={model}", f"method={method}", f"task={task}", f"budget={budget}", f"model.pretrained={folder}"]
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
            assert cfg.hydra.runtime.choices.preset == f"paper/{method}/{task}/{budget}", overrides
            squad = cfg.task.group == "squad"
            kind = "question_answering" if squad else "sequence_classification"
            dropout = cfg.model.get("classifier_dropout")
            loaded = load_model(cfg.model, kind, 2 if squad else int(cfg.task.num_labels), tokenizer, dropout)
            assert loaded.config.model_type == arch, overrides
            if dropout is not None and not squad:
                assert loaded.dropout.p == dropout, overrides


def test_presets_cover_every_method_task_and_budget():
    assert len(PRESETS) >= 80 and {"lora", "adalora", "increlora", "triadapt"} <= set(METHODS)
    assert {t for _, t, _ in PRESETS} >= {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")}


@pytest.mark.parametrize("method", METHODS)
def test_every_paper_preset_loads_deberta_from_a_checkpoint(method, tiny_checkpoints):
    """The papers' backbone (DeBERTaV3, a DeBERTa-v2 architecture): every task and budget."""
    _load_presets("deberta_v3_base", "deberta-v2", [p for p in PRESETS if p[0] == method], tiny_checkpoints)


def test_paper_presets_load_bert_from_a_checkpoint(tiny_checkpoints):
    """BERT reads the head dropout under another key: every method's MRPC and SQuAD presets."""
    presets = [p for p in PRESETS if p[1] in ("glue/mrpc", "glue/stsb", "squad_v2")]
    _load_presets("bert_base_uncased", "bert", presets, tiny_checkpoints)
