"""triadapt.report on the hand-made results in tests/fixtures/results.

Fixture (minilm_l6, budget r2; metric values as stored, ×100 in the tables):
  lora     mrpc acc 0.80 / 0.84 / 0.90 (seeds 1-3; final 0.78 / 0.82 / 0.86), stsb pearson_spearman_mean
           0.84 / 0.86, mnli m 0.70 / 0.74 and mm 0.72 / 0.76, qqp acc 0.80 / 0.82 and F1 0.76 / 0.78;
           adapter_params 331776 everywhere.
  adalora  mrpc 0.85 / 0.87, stsb 0.88 / 0.90, mnli m 0.75 / 0.77 and mm 0.77 / 0.79,
           qqp acc 0.84 / 0.86 and F1 0.80 / 0.82; adapter_params 320000 except stsb seed 2 (400000).
  lora mrpc seed 4 failed (acc 0.10), adalora mrpc seed 3 running, lora rte seed 1 truncated JSON,
  lora squad_v2 EM 70 / 72, F1 74 / 77 (already percentages).
The expected numbers below are worked out by hand from these values.
"""

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from triadapt import report

FIXTURES = Path(__file__).parent / "fixtures" / "results"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded():
    return report.load_results([FIXTURES])


@pytest.fixture(scope="module")
def df(loaded):
    return loaded[0]


def cell(summary, row, column):
    hit = summary[(summary["row"] == row) & (summary["column"] == column)]
    assert len(hit) == 1, (row, column)
    return hit.iloc[0]


# ----------------------------------------------------------------------------------------- loading


def test_load_results_rows_and_problems(loaded):
    df, problems = loaded
    assert len(df) == 21
    assert df["status"].value_counts().to_dict() == {"completed": 19, "failed": 1, "running": 1}
    assert [Path(p["path"]).parts[-3:] for p in problems] == [("rte", "seed=1", "result.json")]
    assert "JSONDecodeError" in problems[0]["problem"]
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["error"] == "TrainingDiverged: loss is NaN at step 120"
    assert Path(failed["run_dir"]) == FIXTURES / "cpu_glue" / "lora-r2" / "mrpc" / "seed=4"
    for column in ("best.accuracy", "final.accuracy", "best.accuracy_mm", "best.pearson_spearman_mean",
                   "adapter_params", "train_s", "peak_mem_mb", "target_rank", "ranks"):  # fmt: skip
        assert column in df.columns


def test_load_results_never_crashes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text("[1, 2]")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result.json").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text(json.dumps({"status": "completed"}))
    df, problems = report.load_results([tmp_path, tmp_path / "missing"])
    assert df.empty and "task" in df.columns
    assert len(problems) == 4
    assert any("no such file" in p["problem"] for p in problems)


# ----------------------------------------------------------------------------------------- GLUE


def test_glue_means_and_stds(df):
    s = report.glue_summary(df)
    expected = {  # (row, column): (mean, std, n)
        ("lora r2 (0.33M)", "MNLI-m"): (72.0, math.sqrt(8), 2),
        ("lora r2 (0.33M)", "MNLI-mm"): (74.0, math.sqrt(8), 2),
        ("lora r2 (0.33M)", "QQP acc"): (81.0, math.sqrt(2), 2),
        ("lora r2 (0.33M)", "QQP F1"): (77.0, math.sqrt(2), 2),
        # (80 + 84 + 90) / 3; sample var = (4.667² + 0.667² + 5.333²) / 2 = 25.333; the failed seed is out
        ("lora r2 (0.33M)", "MRPC"): (84.6667, 5.0332, 3),
        ("lora r2 (0.33M)", "STS-B"): (85.0, math.sqrt(2), 2),
        ("adalora r2 (0.32M)", "MNLI-m"): (76.0, math.sqrt(2), 2),
        ("adalora r2 (0.32M)", "MRPC"): (86.0, math.sqrt(2), 2),  # the running seed is out
        ("adalora r2 (0.32M)", "STS-B"): (89.0, math.sqrt(2), 2),
    }
    for (row, column), (mean, std, n) in expected.items():
        got = cell(s, row, column)
        assert got["value"] == pytest.approx(mean, abs=1e-4), (row, column)
        assert got["std"] == pytest.approx(std, abs=1e-4), (row, column)
        assert got["n"] == n, (row, column)


