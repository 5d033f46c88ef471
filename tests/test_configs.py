"""Every model × task × method × budget composes and resolves."""

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF


def _options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


MODELS, TASKS, METHODS = _options("model"), _options("task"), _options("method")


def test_groups_cover_the_design():
    assert {"deberta_v3_base", "bert_base_uncased", "minilm_l6", "tiny_bert", "tiny_deberta"} <= set(MODELS)
    assert {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")} <= set(TASKS)
    assert {"full", "lora", "peft_lora"} <= set(METHODS)


@pytest.mark.parametrize("budget", ["r2", "r8"])
def test_every_combination_composes(budget):
    failures = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for model, task, method in itertools.product(MODELS, TASKS, METHODS):
            overrides = [f"model={model}", f"task={task}", f"method={method}", f"budget={budget}"]
            try:
                cfg = compose("config", overrides=overrides)
                resolved = OmegaConf.to_container(cfg, resolve=True)
            except Exception as e:  # collect all failures, report at once
                failures.append(f"{overrides}: {type(e).__name__}: {e}")
                continue
            assert resolved["method"]["name"] == method.split("/")[-1]
            assert resolved["task"]["main_metric"] in resolved["task"]["metrics"]
            assert resolved["model"]["target_modules"]
            assert not {"pooler", "classifier"} & set(resolved["model"]["target_modules"])
            assert float(resolved["train"]["lr"]) > 0
    assert not failures, "\n".join(failures[:10])


def test_target_modules_per_architecture():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        deberta = compose("config", overrides=["model=deberta_v3_base"]).model.target_modules
        bert = compose("config", overrides=["model=bert_base_uncased"]).model.target_modules
    assert list(deberta) == ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert list(bert) == ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
