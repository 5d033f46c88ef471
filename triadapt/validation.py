"""Settings checked before a run writes anything: one line per mistake, naming the setting.

:func:`validate` needs only the composed config (types, ranges, choices); it runs before the
run dir is touched, so a typo (``seed=abc``) leaves no ``result.json`` behind.
:func:`check_sequence_length` needs the tokenizer and runs before tokenisation.
:func:`budget_name` is the budget a run actually trains with, the name the report groups by.
Method-specific bounds that need the model (a rank wider than a matrix) live in the methods.
"""

from __future__ import annotations

import math
from pathlib import Path

from triadapt.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DATA_SOURCES = ("auto", "local", "hub")
#: method settings that hold a rank (an integer); their positivity is each method's own check
RANK_KEYS = ("r", "target_rank", "init_rank", "target_total_rank", "total_budget", "incre_rank_num", "top_h")


def _number(name: str, value) -> float:
    """A finite real number (YAML may leave ``5e-4`` a string)."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={value} must be a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{name}={value} must be a finite number")
    return x


def _integer(name: str, value, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be {what}")
    return value


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose {', '.join(choices[:-1])} or {choices[-1]}")


def validate(cfg) -> None:
    """Types, ranges and choices of the settings every run reads; raises :class:`ConfigError`."""
    _integer("seed", cfg.seed)
    resume = cfg.get("resume", "auto")
    if not (isinstance(resume, bool) or resume == "auto" or (isinstance(resume, str) and Path(resume).is_dir())):
        raise ConfigError(f"resume={resume!r}; choose auto, true, false or the path of an existing run dir")
    _flag("debug", cfg.get("debug", False))

    d = cfg.data
    _choice("data.source", d.get("source", "auto"), DATA_SOURCES)
    from triadapt.data import data_layouts, resolve_data_dir

    root = resolve_data_dir(d)
    if root is not None and d.get("source", "auto") != "hub" and not root.is_dir():
        raise ConfigError(f"data dir {root} does not exist; {data_layouts()}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = d.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"data.{key}={value} must be a positive integer (or null for all examples)")

    t = cfg.train
    if _number("train.lr", t.lr) <= 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    if _number("train.weight_decay", t.weight_decay) < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if _number("train.adam_eps", t.adam_eps) <= 0:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be > 0")
    betas = t.adam_betas
    if betas is None or isinstance(betas, str) or len(betas) != 2:
        raise ConfigError(f"train.adam_betas={betas} must be two numbers in [0, 1)")
    for i, beta in enumerate(betas):
        if not 0 <= _number(f"train.adam_betas[{i}]", beta) < 1:
            raise ConfigError(f"train.adam_betas={list(betas)} must be two numbers in [0, 1)")
    if t.get("warmup_ratio") is not None and not 0 <= _number("train.warmup_ratio", t.warmup_ratio) <= 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must lie in [0, 1] (or null to use train.warmup_steps)")
    if _integer("train.warmup_steps", t.warmup_steps or 0, "a non-negative integer") < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be a non-negative integer")
    if _integer("train.batch_size", t.batch_size, "a positive integer") <= 0:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a positive integer")
    if _integer("train.eval_batch_size", t.eval_batch_size, "a positive integer") <= 0:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} must be > 0")
    if t.max_steps is not None:
        if _integer("train.max_steps", t.max_steps, "a positive integer") <= 0:
            raise ConfigError(f"train.max_steps={t.max_steps} must be a positive integer (or null to use train.epochs)")
    elif t.epochs is None or _number("train.epochs", t.epochs) <= 0:
        raise ConfigError(f"train.epochs={t.epochs} must be > 0 (or set train.max_steps)")
    if t.get("max_grad_norm") is not None and _number("train.max_grad_norm", t.max_grad_norm) < 0:
        raise ConfigError(f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0: no clipping)")
    if t.get("eval_every") is not None and _integer("train.eval_every", t.eval_every, "a positive integer") <= 0:
        raise ConfigError(f"train.eval_every={t.eval_every} must be a positive integer (or null: once per epoch)")
    if _integer("train.log_every", t.log_every, "a positive integer") <= 0:
        raise ConfigError(f"train.log_every={t.log_every} must be a positive integer")
    _choice("train.precision", t.precision, PRECISIONS)
    device = t.device
    if not (device in DEVICES or (isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"train.device={device!r}; choose auto, cpu, cuda or cuda:<index>")
    if _integer("train.checkpoint_every", t.get("checkpoint_every") or 0, "an integer") < 0:
        raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0: only on a signal or a NaN)")
    if t.get("keep_checkpoints") is not None and _integer("train.keep_checkpoints", t.keep_checkpoints) < 1:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    for key in ("fused_optimizer", "deterministic", "save_adapter", "cuda_graphs"):
        if key in t:
            _flag(f"train.{key}", t[key])
    if t.get("cuda_graphs") and t.get("fused_optimizer") is False:
        raise ConfigError("train.cuda_graphs=true replays the fused AdamW kernel; drop train.fused_optimizer=false")

    _integer("budget.rank", cfg.budget.rank)
    m = cfg.method
    for key in RANK_KEYS:
        if m.get(key) is not None:
            _integer(f"method.{key}", m[key])
    if "alpha" in m and _number("method.alpha", m.alpha) <= 0:
        raise ConfigError(f"method.alpha={m.alpha} must be > 0")
    if "dropout" in m and not 0 <= _number("method.dropout", m.dropout) < 1:
        raise ConfigError(f"method.dropout={m.dropout} must lie in [0, 1)")
    if "weight_decay" in m and m.weight_decay is not None and _number("method.weight_decay", m.weight_decay) < 0:
        raise ConfigError(f"method.weight_decay={m.weight_decay} must be >= 0 (or null: train.weight_decay)")

    if _integer("task.max_seq_length", cfg.task.max_seq_length, "a positive integer") <= 0:
        raise ConfigError(f"task.max_seq_length={cfg.task.max_seq_length} must be a positive integer")


def budget_name(cfg) -> str:
    """The budget the run trains with: ``budget.name``, unless the method's own rank setting
    overrides it (``method.r=2`` under ``budget=r8`` trains rank 2, recorded as ``r2``)."""
    m = cfg.method
    for key in ("target_total_rank", "total_budget"):
        if m.get(key) is not None:
            return f"total{int(m[key])}"
    for key in ("r", "target_rank"):
        if m.get(key) is not None and int(m[key]) != int(cfg.budget.rank):
            return f"r{int(m[key])}"
    return str(cfg.budget.name)


def _position_limit(model_cfg) -> int | None:
    """The longest input the model's absolute position embeddings cover; None when it has none
    (DeBERTa's relative attention) or the model's config cannot be read here."""
    try:
        if model_cfg.source == "random":
            arch = dict(model_cfg.architecture)
            model_type, positions = arch.get("model_type"), arch.get("max_position_embeddings")
            relative = arch.get("position_biased_input") is False
        else:
            from transformers import AutoConfig

            from triadapt.models import _package_dir

            where = _package_dir(model_cfg.pretrained) if model_cfg.source == "package" else model_cfg.pretrained
            config = AutoConfig.from_pretrained(where, local_files_only=model_cfg.source == "package")
            model_type, positions = config.model_type, getattr(config, "max_position_embeddings", None)
            relative = getattr(config, "position_biased_input", True) is False or (
                getattr(config, "position_embedding_type", "absolute") != "absolute"
            )
    except Exception:  # an unreachable hub model fails with its own message when loaded
        return None
    if relative or not positions:
        return None
    return int(positions) - (2 if model_type in ("roberta", "xlm-roberta", "camembert") else 0)


def check_sequence_length(cfg, tokenizer) -> None:
    """``task.max_seq_length`` must leave room for the special tokens and one token of each text
    (below that the tokenizer stops truncating), and fit the model's position embeddings."""
    n = int(cfg.task.max_seq_length)
    texts = len(cfg.task.get("text_keys") or ()) or 2
    least = tokenizer.num_special_tokens_to_add(pair=texts > 1) + texts
    if n < least:
        raise ConfigError(
            f"task.max_seq_length={n} is below {least}: the special tokens and one token of each of the "
            f"{texts} text(s) need that many"
        )
    limit = _position_limit(cfg.model)
    if limit is not None and n > limit:
        raise ConfigError(
            f"task.max_seq_length={n} exceeds the {limit} positions of model {cfg.model.name}; use at most {limit}"
        )
