"""Decoder LLM backbones (LLaMA, Qwen2, BLOOM): every method trains on the tiny random variants,
ends at its budget with parameter counts checked against hand-computed shapes (grouped-query
attention makes k/v narrower than q), and resumes exactly; saved checkpoints load through the
``from_pretrained`` path with the real configs' module names; the LLM-size options.

The runs go through ``triadapt.experiment.main`` in-process (what run.py calls), on one thread;
one test per family starts run.py itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, REPO, compose, write_tiny_mrpc
from omegaconf import OmegaConf
from safetensors.torch import load_file

from triadapt.train import STOP_AFTER_ENV

FAMILIES = {"llama": "tiny_llama", "qwen2": "tiny_qwen2", "bloom": "tiny_bloom"}
HUB_CONFIGS = {"llama": "llama3_2_1b", "qwen2": "qwen2_5_0_5b", "bloom": "bloom_560m"}
METHODS = ["lora", "peft_lora", "adalora", "peft_adalora", "increlora", "triadapt", "full"]
LAYERS = 2
#: (d_in, d_out) of every adapted matrix of one layer, by hand from the tiny configs (hidden 32,
#: 4 query heads of 8): LLaMA 2 key/value heads → k/v 32→16, MLP 64; Qwen2 1 key/value head →
#: k/v 32→8, MLP 48; BLOOM fused q|k|v 32→96, MLP 4×32.
SHAPES = {
    "tiny_llama": {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                   "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)},
    "tiny_qwen2": {"q_proj": (32, 32), "k_proj": (32, 8), "v_proj": (32, 8), "o_proj": (32, 32),
                   "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)},
    "tiny_bloom": {"query_key_value": (32, 96), "dense": (32, 32), "dense_h_to_4h": (32, 128),
                   "dense_4h_to_h": (128, 32)},
}  # fmt: skip
#: adapter parameters of one module of rank r, per method (see each method's adapter_params)
COST = {
    "lora": lambda r, d_in, d_out: r * (d_in + d_out),
    "peft_lora": lambda r, d_in, d_out: r * (d_in + d_out),
    "adalora": lambda r, d_in, d_out: r * (d_in + d_out + 1),  # + one singular value per rank
    "peft_adalora": lambda r, d_in, d_out: r * (d_in + d_out + 1),
    "increlora": lambda r, d_in, d_out: r * (d_in + d_out + 1),
    "triadapt": lambda r, d_in, d_out: r * (d_in + d_out) + r * (r + 1),  # + triangular core L + U
}
RANK, STEPS, STOP_AT = 2, 12, 7
#: growth spread over steps 5-10 so that the stop at step 7 falls inside it (AdaLoRA budgets until
#: step 10 and IncreLoRA grows until step 8 with their defaults)
SCHEDULES = {"triadapt": ["method.init_warmup=2", "method.incre_interval=1"]}


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    """A hand-made MRPC folder (64 pairs) in the GLUE TSV layout."""
    return write_tiny_mrpc(tmp_path_factory.mktemp("data") / "glue")


def _squad_json(n: int, offset: int) -> dict:
    paragraphs = []
    for i in range(n):
        context = f"Item {i + offset} was made in the year {1900 + i} by a small team in the north."
        answer = str(1900 + i)
        qas = [
            {"id": f"q{i + offset}a", "question": f"When was item {i + offset} made?", "is_impossible": False,
             "answers": [{"text": answer, "answer_start": context.index(answer)}]},
            {"id": f"q{i + offset}b", "question": "Who painted the moon?", "is_impossible": True, "answers": []},
        ]  # fmt: skip
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "v2.0", "data": [{"title": f"t{offset}", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def squad(tmp_path_factory) -> Path:
    """A hand-made SQuAD 2.0 folder (answerable and unanswerable questions) in the official layout."""
    root = tmp_path_factory.mktemp("data")
    (root / "squad_v2").mkdir()
    (root / "squad_v2" / "train-v2.0.json").write_text(json.dumps(_squad_json(16, 0)))
    (root / "squad_v2" / "dev-v2.0.json").write_text(json.dumps(_squad_json(6, 100)))
    return root


def run(overrides: list[str], run_dir: Path) -> dict:
    from triadapt.experiment import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(compose(["logger=none", "hparams=none", *overrides, f"+paths.run_dir={run_dir}"]))
    finally:
        torch.set_num_threads(threads)
    return json.loads((run_dir / "result.json").read_text())


def glue_overrides(model: str, method: str, glue: Path) -> list[str]:
    out = [f"model={model}", f"method={method}", f"budget=r{RANK}", "task=glue/mrpc", f"data.dir={glue}",
           f"train.max_steps={STEPS}", "train.batch_size=8", "train.lr=5e-3", "train.eval_every=4"]  # fmt: skip
    return out + ([] if method == "full" else ["method.dropout=0.1"]) + SCHEDULES.get(method, [])


def expected_adapter_params(model: str, method: str, ranks: dict[str, int]) -> int:
    shapes = SHAPES[model]
    return sum(COST[method](r, *shapes[name.rpartition(".")[2]]) for name, r in ranks.items())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_ends_at_its_budget_and_resumes_exactly(family, method, glue, tmp_path, monkeypatch):
    model = FAMILIES[family]
    overrides = glue_overrides(model, method, glue)
    ref = run(overrides, tmp_path / "ref")
    assert ref["status"] == "completed" and ref["timing"]["steps"] == STEPS
    budget = ref["budget"]
    if method == "full":
        assert budget["ranks"] == {} and budget["adapter_params"] == 0
    else:
        n_matrices = LAYERS * len(SHAPES[model])
        assert len(budget["ranks"]) == n_matrices
        assert budget["total_rank"] == sum(budget["ranks"].values()) == RANK * n_matrices  # the budget, reached
        assert budget["adapter_params"] == expected_adapter_params(model, method, budget["ranks"])
        if method in ("lora", "peft_lora"):  # r × Σ(d_in + d_out): LLaMA 2×1024, Qwen2 2×896, BLOOM 2×1024
            assert budget["adapter_params"] == {"tiny_llama": 2048, "tiny_qwen2": 1792, "tiny_bloom": 2048}[model]
    assert budget["head_params"] == 32 * 2  # the decoders' `score` head: no bias, no pooler

    # Stopped as a signal would stop it (checkpoint, `interrupted`), then resumed: the same run.
    run_dir = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_ENV, str(STOP_AT))
    with pytest.raises(SystemExit) as stopped:
        run(overrides, run_dir)
    assert stopped.value.code == 130
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    monkeypatch.delenv(STOP_AFTER_ENV)
    resumed = run(overrides, run_dir)
    assert resumed["status"] == "completed"
    assert resumed["metrics"] == ref["metrics"] and resumed["budget"] == ref["budget"]
    history = tmp_path / "ref" / "rank_history.json"
    if history.exists():  # the stop falls inside the allocation phase
        assert json.loads(history.read_text())[-1]["step"] > STOP_AT
    for name in ("rank_history.json", "metrics.jsonl"):
        if (tmp_path / "ref" / name).exists():
            assert (run_dir / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    got, want = load_file(run_dir / "adapter.safetensors"), load_file(tmp_path / "ref" / "adapter.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "adapter differs after resume"


def test_grouped_query_budgets_of_the_real_backbones():
    """Parameters per rank unit Σ(d_in + d_out) and adapted matrices of the hub configs' shapes
    (built on the meta device: no weights), against the published shapes by hand."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from triadapt.methods.core import find_target_linears

    by_hand = {
        # 16 layers: q, o 2048→2048; k, v 2048→512 (8 of 32 heads); gate, up 2048→8192; down 8192→2048
        "llama3_2_1b": (16 * (2 * 4096 + 2 * 2560 + 3 * 10240), 16 * 7, 1_235_814_400),
        # 24 layers: q, o 896→896; k, v 896→128 (2 of 14 heads); gate, up, down 896↔4864
        "qwen2_5_0_5b": (24 * (2 * 1792 + 2 * 1024 + 3 * 5760), 24 * 7, 494_032_768),
        # 24 layers: query_key_value 1024→3072, dense 1024→1024, dense_h_to_4h / dense_4h_to_h 1024↔4096
        "bloom_560m": (24 * (4096 + 2048 + 2 * 5120), 24 * 4, 559_214_592),
    }
    assert [v[0] for v in by_hand.values()] == [704_512, 549_888, 393_216]
    for name, (per_rank, n_matrices, n_params) in by_hand.items():
        cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        arch = OmegaConf.to_container(cfg.architecture)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(
                AutoConfig.for_model(arch.pop("model_type"), **arch)
            )
        linears = find_target_linears(model, list(cfg.target_modules))
        assert len(linears) == n_matrices, name
        assert sum(m.in_features + m.out_features for _, m in linears) == per_rank, name
        assert sum(p.numel() for p in model.base_model.parameters()) == n_params, name  # the released size


