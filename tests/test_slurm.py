"""launcher=slurm_cpu against a live single-node SLURM: sweeps, re-runs, scancel, requeue, time limits.

Marker ``slurm`` (and ``slow``: a few minutes in all). A session fixture starts the throwaway cluster
of ``scripts/slurm_local_start.sh`` (root, with slurm-wlm, munge, slurmdbd and mariadb-server
installed, as ``.ci/run`` does) and stops it afterwards if it started it; where that is not
possible the tests are skipped with the reason (``TRIADAPT_REQUIRE_SLURM=1`` turns that into a
failure). Jobs: tiny BERT on hand-made MRPC, one CPU each, a few seconds of training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
from conftest import REPO

STEPS = 2500  # per sweep job: long enough to catch it mid-training (~20 s on one idle core)
NAME = "triadapt-mrpc-{method}-r2-seed{seed}"  # conf/launcher/slurm.yaml's per-job name for experiment=smoke


# -- without a cluster ------------------------------------------------------------------------

@pytest.mark.parametrize("launcher, gpus", [("slurm", 1), ("slurm_cpu", None)])
def test_slurm_launchers_compose_with_one_name_per_job(launcher, gpus):
    from test_sweeps import _compose

    cfg = _compose([f"launcher={launcher}", "task=glue/rte", "method=adalora", "seed=3", "paths.output_dir=/out"])
    hl = cfg.hydra.launcher
    assert hl._target_ == "hydra_plugins.triadapt_slurm.launcher.TriadaptSlurmLauncher"
    assert hl.gpus_per_node == gpus  # slurm_cpu: no GPU request at all (no gres)
    assert {"partition", "account", "qos", "cpus_per_task", "mem_gb", "timeout_min"} <= set(hl)
    assert hl.name == "triadapt-rte-adalora-r8-seed3" and hl.cancel_on_interrupt is False


def test_summary_counts_interrupted_jobs_apart(tmp_path):
    from triadapt.callbacks import summarize

    for name, status in (("a", "completed"), ("b", "interrupted"), ("c", "running")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"status": status, "error": None}))
    notes = [{"dir": str(tmp_path / "a"), "skipped": False, "error": None},
             {"dir": str(tmp_path / "b"), "skipped": False, "error": None},
             {"dir": str(tmp_path / "c"), "skipped": False, "error": None, "interrupted": "SLURM job 7_2 CANCELLED by 0"}]
    s = summarize(notes, tmp_path)
    assert (s["completed"], len(s["failed"]), len(s["interrupted"])) == (1, 0, 2)
    assert s["line"].endswith(
        "3 jobs: 1 completed, 0 skipped, 0 failed, 2 interrupted (resumable: run the same command again): "
        "b (interrupted: interrupted); c (interrupted: SLURM job 7_2 CANCELLED by 0)")


class _FakeSubmititHandler:
    """submitit's SignalHandler as the job sees it: timeouts left, and the requeue it performs."""

    def __init__(self, countdown: int) -> None:
        self._delayed = SimpleNamespace(_timeout_countdown=countdown)
        self.requeued = 0

    def has_timed_out(self) -> bool:
        return True

    def checkpoint_and_try_requeue(self, signum, frame) -> None:
        self.requeued += 1


def test_time_limit_warning_waits_for_the_training_loop_then_stops_it():
    from hydra_plugins.triadapt_slurm.launcher import _TimeLimitWarning
    from triadapt.train import Trainer

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    try:
        handler = _FakeSubmititHandler(countdown=1)
        warning = _TimeLimitWarning(handler.checkpoint_and_try_requeue)
        signal.signal(signal.SIGALRM, warning.on_alarm)
        warning.on_warning(signal.SIGUSR2, None)  # the model is still loading: held
        assert warning.pending and not warning.stopped
        trainer = Trainer.__new__(Trainer)
        trainer._stop_signal = None
        signal.signal(signal.SIGTERM, trainer._on_signal)  # what Trainer.fit installs
        _wait_for("the held warning", lambda: warning.stopped, timeout=10)
        assert trainer._stop_signal == signal.SIGUSR2  # the loop saves a checkpoint at the end of its step
        warning.requeue()
        assert handler.requeued == 1

        spent = _TimeLimitWarning(_FakeSubmititHandler(countdown=0).checkpoint_and_try_requeue)
        spent.on_warning(signal.SIGUSR2, None)  # no requeue left: trains on
        assert not spent.pending and not spent.stopped
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, h in saved.items():
            signal.signal(sig, h)


# -- against the live cluster ----------------------------------------------------------------