def test_glue_table_layout(df):
    table = report.glue_table(df)
    # Only the tasks that ran, in the paper's column order; adalora's label uses the median
    # adapter_params (320000), not the mean (330000).
    assert list(table.columns) == ["MNLI-m", "MNLI-mm", "QQP acc", "QQP F1", "MRPC", "STS-B", "Ave. (4 tasks)"]
    assert list(table.index) == ["adalora r2 (0.32M)", "lora r2 (0.33M)"]
    assert table.loc["lora r2 (0.33M)", "MRPC"] == "84.67 ± 5.03 (n=3)"
    assert table.loc["adalora r2 (0.32M)", "STS-B"] == "89.00 ± 1.41 (n=2)"
    assert any("mnli, qqp, mrpc, stsb" in note for note in table.attrs["notes"])


def test_all_average_convention(df):
    s = report.glue_summary(df)
    # MNLI = mean(m, mm), QQP = mean(acc, F1), STS-B = mean corr, MRPC = acc:
    # lora (84.667 + 85 + (72 + 74)/2 + (81 + 77)/2) / 4; adalora (86 + 89 + 77 + 83) / 4
    assert cell(s, "lora r2 (0.33M)", "Ave. (4 tasks)")["value"] == pytest.approx(80.4167, abs=1e-4)
    assert cell(s, "adalora r2 (0.32M)", "Ave. (4 tasks)")["value"] == pytest.approx(83.75)
    assert report.glue_table(df).loc["adalora r2 (0.32M)", "Ave. (4 tasks)"] == "83.75"


def test_full_finetuning_row_names_no_rank_budget(tmp_path):
    """Full fine-tuning has no rank budget: its row says so instead of "full r2 (0.00M)"."""
    lora = json.loads((FIXTURES / "cpu_glue" / "lora-r2" / "mrpc" / "seed=1" / "result.json").read_text())
    full = lora | {"method": "full", "budget": {"target_rank": None, "adapter_params": 0, "ranks": {}}}
    full["config"] = lora.get("config", {}) | {"method": {"name": "full"}}
    for name, result in (("lora", lora), ("full", full)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    df, _ = report.load_results([tmp_path])
    table = report.glue_table(df)
    assert "full (all weights)" in table.index
    assert not any(label.startswith("full r") for label in table.index)
    assert any(label.startswith("lora r2 (0.33M)") for label in table.index)


def test_median_option(df):
    s = report.glue_summary(df, agg="median")
    mrpc = cell(s, "lora r2 (0.33M)", "MRPC")
    assert (mrpc["value"], mrpc["n"]) == (pytest.approx(84.0), 3) and math.isnan(mrpc["std"])
    assert cell(s, "lora r2 (0.33M)", "Ave. (4 tasks)")["value"] == pytest.approx((84 + 85 + 73 + 79) / 4)
    assert report.glue_table(df, agg="median").loc["lora r2 (0.33M)", "MRPC"] == "84.00 (n=3)"


def test_which_final(df):
    mrpc = cell(report.glue_summary(df, which="final"), "lora r2 (0.33M)", "MRPC")
    assert mrpc["value"] == pytest.approx(82.0) and mrpc["std"] == pytest.approx(4.0)


def test_reference_rows(df):
    s = report.glue_summary(df, include_reference=True)
    paper = "paper: adalora (0.32M)"
    assert cell(s, paper, "MNLI-m")["value"] == 90.66
    assert cell(s, paper, "MRPC")["value"] == 90.44
    # recomputed over our 4 tasks: ((90.66 + 90.70)/2 + (91.78 + 89.16)/2 + 90.44 + 91.63) / 4
    assert cell(s, paper, "Ave. (4 tasks)")["value"] == pytest.approx(90.805)
    table = report.glue_table(df, include_reference=True)
    assert table.loc["paper: lora (1.33M)", "QQP F1"] == "89.38"
    assert list(table.index[:2]) == ["adalora r2 (0.32M)", "lora r2 (0.33M)"]


def write_run(root, task, method, metrics, seed=1, status="completed", group="glue", params=331776):
    run_dir = root / f"{method}-{task}-{seed}"
    run_dir.mkdir(parents=True)
    result = {"status": status, "error": None, "task": task, "task_group": group, "method": method,
              "model": "m", "seed": seed, "budget_name": "r2", "main_metric": "accuracy",
              "metrics": {"best": metrics, "final": metrics}, "budget": {"adapter_params": params}}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result))


