"""Sweeps: experiment configs, launchers, job folders, resume, failures and the sweep summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import triadapt  # noqa: F401  (registers the triadapt.dirname resolver used by hydra.sweep.subdir)
from conftest import CONF, REPO

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GLUE8 = {f"glue/{t}" for t in ("mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb")}
PAPER_METHODS = ["lora", "adalora", "increlora", "triadapt"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _jobs(cfg) -> list[list[str]]:
    """The multirun's jobs as override lists, expanded by Hydra's own BasicSweeper logic."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    return BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]


def _job_values(jobs: list[list[str]], key: str) -> list[str]:
    return [dict(o.split("=", 1) for o in job)[key] for job in jobs]


# -- experiment configs (compose only) -------------------------------------------------------

def test_all_experiments_exist():
    expected = {"cpu_glue", "paper_glue_r2", "paper_glue_r8", "paper_squad", "ablation_triadapt", "smoke"}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_first_and_last_job_resolve(name):
    cfg = _compose([f"experiment={name}"])
    assert cfg.experiment_name == name
    assert cfg.hydra.runtime.choices.experiment == name
    jobs = _jobs(cfg)
    assert len(jobs) >= 2
    for job in (jobs[0], jobs[-1]):
        job_cfg = _compose([f"experiment={name}", *job])
        task_cfg = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])  # what run.py gets
        resolved = OmegaConf.to_container(task_cfg, resolve=True)
        assert resolved["experiment_name"] == name
        assert float(resolved["train"]["lr"]) > 0
        assert OmegaConf.select(job_cfg, "hydra.sweep.dir").endswith(f"/{name}")
        subdir = OmegaConf.select(job_cfg, "hydra.sweep.subdir")
        assert subdir and "/" not in subdir and all(o.split("=")[0] in subdir for o in job)


def test_paper_glue_r8_is_160_jobs_at_r8_on_deberta():
    cfg = _compose(["experiment=paper_glue_r8"])
    assert (cfg.model.name, cfg.budget.name, cfg.budget.rank) == ("deberta_v3_base", "r8", 8)
    assert cfg.hydra.runtime.choices.hparams == "paper"
    jobs = _jobs(cfg)
    assert len(jobs) == 8 * 4 * 5 == 160
    assert set(_job_values(jobs, "task")) == GLUE8
    assert set(_job_values(jobs, "method")) == set(PAPER_METHODS)
    seeds = _job_values(jobs, "seed")
    assert seeds == sorted(seeds, key=int) and set(seeds) == {"1", "2", "3", "4", "5"}  # seed varies slowest
    assert len({tuple(sorted(j)) for j in jobs}) == 160


def test_paper_glue_keeps_the_per_task_presets():
    # The experiment file must not clobber conf/preset/paper/...: RTE AdaLoRA runs 50 epochs at 1.2e-3.
    for budget in ("r2", "r8"):
        cfg = _compose([f"experiment=paper_glue_{budget}", "task=glue/rte", "method=adalora"])
        assert cfg.hydra.runtime.choices.preset == f"paper/adalora/glue/rte/{budget}"
        assert (cfg.budget.name, float(cfg.train.lr), cfg.train.epochs) == (budget, 1.2e-3, 50)
    r2 = _compose(["experiment=paper_glue_r2"])
    assert len(_jobs(r2)) == 160 and set(_job_values(_jobs(r2), "task")) == GLUE8


def test_paper_squad_budgets_methods_and_shared_settings():
    cfg = _compose(["experiment=paper_squad"])
    assert (cfg.model.name, cfg.task.name) == ("deberta_v3_base", "squad_v2")
    jobs = _jobs(cfg)
    assert len(jobs) == 5 * 4 * 4
    assert set(_job_values(jobs, "budget")) == {"r1", "r2", "r4", "r8"}
    assert set(_job_values(jobs, "method")) == set(PAPER_METHODS)
    epochs = {}
    for method in PAPER_METHODS:
        c = _compose(["experiment=paper_squad", f"method={method}", "budget=r4"])
        assert (float(c.train.lr), c.train.batch_size, c.train.eval_batch_size) == (1e-3, 16, 128)
        rank = c.method.r if method == "lora" else c.method.target_rank
        assert (c.train.warmup_steps, c.train.warmup_ratio, c.method.alpha, rank) == (1000, None, 16, 4)
        assert (c.task.max_seq_length, c.task.doc_stride) == (384, 128)
        epochs[method] = c.train.epochs
    assert epochs == {"lora": 12, "adalora": 12, "increlora": 14, "triadapt": 14}