def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="session")
def slurm():
    def unavailable(reason: str):
        if os.environ.get("TRIADAPT_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required (TRIADAPT_REQUIRE_SLURM=1) but {reason}")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root (scripts/slurm_local_start.sh)")
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        unavailable("SLURM not installed: apt-get install -y slurm-wlm munge slurmdbd mariadb-server")
    state = Path(os.environ.get("TRIADAPT_SLURM_DIR", "/tmp/triadapt-slurm"))
    pid = state / "run" / "slurmctld.pid"
    was_running = pid.is_file() and Path(f"/proc/{pid.read_text().strip()}").exists()
    start = _run("bash", str(REPO / "scripts" / "slurm_local_start.sh"), timeout=180)
    if start.returncode != 0:
        unavailable(f"scripts/slurm_local_start.sh failed: {(start.stderr.strip().splitlines() or ['?'])[-1]}")
    yield
    if not was_running:
        _run("bash", str(REPO / "scripts" / "slurm_local_stop.sh"), timeout=120)


def _args(data: Path, out: Path, *extra: str, slurm: bool = True) -> list[str]:
    launcher = ["launcher=slurm_cpu", "hydra.launcher.partition=cpu", "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.mem_gb=1"] if slurm else ["launcher=basic"]
    return ["experiment=smoke", *launcher, f"data.dir={data}", f"paths.output_dir={out}",
            f"train.max_steps={STEPS}", "train.save_adapter=true", *extra]


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _start(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", "-m", *overrides], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 400) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _summary(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sweep summary")]
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines[0]


