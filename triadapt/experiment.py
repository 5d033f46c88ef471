"""One run: wire model + data + method + loop + tracking, and write ``result.json``.

``result.json`` is the only input the report needs. It is written atomically: first with
``status: running`` when the run starts, then ``completed`` / ``failed`` / ``interrupted``.
A run directory whose result says ``completed`` is skipped, so re-running a sweep resumes
it; a directory holding a checkpoint is resumed (``resume=auto``), provided the run's
settings are those the checkpoint was written with.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from triadapt.data import build_task
from triadapt.errors import ConfigError, TriadaptError
from triadapt.methods import RunContext, build_method
from triadapt.models import head_parameters, load_model, load_tokenizer
from triadapt.schedules import GroupedLinearSchedule
from triadapt.tracking import (
    RESULT_FILE,
    Tracker,
    atomic_path,
    atomic_write_json,
    git_sha,
    package_versions,
    read_result,
)
from triadapt.train import Interrupted, Trainer, build_optimizer, latest_checkpoint, seed_everything, total_steps_for

log = logging.getLogger("triadapt")


def run_dir_of(cfg: DictConfig) -> Path:
    explicit = cfg.paths.get("run_dir")
    if explicit:
        return Path(explicit)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # Hydra not initialised (API use, tests)
        return False


def _display_path(path: Path) -> str:
    """Paths under the working directory are recorded relative to it (result files get committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _essentials(cfg: DictConfig, run_dir: Path) -> dict:
    return {
        "run_dir": _display_path(run_dir),
        "experiment": cfg.get("experiment_name"),
        "task": cfg.task.name,
        "task_group": cfg.task.group,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "budget_name": cfg.budget.name,
        "main_metric": cfg.task.main_metric,
    }


def _validate(cfg: DictConfig) -> None:
    t = cfg.train
    if not t.lr or float(t.lr) <= 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    if int(t.eval_batch_size) <= 0:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} must be > 0")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision={t.precision!r}; choose auto, fp32 or bf16")
    if int(t.get("checkpoint_every") or 0) < 0:
        raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0: only on a signal or a NaN)")
    if t.get("keep_checkpoints") is not None and int(t.keep_checkpoints) < 1:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    for key in ("max_train_samples", "max_eval_samples"):
        value = cfg.data.get(key)
        if value is not None and int(value) <= 0:
            raise ConfigError(f"data.{key}={value} must be a positive integer (or null for all examples)")


#: Settings that may differ between a run and its resume: they do not change what is trained
#: (a resumed optimizer keeps the kernel choice stored in its checkpoint).
RESUME_MAY_CHANGE = frozenset({
    "resume", "debug", "logger", "paths", "data.dir", "data.source",
    "train.device", "train.gradient_checkpointing", "train.fused_optimizer", "train.eval_batch_size", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
})  # fmt: skip


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old → new`` for every setting that differs, outside :data:`RESUME_MAY_CHANGE`."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        if name in RESUME_MAY_CHANGE:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{name}.")
        elif a != b:
            changes.append(f"{name}: {a} → {b}")
    return changes


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    return torch.device(name)


