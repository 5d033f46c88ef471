"""Checkpoint and resume: a run killed with SIGKILL and started again ends exactly like an
uninterrupted one (final metrics, rank pattern, adapter tensors, metrics.jsonl), for every
native method; SIGTERM checkpoints and stops; a checkpoint is not resumed with other settings;
and a truncated result.json is listed, not fatal, in the report.

The killed and resumed runs go through ``run.py``, the uninterrupted ones in-process (same
code, one thread like the subprocesses, no start-up cost). The kill step is drawn with a seeded
random (``TRIADAPT_KILL_SEED=… pytest -s`` to vary and see it). Each adaptive method is still
allocating at the kill point: AdaLoRA budgets until step 32, IncreLoRA and TriAdaptLoRA grow
every 3 steps until step 33-36.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose, write_tiny_mrpc

KILL_SEED = int(os.environ.get("TRIADAPT_KILL_SEED", "2024"))
MAX_STEPS, CHECKPOINT_EVERY, KEEP = 40, 5, 2
#: per method: overrides that keep allocation going past the kill point
SCHEDULES = {
    "lora": [],
    "adalora": [],  # tinit 0.1, tfinal 0.2: budgeting from step 4 to 32
    "increlora": ["method.incre_interval=3"],
    "triadapt": ["method.incre_interval=3", "method.incre_rank_num=1"],
}


def command(method: str, data_dir: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "run.py", "logger=none", "hparams=none", "model=tiny_bert", f"method={method}",
        "task=glue/mrpc", f"data.dir={data_dir}", f"train.max_steps={MAX_STEPS}", "train.batch_size=8",
        "train.lr=5e-3", "method.dropout=0.1", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        f"train.keep_checkpoints={KEEP}", *SCHEDULES[method], f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


class Job:
    """One run.py process of ``method`` in ``run_dir``, logging to ``<run_dir>-<tag>.log``."""

    def __init__(self, method: str, data_dir: Path, run_dir: Path) -> None:
        self.method, self.run_dir, self.cmd = method, run_dir, command(method, data_dir, run_dir)
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def start(self, tag: str) -> Job:
        self.log = self.run_dir.with_name(f"{self.run_dir.name}-{tag}.log")
        # One thread each: several runs share the cores, and oversubscribed threads crawl.
        env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ok(self) -> None:
        if self.proc.wait(timeout=600) != 0:
            pytest.fail(f"{self.method} failed (rc={self.proc.returncode}):\n{self.log.read_text()[-3000:]}")


def checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in (run_dir / "checkpoints").glob("step-*.pt")}


def kill_at(victims: dict[str, Job], kill_steps: dict[str, int], timeout: float = 400) -> dict[str, list[int]]:
    """SIGKILL each victim at about its kill step: wait for the checkpoint before it, then for the
    remaining steps at the pace measured between the last two checkpoints. All victims at once."""
    due: dict[str, float] = {}
    at_kill: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout
    while len(at_kill) < len(victims):
        if time.monotonic() > deadline:
            pytest.fail(f"no kill point reached within {timeout}s: {sorted(set(victims) - set(at_kill))}")
        for method, job in victims.items():
            if method in at_kill:
                continue
            if job.proc.poll() is not None:
                tail = job.log.read_text()[-2000:]
                pytest.fail(f"{method} ended (rc={job.proc.returncode}) before its kill:\n{tail}")
            step = kill_steps[method]
            if method not in due:
                found = checkpoints(job.run_dir)
                if not any(s >= step - step % CHECKPOINT_EVERY for s in found):
                    continue
                first, last = min(found), max(found)
                try:
                    pace = (found[last].stat().st_mtime - found[first].stat().st_mtime) / max(last - first, 1)
                except FileNotFoundError:  # pruned meanwhile: look again
                    continue
                due[method] = time.monotonic() + max(step - last, 0) * pace
            if time.monotonic() >= due[method]:
                job.proc.send_signal(signal.SIGKILL)
                job.proc.wait()
                at_kill[method] = sorted(checkpoints(job.run_dir))
        time.sleep(0.005)
    return at_kill


def run_in_process(cmd: list[str], run_dir: Path) -> None:
    """``cmd``'s run in this process (no start-up cost), on one thread like the subprocesses."""
    from triadapt.experiment import main

    overrides = [a for a in cmd[2:] if not a.startswith("hydra.")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(compose([*overrides, f"+paths.run_dir={run_dir}"]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path, list[int], Path]]:
    """Per method: (uninterrupted run dir, killed-and-resumed run dir, checkpoints at the kill, resume log).

    The four victims run side by side and are killed; then the four resumes run while the
    uninterrupted runs go in this process."""
    root = tmp_path_factory.mktemp("resume")
    data_dir = write_tiny_mrpc(root / "glue")
    kill_steps = {}
    for method in SCHEDULES:
        # At or beyond step 15, so that a checkpoint beyond step 10 exists; at least 10 steps before the end.
        kill_steps[method] = random.Random(f"{KILL_SEED}-{method}").randint(3 * CHECKPOINT_EVERY, MAX_STEPS - 10)
    victims = {m: Job(m, data_dir, root / f"{m}-killed").start("killed") for m in SCHEDULES}
    try:
        at_kill = kill_at(victims, kill_steps)
        for method, ckpts in at_kill.items():
            print(f"\n{method}: TRIADAPT_KILL_SEED={KILL_SEED}: SIGKILL at ~step {kill_steps[method]}, "
                  f"checkpoints then {ckpts}")
            status = json.loads((victims[method].run_dir / "result.json").read_text())["status"]
            assert status == "running", f"{method}: killed run says {status}"  # SIGKILL leaves no chance
        for job in victims.values():
            job.start("resumed")  # the same command again: resume=auto continues from the latest checkpoint
        for method in SCHEDULES:
            ref_dir = root / f"{method}-uninterrupted"
            run_in_process(command(method, data_dir, ref_dir), ref_dir)
        for job in victims.values():
            job.wait_ok()
    finally:
        for job in victims.values():
            if job.proc.poll() is None:
                job.proc.kill()
    return {m: (root / f"{m}-uninterrupted", victims[m].run_dir, at_kill[m], victims[m].log) for m in SCHEDULES}



def evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(SCHEDULES))
def test_sigkill_then_resume_matches_uninterrupted_run(method, runs):
    ref_dir, run_dir, at_kill, log = runs[method]
    assert at_kill and max(at_kill) > 10
    assert f"resumed from {run_dir / 'checkpoints'}" in log.read_text()

    ref_result, result = (json.loads((d / "result.json").read_text()) for d in (ref_dir, run_dir))
    assert result["status"] == ref_result["status"] == "completed" and result["error"] is None
    assert result["metrics"] == ref_result["metrics"]  # final, best, best_step
    assert result["budget"] == ref_result["budget"]  # ranks, adapter_params, target_rank, …
    assert result["timing"]["steps"] == ref_result["timing"]["steps"] == MAX_STEPS
    if method != "lora":
        history = json.loads((run_dir / "rank_history.json").read_text())
        assert history == json.loads((ref_dir / "rank_history.json").read_text())
        assert history[-1]["step"] > max(at_kill), "allocation should still be going on at the kill"
    for name in ("adapter.safetensors", "adapter_best.safetensors"):
        got, want = load_file(run_dir / name), load_file(ref_dir / name)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}:{key} differs after resume"

    # metrics.jsonl: one record per evaluation (every epoch of 8 steps), none missing or repeated.
    assert [e["step"] for e in evals(run_dir)] == [8, 16, 24, 32, 40]
    assert evals(run_dir) == evals(ref_dir)

    # Only the last KEEP checkpoints are kept (the end of a run writes none); no temp file is left.
    last = (MAX_STEPS - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    kept = [last - CHECKPOINT_EVERY * i for i in reversed(range(KEEP))]
    assert sorted(checkpoints(ref_dir)) == sorted(checkpoints(run_dir)) == kept
    assert not list((run_dir / "checkpoints").glob(".*"))


def test_sigterm_stops_with_a_checkpoint_refuses_other_settings_then_resumes(runs, tmp_path, capsys):
    """SIGTERM: checkpoint at the current step, status ``interrupted``, exit 130. Resuming with
    another learning rate would silently keep the old one (it lives in the optimizer state), so
    it is refused, naming the change; the same settings resume to the uninterrupted result."""
    from triadapt.experiment import main

    data_dir = write_tiny_mrpc(tmp_path / "glue")
    job = Job("lora", data_dir, tmp_path / "run").start("terminated")
    while not any(s >= 10 for s in checkpoints(job.run_dir)):
        assert job.proc.poll() is None, job.log.read_text()[-3000:]
        time.sleep(0.01)
    job.proc.send_signal(signal.SIGTERM)
    assert job.proc.wait(timeout=120) == 130
    result = json.loads((job.run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["error"]["type"] == "Interrupted"
    stopped = max(checkpoints(job.run_dir))
    assert f"stopped by signal {int(signal.SIGTERM)} at step {stopped}; resume from" in result["error"]["message"]
    assert f"interrupted: {result['error']['message']}" in job.log.read_text()

    overrides = [a for a in job.cmd[2:] if not a.startswith("hydra.")] + [f"+paths.run_dir={job.run_dir}"]
    before = {p.name: p.read_bytes() for p in (job.run_dir / "checkpoints").iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(compose([*overrides, "train.lr=1e-5"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr: 0.005 → 1e-05" in err and str(job.run_dir) in err
    assert {p.name: p.read_bytes() for p in (job.run_dir / "checkpoints").iterdir()} == before
    assert json.loads((job.run_dir / "result.json").read_text())["status"] == "interrupted"  # untouched

    run_in_process(job.cmd, job.run_dir)
    ref_dir = runs["lora"][0]
    result, ref = (json.loads((d / "result.json").read_text()) for d in (job.run_dir, ref_dir))
    assert result["status"] == "completed" and result["metrics"] == ref["metrics"]
    got, want = load_file(job.run_dir / "adapter.safetensors"), load_file(ref_dir / "adapter.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert evals(job.run_dir) == evals(ref_dir)


def test_report_lists_a_truncated_result_and_builds_the_table_from_the_others(tmp_path, tiny_glue_dir, capsys):
    from triadapt import report
    from triadapt.experiment import main

    runs = tmp_path / "runs"
    for seed in (1, 2):
        main(compose(["logger=none", "hparams=none", "model=tiny_bert", "method=lora", "task=glue/mrpc",
                      f"data.dir={tiny_glue_dir}", "train.max_steps=2", "train.batch_size=8", f"seed={seed}",
                      f"+paths.run_dir={runs / f'seed{seed}'}"]))  # fmt: skip
    broken = runs / "seed2" / "result.json"
    text = broken.read_text()
    broken.write_text(text[: len(text) // 2])  # what a non-atomic writer killed mid-way would leave

    df, problems = report.load_results(runs)
    assert list(df["seed"]) == [1]
    assert [p["path"] for p in problems] == [str(broken)]
    capsys.readouterr()
    assert report.main([str(runs), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert f"unreadable: {broken}" in out
    table = (runs / "table_glue.md").read_text()
    assert "| MRPC |" in table and "| lora r8" in table and "(n=1)" in table  # seed 1 only


# -- the checkpoint, not result.json, decides what may resume --------------------------------

RESUME_BASE = ["logger=none", "hparams=none", "model=tiny_bert", "task=glue/mrpc", "train.max_steps=6",
               "train.batch_size=8", "train.lr=5e-3", "train.checkpoint_every=4"]  # fmt: skip


def _killed_run(run_dir: Path, data_dir: Path, result: str | None) -> Path:
    """A run that left a checkpoint at step 4 and a result.json that is missing or ``result``."""
    from triadapt.experiment import main

    main(compose([*RESUME_BASE, f"data.dir={data_dir}", f"+paths.run_dir={run_dir}"]))
    ckpt = run_dir / "checkpoints" / "step-00000004.pt"
    assert ckpt.exists()
    (run_dir / "result.json").unlink()
    if result is not None:
        (run_dir / "result.json").write_text(result)
    return ckpt


def _main_fails(overrides: list[str], capsys) -> str:
    from triadapt.experiment import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(compose(overrides))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("result", [None, '{"status": "run', "[]"], ids=["deleted", "truncated", "not-a-dict"])
def test_resume_checks_the_checkpoints_settings_without_result_json(result, tmp_path, tiny_glue_dir, capsys):
    """result.json deleted or garbled: the checkpoint's own settings refuse another lr and seed
    (which would otherwise be silently ignored: the lr lives in the optimizer state), nothing is
    written, and the same settings resume."""
    from triadapt.experiment import main

    run_dir = tmp_path / "run"
    ckpt = _killed_run(run_dir, tiny_glue_dir, result)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    same = [*RESUME_BASE, f"data.dir={tiny_glue_dir}", f"+paths.run_dir={run_dir}"]
    err = _main_fails([*same, "train.lr=5e-2", "seed=7"], capsys)
    assert f"{run_dir} holds a checkpoint of a run with other settings (seed: 42 → 7; train.lr: 0.005 → 0.05)" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == files

    main(compose(same))
    done = json.loads((run_dir / "result.json").read_text())
    assert done["status"] == "completed" and done["config"]["train"]["lr"] == 5e-3 and done["timing"]["steps"] == 6
    assert ckpt.exists()  # a periodic checkpoint, kept (train.keep_checkpoints=1)


def test_another_methods_checkpoint_is_refused_before_anything_is_written(tmp_path, tiny_glue_dir, capsys):
    from triadapt.experiment import main

    run_dir = tmp_path / "run"
    _killed_run(run_dir, tiny_glue_dir, None)
    same = [*RESUME_BASE, f"data.dir={tiny_glue_dir}", f"+paths.run_dir={run_dir}"]
    err = _main_fails([*same, "method=adalora"], capsys)
    assert f"{run_dir} holds a checkpoint of method lora, not adalora; resume with method=lora" in err
    assert not (run_dir / "result.json").exists()
    main(compose(same))  # the rightful resume is not refused afterwards
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"


def test_a_checkpoint_without_settings_and_without_result_json_is_refused(tmp_path, tiny_glue_dir, capsys):
    run_dir = tmp_path / "run"
    ckpt = _killed_run(run_dir, tiny_glue_dir, None)
    payload = torch.load(ckpt, weights_only=False)
    del payload["config"]  # as written by a triadapt before checkpoints carried their settings
    torch.save(payload, ckpt)
    err = _main_fails([*RESUME_BASE, f"data.dir={tiny_glue_dir}", f"+paths.run_dir={run_dir}"], capsys)
    assert f"{ckpt} does not record the settings it was written with" in err
    assert not (run_dir / "result.json").exists()
