"""triadapt.claims on synthetic result sets whose answer is known (python -m triadapt.report --compare)."""

import json

import numpy as np
import pandas as pd
import pytest

from triadapt import claims, report

TASKS = {"mrpc": 0.80, "rte": 0.60, "sst2": 0.90}  # accuracy tasks: the score is accuracy ×100


def write(root, method, task, seed, accuracy, budget="r2", lr=1e-3):
    run_dir = root / f"method={method},seed={seed},task=glue-{task},budget={budget}"
    run_dir.mkdir(parents=True)
    result = {"status": "completed", "task": task, "task_group": "glue", "method": method, "model": "m",
              "seed": seed, "budget_name": budget, "main_metric": "accuracy",
              "metrics": {"best": {"accuracy": accuracy}, "final": {"accuracy": accuracy}},
              "budget": {"adapter_params": 1000, "target_rank": 2},
              "config": {"seed": seed, "train": {"lr": lr, "epochs": 2}, "method": {"name": method}}}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result))


def result_set(root, shift, noise, seeds_a, seeds_b, rng, collapse_b=None):
    """A = task base + shift + noise, B = task base + noise (accuracies), per task and seed.
    ``collapse_b``: (task, seed) of B that drops by 0.3."""
    for task, base in TASKS.items():
        for seed in seeds_a:
            write(root, "a", task, seed, base + shift + rng.normal(0, noise))
        for seed in seeds_b:
            drop = 0.3 if collapse_b == (task, seed) else 0.0
            write(root, "b", task, seed, base + rng.normal(0, noise) - drop)
    return report.load_results(root)[0]


def test_true_difference_of_several_noise_widths_is_detected(tmp_path):
    # 4 points better with seed noise of 1 point, 5 seeds paired
    df = result_set(tmp_path, 0.04, 0.01, range(1, 6), range(1, 6), np.random.default_rng(0))
    c = claims.compare(df, "a", "b")
    d = c.differences.set_index("task")
    assert list(d.index) == ["sst2", "rte", "mrpc", "average"]
    assert (d["verdict"] == "A better").all()
    assert d["paired"].all() and (d["n_a"] == 5).all()
    assert d.loc["average", "column"] == "Ave. (3 tasks)"
    assert d.loc["average", "low"] > 0 and d.loc["average", "diff"] == pytest.approx(4, abs=1.5)
    assert c.pooled["pairs"] == 15 and c.pooled["verdict"] == "A better"
    # the other way round
    flipped = claims.compare(df, "b", "a").differences
    assert (flipped["verdict"] == "B better").all()
    text = claims.format_comparison(c)
    assert "paired by seed (1,2,3,4,5)" in text and "**A better**" in text and "Student t" in text


def test_zero_difference_is_within_noise_at_the_stated_rate():
    """Under the null (equal means), a difference is called in 1 − level = 5% of comparisons."""
    rng = np.random.default_rng(1)
    calls = {"paired": 0, "unpaired": 0}
    sims = 4000
    for _ in range(sims):
        seed_effect = rng.normal(0, 2, 5)  # shared by both methods on a seed: pairing removes it
        a, b = seed_effect + rng.normal(0, 1, 5), seed_effect + rng.normal(0, 1, 5)
        _, low, high, _, _ = claims.difference_ci(a, b, paired=True)
        calls["paired"] += claims.verdict(low, high) != "within seed noise"
        _, low, high, _, _ = claims.difference_ci(rng.normal(0, 1, 4), rng.normal(0, 3, 7), paired=False)
        calls["unpaired"] += claims.verdict(low, high) != "within seed noise"
    for kind, n in calls.items():  # binomial sd at 5% of 4000: 0.34%
        assert 0.038 <= n / sims <= 0.062, (kind, n / sims)


def test_zero_difference_through_the_report(tmp_path):
    """The same rate through result files and compare(): 60 sets × 3 tasks + average."""
    rng = np.random.default_rng(2)
    verdicts = []
    for i in range(60):
        df = result_set(tmp_path / str(i), 0.0, 0.01, range(1, 5), range(1, 5), rng)
        verdicts += list(claims.compare(df, "a", "b").differences["verdict"])
    wrong = sum(v != "within seed noise" for v in verdicts) / len(verdicts)
    assert set(verdicts) <= {"within seed noise", "A better", "B better"}
    assert 0.01 <= wrong <= 0.11, wrong  # 5% expected; 240 verdicts (tasks of a set independent)


def test_unequal_seed_sets_are_unpaired_and_labelled(tmp_path):
    df = result_set(tmp_path, 0.05, 0.01, range(1, 6), range(1, 4), np.random.default_rng(3))
    c = claims.compare(df, "a", "b")
    d = c.differences.set_index("task")
    assert not d.loc["mrpc", "paired"]
    assert d.loc["mrpc", "pairing"] == "unpaired: seeds differ (A 1,2,3,4,5; B 1,2,3)"
    assert (d.loc["mrpc", "n_a"], d.loc["mrpc", "n_b"]) == (5, 3)
    assert d.loc["mrpc", "verdict"] == "A better"
    assert d.loc["average", "pairing"].startswith("per-task intervals combined")
    assert c.pooled["pairs"] == 9  # only the seeds both ran
    assert "unpaired: seeds differ" in claims.format_comparison(c)


