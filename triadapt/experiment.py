"""One run: wire model + data + method + loop + tracking, and write ``result.json``.

``result.json`` is the only input the report needs. It is written atomically: first with
``status: running`` when the run starts, then ``completed`` / ``failed`` / ``interrupted``.
A run directory whose result says ``completed`` is skipped, so re-running a sweep resumes
it; a directory holding a checkpoint is resumed (``resume=auto``), provided the run's
settings are those the checkpoint was written with (stored in the checkpoint itself).
Settings are validated, the run dir locked (one writer at a time) and the resume checked
before anything is written; a signal at any point records ``interrupted``.
"""

from __future__ import annotations

import logging
import math
import signal
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from triadapt.data import build_task
from triadapt.errors import ConfigError, TriadaptError
from triadapt.methods import RunContext, build_method
from triadapt.models import head_parameters, load_model, load_tokenizer
from triadapt.rundir import RunDirLock
from triadapt.schedules import GroupedLinearSchedule
from triadapt.tracking import (
    RESULT_FILE,
    Tracker,
    atomic_path,
    atomic_write_json,
    git_sha,
    package_versions,
    read_result,
    write_status_in_place,
)
from triadapt.train import (
    Interrupted,
    Trainer,
    build_optimizer,
    checkpoint_config,
    latest_checkpoint,
    seed_everything,
    total_steps_for,
)
from triadapt.validation import budget_name, check_sequence_length, validate

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
        "budget_name": budget_name(cfg),
        "main_metric": cfg.task.main_metric,
    }


#: Settings that may differ between a run and its resume: they do not change what is trained
#: (a resumed optimizer keeps the kernel choice stored in its checkpoint).
RESUME_MAY_CHANGE = frozenset({
    "resume", "debug", "logger", "paths", "data.dir", "data.source",
    "train.device", "train.gradient_checkpointing", "train.fused_optimizer", "train.cuda_graphs", "train.eval_batch_size", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
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
    validate(cfg)
    run_dir = run_dir_of(cfg)
    previous = read_result(run_dir)
    if previous and previous.get("status") == "completed":  # final: no lock needed to read it
        return _skip(run_dir, previous)
    with RunDirLock(run_dir):
        return _run_locked(cfg, run_dir)


def _skip(run_dir: Path, previous: dict) -> float | None:
    log.info("%s already completed; skipping (delete it to re-run)", run_dir)
    return ((previous.get("metrics") or {}).get("best") or {}).get(previous.get("main_metric"))


def _run_locked(cfg: DictConfig, run_dir: Path) -> float | None:
    previous = read_result(run_dir)  # again: another process may have finished it meanwhile
    if previous and previous.get("status") == "completed":
        return _skip(run_dir, previous)
    checkpoint = latest_checkpoint(run_dir)
    resume = cfg.get("resume", "auto")
    if resume is True and checkpoint is None:
        raise ConfigError(f"resume=true but {run_dir} holds no checkpoint")
    if resume is False and checkpoint is not None:
        raise ConfigError(f"{run_dir} holds a checkpoint; pass resume=true to continue it or choose another run dir")
    if resume is False and previous is not None:
        raise ConfigError(f"{run_dir} already holds a {previous.get('status')} run; choose another run dir")
    if previous is None and (run_dir / RESULT_FILE).exists():
        log.warning("%s is unreadable; its checkpoint (if any) decides what may resume", run_dir / RESULT_FILE)
    config = OmegaConf.to_container(cfg, resolve=True)
    if checkpoint is not None:
        _check_resume(run_dir, checkpoint, config, previous)

    essentials = _essentials(cfg, run_dir)
    if essentials["budget_name"] != cfg.budget.name:
        log.warning("the method's rank overrides budget %s: recorded as budget %s", cfg.budget.name, essentials["budget_name"])
    base = essentials | {"status": "running", "error": None, "versions": package_versions(), "git_sha": git_sha()}
    base["protocol"] = protocol_of(cfg)
    base["config"] = config
    tracker = None
    with _SignalsInterrupt() as signals:
        try:
            atomic_write_json(run_dir / RESULT_FILE, base)
            tracker = Tracker(cfg.logger, run_dir, base["config"], name=f"{cfg.experiment_name}-seed{cfg.seed}")
            result = _train(cfg, run_dir, checkpoint, tracker, config)
            final_checkpoint = result.pop("final_checkpoint", None)
            atomic_write_json(run_dir / RESULT_FILE, base | result | {"status": "completed"})
        except BaseException as e:
            signals.disarm()  # a second signal must not cut the status write short
            status = "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed"
            _record_status(run_dir, base | {"status": status, "error": {"type": type(e).__name__, "message": str(e)}})
            if tracker is not None:
                tracker.finish(exit_code=1)
            raise
    # Complete: the end-of-run checkpoint (kept only so that failed final writes can resume) goes.
    if final_checkpoint is not None:
        Path(final_checkpoint).unlink(missing_ok=True)
        try:
            Path(final_checkpoint).parent.rmdir()
        except OSError:  # other checkpoints kept (train.keep_checkpoints)
            pass
    tracker.finish()
    return result["metrics"]["best"][cfg.task.main_metric] if result["metrics"]["best"] else None


def _check_resume(run_dir: Path, checkpoint: Path, config: dict, previous: dict | None) -> None:
    """The checkpoint's own settings decide whether this run may continue it."""
    old = checkpoint_config(checkpoint)
    if old is None and previous and isinstance(previous.get("config"), dict):
        old = previous["config"]  # a checkpoint written before checkpoints carried their settings
    if old is None:
        raise ConfigError(
            f"{checkpoint} does not record the settings it was written with, and {run_dir / RESULT_FILE} is "
            "missing or unreadable; delete the checkpoint to start over, or choose another run dir"
        )
    old_method, new_method = (c.get("method", {}).get("name") for c in (old, config))
    if old_method != new_method:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of method {old_method}, not {new_method}; "
            f"resume with method={old_method}, or choose another run dir"
        )
    changes = config_changes(old, config)
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a run with other settings ({'; '.join(changes[:3])}{more}); "
            "resume with the same settings, or choose another run dir"
        )


