"""run.py end to end: a tiny model on hand-made data, and MiniLM on real MRPC."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO

RESULT_KEYS = {"status", "error", "task", "method", "model", "seed", "main_metric", "metrics", "budget", "timing", "versions", "git_sha"}


def run_py(*overrides, check=True):
    proc = subprocess.run(
        [sys.executable, "run.py", "logger=none", "hparams=none", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_tiny_bert_lora_writes_a_valid_result(tmp_path, tiny_glue_dir):
    run_dir = tmp_path / "run"
    run_py("model=tiny_bert", "method=lora", "budget=r2", "task=glue/mrpc", f"data.dir={tiny_glue_dir}",
           "train.max_steps=6", "train.batch_size=8", "train.eval_every=3", f"hydra.run.dir={run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "completed" and result["error"] is None
    assert (result["task"], result["method"], result["model"]) == ("mrpc", "lora", "tiny_bert")
    assert set(result["metrics"]["final"]) == {"accuracy", "f1"}
    assert result["metrics"]["best_step"] in (3, 6)
    # 2 layers × (4·(32+32) + (32+64) + (64+32)) × r=2
    assert result["budget"]["adapter_params"] == 2 * 2 * (4 * 64 + 96 + 96)
    assert set(result["budget"]["ranks"].values()) == {2} and len(result["budget"]["ranks"]) == 12
    assert result["budget"]["head_params"] == 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier
    assert result["timing"]["steps"] == 6 and result["timing"]["step_s_median"] > 0
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6]
    adapter = load_file(run_dir / "adapter.safetensors")
    assert sum(t.numel() for t in adapter.values()) == result["budget"]["adapter_params"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_stsb_regression_and_full_finetuning(tmp_path, tiny_glue_dir):
    run_dir = tmp_path / "run"
    run_py("model=tiny_deberta", "method=full", "task=glue/stsb", f"data.dir={tiny_glue_dir}",
           "train.max_steps=4", "train.batch_size=8", f"hydra.run.dir={run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert set(result["metrics"]["final"]) == {"pearson", "spearmanr", "pearson_spearman_mean"}
    assert result["budget"]["adapter_params"] == 0


def test_completed_run_dir_is_skipped_not_overwritten(tmp_path, tiny_glue_dir):
    run_dir = tmp_path / "run"
    args = ("model=tiny_bert", "task=glue/mrpc", f"data.dir={tiny_glue_dir}", "train.max_steps=2", f"hydra.run.dir={run_dir}")
    run_py(*args)
    before = (run_dir / "result.json").read_bytes()
    run_py(*args)
    assert (run_dir / "result.json").read_bytes() == before


@pytest.mark.slow
def test_minilm_real_mrpc_smoke(tmp_path, glue_dir):
    run_dir = tmp_path / "run"
    run_py("model=minilm_l6", "method=lora", "task=glue/mrpc", f"data.dir={glue_dir}", "train.max_steps=4",
           "train.batch_size=8", "data.max_eval_samples=64", f"hydra.run.dir={run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert result["budget"]["adapter_params"] == 8 * 6 * (4 * 768 + 1920 + 1920)  # MiniLM: 6 layers, hidden 384
    assert 0.0 <= result["metrics"]["final"]["accuracy"] <= 1.0


def test_squad_devsplit_tiny_run_writes_predictions(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    run_py("model=tiny_bert", "method=triadapt", "budget=r2", "task=squad_v2_devsplit", f"data.dir={shared_data}",
           "data.max_train_samples=48", "data.max_eval_samples=24", "train.max_steps=10", "train.batch_size=8",
           f"hydra.run.dir={run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["main_metric"] == "f1"
    assert {"exact", "f1", "HasAns_exact", "NoAns_exact", "best_f1"} <= set(result["metrics"]["final"])
    assert result["budget"]["head_params"] == 32 * 2 + 2  # qa_outputs only: BERT QA has no pooler
    predictions = json.loads((run_dir / "predictions.json").read_text())
    null_odds = json.loads((run_dir / "null_odds.json").read_text())
    assert len(predictions) == len(null_odds) == 24
    # growth reached the target: 12 modules × average rank 2
    assert sum(result["budget"]["ranks"].values()) == 24
    assert (run_dir / "rank_history.json").is_file() and (run_dir / "rank_heatmap.png").is_file()
