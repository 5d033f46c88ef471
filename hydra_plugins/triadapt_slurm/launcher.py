"""Hydra launcher ``triadapt_slurm``: hydra-submitit-launcher's SLURM launcher fitted to triadapt sweeps.

Selected by ``conf/launcher/slurm.yaml`` / ``slurm_cpu.yaml``. On top of ``SlurmLauncher``:

Submitting command (:meth:`launch`)
  * a job whose ``result.json`` already says completed is not submitted (the sweep summary counts
    it as skipped), so re-running a sweep sends only unfinished jobs to the queue; one still queued
    or running from an earlier run of the command (after Ctrl-C) is waited for, not submitted twice;
  * the rest go out as one array job, each task renamed after its own job (``hydra.launcher.name``
    resolved in that job's config, e.g. ``triadapt-mrpc-lora-r8-seed1``);
  * a task that ends without a result (``scancel``, time limit, node failure) is recorded for the
    sweep summary (interrupted, resumable) instead of raising: no traceback, ledger cleaned up;
  * Ctrl-C (or SIGTERM) while waiting: one line saying the jobs keep running and how to cancel
    them; ``hydra.launcher.cancel_on_interrupt=true`` cancels them instead. Exit 130.

Job (:meth:`__call__`, on the compute node)
  * SLURM's warning before the time limit (or a pre-emption), USR2 through submitit, stops the
    training loop at the end of its step with a checkpoint; then submitit requeues the job and the
    retry resumes from that checkpoint. ``result.json`` says ``interrupted`` meanwhile, never failed.
    A warning that arrives before the loop starts is held until it does. When no requeue is left
    (``max_num_timeout`` used up) the warning is ignored: the run trains on, and if the limit cuts
    it off it still checkpoints on SLURM's SIGTERM, so a re-run of the sweep resumes it.
"""

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

#: SLURM states in which a task ended without finishing its run: it can be resumed.
INTERRUPTED_STATES = ("CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


#: <sweep dir>/.submitit/submitted.json: job folder -> SLURM job id of its latest submission.
SUBMITTED_FILE = "submitted.json"


def _still_queued(ids: dict) -> dict:
    """The entries of ``ids`` whose SLURM job is still pending or running."""
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=False)
    except OSError:  # no SLURM commands here
        return {}
    active = set(out.stdout.split()) if out.returncode == 0 else set()
    return {d: j for d, j in ids.items() if j in active}


@dataclass
class TriadaptSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.triadapt_slurm.launcher.TriadaptSlurmLauncher"
    # Ctrl-C on the submitting command: false = leave the jobs running (say how to cancel them), true = scancel them.
    cancel_on_interrupt: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="triadapt_slurm", node=TriadaptSlurmConf,
                             provider="triadapt")


class TriadaptSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        self.cancel_on_interrupt = bool(params.pop("cancel_on_interrupt", False))
        super().__init__(**params)

    # -- submitting command -------------------------------------------------------------------
    def _job_config(self, overrides: Sequence[str], idx: int):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        import triadapt  # noqa: F401  (the triadapt.dirname resolver of hydra.sweep.subdir)
        from triadapt.callbacks import RESULT_FILE, _read_json, _write_json, discard_ledger, record_job

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        record = sweep_dir / ".submitit" / SUBMITTED_FILE
        queued = _still_queued(_read_json(record) or {})  # job dir -> SLURM id, from an earlier run of this command
        jobs, waiting, returns = [], [], [None] * len(job_overrides)
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg = self._job_config(overrides, idx)
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            previous = _read_json(job_dir / RESULT_FILE) or {}
            if previous.get("status") == "completed":
                record_job(idx, job_dir, skipped=True)
                best = (previous.get("metrics") or {}).get("best") or {}
                returns[i] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                       _return_value=best.get(previous.get("main_metric")))
            elif str(job_dir) in queued:  # still queued or running: wait for it, do not submit it twice
                record_job(idx, job_dir)
                job = submitit.SlurmJob(folder=self.params["submitit_folder"], job_id=queued[str(job_dir)])
                waiting.append((i, idx, list(overrides), job_dir, job))
            else:
                jobs.append((i, idx, list(overrides), job_dir, str(cfg.hydra.launcher.name)))
        done = len(job_overrides) - len(jobs) - len(waiting)
        if waiting:
            log.info("waiting for %d jobs submitted earlier and still in the queue", len(waiting))
        if not jobs and not waiting:
            log.info("all %d jobs already completed: nothing to submit", len(job_overrides))
            return returns
        if jobs:
            log.info("submitting %d of %d jobs (%d already completed)", len(jobs), len(job_overrides), done)
            submitted = self._submit(submitit, jobs)
            waiting += [(i, idx, o, d, job) for job, (i, idx, o, d, _) in zip(submitted, jobs)]
            ids = (_read_json(record) or {}) | {str(d): job.job_id for job, (_, _, _, d, _) in zip(submitted, jobs)}
            record.parent.mkdir(parents=True, exist_ok=True)
            _write_json(record, ids)

        previous_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            for i, idx, overrides, job_dir, job in waiting:
                returns[i] = self._wait(job, idx, overrides, job_dir, record_job, submitit)
        except KeyboardInterrupt:
            self._on_interrupt([w[-1] for w in waiting], discard_ledger)
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        return returns

    def _submit(self, submitit, jobs: list) -> list:
        from hydra.core.singleton import Singleton

        executor = self._executor(submitit)
        params = [(o, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()) for _, idx, o, _, _ in jobs]
        try:
            submitted = executor.map_array(self, *zip(*params))
        except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.UncompletedJobError, OSError) as e:
            from triadapt.callbacks import discard_ledger

            lines = [line.strip() for line in str(getattr(e, "stderr", None) or e).splitlines() if "error" in line.lower()]
            print(f"error: sbatch refused the sweep ({lines[-1] if lines else e}); check hydra.launcher.partition, "
                  "gpus_per_node (launcher=slurm_cpu for CPU partitions), mem_gb, cpus_per_task, timeout_min",
                  file=sys.stderr, flush=True)
            discard_ledger()
            sys.exit(2)
        for job, (_, idx, overrides, _, name) in zip(submitted, jobs):
            log.info("\t#%d %s: %s", idx, job.job_id, " ".join(overrides))
            # One name per task (the array shares one at submission): squeue/sacct/scancel --name.
            subprocess.run(["scontrol", "update", f"JobId={job.job_id}", f"JobName={name}"],
                           capture_output=True, check=False)
        return submitted

    def _executor(self, submitit):
        """submitit's SLURM executor with this launcher's parameters (as SlurmLauncher.launch builds it)."""
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        return executor

    @staticmethod
    def _wait(job, idx, overrides, job_dir, record_job, submitit) -> JobReturn:
        try:
            value = job.results()[0]
        except submitit.core.utils.UncompletedJobError as e:
            state = job.state
            if any(state.startswith(s) for s in INTERRUPTED_STATES):
                record_job(idx, job_dir, interrupted=f"SLURM job {job.job_id} {state}")
            else:  # the job's own code raised past triadapt's handling: the last line says what
                lines = [line for line in str(e).splitlines() if line.strip()]
                record_job(idx, job_dir, error=f"SLURM job {job.job_id} {state}: {lines[-1] if lines else e}")
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)
        if isinstance(value, JobReturn):
            # The sweeper reads every return value; a failure is reported by the summary instead.
            value.status, value._return_value = JobStatus.COMPLETED, getattr(value, "_return_value", None)
            return value
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=value)

    def _on_interrupt(self, submitted, discard_ledger) -> None:
        ids = sorted({job.job_id.split("_")[0] for job in submitted}, key=str)
        if self.cancel_on_interrupt:
            subprocess.run(["scancel", *ids], check=False)
            print(f"interrupted: cancelled the sweep's SLURM jobs ({' '.join(ids)}); "
                  "re-run the same command to resume them", file=sys.stderr, flush=True)
        else:
            print(f"interrupted: the sweep's {len(submitted)} SLURM jobs keep running (job {' '.join(ids)}); "
                  f"watch: squeue -j {','.join(ids)}; cancel: scancel {' '.join(ids)}; "
                  "re-run the same command to wait for them again", file=sys.stderr, flush=True)
        discard_ledger()
        sys.exit(130)

    # -- job (on the compute node) ------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        warning = _TimeLimitWarning(signal.getsignal(signal.SIGUSR2))
        signal.signal(signal.SIGUSR2, warning.on_warning)
        signal.signal(signal.SIGALRM, warning.on_alarm)
        try:
            ret = super().__call__(*args, **kwargs)
        except SystemExit:  # triadapt's exit after a stop by signal
            if warning.stopped:
                warning.requeue()
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if warning.stopped and not _run_completed(ret):  # stopped by the warning, returned instead of exiting
            warning.requeue()
        return ret


def _run_completed(ret: JobReturn) -> bool:
    from triadapt.callbacks import RESULT_FILE, _read_json

    run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg is not None else None
    if run_dir is None:
        return ret.status == JobStatus.COMPLETED
    return (_read_json(Path(str(run_dir)) / RESULT_FILE) or {}).get("status") == "completed"


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _TimeLimitWarning:
    """USR2 (time limit near, or pre-emption): stop the training loop, then let submitit requeue."""

    def __init__(self, submitit_handler: Any) -> None:
        self.submitit_handler = submitit_handler  # SignalHandler.checkpoint_and_try_requeue
        self.pending = False
        self.stopped = False

    def _requeue_left(self) -> bool:
        handler = getattr(self.submitit_handler, "__self__", None)
        if handler is None:
            return False
        return handler._delayed._timeout_countdown - handler.has_timed_out() >= 0

    def on_warning(self, signum, frame) -> None:
        if self.pending or self.stopped:
            return
        if not self._requeue_left():
            log.warning("SLURM warning signal: no requeue left (hydra.launcher.max_num_timeout); training on. "
                        "If the time limit stops the run it checkpoints; re-run the sweep to resume it")
            return
        self.pending = True
        self._deliver(frame)

    def on_alarm(self, signum, frame) -> None:
        if self.pending:
            self._deliver(frame)

    def _deliver(self, frame) -> None:
        from triadapt.train import Trainer

        handler = signal.getsignal(signal.SIGTERM)
        if getattr(handler, "__func__", None) is Trainer._on_signal:  # the training loop is running
            handler(signal.SIGUSR2, frame)
            self.pending, self.stopped = False, True
        else:  # not started yet (or already done): look again shortly
            signal.setitimer(signal.ITIMER_REAL, 0.2)

    def requeue(self) -> None:
        """submitit's own handler: pickle this job again, ``scontrol requeue`` it, exit."""
        self.submitit_handler(signal.SIGUSR2, None)
