"""What the benchmark runs: method names, sections, model, method and training configs (from conf/)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
METHODS = ("floor", "full", "lora", "adalora", "increlora", "triadapt", "peft_lora", "peft_adalora")
ADAPTIVE = ("adalora", "increlora", "triadapt", "peft_adalora")
SECTIONS = ("main", "overhead", "memory", "growth", "scaling", "eval")


def model_config(name: str) -> DictConfig:
    """A model config from conf/model (the ``*_shape`` ones are random-init architectures)."""
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(choices)}")
    return OmegaConf.load(path)


def method_config(name: str, rank: int, **overrides) -> DictConfig:
    """conf/method/<name>.yaml (with its ``defaults``) at average rank ``rank``, as ``hparams=none`` gives it."""
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    defaults = node.pop("defaults", None) if "defaults" in node else None
    if defaults:
        merged = OmegaConf.create()
        for d in defaults:
            merged = OmegaConf.merge(merged, node if d == "_self_" else method_config_raw(d))
        node = merged
    root = OmegaConf.create({"budget": {"rank": rank}, "method": node})
    cfg = OmegaConf.create(OmegaConf.to_container(root, resolve=True)["method"])
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def method_config_raw(name: str) -> DictConfig:
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    if "defaults" in node:
        node.pop("defaults")
    return node


def train_config() -> DictConfig:
    return OmegaConf.load(CONF / "train" / "default.yaml")