def test_ablation_is_one_factor_at_a_time_on_a_cpu_glue_task():
    cfg = _compose(["experiment=ablation_triadapt"])
    assert (cfg.model.name, cfg.method.name, cfg.hydra.runtime.choices.hparams) == ("minilm_l6", "triadapt", "cpu")
    jobs = _jobs(cfg)
    variants = set(_job_values(jobs, "ablation"))
    assert variants == {"headline", "growth_exponential", "growth_none", "score_random", "core_diagonal",
                        "schedule_global", "schedule_constant"}
    assert set(_job_values(jobs, "seed")) == {"1", "2", "3"}
    cpu_glue_tasks = set(_job_values(_jobs(_compose(["experiment=cpu_glue"])), "task"))
    assert len(set(_job_values(jobs, "task"))) == 1 and set(_job_values(jobs, "task")) <= cpu_glue_tasks
    assert len(jobs) == 7 * 3
    schedules = {_compose(["experiment=ablation_triadapt", f"ablation={v}"]).method.new_group_schedule for v in variants}
    assert schedules == {"restart", "global", "constant"}


def test_cpu_glue_job_folders_do_not_collide_with_the_earlier_setting():
    jobs = _jobs(_compose(["experiment=cpu_glue"]))
    assert len(jobs) == 3 * 3 * 5 and set(_job_values(jobs, "budget")) == {"r2"}


def test_smoke_is_tiny():
    cfg = _compose(["experiment=smoke"])
    assert (cfg.model.name, cfg.logger.name, cfg.train.max_steps) == ("tiny_bert", "none", 4)
    assert cfg.hydra.runtime.choices.hparams == "none"
    assert len(_jobs(cfg)) == 4


# -- launchers (compose only) ----------------------------------------------------------------

@pytest.mark.parametrize(
    "launcher, target, expected",
    [
        ("basic", "BasicLauncher", {}),
        ("joblib", "JoblibLauncher", {"n_jobs": 2}),
        ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "array_parallelism": 32, "timeout_min": 720}),
        ("submitit_local", "LocalLauncher", {"gpus_per_node": 0}),
    ],
)
def test_launcher_composes(launcher, target, expected):
    cfg = _compose([f"launcher={launcher}", "experiment=smoke", "paths.output_dir=/out"])
    assert cfg.hydra.launcher._target_.endswith(target)
    for key, value in expected.items():
        assert cfg.hydra.launcher[key] == value
    if launcher in ("slurm", "submitit_local"):
        assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder") == "/out/smoke/.submitit/%j"
    if launcher == "slurm":
        assert {"partition", "cpus_per_task", "mem_gb"} <= set(cfg.hydra.launcher)
        assert "export OMP_NUM_THREADS=8" in OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["setup"]
    # the launcher never renames job folders, so a sweep can be resumed with another launcher
    assert "launcher" in cfg.hydra.job.config.override_dirname.exclude_keys


# -- the summary callback (unit) -------------------------------------------------------------

def _result(d: Path, status: str, error: dict | None = None) -> None:
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"status": status, "error": error}))


def test_summarize_counts_completed_skipped_failed(tmp_path):
    from triadapt.callbacks import summarize

    _result(tmp_path / "a", "completed")
    _result(tmp_path / "b", "completed")
    _result(tmp_path / "c", "failed", {"type": "DataError", "message": "mrpc train split is empty\nmore"})
    _result(tmp_path / "d", "running")  # killed without a word
    (tmp_path / "e").mkdir()             # died before writing result.json
    notes = [{"dir": str(tmp_path / n), "skipped": n == "b", "error": None} for n in "abcde"]
    s = summarize(notes, tmp_path)
    assert (s["completed"], s["skipped"], len(s["failed"])) == (1, 1, 3)
    assert s["line"].startswith(f"sweep summary ({tmp_path}): 5 jobs: 1 completed, 1 skipped, 3 failed: ")
    assert "c (DataError: mrpc train split is empty)" in s["line"] and "more" not in s["line"]
    assert "d (status running)" in s["line"] and "e (status missing (no result.json))" in s["line"]
    assert "\n" not in s["line"]