def save_decoder_checkpoint(model_name: str, folder: Path) -> Path:
    """A checkpoint as the hub serves one: the tiny backbone (no head) and its tokenizer, saved
    without a padding token (as LLaMA's is)."""
    from transformers import AutoConfig, AutoModel

    from triadapt.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    assert tokenizer.pad_token is None
    arch = OmegaConf.to_container(compose([f"model={model_name}"]).model.architecture)
    # a few spare rows, as released embeddings have (Qwen2's tokenizer class adds its own padding token)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer) + 2, **arch)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoder_checkpoints")
    return {family: save_decoder_checkpoint(model, root / family) for family, model in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_loads_through_from_pretrained_and_pools_the_last_real_token(family, checkpoints):
    from triadapt.models import load_model, load_tokenizer

    cfg = compose([f"model={HUB_CONFIGS[family]}", f"model.pretrained={checkpoints[family]}"]).model
    tokenizer = load_tokenizer(cfg)
    # The saved tokenizer has none: pad with end-of-text; Qwen2's tokenizer class brings its own, as Qwen's has.
    assert tokenizer.pad_token == ("<|endoftext|>" if family == "qwen2" else tokenizer.eos_token)
    model = load_model(cfg, "sequence_classification", 3, tokenizer, device=torch.device("cpu"))
    assert model.config.model_type == family and model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32  # weights_dtype auto: fp32 off a GPU
    saved = load_file(checkpoints[family] / "model.safetensors")
    embedding = next(k for k in saved if "embed" in k)
    assert torch.equal(model.get_input_embeddings().weight, saved[embedding])  # loaded, not re-initialised
    # Right padding must not change a sequence's logits: transformers pools its last real token.
    model.eval()
    texts = ["a short one", "a much longer sentence than the first"]
    alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["input_ids"][0] == tokenizer.pad_token_id).any()
    torch.testing.assert_close(model(**batch).logits[:1], alone)
    qa = load_model(cfg, "question_answering", 2, tokenizer)
    assert type(qa).__name__.endswith("ForQuestionAnswering")