def run(cfg: DictConfig) -> float | None:
    """Run one job; return the best value of the task's main metric (Hydra's objective)."""
    run_dir = run_dir_of(cfg)
    _validate(cfg)  # before anything is written: a rejected command leaves nothing behind
    previous = read_result(run_dir)
    if previous and previous.get("status") == "completed":
        log.info("%s already completed; skipping (delete it to re-run)", run_dir)
        return (previous.get("metrics") or {}).get("best", {}).get(previous.get("main_metric"))
    checkpoint = latest_checkpoint(run_dir)
    resume = cfg.get("resume", "auto")
    if resume is True and checkpoint is None:
        raise ConfigError(f"resume=true but {run_dir} holds no checkpoint")
    if resume is False and checkpoint is not None:
        raise ConfigError(f"{run_dir} holds a checkpoint; pass resume=true to continue it or choose another run dir")
    if resume is False and previous is not None:
        raise ConfigError(f"{run_dir} already holds a {previous.get('status')} run; choose another run dir")
    if previous is None and (run_dir / RESULT_FILE).exists():
        log.warning("%s is unreadable; starting the run again", run_dir / RESULT_FILE)
    config = OmegaConf.to_container(cfg, resolve=True)
    if checkpoint is not None and previous and isinstance(previous.get("config"), dict):
        changes = config_changes(previous["config"], config)
        if changes:
            more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
            raise ConfigError(
                f"{run_dir} holds a checkpoint of a run with other settings ({'; '.join(changes[:3])}{more}); "
                "resume with the same settings, or choose another run dir"
            )

    essentials = _essentials(cfg, run_dir)
    base = essentials | {"status": "running", "error": None, "versions": package_versions(), "git_sha": git_sha()}
    base["config"] = config
    atomic_write_json(run_dir / RESULT_FILE, base)
    tracker = None
    try:
        tracker = Tracker(cfg.logger, run_dir, base["config"], name=f"{cfg.experiment_name}-seed{cfg.seed}")
        result = _train(cfg, run_dir, checkpoint, tracker)
    except BaseException as e:
        status = "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed"
        atomic_write_json(
            run_dir / RESULT_FILE, base | {"status": status, "error": {"type": type(e).__name__, "message": str(e)}}
        )
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    atomic_write_json(run_dir / RESULT_FILE, base | result | {"status": "completed"})
    tracker.finish()
    return result["metrics"]["best"][cfg.task.main_metric]


def inject_with_head(method, model, head_modules: list[str], weight_decay: float) -> tuple[list[dict], dict]:
    """Let the method adapt the model; the task head (pooler, classifier) always trains fully."""
    groups = method.inject(model)
    head = head_parameters(model, head_modules)
    in_groups = {id(p) for g in groups for p in g["params"]}
    for p in head.values():
        p.requires_grad_(True)
    head_group = [p for p in head.values() if id(p) not in in_groups]
    if head_group:
        groups.append({"params": head_group, "weight_decay": weight_decay})
    return groups, head