def _record_status(run_dir: Path, record: dict) -> None:
    """Write the final status; on a full disk, in place (needs no second copy's space)."""
    path = run_dir / RESULT_FILE
    try:
        atomic_write_json(path, record)
    except Exception:
        try:
            write_status_in_place(path, record)
        except Exception as e:
            log.warning("could not record status %s in %s (%s)", record["status"], path, type(e).__name__)


class _SignalsInterrupt:
    """SIGTERM/SIGINT outside the training loop (loading, tokenising, final writes) raise
    :class:`Interrupted`, so the run records ``interrupted`` instead of dying as ``running``.
    The training loop installs its own handlers (checkpoint, then stop) and restores these."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._previous: dict = {}
        self._armed = True

    def _handler(self, signum, frame) -> None:
        if self._armed:
            self._armed = False
            raise Interrupted(
                f"stopped by signal {signum} outside the training loop; run the same command again to "
                "resume from the last checkpoint (or start over if there is none)"
            )

    def disarm(self) -> None:
        self._armed = False

    def __enter__(self) -> _SignalsInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def inject_with_head(
    method, model, head_modules: list[str], weight_decay: float, decay_norm_and_bias: bool = False
) -> tuple[list[dict], dict]:
    """Let the method adapt the model; the task head (pooler, classifier) always trains fully.

    Unless ``decay_norm_and_bias``, biases and LayerNorm weights get no weight decay (HF Trainer's
    rule, which every reference script ran under): they move to a group of their own with 0."""
    groups = method.inject(model)
    head = head_parameters(model, head_modules)
    in_groups = {id(p) for g in groups for p in g["params"]}
    for p in head.values():
        p.requires_grad_(True)
    head_group = [p for p in head.values() if id(p) not in in_groups]
    if head_group:
        groups.append({"params": head_group, "weight_decay": weight_decay})
    if not decay_norm_and_bias:
        groups = _split_no_decay(groups, _norm_and_bias_ids(model))
    return groups, head


def _norm_and_bias_ids(model: torch.nn.Module) -> set[int]:
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    return norms | {id(p) for name, p in model.named_parameters() if name.endswith("bias")}


def _split_no_decay(groups: list[dict], no_decay: set[int]) -> list[dict]:
    """Each group with weight decay > 0 becomes its decayed part followed by its no-decay part."""
    out = []
    for g in groups:
        if not g.get("weight_decay") or not any(id(p) in no_decay for p in g["params"]):
            out.append(g)
            continue
        decayed = [p for p in g["params"] if id(p) not in no_decay]
        if decayed:
            out.append(g | {"params": decayed})
        out.append(g | {"params": [p for p in g["params"] if id(p) in no_decay], "weight_decay": 0.0})
    return out


#: Settings every method of a task shares within an experiment (README "Protocol"): result.json's
#: ``protocol.shared``; tests/test_protocol.py asserts them equal across the methods of every experiment.
PROTOCOL_SHARED = {
    "model": "model.name", "task": "task.name", "max_seq_length": "task.max_seq_length",
    "doc_stride": "task.doc_stride", "main_metric": "task.main_metric",  # best checkpoint = best main metric
    "max_train_samples": "data.max_train_samples", "max_eval_samples": "data.max_eval_samples",
    "group_by_length": "data.group_by_length", "batch_size": "train.batch_size", "eval_every": "train.eval_every",
    "precision": "train.precision", "tf32": "train.tf32", "optimizer": "train.optimizer",
    "adam_betas": "train.adam_betas", "adam_eps": "train.adam_eps", "max_grad_norm": "train.max_grad_norm",
    "decay_norm_and_bias": "train.decay_norm_and_bias",
}  # fmt: skip
#: What each method may take from its own paper (declared, recorded, printed): ``protocol.recipe``.
PROTOCOL_RECIPE = {
    "lr": "train.lr", "epochs": "train.epochs", "max_steps": "train.max_steps", "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "classifier_dropout": "model.classifier_dropout",
}  # fmt: skip


def protocol_of(cfg: DictConfig) -> dict:
    """{"shared": the measurement protocol, resolved; "recipe": the training recipe and method knobs}."""

    def value(path: str):
        v = OmegaConf.select(cfg, path, default=None)
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v

    shared = {key: value(path) for key, path in PROTOCOL_SHARED.items()}
    device = cfg.train.get("device", "auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    bf16 = shared["precision"] == "bf16" or (shared["precision"] == "auto" and cuda)
    shared["precision"] = "bf16 autocast" if bf16 else "fp32"
    shared["tf32"] = bool(shared["tf32"]) and cuda and not bf16  # TF32 matmuls only act on CUDA fp32
    shared["eval_every"] = shared["eval_every"] or "epoch"
    recipe = {key: value(path) for key, path in PROTOCOL_RECIPE.items()}
    method = OmegaConf.to_container(cfg.method, resolve=True)
    recipe |= {f"method.{k}": v for k, v in method.items() if k != "name"}
    return {"shared": shared, "recipe": recipe}


def _train(cfg: DictConfig, run_dir: Path, checkpoint: Path | None, tracker: Tracker, config: dict) -> dict:
    seed_everything(int(cfg.seed), bool(cfg.train.get("deterministic", True)))
    device = _device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    check_sequence_length(cfg, tokenizer)
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
    groups, head = inject_with_head(method, model, list(cfg.model.head_modules), ctx.weight_decay,
                                    bool(cfg.train.get("decay_norm_and_bias", False)))
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
        config=config,
        max_length=int(cfg.task.max_seq_length),
    )
    log.info(
        "%s | %s | %s: %d train features, %d steps (%d/epoch), %d trainable params (%d in the head), data %s",
        cfg.task.name, cfg.method.name, cfg.model.name, len(task.train), total_steps, steps_per_epoch,
        # what the optimizer updates (the budget's effective count is in result.json: AdaLoRA's is 0 until its λ train)
        sum(p.numel() for g in groups for p in g["params"]), sum(p.numel() for p in head.values()),
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
            "graph_captures": summary["graph_captures"],  # train.cuda_graphs: count and seconds
        },
        "data": task.info,
        "final_checkpoint": summary["final_checkpoint"],
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


def _remove_run_dir(run_dir: Path, output_dir: Path) -> None:
    """Delete a run dir Hydra just created, and the folders it created above it (up to the output dir)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    stop = output_dir.resolve()
    for parent in run_dir.resolve().parents:
        if parent == stop or stop not in parent.parents:
            break
        try:
            parent.rmdir()  # only while empty
        except OSError:
            break