EIGHT_TASKS = {
    "mnli": {"accuracy": 0.80, "accuracy_mm": 0.82},
    "sst2": {"accuracy": 0.90},
    "cola": {"matthews_correlation": 0.60},
    "qqp": {"accuracy": 0.88, "f1": 0.84},
    "qnli": {"accuracy": 0.91},
    "rte": {"accuracy": 0.70},
    "mrpc": {"accuracy": 0.85, "f1": 0.89},
    "stsb": {"pearson": 0.87, "spearmanr": 0.89, "pearson_spearman_mean": 0.88},
}


def test_all_eight_tasks_and_published_average(tmp_path):
    for task, metrics in EIGHT_TASKS.items():
        write_run(tmp_path, task, "lora", metrics)
        if task != "cola":
            write_run(tmp_path, task, "adalora", metrics)
    df, problems = report.load_results(tmp_path)
    assert not problems
    table = report.glue_table(df, include_reference=True)
    assert table.columns[-1] == "All Ave."
    # (81 + 90 + 60 + 86 + 91 + 70 + 85 + 88) / 8
    assert table.loc["lora r2 (0.33M)", "All Ave."] == "81.38"
    assert table.loc["adalora r2 (0.33M)", "All Ave."] == "–"  # CoLA missing: no comparable average
    assert table.loc["paper: adalora (0.32M)", "RTE"] == "87.36"
    assert table.loc["paper: adalora (0.32M)", "All Ave."] == "88.86"  # as published over 8 tasks
    assert table.loc["paper: full_ft (184M)", "CoLA"] == "69.19"


# ----------------------------------------------------------------------------------------- SQuAD


def test_squad_table(df):
    table = report.squad_table(df, include_reference=True)
    assert list(table.columns) == ["SQuAD v2.0 EM", "SQuAD v2.0 F1"]
    assert table.loc["lora r2 (0.33M)", "SQuAD v2.0 EM"] == "71.00 ± 1.41 (n=2)"
    assert table.loc["lora r2 (0.33M)", "SQuAD v2.0 F1"] == "75.50 ± 2.12 (n=2)"  # std of 74, 77
    assert table.loc["paper: adalora 0.16%", "SQuAD v2.0 F1"] == "88.80"
    assert "SQuAD v2.0 F1" not in report.glue_table(df).columns


# ----------------------------------------------------------------------------------------- formats


def test_markdown_and_latex(df):
    table = report.glue_table(df, include_reference=True)
    md = report.to_markdown(table)
    assert md.splitlines()[0].startswith("| method / budget | MNLI-m |")
    assert "| paper: adalora (0.32M) | 90.66 | 90.70 |" in md
    tex = report.to_latex(table)
    assert r"84.67 $\pm$ 5.03 (n=3)" in tex and r"paper: full\_ft (184M)" in tex
    assert tex.startswith(r"\begin{tabular}{lrrrrrrr}") and tex.rstrip().endswith(r"\end{tabular}")


# ----------------------------------------------------------------------------------------- plots