def _sacct_jobs() -> set[str]:
    out = _run("sacct", "-X", "-n", "-P", "-a", "-S", "now-1days", "-o", "JobID", timeout=30)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def _wait_for(what: str, cond, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _running_job_id(name: str) -> str | None:
    out = _run("squeue", "-h", "-t", "RUNNING", f"--name={name}", "-o", "%i", timeout=30).stdout.split()
    return out[0] if out else None


def _outcome(job_dir: Path) -> tuple:
    """What an uninterrupted and a resumed run must share: final/best metrics and the adapter bytes."""
    result = json.loads((job_dir / "result.json").read_text())
    return (result["status"], result["metrics"]["final"], result["metrics"]["best"],
            (job_dir / "adapter.safetensors").read_bytes())


def _job_dir(out: Path, method: str, seed: int) -> Path:
    # Found by its overrides, whatever the sweep folder is called.
    hits = [d for d in out.rglob(f"method={method},seed={seed},train.max_steps=*") if (d / ".hydra").is_dir()]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return conftest.tiny_glue_dir.__wrapped__(tmp_path_factory.mktemp("data"))  # the same hand-made GLUE folder


@pytest.fixture(scope="module")
def first_sweep(slurm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_a")
    return out, _finish(_start(*_args(data, out)))


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_completes_with_one_name_per_job(first_sweep):
    out, proc = first_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(proc).endswith("4 jobs: 4 completed, 0 skipped, 0 failed")
    for method in ("lora", "adalora"):
        for seed in (1, 2):
            assert _outcome(_job_dir(out, method, seed))[0] == "completed"
            names = _run("sacct", "-X", "-n", "-P", "-a", "-S", "now-1days", f"--name={NAME.format(method=method, seed=seed)}",
                         "-o", "State", timeout=30).stdout.split()
            assert "COMPLETED" in names
    assert not list(out.rglob(".sweep_jobs"))


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_submits_no_job(first_sweep, data):
    out, first = first_sweep
    assert first.returncode == 0
    before = _sacct_jobs()
    again = _finish(_start(*_args(data, out)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(again).endswith("4 jobs: 0 completed, 4 skipped, 0 failed")
    assert "nothing to submit" in again.stdout + again.stderr
    assert _sacct_jobs() == before  # not one sbatch


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_and_requeue_mid_training_resume_to_the_uninterrupted_result(first_sweep, data, tmp_path):
    ref, first = first_sweep
    assert first.returncode == 0
    out = tmp_path / "sweep_b"
    proc = _start(*_args(data, out))
    # Tasks 0 and 1 (lora and adalora, seed 1) run first, side by side on the two cores: once each
    # has evaluated (inside the training loop), cancel one and requeue the other.
    cancelled, requeued = ("lora", 1), ("adalora", 1)
    for (method, seed), action in ((cancelled, ["scancel"]), (requeued, ["scontrol", "requeue"])):
        pattern, name = f"method={method},seed={seed},*/metrics.jsonl", NAME.format(method=method, seed=seed)
        _wait_for(f"{method} seed {seed} training", lambda p=pattern: list(out.rglob(p)))
        job_id = _wait_for("its job id", lambda n=name: _running_job_id(n))
        assert _run(*action, job_id, timeout=30).returncode == 0  # at once: a job trains for ~20 s
    done = _finish(proc)

    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    summary = _summary(done)
    assert "4 jobs: 3 completed, 0 skipped, 0 failed, 1 interrupted" in summary
    assert "method=lora,seed=1," in summary and "CANCELLED" in summary
    assert not list(out.rglob(".sweep_jobs"))
    lora = _job_dir(out, *cancelled)
    result = json.loads((lora / "result.json").read_text())
    assert result["status"] == "interrupted" and "resume from" in result["error"]["message"]
    adalora = _job_dir(out, *requeued)
    assert "resumed from" in (adalora / "run.log").read_text()  # inside the same command

    again = _finish(_start(*_args(data, out)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(again).endswith("4 jobs: 1 completed, 3 skipped, 0 failed")
    assert "resumed from" in (lora / "run.log").read_text()
    for job in (cancelled, requeued):
        assert _outcome(_job_dir(out, *job)) == _outcome(_job_dir(ref, *job))


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_requeues_from_the_warning_checkpoint(first_sweep, data, tmp_path):
    ref_sweep, first = first_sweep
    assert first.returncode == 0
    # About 60 s of training (sized by the first sweep's step times). With signal_delay_s=20 the
    # warning (USR2) of a 1-minute limit reaches a try 10-40 s after it starts (SLURM looks every
    # 30 s), so the first try never finishes; the third, left without a requeue, trains on until
    # SLURM kills it, after the limit plus the cluster's OverTimeLimit (1 minute), ample to finish.
    per_step = max(r["timing"]["train_s"] / r["timing"]["steps"] for r in (
        json.loads((_job_dir(ref_sweep, "lora", s) / "result.json").read_text()) for s in (1, 2)))
    steps = max(STEPS, int(60 / (1.2 * per_step)))
    overrides = ["method=lora", "seed=1", f"train.max_steps={steps}"]
    out, ref = tmp_path / "limited", tmp_path / "reference"
    proc = _start(*_args(data, out), *overrides, "hydra.launcher.timeout_min=1",
                  "hydra.launcher.max_num_timeout=2", "hydra.launcher.signal_delay_s=20")
    reference = _start(*_args(data, ref, slurm=False), *overrides)  # uninterrupted, here, meanwhile
    statuses = set()
    while proc.poll() is None:
        for f in out.rglob("result.json"):
            try:
                statuses.add(json.loads(f.read_text())["status"])
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    done, reference = _finish(proc), _finish(reference)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _summary(done).endswith("1 jobs: 1 completed, 0 skipped, 0 failed")
    assert "failed" not in statuses and "interrupted" in statuses
    job_dir = _job_dir(out, "lora", 1)
    errors = "".join(f.read_text() for f in out.rglob(".submitit/*/*_log.err"))
    stops = re.findall(r"stopped by signal 12 at step (\d+);", errors)
    resumes = re.findall(r"resumed from \S+ at step (\d+)/", (job_dir / "run.log").read_text())
    assert stops and resumes == stops  # each retry starts where the warning stopped the last one
    assert _outcome(job_dir) == _outcome(_job_dir(ref, "lora", 1))


@pytest.mark.slurm
@pytest.mark.slow
def test_ctrl_c_leaves_the_jobs_running_and_says_how_to_cancel_them(slurm, data, tmp_path):
    proc = _start(*_args(data, tmp_path, "method=lora", "seed=1"))
    _wait_for("the submission", lambda: list(tmp_path.rglob(".submitit/submitted.json")), timeout=120)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    done = _finish(proc, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and "1 SLURM jobs keep running" in lines[0], done.stderr[-2000:]
    job_id = re.search(r"cancel: scancel (\d+)", lines[0]).group(1)
    assert _run("squeue", "-h", "-j", job_id, "-o", "%T", timeout=30).stdout.strip() in ("PENDING", "RUNNING")
    assert not list(tmp_path.rglob(".sweep_jobs"))
    assert _run("scancel", job_id, timeout=30).returncode == 0  # the printed command
    _wait_for("the cancellation", lambda: "CANCELLED" in _run(
        "sacct", "-X", "-n", "-j", job_id, "-o", "State", timeout=30).stdout, timeout=60)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_gpu_request_on_a_cpu_cluster_is_one_line_error(slurm, data, tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "-m", "experiment=smoke", "launcher=slurm", "seed=1", "method=lora",
                           f"data.dir={data}", f"paths.output_dir={tmp_path}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sbatch refused the sweep" in errors[0] and "gres" in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.rglob(".sweep_jobs"))