def test_fewer_seeds_than_the_minimum_give_no_verdict(tmp_path):
    df = result_set(tmp_path, 0.10, 0.01, [1, 2], [1, 2], np.random.default_rng(4))
    c = claims.compare(df, "a", "b")
    assert set(c.differences["verdict"]) == {"not enough seeds"}
    assert c.pooled["verdict"] == "not enough seeds"  # 6 pairs, but from 2 seeds
    assert set(c.stability["verdict"]) == {"not enough seeds"}
    assert "Minimum seeds per claim: 3" in claims.format_comparison(c)
    verdicts = set(claims.compare(df, "a", "b", min_seeds=2).differences["verdict"])
    assert "not enough seeds" not in verdicts and "A better" in verdicts  # 2 seeds: t has 1 dof, wide intervals


def test_one_collapsed_seed_makes_a_method_less_stable(tmp_path):
    df = result_set(tmp_path, 0.0, 0.005, range(1, 7), range(1, 7), np.random.default_rng(5), collapse_b=("mrpc", 4))
    c = claims.compare(df, "a", "b")
    s = c.stability.set_index("task")
    assert (s.loc["mrpc", "collapsed_a"], s.loc["mrpc", "collapsed_b"]) == (0, 1)
    assert s.loc["mrpc", "std_b"] > 10 * s.loc["mrpc", "std_a"]
    assert s.loc["mrpc", "range_b"] > 25
    assert s.loc["mrpc", "verdict"] == "A more stable"
    assert s.loc["rte", "verdict"] == "within seed noise"
    assert c.stability_overall["collapsed_a"] == [0, 18] and c.stability_overall["collapsed_b"] == [1, 18]
    assert c.stability_overall["verdict"] == "A more stable"
    table = claims.stability_table(df)
    assert table.loc["b r2 (0.00M)", "MRPC (acc)"].endswith("collapsed 1/6")
    assert table.loc["a r2 (0.00M)", "MRPC (acc)"].endswith("collapsed 0/6")


def test_rows_are_named_by_method_or_label(tmp_path):
    rng = np.random.default_rng(6)
    result_set(tmp_path, 0.0, 0.01, [1, 2, 3], [1, 2, 3], rng)
    for seed in (1, 2, 3):
        write(tmp_path, "a", "mrpc", seed, 0.8, budget="r8")
    df = report.load_results(tmp_path)[0]
    with pytest.raises(ValueError, match="names several rows"):
        claims.compare(df, "a", "b")
    c = claims.compare(df, "a r8 (0.00M)", "b")
    assert c.a == "a r8 (0.00M)" and list(c.differences["task"]) == ["mrpc", "average"]
    assert c.only == {"A": [], "B": ["sst2", "rte"]}
    with pytest.raises(ValueError, match="no row 'c'"):
        claims.compare(df, "c", "b")


def test_compare_names_settings_that_differ(tmp_path):
    for seed in (1, 2, 3):
        write(tmp_path, "a", "mrpc", seed, 0.8, lr=5e-4)
        write(tmp_path, "b", "mrpc", seed, 0.8, lr=1e-3)
    c = claims.compare(report.load_results(tmp_path)[0], "a", "b")
    assert c.settings == ["train.lr: 0.0005 (a r2 (0.00M)); 0.001 (b r2 (0.00M))"]


def test_cli_compare_prints_and_writes_nothing(tmp_path, capsys):
    result_set(tmp_path, 0.04, 0.01, range(1, 6), range(1, 6), np.random.default_rng(7))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert report.main([str(tmp_path), "--compare", "a,b", "--compare", "b,a"]) == 0
    out = capsys.readouterr().out
    assert "## Compare A = a r2 (0.00M) vs B = b r2 (0.00M)" in out
    assert "## Compare A = b r2 (0.00M) vs B = a r2 (0.00M)" in out
    assert "| Ave. (3 tasks) |" in out and "Across tasks: paired t-test over 15 (task, seed) pairs" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert report.main([str(tmp_path), "--compare", "a,zzz"]) == 2
    assert capsys.readouterr().err.startswith("error: --compare a,zzz: no row 'zzz'")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--compare", "a"])


def test_plot_comparison(tmp_path):
    df = result_set(tmp_path, 0.04, 0.01, range(1, 6), range(1, 6), np.random.default_rng(8))
    ax = claims.plot_comparison(claims.compare(df, "a", "b")).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["SST-2 (acc) (A better)", "RTE (acc) (A better)", "MRPC (acc) (A better)",
                      "Ave. (3 tasks) (A better)"]  # fmt: skip
    assert any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines())  # the zero line


def test_stability_of_a_constant_row(tmp_path):
    for seed in (1, 2, 3):
        write(tmp_path, "a", "mrpc", seed, 0.7)
        write(tmp_path, "b", "mrpc", seed, 0.6 + seed / 100)
    s = claims.compare(report.load_results(tmp_path)[0], "a", "b").stability.iloc[0]
    assert s["std_a"] == 0 and s["verdict"] == "no test (a spread is zero)"
    runs = report.included_runs(report.load_results(tmp_path)[0])
    table = claims.stability(runs)
    assert isinstance(table, pd.DataFrame) and set(table["collapsed"]) == {0}