def test_rank_heatmap_from_dict_and_row(df):
    ranks = {f"deberta.encoder.layer.{i}.attention.self.{m}_proj": i + 1 for i in range(3) for m in ("query", "value")}
    ranks["deberta.encoder.layer.11.intermediate.dense"] = 0
    ranks["classifier.dense"] = 5  # no layer index: left out
    fig = report.rank_heatmap(ranks)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (4, 3)  # layers 0, 1, 2, 11 × query, value, intermediate
    assert [t.get_text() for t in ax.get_xticklabels()] == ["query", "value", "intermediate"]
    assert grid[2, 1] == 3 and grid[3, 2] == 0 and grid.mask[0, 2]

    row = df[(df["method"] == "adalora") & (df["task"] == "mnli")].iloc[0]
    grid = report.rank_heatmap(row).axes[0].images[0].get_array()
    assert grid.shape == (6, 6) and grid.sum() == 72  # the fixture's allocation, average rank 2
    assert grid[4, 2] == 3  # encoder.layer.4.attention.self.value

    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert report.rank_heatmap({"layer.0.output.dense": 2}, ax=ax) is ax.figure
    with pytest.raises(ValueError):
        report.rank_heatmap({"classifier": 2})


def test_plot_metric_vs_params(df):
    fig = report.plot_metric_vs_params(df)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["MNLI (mean of m/mm acc)", "QQP (mean of acc/F1)", "MRPC (acc)", "STS-B (mean corr.)",
                      "SQuAD v2.0 F1"]  # fmt: skip
    mnli = fig.axes[0]
    assert sorted(mnli.get_legend_handles_labels()[1]) == ["adalora", "lora"]


# ----------------------------------------------------------------------------------------- CLI


