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


def test_full_finetuning_row_names_no_rank_budget():
    """Full fine-tuning has no rank budget: its row says so instead of "full r2 (0.00M)"."""
    df, _ = report.load_results([REPO / "results" / "cpu_glue"])  # committed result files
    table = report.glue_table(df)
    assert "full (all weights)" in table.index
    assert not any(label.startswith("full r") for label in table.index)
    assert any(label.startswith("lora r2 (0.08M)") for label in table.index)


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
    # The kernel inherits the environment; make triadapt importable without an install.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    resources = {"metadata": {"path": str(path.parent)}}  # run from notebooks/, as Jupyter would
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| lora r2 (0.33M) |" in m for m in markdown)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 + 4  # metric-vs-params + one heatmap per adaptive (task, method, budget)