def _train(cfg: DictConfig, run_dir: Path, checkpoint: Path | None, tracker: Tracker) -> dict:
    seed_everything(int(cfg.seed), bool(cfg.train.get("deterministic", True)))
    device = _device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg.task, cfg.data, tokenizer, int(cfg.seed))
    total_steps, steps_per_epoch = total_steps_for(len(task.train), cfg.train)
    warmup = (
        math.ceil(float(cfg.train.warmup_ratio) * total_steps)
        if cfg.train.get("warmup_ratio") is not None
        else int(cfg.train.warmup_steps or 0)
    )
    ctx = RunContext(
        total_steps=total_steps,
        target_modules=list(cfg.model.target_modules),
        learning_rate=float(cfg.train.lr),
        weight_decay=float(cfg.train.weight_decay),
        warmup_steps=warmup,
        seed=int(cfg.seed),
    )
    method = build_method(cfg.method, ctx)
    model = load_model(cfg.model, task.model_kind, task.num_labels, tokenizer, cfg.model.get("classifier_dropout"),
                       device=device, precision=cfg.train.precision, trains_backbone=not method.freezes_backbone,
                       gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing", False)))
    groups, head = inject_with_head(method, model, list(cfg.model.head_modules), ctx.weight_decay)
    model.to(device)
    optimizer = build_optimizer(groups, ctx.learning_rate, cfg.train.adam_betas, float(cfg.train.adam_eps),
                                fused=bool(cfg.train.get("fused_optimizer", True)))
    scheduler = GroupedLinearSchedule(optimizer, warmup, total_steps)
    trainer = Trainer(
        model=model,
        method=method,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        train_cfg=cfg.train,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        main_metric=cfg.task.main_metric,
        device=device,
        run_dir=run_dir,
        seed=int(cfg.seed),
        log=tracker.log,
        group_by_length=bool(cfg.data.get("group_by_length")),
    )
    log.info(
        "%s | %s | %s: %d train features, %d steps (%d/epoch), %d adapter + %d head params, data %s",
        cfg.task.name, cfg.method.name, cfg.model.name, len(task.train), total_steps, steps_per_epoch,
        # every allocated adapter tensor (AdaLoRA's effective count is 0 before its λ train)
        sum(p.numel() for p in method.adapter_state(model).values()), sum(p.numel() for p in head.values()),
        task.info.get("source"),
    )
    summary = trainer.fit(resume_from=checkpoint)
    report = method.report(model)
    outputs = _write_rank_outputs(run_dir, report, list(cfg.model.target_modules), tracker, summary["steps"])
    return {
        "metrics": {"final": summary["final"], "best": summary["best"], "best_step": summary["best_step"]},
        "budget": {
            "target_rank": report["target_rank"],
            "adapter_params": report["adapter_params"],
            # with grouped-query attention one rank unit costs different parameters per matrix: both counts
            "total_rank": sum(report["ranks"].values()),
            "head_params": sum(p.numel() for p in head.values()),
            "ranks": report["ranks"],
        }
        | {k: v for k, v in report.items() if k not in ("target_rank", "adapter_params", "ranks", "history")},
        "timing": {
            "train_s": summary["train_s"],
            "steps": summary["steps"],
            "step_s_median": summary["step_s_median"],
            "hook_s": summary["hook_s"],
            "peak_mem_mb": summary["peak_mem_mb"],
        },
        "data": task.info,
        **outputs,
    }


def _write_rank_outputs(run_dir: Path, report: dict, patterns: list[str], tracker: Tracker, step: int) -> dict:
    """rank_history.json and a heatmap of final ranks, for methods that allocate ranks."""
    if not report.get("history"):
        return {}
    atomic_write_json(run_dir / "rank_history.json", report["history"])
    from triadapt.report import rank_heatmap

    fig = rank_heatmap(report["ranks"])
    path = run_dir / "rank_heatmap.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    tracker.log_image("rank_heatmap", path, step)
    return {"rank_history": "rank_history.json", "rank_heatmap": "rank_heatmap.png"}


def _fresh(run_dir: Path) -> bool:
    """Nothing in the run dir but what Hydra writes when a job starts (its config and log)."""
    if not run_dir.exists():
        return True
    return all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def _status_of(run_dir: Path) -> str:
    return (read_result(run_dir) or {}).get("status") or "not started"


def _record_failure(cfg: DictConfig, run_dir: Path, e: BaseException) -> None:
    """A sweep job rejected before its run began still leaves a result the summary can name."""
    if run_dir.is_dir() and not (run_dir / RESULT_FILE).exists():
        error = {"type": type(e).__name__, "message": str(e)}
        atomic_write_json(run_dir / RESULT_FILE, _essentials(cfg, run_dir) | {"status": "failed", "error": error})


def main(cfg: DictConfig) -> float | None:
    """Entry point for run.py: run dir named at start and end, one-line errors (the traceback of an
    unexpected one goes to the run dir's ``error.log``), the command that resumes an interrupted
    or failed run, non-zero exit; in a sweep a failed job does not stop the others."""
    from triadapt.cli import resume_command

    started = time.time()
    run_dir = run_dir_of(cfg)
    fresh = _fresh(run_dir)
    shown = _display_path(run_dir)
    log.info("run dir: %s", shown)
    try:
        value = run(cfg)
        log.info("run dir: %s (%s)", shown, _status_of(run_dir))
        return value
    except (TriadaptError, KeyboardInterrupt) as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or "interrupted"
        print(f"error: {message}", file=sys.stderr, flush=True)  # one line; the traceback only with debug=true
        if cfg.get("debug"):
            raise
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            print(f"resume: {resume_command(shown)}", file=sys.stderr, flush=True)
            sys.exit(130)  # a signal stops the whole sweep, not just this job
        if _is_multirun():
            _record_failure(cfg, run_dir, e)
            return None
        if fresh and not (run_dir / RESULT_FILE).exists() and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # rejected before the run began: leave nothing
        sys.exit(2)
    except Exception as e:
        if cfg.get("debug"):
            raise
        where = ""
        if run_dir.is_dir():
            (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            where = f" (traceback in {_display_path(run_dir / 'error.log')}; debug=true prints it)"
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {type(e).__name__}: {message}{where}", file=sys.stderr, flush=True)
        print(f"resume: {resume_command(shown)}", file=sys.stderr, flush=True)
        if _is_multirun():
            _record_failure(cfg, run_dir, e)  # one broken job must not stop the sweep
            return None
        sys.exit(1)
    finally:
        log.info("wall time %.1fs", time.time() - started)