def test_multirun_end_exits_nonzero_only_when_asked(tmp_path, capsys):
    from triadapt.callbacks import LEDGER_ENV, SweepSummary

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    for fail_on_error in (True, False):
        cb = SweepSummary(fail_on_error=fail_on_error)
        cb.on_multirun_start(cfg)
        ledger = Path(os.environ[LEDGER_ENV])
        job_dir = tmp_path / f"job{fail_on_error}"
        job = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job_dir)}, "job": {"num": 0}}})
        cb.on_job_start(job)
        _result(job_dir, "failed", {"type": "RuntimeError", "message": "boom"})
        cb.on_job_end(job, job_return=None)
        if fail_on_error:
            with pytest.raises(SystemExit) as e:
                cb.on_multirun_end(cfg)
            assert e.value.code == 1
        else:
            cb.on_multirun_end(cfg)
        assert "1 jobs: 0 completed, 0 skipped, 1 failed" in capsys.readouterr().out
        assert LEDGER_ENV not in os.environ and not ledger.exists()


# -- real multiruns through run.py (tiny_bert, hand-made data) --------------------------------

def run_multirun(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "run.py", "-m", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _summary(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("sweep summary")]
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines[0]


def _job_dirs(sweep_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "result.json").read_text())
            for d in sorted(sweep_dir.iterdir()) if (d / "result.json").is_file()}


SMOKE_DIRS = {"method=lora,seed=1", "method=lora,seed=2", "method=adalora,seed=1", "method=adalora,seed=2"}


def test_multirun_job_folders_and_resume(tmp_path, tiny_glue_dir):
    args = ("experiment=smoke", f"data.dir={tiny_glue_dir}", f"paths.output_dir={tmp_path / 'out'}")
    first = run_multirun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "out" / "smoke"
    jobs = _job_dirs(sweep)
    assert set(jobs) == SMOKE_DIRS
    for name, result in jobs.items():
        assert result["status"] == "completed" and result["error"] is None
        assert f"method={result['method']},seed={result['seed']}" == name
        assert (result["model"], result["experiment"], result["timing"]["steps"]) == ("tiny_bert", "smoke", 4)
        assert (sweep / name / ".hydra" / "overrides.yaml").is_file()
    assert (sweep / "multirun.yaml").is_file() and not (sweep / ".sweep_jobs").exists()
    assert _summary(first).endswith("4 jobs: 4 completed, 0 skipped, 0 failed")
    before = {n: (sweep / n / "result.json").read_bytes() for n in jobs}

    again = run_multirun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: (sweep / n / "result.json").read_bytes() for n in jobs} == before
    log = again.stdout + again.stderr
    assert len(re.findall(r"already completed; skipping", log)) == 4
    assert _summary(again).endswith("4 jobs: 0 completed, 4 skipped, 0 failed")


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, tiny_glue_dir):
    # data.max_train_samples=0 composes but fails at run time (empty training split); it runs first.
    proc = run_multirun("experiment=smoke", "seed=1", "method=lora", "data.max_train_samples=0,16",
                        f"data.dir={tiny_glue_dir}", f"paths.output_dir={tmp_path}")
    jobs = _job_dirs(tmp_path / "smoke")
    bad, good = "data.max_train_samples=0,method=lora,seed=1", "data.max_train_samples=16,method=lora,seed=1"
    assert set(jobs) == {good}  # the bad job is refused by validation before it writes anything
    assert jobs[good]["status"] == "completed"
    assert proc.returncode == 1  # the sweep summary callback
    summary = _summary(proc)
    assert "2 jobs: 1 completed, 0 skipped, 1 failed: " in summary
    assert f"{bad} (ConfigError: data.max_train_samples=0 must be a positive integer" in summary


@pytest.mark.slow
def test_joblib_launcher(tmp_path, tiny_glue_dir):
    proc = run_multirun("experiment=smoke", "seed=1", "launcher=joblib", f"data.dir={tiny_glue_dir}",
                        f"paths.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _job_dirs(tmp_path / "smoke")
    assert set(jobs) == {"method=lora,seed=1", "method=adalora,seed=1"}  # same folders as launcher=basic
    assert {r["status"] for r in jobs.values()} == {"completed"}
    assert _summary(proc).endswith("2 jobs: 2 completed, 0 skipped, 0 failed")


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path, tiny_glue_dir):
    proc = run_multirun("experiment=smoke", "seed=1", "launcher=submitit_local", f"data.dir={tiny_glue_dir}",
                        f"paths.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "smoke"
    jobs = _job_dirs(sweep)
    assert set(jobs) == {"method=lora,seed=1", "method=adalora,seed=1"}
    assert {r["status"] for r in jobs.values()} == {"completed"}
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # really went through submitit
    assert _summary(proc).endswith("2 jobs: 2 completed, 0 skipped, 0 failed")
