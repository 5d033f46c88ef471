"""Hydra callback: a one-line account of a multirun, and a non-zero exit when a job failed.

Registered in ``conf/config.yaml`` under ``hydra.callbacks.sweep_summary``. Jobs run in this
process (launcher=basic) or elsewhere (joblib workers, submitit processes, SLURM nodes), so each
job leaves one small JSON note in a ledger folder of the sweep directory (``.sweep_jobs/<id>/``);
at the end of the multirun this process reads the notes together with each job's ``result.json``,
prints

    sweep summary (outputs/smoke): 4 jobs: 3 completed, 0 skipped, 1 failed: method=lora,seed=2 (DataError: …)

and exits with status 1 when any job did not complete (``fail_on_error: false`` turns that off).
"Skipped" jobs found ``result.json`` already completed when they started (a resumed sweep), or
were not even submitted for that reason (launcher=slurm). "Interrupted" jobs were stopped by a
signal, ``scancel`` or a time limit and resume from their checkpoint when the sweep is re-run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LEDGER_ENV = "TRIADAPT_SWEEP_LEDGER"
LEDGER_DIR = ".sweep_jobs"
RESULT_FILE = "result.json"  # = triadapt.tracking.RESULT_FILE; not imported to keep start-up light


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.runtime.output_dir))


def record_job(num: int, job_dir: Path, *, skipped: bool = False, interrupted: str | None = None,
               error: str | None = None) -> None:
    """A launcher's word on job ``num`` of this process's running multirun (merged into its note)."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger or not Path(ledger).is_dir():
        return
    path = Path(ledger) / f"job-{num}.json"
    note = _read_json(path) or {"dir": str(job_dir), "skipped": skipped, "error": None}
    if interrupted:
        note["interrupted"] = interrupted
    if error and not note.get("error"):
        note["error"] = error
    _write_json(path, note)


def discard_ledger() -> None:
    """Remove this process's ledger when the multirun ends without its summary (Ctrl-C)."""
    ledger = os.environ.pop(LEDGER_ENV, None)
    if ledger:
        _remove_ledger(Path(ledger))


def _remove_ledger(ledger: Path) -> None:
    for p in ledger.glob("*"):
        p.unlink(missing_ok=True)
    for d in (ledger, ledger.parent):
        try:
            d.rmdir()
        except OSError:  # another sweep's ledger is still there
            pass


class SweepSummary(Callback):
    def __init__(self, fail_on_error: bool = True) -> None:
        self.fail_on_error = fail_on_error
        self._ledger: str | None = None
        self._sweep_dir: Path | None = None

    # -- main process -------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        ledger = self._sweep_dir / LEDGER_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        ledger.mkdir(parents=True, exist_ok=True)
        self._ledger = str(ledger)
        # The instance travels to joblib / submitit workers pickled; the environment variable
        # covers launchers that rebuild callbacks from the config instead.
        os.environ[LEDGER_ENV] = self._ledger

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._ledger is None:
            return
        ledger = Path(self._ledger)
        notes = [n for p in sorted(ledger.glob("job-*.json")) if (n := _read_json(p)) is not None]
        summary = summarize(notes, self._sweep_dir)
        print(summary["line"], flush=True)
        if os.environ.get(LEDGER_ENV) == self._ledger:
            del os.environ[LEDGER_ENV]
        _remove_ledger(ledger)
        if (summary["failed"] or summary["interrupted"]) and self.fail_on_error:
            sys.exit(1)

    # -- job process (wherever the launcher runs it) ------------------------------------------
    def _ledger_path(self) -> Path | None:
        ledger = self._ledger or os.environ.get(LEDGER_ENV)
        return Path(ledger) if ledger else None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        ledger = self._ledger_path()
        if ledger is None or not ledger.is_dir():
            return
        job_dir = _job_dir(config)
        previous = _read_json(job_dir / RESULT_FILE) or {}
        # Written before the run, so a job killed without reaching on_job_end still shows up.
        _write_json(ledger / f"job-{config.hydra.job.num}.json",
                    {"dir": str(job_dir), "skipped": previous.get("status") == "completed", "error": None})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        ledger = self._ledger_path()
        if ledger is None or not ledger.is_dir():
            return
        note_path = ledger / f"job-{config.hydra.job.num}.json"
        note = _read_json(note_path) or {"dir": str(_job_dir(config)), "skipped": False}
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, BaseException):  # the task raised past triadapt's own handling
            note["error"] = f"{type(value).__name__}: {value}"
        _write_json(note_path, note)


def summarize(notes: list[dict], sweep_dir: Path | None = None) -> dict:
    """Counts and the one-line message from ledger notes plus each job's result.json."""
    completed, skipped, failed, interrupted = 0, 0, [], []

    def short(d: Path) -> str:
        if sweep_dir is not None:
            try:
                return str(d.resolve().relative_to(sweep_dir))
            except ValueError:
                pass
        return str(d)

    for note in notes:
        job_dir = Path(note["dir"])
        result = _read_json(job_dir / RESULT_FILE) or {}
        status = result.get("status")
        if status == "completed" and not note.get("error"):
            if note.get("skipped"):
                skipped += 1
            else:
                completed += 1
            continue
        err = result.get("error") or {}
        if not note.get("error") and (status == "interrupted" or note.get("interrupted")):
            # Stopped from outside (signal, scancel, time limit): a re-run resumes it.
            why = "; ".join(w for w in (note.get("interrupted"), err.get("message")) if w)
            interrupted.append({"dir": str(job_dir), "why": (why or "interrupted").splitlines()[0][:200]})
            continue
        why = note.get("error") or (
            f"{err.get('type')}: {err.get('message')}" if err else f"status {status or 'missing (no result.json)'}"
        )
        failed.append({"dir": str(job_dir), "why": why.splitlines()[0][:200] if why else why})
    where = f" ({sweep_dir})" if sweep_dir is not None else ""
    line = f"sweep summary{where}: {len(notes)} jobs: {completed} completed, {skipped} skipped, {len(failed)} failed"
    if interrupted:
        line += f", {len(interrupted)} interrupted (resumable: run the same command again)"
    problems = [f"{short(Path(f['dir']))} ({f['why']})" for f in failed]
    problems += [f"{short(Path(f['dir']))} (interrupted: {f['why']})" for f in interrupted]
    if problems:
        line += ": " + "; ".join(problems)
    return {"completed": completed, "skipped": skipped, "failed": failed, "interrupted": interrupted, "line": line}
