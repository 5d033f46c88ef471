"""Export a finished run so that it loads without triadapt.

    python -m triadapt.export RUN_DIR --merged OUT [--best | --final]
    python -m triadapt.export RUN_DIR --peft OUT   [--best | --final]

``--merged`` writes a standard transformers model: every adapted matrix holds W0 + ΔW (ΔW folded in
exactly as the evaluation path folds it), the trained task head, a config with the task's labels,
and the tokenizer; ``AutoModelForSequenceClassification`` / ``AutoModelForQuestionAnswering
.from_pretrained(OUT)`` loads it. Every method exports this way (grown ranks, masked ranks, full
fine-tuning). ``--peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` for
``PeftModel.from_pretrained(base, OUT)``, for the methods peft has (LoRA, AdaLoRA).

The run is rebuilt from its ``result.json`` config: the backbone as the run loaded it (a random
backbone from the run's seed), the method's own structure grown to the saved shapes, then the saved
adapter (``adapter[_best].safetensors``) and the head and layer scales (``head[_best].safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn

from triadapt.errors import ConfigError, TriadaptError
from triadapt.methods import RunContext, build_method
from triadapt.methods.core import (
    AdaptedLinear,
    DiagonalCore,
    TriangularCore,
    adapted_layers,
    replace_module,
)
from triadapt.methods.lowrank_kernels import _folded_weight
from triadapt.models import head_parameters, load_model, load_tokenizer
from triadapt.tracking import read_result
from triadapt.train import seed_everything

#: task.kind → the model head the run trained
MODEL_KINDS = {"classification": "sequence_classification", "question_answering": "question_answering"}
#: label names of the GLUE tasks, in label-id order (the hub's ClassLabel names)
GLUE_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}
#: methods with a peft equivalent → peft's tuner type
PEFT_TYPES = {"lora": "lora", "peft_lora": "lora", "adalora": "adalora", "peft_adalora": "adalora"}
#: why the others have none
NO_PEFT = {
    "triadapt": "its triangular core C = L + U and grown ranks have no peft tuner",
    "increlora": "its grown ranks (and reserve) have no peft tuner",
    "full": "full fine-tuning has no adapter",
}


@dataclass
class Run:
    """A finished run's config and the saved tensors of one checkpoint."""

    dir: Path
    cfg: DictConfig
    result: dict
    which: str  # "best" | "final"
    tensors: dict[str, torch.Tensor]
    scales: dict[str, float]

    @property
    def step(self) -> int | None:
        m = self.result.get("metrics") or {}
        return m.get("best_step") if self.which == "best" else (self.result.get("timing") or {}).get("steps")

    @property
    def metrics(self) -> dict:
        return (self.result.get("metrics") or {}).get(self.which) or {}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def load_run(run_dir: str | Path, which: str = "best") -> Run:
    run_dir = Path(run_dir)
    result = read_result(run_dir)
    if result is None:
        raise ConfigError(f"{run_dir} holds no readable result.json; pass a run dir (the folder with result.json)")
    if result.get("status") != "completed" or not isinstance(result.get("config"), dict):
        raise ConfigError(f"{run_dir} is a {result.get('status')} run; only a completed run can be exported")
    suffix = "_best" if which == "best" else ""
    adapter, head = run_dir / f"adapter{suffix}.safetensors", run_dir / f"head{suffix}.safetensors"
    if not adapter.is_file():
        raise ConfigError(f"{adapter} not found: the run saved no weights (train.save_adapter=false?)")
    if not head.is_file():
        raise ConfigError(
            f"{head} not found: the run predates head saving and its trained task head is lost; run it again to export"
        )
    tensors, _ = _read(adapter)
    rest, meta = _read(head)
    return Run(
        run_dir,
        OmegaConf.create(result["config"]),
        result,
        which,
        tensors | rest,
        {k: float(v) for k, v in json.loads(meta.get("scales", "{}")).items()},
    )


# --------------------------------------------------------------------------- rebuild


def _base_model(cfg: DictConfig):
    """(backbone with its task head as the run loaded it, tokenizer); a random backbone from the run's seed."""
    seed_everything(int(cfg.seed), deterministic=False)  # the run seeded here before building its model
    tokenizer = load_tokenizer(cfg.model)
    kind = MODEL_KINDS[cfg.task.kind]
    model = load_model(cfg.model, kind, int(cfg.task.num_labels), tokenizer, cfg.model.get("classifier_dropout"))
    return model, tokenizer


def _context(run: Run) -> RunContext:
    cfg = run.cfg
    return RunContext(
        total_steps=int(run.result["timing"]["steps"]),
        target_modules=list(cfg.model.target_modules),
        learning_rate=float(cfg.train.lr),
        weight_decay=float(cfg.train.weight_decay),
        seed=int(cfg.seed),
    )


