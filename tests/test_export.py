"""Export round trips: a tiny run of every method, exported with ``--merged`` (and ``--peft`` where
peft has the method), loads with plain transformers / peft and gives the run's predictions and dev
metric. Runs go in-process (the same code as run.py, without the start-up cost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose

BASE = ["logger=none", "hparams=none", "model=tiny_bert", "train.batch_size=8", "train.lr=5e-3"]
#: per method: a 24-step run in which allocation happens (AdaLoRA masks, IncreLoRA/TriAdaptLoRA grow)
SCHEDULES = {
    "full": [],
    "lora": [],
    "peft_lora": [],
    "adalora": [],
    "peft_adalora": [],
    "increlora": ["method.incre_interval=3"],
    "triadapt": ["method.incre_interval=2", "method.incre_rank_num=1"],
}
STEPS = 24


def run_once(run_dir: Path, overrides: list[str]) -> dict:
    from triadapt.experiment import run

    cfg = compose([*BASE, *overrides, f"+paths.run_dir={run_dir}"])
    run(cfg)
    return json.loads((run_dir / "result.json").read_text())


def task_of(result: dict):
    from omegaconf import OmegaConf

    from triadapt.data import build_task
    from triadapt.models import load_tokenizer

    cfg = OmegaConf.create(result["config"])
    return build_task(cfg.task, cfg.data, load_tokenizer(cfg.model), int(cfg.seed))


def logits(model, task, n: int = 16) -> torch.Tensor:
    """Logits (or start/end logits) of the first ``n`` training features."""
    batch = task.collate([task.train[i] for i in range(n)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    with torch.no_grad():
        out = model.eval()(**inputs)
    return out.logits if hasattr(out, "logits") else torch.stack([out.start_logits, out.end_logits])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished MRPC run per method (shared by the merged and peft tests)."""
    return {}


def finished_run(runs, tmp_path_factory, tiny_glue_dir, method: str) -> tuple[Path, dict]:
    if method not in runs:
        run_dir = tmp_path_factory.mktemp(method) / "run"
        result = run_once(
            run_dir,
            [
                f"method={method}",
                "task=glue/mrpc",
                f"data.dir={tiny_glue_dir}",
                f"train.max_steps={STEPS}",
                "train.eval_every=6",
                *SCHEDULES[method],
            ],
        )
        runs[method] = run_dir, result
    return runs[method]


@pytest.mark.parametrize("method", list(SCHEDULES))
@pytest.mark.parametrize("which", ["best", "final"])
def test_merged_export_reproduces_the_run(method, which, runs, tmp_path_factory, tiny_glue_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from triadapt.export import _base_model, load_run, main, rebuild

    run_dir, result = finished_run(runs, tmp_path_factory, tiny_glue_dir, method)
    assert result["status"] == "completed"
    out = tmp_path / "merged"
    main([str(run_dir), "--merged", str(out), f"--{which}"])
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in k or "core" in k for k in merged.state_dict())
    assert merged.config.id2label == {0: "not_equivalent", 1: "equivalent"}

    task = task_of(result)
    metrics = task.evaluate(merged, torch.device("cpu"), 32)
    for key, value in result["metrics"][which].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    run = load_run(run_dir, which)
    trained, _ = rebuild(run)
    ours, theirs = logits(trained, task), logits(merged, task)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    base, _ = _base_model(run.cfg)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert (merged.state_dict()[key] - base.state_dict()[key]).abs().max() > 0  # ΔW is in the weights
    provenance = json.loads((out / "triadapt_export.json").read_text())
    assert provenance["checkpoint"] == which and provenance["method"] == method