@pytest.mark.parametrize("family", ["llama", *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "bloom"))])
def test_hub_config_trains_through_run_py(family, checkpoints, glue, tmp_path):
    """run.py with the real config (module names, heads, weights_dtype) on the saved tiny weights."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", "logger=none", "hparams=none", f"model={HUB_CONFIGS[family]}",
           f"model.pretrained={checkpoints[family]}", "method=triadapt", "budget=r2", "task=glue/mrpc",
           f"data.dir={glue}", "train.max_steps=8", "train.batch_size=8", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["model"] == HUB_CONFIGS[family]
    model = FAMILIES[family]
    assert result["budget"]["total_rank"] == 2 * LAYERS * len(SHAPES[model])
    assert result["budget"]["adapter_params"] == expected_adapter_params(model, "triadapt", result["budget"]["ranks"])
    assert (run_dir / "rank_heatmap.png").stat().st_size > 0  # layers.N / h.N module names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_squad_through_the_question_answering_head(family, squad, tmp_path):
    result = run([f"model={FAMILIES[family]}", "method=lora", "budget=r2", "task=squad_v2", f"data.dir={squad}",
                  "task.max_seq_length=96", "task.doc_stride=32", "train.max_steps=4", "train.batch_size=8"],
                 tmp_path / "run")  # fmt: skip
    assert result["status"] == "completed" and {"exact", "f1", "NoAns_exact"} <= set(result["metrics"]["final"])
    assert result["budget"]["head_params"] == 32 * 2 + 2  # qa_outputs
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 12


def test_paper_presets_name_the_missing_head_dropout(checkpoints, glue, tmp_path, capsys):
    """The paper presets set a head dropout (DeBERTa's); the decoders' heads have none: one line says so."""
    from triadapt.experiment import main

    cfg = compose(["logger=none", "model=llama3_2_1b", f"model.pretrained={checkpoints['llama']}", "method=lora",
                   "task=glue/mrpc", f"data.dir={glue}", "budget=r8", f"+paths.run_dir={tmp_path / 'run'}"])  # fmt: skip
    assert cfg.model.classifier_dropout is not None
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.classifier_dropout=null" in err and "llama" in err


@pytest.mark.parametrize("method", ["lora", "increlora", "triadapt"])
def test_gradient_checkpointing_trains_the_same_adapter(method, glue, tmp_path):
    overrides = glue_overrides("tiny_llama", method, glue)
    plain = run(overrides, tmp_path / "plain")
    ckpt = run([*overrides, "train.gradient_checkpointing=true"], tmp_path / "ckpt")
    assert ckpt["metrics"] == plain["metrics"] and ckpt["budget"] == plain["budget"]
    got, want = (
        load_file(tmp_path / "ckpt" / "adapter.safetensors"),
        load_file(tmp_path / "plain" / "adapter.safetensors"),
    )
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_weights_keep_adapters_and_head_in_fp32(glue, tmp_path):
    """bf16 frozen weights (meant for GPUs; here on CPU under bf16 autocast)."""
    from triadapt.methods import RunContext, build_method
    from triadapt.models import load_model, load_tokenizer

    cfg = compose(["model=tiny_qwen2", "model.weights_dtype=bf16", "method=lora", "budget=r2"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model, "sequence_classification", 2, tokenizer, device=torch.device("cpu"), precision="bf16"
    )
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32
    method = build_method(cfg.method, RunContext(total_steps=4, target_modules=list(cfg.model.target_modules)))
    params = [p for g in method.inject(model) for p in g["params"]]
    assert params and all(p.dtype == torch.float32 for p in params)
    result = run(["model=tiny_qwen2", "model.weights_dtype=bf16", "train.precision=bf16", "method=lora", "budget=r2",
                  "task=glue/mrpc", f"data.dir={glue}", "train.max_steps=4", "train.batch_size=8"], tmp_path / "run")  # fmt: skip
    assert result["status"] == "completed" and result["budget"]["adapter_params"] == 1792


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.weights_dtype=bf16", "train.precision=fp32"], "needs bf16 autocast"),
        (["model.weights_dtype=bf16", "train.precision=bf16", "method=full"], "would train every weight in bf16"),
        (["model.weights_dtype=fp16"], "choose fp32, bf16 or auto"),
    ],
)
def test_bad_weight_dtypes_are_one_line_errors(overrides, message, glue, tmp_path, capsys):
    from triadapt.experiment import main

    cfg = compose(["logger=none", "hparams=none", "model=tiny_llama", "task=glue/mrpc", f"data.dir={glue}",
                   *overrides, f"+paths.run_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_model_that_cannot_fit_is_refused_before_loading(monkeypatch, glue, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from triadapt import models
    from triadapt.errors import ConfigError
    from triadapt.experiment import main

    # The 1B shape, counted on the meta device: 16 bytes a parameter for full fine-tuning, 2 for bf16 weights.
    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "llama3_2_1b.yaml").architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), num_labels=2, **arch)
    monkeypatch.setattr(models, "available_bytes", lambda device: 4 * 2**30)
    args = ("llama3_2_1b", AutoModelForSequenceClassification, config, torch.device("cpu"))
    assert models.check_fits(*args, torch.bfloat16, trains_backbone=False) == 1_235_818_496  # 2.3 GiB fits
    with pytest.raises(
        ConfigError, match=r"1\.24B parameters\) needs at least 18\.4 GiB .* but cpu has 4\.0 GiB free"
    ):
        models.check_fits(*args, torch.float32, trains_backbone=True)

    monkeypatch.setattr(models, "available_bytes", lambda device: 2**10)  # below the tiny model's 108 KB
    with pytest.raises(SystemExit) as exit_info:
        main(compose(["logger=none", "hparams=none", "model=tiny_llama", "task=glue/mrpc", f"data.dir={glue}",
                      f"+paths.run_dir={tmp_path / 'run'}"]))  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny_llama" in err and "needs at least" in err, err


def test_bench_llama_1b_shape_point():
    """The scaling section's full model sweep ends at Llama 3.2 1B's shape, read from conf/model."""
    import argparse

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from triadapt.bench.config import model_config
    from triadapt.bench.scaling import scaling_plan

    cfg = model_config("llama_1b_shape")
    assert (
        cfg.source == "random"
        and cfg.tokenizer == "bytes"
        and list(cfg.target_modules)[:3] == ["q_proj", "k_proj", "v_proj"]
    )
    arch = OmegaConf.to_container(cfg.architecture)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    assert sum(p.numel() for p in model.base_model.parameters()) == 1_235_814_400
    args = argparse.Namespace(full=True, scaling_models=None, model="tiny_bert", batch_size=8, scaling_batch=4,
                              seq_len=32, rank=8)  # fmt: skip
    points = [p for p in scaling_plan(args) if p[0] == "model" and p[2] == "llama_1b_shape"]
    assert {p[3].method for p in points} == {"floor", "lora", "peft_lora", "triadapt"}


@pytest.mark.parametrize("method", ["floor", "lora", "triadapt"])
def test_bench_steps_a_decoder(method):
    from triadapt.bench.config import model_config
    from triadapt.bench.runner import Runner, Spec, build_base, make_batch

    cfg = model_config("tiny_llama")
    base = build_base(cfg, 0)[0]
    batch = make_batch(base, 4, 16, torch.device("cpu"), 0)
    runner = Runner(Spec(method, "steady", 2), base, cfg, batch, torch.device("cpu"), 20, 1, 0)
    assert all(dt > 0 for dt, _ in (runner.step(), runner.step()))
    if method == "floor":
        assert len(runner.floor_leaves) == 3  # layer 0's q, k and v outputs


def test_weights_dtype_auto_means_bf16_only_for_frozen_weights_on_cuda():
    from triadapt.models import weights_dtype

    auto = OmegaConf.create({"weights_dtype": "auto"})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert weights_dtype(auto, cuda) == torch.bfloat16
    assert weights_dtype(auto, cuda, trains_backbone=True) == torch.float32  # full fine-tuning
    assert weights_dtype(auto, cuda, precision="fp32") == torch.float32
    assert weights_dtype(auto, cpu) == weights_dtype(auto, None) == torch.float32
    assert weights_dtype(OmegaConf.create({}), cuda) == torch.float32  # encoder configs: no key, fp32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-cuda on a GPU machine)")
@pytest.mark.parametrize("method", ["triadapt", "adalora"])
def test_cuda_bf16_weights_train_and_resume_exactly(method, glue, tmp_path, monkeypatch):
    """weights_dtype=auto on CUDA: bf16 frozen weights, fp32 adapters, bf16 autocast; stop and resume."""
    overrides = [*glue_overrides("tiny_qwen2", method, glue), "model.weights_dtype=auto", "train.device=cuda",
                 "train.gradient_checkpointing=true"]  # fmt: skip
    ref = run(overrides, tmp_path / "ref")
    assert ref["status"] == "completed" and ref["budget"]["total_rank"] == RANK * LAYERS * 7
    monkeypatch.setenv(STOP_AFTER_ENV, str(STOP_AT))
    with pytest.raises(SystemExit):
        run(overrides, tmp_path / "run")
    monkeypatch.delenv(STOP_AFTER_ENV)
    resumed = run(overrides, tmp_path / "run")
    assert resumed["metrics"] == ref["metrics"] and resumed["budget"] == ref["budget"]
    got, want = (
        load_file(tmp_path / "run" / "adapter.safetensors"),
        load_file(tmp_path / "ref" / "adapter.safetensors"),
    )
    assert all(v.dtype == torch.float32 for v in want.values())
    assert all(torch.equal(got[k], want[k]) for k in want)