def _status_of(run_dir: Path) -> str:
    return (read_result(run_dir) or {}).get("status") or "not started"


def _record_failure(cfg: DictConfig, run_dir: Path, e: BaseException) -> None:
    """A sweep job rejected before its run began still leaves a result the summary can name."""
    if run_dir.is_dir() and not (run_dir / RESULT_FILE).exists():
        error = {"type": type(e).__name__, "message": str(e)}
        atomic_write_json(run_dir / RESULT_FILE, _essentials(cfg, run_dir) | {"status": "failed", "error": error})


def _single_line(e: BaseException) -> str:
    """The message of ``e`` on one line (its non-blank lines joined)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main(cfg: DictConfig) -> float | None:
    """Entry point for run.py: run dir named at start and end, one-line errors (the traceback of an
    unexpected one goes to the run dir's ``error.log``), the command that resumes an interrupted
    or failed run, non-zero exit; in a sweep a failed job does not stop the others."""
    from triadapt.cli import resume_command

    started = time.time()
    run_dir = run_dir_of(cfg)
    fresh = _fresh(run_dir)
    shown = _display_path(run_dir)
    try:
        validate(cfg)  # a rejected command names no run dir (run() validates again: harmless)
        log.info("run dir: %s", shown)
        value = run(cfg)
        log.info("run dir: %s (%s)", shown, _status_of(run_dir))
        return value
    except (TriadaptError, KeyboardInterrupt) as e:
        message = _single_line(e) or "stopped"
        stopped = isinstance(e, (Interrupted, KeyboardInterrupt))  # a stop asked for, not an error: resumable
        print(f"{'interrupted' if stopped else 'error'}: {message}", file=sys.stderr, flush=True)
        if cfg.get("debug"):
            raise
        if stopped:
            print(f"resume: {resume_command(shown)}", file=sys.stderr, flush=True)
            sys.exit(130)  # a signal stops the whole sweep, not just this job
        if _is_multirun():
            return e  # the sweep summary names the job failed; nothing is written into its dir
        if fresh and isinstance(e, ConfigError):
            _remove_run_dir(run_dir, Path(cfg.paths.output_dir))  # a rejected command leaves nothing behind
        sys.exit(2)
    except Exception as e:
        if cfg.get("debug"):
            raise
        where = ""
        if run_dir.is_dir():
            (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            where = f" (traceback in {_display_path(run_dir / 'error.log')}; debug=true prints it)"
        message = _single_line(e)
        print(f"error: {type(e).__name__}: {message}{where}", file=sys.stderr, flush=True)
        print(f"resume: {resume_command(shown)}", file=sys.stderr, flush=True)
        if _is_multirun():
            _record_failure(cfg, run_dir, e)  # one broken job must not stop the sweep
            return None
        sys.exit(1)
    finally:
        log.info("wall time %.1fs", time.time() - started)