def _grow_to_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Append to each adapted layer the components the run grew (shapes from the saved tensors;
    values are loaded afterwards)."""
    for name, layer in adapted_layers(model):
        i = len(layer.lora_A)
        while f"{name}.lora_A.{i}" in tensors:
            a, b = tensors[f"{name}.lora_A.{i}"], tensors[f"{name}.lora_B.{i}"]
            layer.append_factors(torch.zeros_like(a), torch.zeros_like(b))
            i += 1
        core = layer.core
        if isinstance(core, DiagonalCore):
            j = len(core.values)
            while f"{name}.core.values.{j}" in tensors:
                core.append(torch.zeros_like(tensors[f"{name}.core.values.{j}"]))
                j += 1
        elif isinstance(core, TriangularCore):
            # one core block per growth event, beside that event's A block (k ranks); a block is
            # triangular ("single") when it holds exactly the triangle entries of its k ranks
            j = len(core.blocks)
            while f"{name}.core.blocks.{j}" in tensors:
                values, k = tensors[f"{name}.core.blocks.{j}"], tensors[f"{name}.lora_A.{j}"].shape[0]
                triangular = values.numel() == TriangularCore.block_numel(core.rank, core.rank + k, True)
                core.append(torch.zeros_like(values), k, triangular=triangular)
                j += 1


def rebuild(run: Run):
    """(the run's trained model, in eval mode, with its adapters unmerged; tokenizer)."""
    cfg = run.cfg
    method = build_method(cfg.method, _context(run))
    model, tokenizer = _base_model(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedule warnings were shown when the run started
        method.inject(model)
    try:
        _grow_to_saved(model, run.tensors)
        _, unexpected = model.load_state_dict(run.tensors, strict=False)
    except (KeyError, ValueError, RuntimeError) as err:  # a missing factor, a shape that does not fit
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"the weights in {run.dir} do not fit the model its config builds ({reason})") from None
    expected = set(method.adapter_state(model)) | set(head_parameters(model, list(cfg.model.head_modules)))
    missing = sorted(expected - set(run.tensors))
    if unexpected or missing:
        what = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
        raise ConfigError(f"the weights in {run.dir} do not fit the model its config builds ({what})")
    layers = dict(adapted_layers(model))
    if set(run.scales) != set(layers):
        raise ConfigError(f"the layer scales saved in {run.dir} do not match its adapted layers")
    for name, layer in layers.items():
        layer.scale = run.scales[name]
    return model.eval(), tokenizer


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear (W0 + ΔW) and unwrap it: a plain transformers model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            base = module.base
            if module.rank:
                a, b, kind, core = module.factors()
                w = base.weight
                # the function the evaluation path folds with: the same numbers the run scored
                merged = (
                    _folded_weight(w, a, b, core, kind, float(module.scale))
                    if kind is not None
                    else w + module.delta_weight()
                )
                base.weight.copy_(merged)
            replace_module(model, name, base)
        elif isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            replace_module(model, name, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # peft's in-place tuners leave these behind
        if hasattr(model, attr) and attr in vars(model):
            delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _set_labels(model: nn.Module, cfg: DictConfig) -> None:
    config = model.config
    if cfg.task.kind != "classification":
        return
    if cfg.task.get("is_regression"):
        config.problem_type = "regression"
        config.id2label, config.label2id = {0: "score"}, {"score": 0}
        return
    n = int(cfg.task.num_labels)
    names = GLUE_LABELS.get(cfg.task.name) if cfg.task.group == "glue" else None
    names = names if names and len(names) == n else [f"LABEL_{i}" for i in range(n)]
    config.problem_type = "single_label_classification"
    config.id2label = dict(enumerate(names))
    config.label2id = {label: i for i, label in enumerate(names)}


# --------------------------------------------------------------------------- writers


class _NewFolder:
    """Write into a temporary sibling of ``out`` and move it into place at the end: a failed export
    leaves nothing, and an existing non-empty folder is never touched."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ConfigError(f"{self.out} exists and is not empty; choose a new folder")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.out.exists():
                self.out.rmdir()  # empty (checked above)
            os.replace(self.tmp, self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _provenance(run: Run, kind: str) -> dict:
    return {
        "export": kind,
        "run_dir": str(run.dir),
        "checkpoint": run.which,
        "step": run.step,
        "metrics": run.metrics,
        "method": run.cfg.method.name,
        "task": run.cfg.task.name,
        "model": run.cfg.model.name,
        "git_sha": run.result.get("git_sha"),
    }


def export_merged(run: Run, out: str | Path) -> Path:
    model, tokenizer = rebuild(run)
    merge(model)
    _set_labels(model, run.cfg)
    with _NewFolder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "triadapt_export.json").write_text(json.dumps(_provenance(run, "merged"), indent=2) + "\n")
    return Path(out)


def _peft_config(run: Run, model: nn.Module):
    from peft import AdaLoraConfig, LoraConfig

    cfg, m = run.cfg, run.cfg.method
    heads = [h for h in cfg.model.head_modules if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())]
    common = {
        "target_modules": list(cfg.model.target_modules),
        "lora_alpha": float(m.alpha),
        "lora_dropout": float(m.dropout),
        "task_type": "SEQ_CLS" if cfg.task.kind == "classification" else "QUESTION_ANS",
        "modules_to_save": heads,  # the trained head (pooler, classifier / qa_outputs) travels with the adapter
    }
    if PEFT_TYPES[m.name] == "lora":
        return LoraConfig(r=int(m.r), bias="none", **common)
    from triadapt.methods.adalora import AdaLoRASettings

    s = AdaLoRASettings.from_config(m, _context(run))
    # The masked singular values travel as zeros, so the outputs are those of the run.
    return AdaLoraConfig(
        init_r=s.init_rank, target_r=round(s.target_rank), tinit=s.schedule.tinit, tfinal=s.schedule.tfinal,
        deltaT=s.schedule.delta_t, beta1=s.beta1, beta2=s.beta2, orth_reg_weight=s.orth_reg_weight,
        total_step=s.schedule.total_steps, **common,
    )  # fmt: skip


def _adapter_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """peft's tensors (lora_A, lora_B and AdaLoRA's lora_E) of one of our adapted layers."""
    if isinstance(layer, AdaptedLinear):
        a, b, kind, core = layer.factors()
        out = {"lora_A": a, "lora_B": b}
        if kind == "diagonal":
            out["lora_E"] = core.reshape(-1, 1)
        return out
    out = {key: getattr(layer, key)["default"] for key in ("lora_A", "lora_B", "lora_E") if hasattr(layer, key)}
    return {
        key: v.weight if isinstance(v, nn.Linear) else v for key, v in out.items()
    }  # LoRA: Linear; AdaLoRA: tensors


def _peft_scale(layer) -> float:
    """The factor peft applies to B·A (AdaLoRA divides its scaling by the rank in the forward)."""
    scale = float(layer.scaling["default"])
    return scale / (float(layer.ranknum["default"]) + 1e-5) if hasattr(layer, "ranknum") else scale


@torch.no_grad()
def export_peft(run: Run, out: str | Path) -> Path:
    name = run.cfg.method.name
    if name not in PEFT_TYPES:
        reason = NO_PEFT.get(name, "peft has no equivalent of this method")
        raise ConfigError(f"method {name!r} cannot be exported for peft: {reason}; export it with --merged OUT")
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    trained, tokenizer = rebuild(run)
    base, _ = _base_model(run.cfg)
    peft_model = get_peft_model(base, _peft_config(run, base))
    ours = dict(trained.named_modules())
    prefix = "base_model.model."
    for pname, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer) and pname.startswith(prefix):
            mine = ours[pname.removeprefix(prefix)]
            for key, value in _adapter_tensors(mine).items():
                target = getattr(module, key)["default"]
                (target.weight if isinstance(target, nn.Linear) else target).copy_(value)
            scale = float(mine.scale) if isinstance(mine, AdaptedLinear) else _peft_scale(mine)
            if abs(scale - _peft_scale(module)) > 1e-6 * abs(scale):
                raise ConfigError(f"{pname}: scale {scale} has no peft equivalent ({_peft_scale(module)})")
    for pname, module in peft_model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper" and pname.startswith(prefix):
            module.modules_to_save["default"].load_state_dict(ours[pname.removeprefix(prefix)].state_dict())
    with _NewFolder(out) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "triadapt_export.json").write_text(json.dumps(_provenance(run, "peft"), indent=2) + "\n")
    return Path(out)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m triadapt.export", description="Export a finished run for use without triadapt."
    )
    parser.add_argument("run_dir", help="the run's folder (holding result.json and adapter*.safetensors)")
    fmt = parser.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--merged", metavar="OUT", help="a transformers model with ΔW folded in (every method)")
    fmt.add_argument("--peft", metavar="OUT", help="a peft adapter folder (lora, adalora, peft_lora, peft_adalora)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", dest="which", action="store_const", const="best", help="best checkpoint (default)")
    which.add_argument("--final", dest="which", action="store_const", const="final", help="weights at the last step")
    parser.set_defaults(which="best")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.which)
        out = export_merged(run, args.merged) if args.merged else export_peft(run, args.peft)
    except TriadaptError as err:
        sys.exit(f"error: {err}")
    main_metric = run.cfg.task.main_metric
    value = run.metrics.get(main_metric)
    score = f"{main_metric}={value:.4f}" if isinstance(value, (int, float)) else "no metric recorded"
    head = (
        "AutoModelForQuestionAnswering"
        if run.cfg.task.kind == "question_answering"
        else ("AutoModelForSequenceClassification")
    )
    how = f"{head}.from_pretrained({str(out)!r})" if args.merged else f"PeftModel.from_pretrained(base, {str(out)!r})"
    print(f"exported {run.dir} ({run.which} checkpoint, step {run.step}, {score}) to {out}; load with {how}")
    return out


if __name__ == "__main__":
    main()