def test_cli_writes_all_formats_atomically(tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(FIXTURES), "--reference", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = {f"table_{name}.{fmt}" for name in ("glue", "squad", "stability") for fmt in ("md", "tex", "csv")}
    assert {p.name for p in out.iterdir()} == expected | {"metric_vs_params.png"}  # no temp files left
    assert "| lora r2 (0.33M) |" in printed and "paper: adalora (0.32M)" in printed
    assert "failed: mrpc lora r2 seed=4" in printed and "TrainingDiverged" in printed
    assert "running: mrpc adalora r2 seed=3" in printed
    assert "unreadable:" in printed and "rte" in printed
    csv = pd.read_csv(out / "table_glue.csv")
    mrpc = csv[(csv["row"] == "lora r2 (0.33M)") & (csv["column"] == "MRPC")].iloc[0]
    assert (round(mrpc["value"], 2), mrpc["n"], mrpc["source"]) == (84.67, 3, "ours")
    assert (out / "table_glue.md").read_text().startswith("| method / budget |")

    assert report.main([str(FIXTURES), "--out", str(out / "md"), "--format", "md", "--which", "final"]) == 0
    assert {p.name for p in (out / "md").iterdir()} == {"table_glue.md", "table_squad.md", "table_stability.md",
                                                       "metric_vs_params.png"}  # fmt: skip


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("old")

    def fail(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        report._atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_cli_rejects_bad_format_and_empty_dir(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(FIXTURES), "--format", "md,pdf"])
    assert report.main([str(tmp_path)]) == 1


def test_cli_with_only_failed_runs_lists_them_and_writes_no_table(tmp_path, capsys):
    write_run(tmp_path, "mrpc", "lora", {"accuracy": 0.5}, status="failed")
    assert report.main([str(tmp_path), "--reference"]) == 0
    assert "failed: mrpc lora r2 seed=1" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["lora-mrpc-1"]


# ----------------------------------------------------------------------------------------- notebook


def test_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = REPO / "notebooks" / "results.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("TRIADAPT_RESULTS", str(FIXTURES))
    monkeypatch.setenv("TRIADAPT_COMPARE", "lora,adalora")
    # The kernel inherits the environment; make triadapt importable without an install.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    resources = {"metadata": {"path": str(path.parent)}}  # run from notebooks/, as Jupyter would
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| lora r2 (0.33M) |" in m for m in markdown)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert any("## Compare A = lora r2 (0.33M) vs B = adalora r2 (0.32M)" in m for m in markdown)
    assert any("std 5.03 · range 10.00 · collapsed 1/3" in m for m in markdown)  # lora MRPC 80/84/90
    # metric-vs-params + the comparison + one heatmap per adaptive (task, method, budget)
    assert len(images) == 1 + 1 + 4


# ----------------------------------------------------------------------------------------- counting (#12)


def run_result(task="mrpc", method="lora", seed=1, accuracy=0.8, model="m", budget="r2", config=None, **extra):
    result = {"status": "completed", "error": None, "task": task, "task_group": "glue", "method": method,
              "model": model, "seed": seed, "budget_name": budget, "main_metric": "accuracy",
              "metrics": {"best": {"accuracy": accuracy}, "final": {"accuracy": accuracy}},
              "budget": {"adapter_params": 1000, "target_rank": 2}, "config": config or {"seed": seed}}  # fmt: skip
    result.update(extra)
    return result


def put(root, name, result):
    (root / name).mkdir(parents=True)
    (root / name / "result.json").write_text(json.dumps(result))


def test_same_seed_in_two_folders_counts_once(tmp_path, capsys):
    for seed in (1, 2):
        put(tmp_path, f"sweep1/seed={seed}", run_result(seed=seed, accuracy=0.7 + seed / 10))
    put(tmp_path, "sweep2/seed=1", run_result(seed=1, accuracy=0.8, config={"seed": 1, "paths": {"output_dir": "x"}}))
    df, _ = report.load_results(tmp_path)
    mrpc = cell(report.glue_summary(df), "lora r2 (0.00M)", "MRPC")
    assert (mrpc["n"], mrpc["value"]) == (2, pytest.approx(85.0))
    skipped = report.runs_not_included(df)
    assert len(skipped) == 1 and Path(skipped.iloc[0]["run_dir"]).parts[-2:] == ("sweep2", "seed=1")
    assert skipped.iloc[0]["reason"].startswith(f"duplicate of {tmp_path / 'sweep1' / 'seed=1'}")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "duplicate of" in capsys.readouterr().out


def test_completed_runs_without_a_numeric_metric_are_listed(tmp_path, capsys):
    put(tmp_path, "ok", run_result(seed=1))
    bad = {"null": None, "nan": float("nan"), "text": "high", "missing": "absent"}
    for seed, (name, value) in enumerate(bad.items(), start=2):
        result = run_result(seed=seed)
        if value == "absent":
            result["metrics"]["best"] = {"f1": 0.5}
        else:
            result["metrics"]["best"]["accuracy"] = value
        if name == "null":
            result["metrics"]["best"]["accuracy_reason"] = "constant predictions"
        put(tmp_path, name, result)
    df, problems = report.load_results(tmp_path)  # NaN is written by json.dumps as the non-standard NaN
    assert not problems
    reasons = dict(zip(report.runs_not_included(df)["run_dir"].map(lambda p: Path(p).name),
                       report.runs_not_included(df)["reason"]))  # fmt: skip
    assert reasons == {
        "null": "completed, but best.accuracy is null: constant predictions",
        "nan": "completed, but best.accuracy is NaN",
        "text": "completed, but best.accuracy is not a number ('high')",
        "missing": "completed, but best.accuracy is missing",
    }
    assert cell(report.glue_summary(df), "lora r2 (0.00M)", "MRPC")["n"] == 1
    # --which final: those runs' final metrics are numbers, so they count there
    assert cell(report.glue_summary(df, which="final"), "lora r2 (0.00M)", "MRPC")["n"] == 5
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "## Not included (4 runs, 0 unreadable files)" in out and "best.accuracy is null" in out


BAD_VALUES = ["abc", [1, 2], {"a": 1}, None, True, float("nan"), 1e308, -1]


@pytest.mark.parametrize("field", ["task_group", "model", "seed", "budget_name", "main_metric", "error",
                                   "metrics", "metrics.best", "metrics.best_step", "budget", "budget.adapter_params",
                                   "budget.target_rank", "budget.ranks", "timing", "timing.train_s", "config",
                                   "config.train", "protocol", "task", "method", "status"])  # fmt: skip
def test_one_odd_field_never_crashes_the_report(tmp_path, capsys, field):
    for seed in (1, 2, 3):
        put(tmp_path, f"good{seed}", run_result(seed=seed, timing={"train_s": 1.0}))
    for i, value in enumerate(BAD_VALUES):
        result = run_result(seed=10 + i, timing={"train_s": 1.0})
        holder, key = (result, field) if "." not in field else (result[field.split(".")[0]], field.split(".")[1])
        holder[key] = value
        put(tmp_path, f"bad{i}", result)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert report.main([str(tmp_path), "--compare", "lora,lora r2 (0.00M)"]) == 2  # the same row: refused
    out = capsys.readouterr().out
    assert "| lora r2" in out or "m: lora r2" in out or "lora r2" in out


def test_odd_fields_are_named(tmp_path, capsys):
    odd = run_result(seed="x")
    odd["budget"]["adapter_params"] = "many"
    put(tmp_path, "a", odd)
    odd = run_result(seed=3)
    odd["budget"]["adapter_params"] = "many"
    odd["budget"]["ranks"] = {"layer.0.output.dense": "x", "layer.1.output.dense": 2}
    put(tmp_path, "c", odd)
    put(tmp_path, "b", run_result(seed="2"))  # a seed written as text is still a seed
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "completed, but its seed is not an integer" in out
    assert "budget.adapter_params 'many' is not a number (read as missing)" in out
    assert "| lora r2 (0.00M) | 80.00 ± 0.00 (n=2) |" in out  # seeds 2 and 3; the median size ignores 'many'
    assert "budget.adapter_params 'many'" in out and "budget.ranks: 1 ranks are not numbers (left out)" in out
    df, _ = report.load_results(tmp_path)
    ranks = df.loc[df["seed"] == 3, "ranks"].iloc[0]
    assert ranks == {"layer.1.output.dense": 2}
    assert report.rank_heatmap(ranks).axes[0].images[0].get_array().shape == (1, 1)


# ----------------------------------------------------------------------------------------- sweeps (#11)


def test_average_over_one_task_is_singular(tmp_path):
    put(tmp_path, "a", run_result())
    assert report.glue_table(report.load_results(tmp_path)[0]).columns[-1] == "Ave. (1 task)"


def test_sweep_folder_of_several_methods_lists_every_job(tmp_path, capsys):
    sweep = tmp_path / "cpu_glue"
    for i, method in enumerate(["lora", "adalora", "triadapt"]):
        for seed in (1, 2):
            put(sweep, f"method={method},seed={seed},task=glue-mrpc", run_result(method=method, seed=seed))
            put(
                sweep,
                f"{i}/nested/method={method},seed={seed},task=glue-rte",
                run_result(task="rte", method=method, seed=seed),
            )
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "12 result.json files: 12 completed; methods: adalora (4), lora (4), triadapt (4)" in out
    table = report.glue_table(report.load_results(sweep)[0])
    assert sorted(table.index) == ["adalora r2 (0.00M)", "lora r2 (0.00M)", "triadapt r2 (0.00M)"]
    assert (table["RTE"].str.endswith("(n=2)")).all() and (table["MRPC"].str.endswith("(n=2)")).all()


# ----------------------------------------------------------------------------------------- settings (#13)


def config(seed, lr=1e-3, epochs=2, eval_every=None, **per_run):
    return {
        "seed": seed,
        "train": {"lr": lr, "epochs": epochs, "eval_every": eval_every, **per_run},
        "method": {"name": "x", "r": 2},
        "data": {"dir": f"/somewhere/{seed}", "max_train_samples": 1024},
    }


def test_runs_with_different_settings_are_never_averaged(tmp_path, capsys):
    # lora: seeds 1-2 at lr 1e-3 and seeds 3-4 at lr 5e-4 on both tasks; per-run keys differ freely
    for seed in (1, 2, 3, 4):
        lr = 1e-3 if seed <= 2 else 5e-4
        for task in ("mrpc", "rte"):
            cfg = config(seed, lr=lr, device=f"cuda:{seed}", log_every=seed)
            put(
                tmp_path,
                f"lora-{task}-{seed}",
                run_result(task=task, seed=seed, accuracy=0.6 + seed / 100, config=cfg),
            )
    # adalora: another lr, evaluated every 100 steps, protocol recorded at top level
    for seed in (1, 2):
        for task in ("mrpc", "rte"):
            put(tmp_path, f"adalora-{task}-{seed}", run_result(
                task=task, method="adalora", seed=seed, config=config(seed, lr=5e-4, eval_every=100),
                protocol={"eval_every": 100, "precision": "fp32"}))  # fmt: skip
    df, _ = report.load_results(tmp_path)
    s = report.glue_summary(df)
    assert cell(s, "lora r2 (0.00M) [train.lr=0.001]", "MRPC")["value"] == pytest.approx(61.5)
    assert cell(s, "lora r2 (0.00M) [train.lr=0.0005]", "MRPC")["value"] == pytest.approx(63.5)
    assert cell(s, "lora r2 (0.00M) [train.lr=0.0005]", "MRPC")["n"] == 2
    assert not (s["row"] == "lora r2 (0.00M)").any()
    notes = " ".join(s.attrs["notes"])
    assert "train.lr: 0.0005 (adalora r2 (0.00M), lora r2 (0.00M) [train.lr=0.0005]); 0.001 (lora r2" in notes
    assert "train.eval_every: 100 (adalora r2 (0.00M)); null (lora r2" in notes
    assert "protocol.precision: fp32 (adalora r2 (0.00M)); absent (lora" in notes
    assert "protocol.eval_every" not in notes  # the same split as train.eval_every: printed once
    assert "device" not in notes and "data.dir" not in notes and "method.r" not in notes
    assert "best checkpoint" in notes and "--which final" in notes
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "Settings that differ between rows" in capsys.readouterr().out


def test_per_task_recipes_do_not_split_rows(tmp_path):
    for seed in (1, 2):
        put(tmp_path, f"mrpc{seed}", run_result(seed=seed, config=config(seed, epochs=30)))
        put(tmp_path, f"rte{seed}", run_result(task="rte", seed=seed, config=config(seed, epochs=50)))
    table = report.glue_table(report.load_results(tmp_path)[0])
    assert list(table.index) == ["lora r2 (0.00M)"]
    assert table.loc["lora r2 (0.00M)", "MRPC"].endswith("(n=2)")


def test_plot_never_joins_backbones(tmp_path):
    for model, params in (("bert", 1000), ("deberta", 4000)):
        for budget, scale in (("r2", 1), ("r8", 4)):
            for seed in (1, 2):
                result = run_result(model=model, seed=seed, budget=budget)
                result["budget"]["adapter_params"] = params * scale
                put(tmp_path, f"{model}-{budget}-{seed}", result)
    df, _ = report.load_results(tmp_path)
    ax = report.plot_metric_vs_params(df).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["bert: lora", "deberta: lora"]
    xs = sorted(sorted(c.lines[0].get_xdata()) for c in ax.containers)  # one errorbar container per line
    assert xs == [[0.001, 0.004], [0.004, 0.016]]  # each line holds one backbone's budgets
    assert "bert: lora r2 (0.00M)" in report.glue_table(df).index


def test_plot_draws_full_finetuning_as_a_level(tmp_path):
    """Full fine-tuning has no adapter: a dashed level at its mean with a ±std band, never a point at x = 0."""
    for seed, acc in ((1, 0.70), (2, 0.80)):
        put(tmp_path, f"lora{seed}", run_result(seed=seed, accuracy=0.9))
        full = run_result(method="full", seed=seed, accuracy=acc, budget=None)
        full["budget"] = {"adapter_params": 0, "target_rank": None}
        put(tmp_path, f"full{seed}", full)
    df, _ = report.load_results(tmp_path)
    ax = report.plot_metric_vs_params(df).axes[0]
    assert sorted(ax.get_legend_handles_labels()[1]) == ["full (all weights)", "lora"]
    assert [list(c.lines[0].get_xdata()) for c in ax.containers] == [[0.001]]  # only LoRA is a point
    level = [line for line in ax.lines if line.get_label() == "full (all weights)"]
    assert len(level) == 1 and list(level[0].get_ydata()) == pytest.approx([75.0, 75.0])
    band = ax.patches[-1]  # y in data coordinates (a Rectangle from matplotlib 3.9, a Polygon before)
    ys = band.get_patch_transform().transform(band.get_path().vertices)[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx((75.0 - 7.0711, 75.0 + 7.0711), abs=1e-3)