@pytest.mark.parametrize("method", [m for m in SCHEDULES if m != "full"])
def test_merged_export_folds_large_adapters_exactly(method, runs, tmp_path_factory, tiny_glue_dir, tmp_path):
    """A 24-step run leaves a small ΔW; with its adapter tensors replaced by large values (zeros, i.e.
    masked singular values, kept) the merged model must still give the adapted model's logits."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from triadapt.export import _base_model, load_run, main, rebuild

    run_dir, result = finished_run(runs, tmp_path_factory, tiny_glue_dir, method)
    big = tmp_path / "run"
    shutil.copytree(run_dir, big)
    gen = torch.Generator().manual_seed(0)
    tensors = load_file(big / "adapter_best.safetensors")
    tensors = {k: torch.where(t == 0, t, torch.randn(t.shape, generator=gen) * 0.3) for k, t in tensors.items()}
    save_file(tensors, str(big / "adapter_best.safetensors"))
    main([str(big), "--merged", str(tmp_path / "merged")])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    run = load_run(big, "best")
    trained, _ = rebuild(run)
    base, _ = _base_model(run.cfg)
    task = task_of(result)
    ours, theirs = logits(trained, task), logits(merged, task)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert (merged.state_dict()[key] - base.state_dict()[key]).abs().max() > 1e-2  # a large ΔW was folded
    for p in trained.parameters():  # without the adapter, the logits are far from these
        p.requires_grad_(False)
    head = {k: v for k, v in trained.state_dict().items() if k.startswith(("classifier", "bert.pooler"))}
    base.load_state_dict(head, strict=False)
    assert (logits(base, task) - ours).abs().max() > 1e-2


def test_grown_and_masked_runs_are_what_they_claim(runs, tmp_path_factory, tiny_glue_dir):
    """The runs above exercise allocation: AdaLoRA masked triplets, the growers grew."""
    _, ada = finished_run(runs, tmp_path_factory, tiny_glue_dir, "adalora")
    assert sum(ada["budget"]["ranks"].values()) < ada["budget"]["init_budget"]
    for method in ("increlora", "triadapt"):
        _, grown = finished_run(runs, tmp_path_factory, tiny_glue_dir, method)
        assert max(grown["budget"]["ranks"].values()) > 1, method


@pytest.mark.parametrize("method", ["lora", "peft_lora", "adalora", "peft_adalora"])
def test_peft_export_loads_with_peft(method, runs, tmp_path_factory, tiny_glue_dir, tmp_path):
    from peft import PeftModel

    from triadapt.export import _base_model, load_run, main, rebuild

    run_dir, result = finished_run(runs, tmp_path_factory, tiny_glue_dir, method)
    out = tmp_path / "peft"
    main([str(run_dir), "--peft", str(out)])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    run = load_run(run_dir, "best")
    base, _ = _base_model(run.cfg)  # the backbone the run started from (random: from its seed)
    loaded = PeftModel.from_pretrained(base, out)
    task = task_of(result)
    trained, _ = rebuild(run)
    torch.testing.assert_close(logits(loaded, task), logits(trained, task), atol=1e-5, rtol=1e-5)
    metrics = task.evaluate(loaded, torch.device("cpu"), 32)
    assert metrics[result["main_metric"]] == pytest.approx(result["metrics"]["best"][result["main_metric"]], abs=1e-6)


@pytest.mark.parametrize("method", ["triadapt", "increlora", "full"])
def test_peft_export_of_other_methods_points_at_merged(
    method, runs, tmp_path_factory, tiny_glue_dir, tmp_path, capsys
):
    from triadapt.export import main

    run_dir, _ = finished_run(runs, tmp_path_factory, tiny_glue_dir, method)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--peft", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "--merged" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def merged_scores_like_the_run(tmp_path, name: str, auto, overrides: list[str]):
    from triadapt.export import main

    run_dir = tmp_path / name
    result = run_once(run_dir, [*overrides, "train.max_steps=12"])
    out = tmp_path / f"{name}-merged"
    main([str(run_dir), "--merged", str(out), "--final"])
    model = auto.from_pretrained(out)
    metrics = task_of(result).evaluate(model, torch.device("cpu"), 32)
    for key, value in result["metrics"]["final"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), (name, key)
    return model


def test_regression_head_exports(tmp_path, tiny_glue_dir):
    """STS-B: a regression head (grown TriAdaptLoRA ranks), scored as the run scored it."""
    from transformers import AutoModelForSequenceClassification

    overrides = ["method=triadapt", "task=glue/stsb", f"data.dir={tiny_glue_dir}", "method.incre_interval=2",
                 "method.incre_rank_num=2"]  # fmt: skip
    model = merged_scores_like_the_run(tmp_path, "stsb", AutoModelForSequenceClassification, overrides)
    assert model.config.problem_type == "regression" and model.config.num_labels == 1


def test_qa_head_exports(tmp_path, shared_data):
    """SQuAD 2.0 (dev split): a QA head (masked AdaLoRA ranks), scored as the run scored it."""
    from transformers import AutoModelForQuestionAnswering

    overrides = ["method=adalora", "task=squad_v2_devsplit", f"data.dir={shared_data}/squad_v2",
                 "data.max_train_samples=24", "data.max_eval_samples=16", "task.max_seq_length=128",
                 "task.doc_stride=64"]  # fmt: skip
    merged_scores_like_the_run(tmp_path, "squad", AutoModelForQuestionAnswering, overrides)


def test_merged_export_loads_without_triadapt(runs, tmp_path_factory, tiny_glue_dir, tmp_path):
    """A fresh interpreter that cannot import triadapt loads the export and gives the same logits."""
    from triadapt.export import load_run, main, rebuild

    run_dir, result = finished_run(runs, tmp_path_factory, tiny_glue_dir, "triadapt")
    out = tmp_path / "merged"
    main([str(run_dir), "--merged", str(out)])
    task = task_of(result)
    batch = task.collate([task.train[i] for i in range(8)])
    batch.pop("labels")
    torch.save(dict(batch), tmp_path / "batch.pt")
    code = (
        "import sys; sys.modules['triadapt'] = None\n"  # any import of triadapt now fails
        "import torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**batch).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    trained, _ = rebuild(load_run(run_dir, "best"))
    with torch.no_grad():
        ours = trained(**batch).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours, atol=1e-5, rtol=1e-5)


def test_export_refuses_bad_inputs(runs, tmp_path_factory, tiny_glue_dir, tmp_path):
    from triadapt.export import main

    def error(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        return str(exit_info.value.code)

    assert error(tmp_path / "nowhere", "--merged", tmp_path / "x").startswith("error: ")
    run_dir, _ = finished_run(runs, tmp_path_factory, tiny_glue_dir, "lora")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "not empty" in error(run_dir, "--merged", taken)
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    old = tmp_path / "old"
    old.mkdir()
    for f in run_dir.iterdir():
        if f.is_file() and not f.name.startswith("head"):
            (old / f.name).write_bytes(f.read_bytes())
    assert "run it again" in error(old, "--merged", tmp_path / "y")

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "adapter_best.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.0"))
    save_file(tensors | {key: torch.zeros(3, 5)}, str(bad / "adapter_best.safetensors"))
    message = error(bad, "--merged", tmp_path / "z")
    assert message.startswith("error: the weights in") and "do not fit" in message and "\n" not in message
    assert not (tmp_path / "z").exists()
