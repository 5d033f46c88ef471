"""The same code on a CUDA device: adapter layers agree with the CPU, native LoRA with peft, every
method trains through run.py (bf16 autocast, the GPU default), and a killed run resumes exactly.

These need a GPU and are skipped without one (CI has none); `make test-cuda` runs them. The
CPU suite covers the same mathematics; what only this file checks is device placement (grown
components, optimizer state, checkpoints, generators) and the autocast path.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_mrpc
from test_lora import BERT_TARGETS, lora, tiny_bert
from test_resume import SCHEDULES, Job, checkpoints
from test_run_e2e import run_py
from triadapt.bench.config import method_config
from triadapt.methods import RunContext, build_method
from triadapt.methods.core import adapted_layers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-cuda on a GPU machine)"),
]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make CUDA and CPU disagree at 1e-3; the comparisons below are about our code, not TF32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B and cores, so that every factor gets a gradient and the delta is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def forward_backward(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().cpu(), grads


# batch × sequence: 4×16 = 64 rows take the folded node on a 32-wide model, 1×8 the factored one.
PATHS = {"folded": (4, 16), "factored": (1, 8)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["lora", "adalora", "increlora", "triadapt"])
def test_adapted_layers_on_cuda_match_cpu(name, path):
    batch, seq = PATHS[path]
    ctx = RunContext(total_steps=100, target_modules=BERT_TARGETS)
    cfg = method_config(name, 4)
    if name == "triadapt":
        cfg.init_rank = 3  # several components: the triangular core is more than a scalar
    cpu_model = tiny_bert()
    build_method(cfg, ctx).inject(cpu_model)
    randomise_adapters(cpu_model)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(2))
    labels = torch.arange(batch) % 2
    want = forward_backward(cpu_model, ids, labels)
    got = forward_backward(gpu_model, ids.cuda(), labels.cuda())
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    assert got[1].keys() == want[1].keys() and any("lora_A" in k for k in want[1])
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_native_lora_equals_peft_lora_on_cuda():
    native_model, peft_model = tiny_bert(), tiny_bert()
    lora().inject(native_model)
    lora(name="peft_lora").inject(peft_model)
    randomise_adapters(native_model)
    peft_modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in adapted_layers(native_model):
            peft_modules[name].lora_A["default"].weight.copy_(layer.lora_A[0])
            peft_modules[name].lora_B["default"].weight.copy_(layer.lora_B[0])
    native_model.cuda()
    peft_model.cuda()
    ids = torch.randint(0, 100, (4, 16), device="cuda")
    labels = torch.tensor([0, 1, 1, 0], device="cuda")
    logits_n, grads_n = forward_backward(native_model, ids, labels)
    logits_p, grads_p = forward_backward(peft_model, ids, labels)
    torch.testing.assert_close(logits_n, logits_p, atol=1e-5, rtol=1e-5)
    for name, layer in adapted_layers(native_model):
        twin = peft_modules[name]
        torch.testing.assert_close(layer.lora_A[0].grad, twin.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B[0].grad, twin.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


# Growth every 3 steps until ~step 33 (the resume test's schedules); AdaLoRA budgets steps 4-32.
E2E = {**SCHEDULES, "full": [], "peft_lora": [], "peft_adalora": []}


def train_tiny(method: str, device: str, root) -> tuple[dict, object]:
    data_dir = write_tiny_mrpc(root / "glue")
    run_dir = root / "run"
    run_py("model=tiny_bert", f"method={method}", "budget=r2", "task=glue/mrpc", f"data.dir={data_dir}",
           f"train.device={device}", "train.precision=auto", "train.max_steps=40", "train.batch_size=8",
           "train.lr=5e-3", "train.eval_every=20", *E2E[method], f"hydra.run.dir={run_dir}")  # fmt: skip
    return json.loads((run_dir / "result.json").read_text()), run_dir


@pytest.mark.parametrize("method", list(E2E))
def test_every_method_trains_on_cuda_with_bf16_autocast(method, tmp_path):
    result, run_dir = train_tiny(method, "cuda", tmp_path)
    assert result["status"] == "completed" and result["error"] is None
    assert all(math.isfinite(v) for v in result["metrics"]["final"].values())
    assert result["timing"]["steps"] == 40
    assert result["timing"]["peak_mem_mb"] > 0  # torch.cuda.max_memory_allocated, not the host's RSS
    budget = result["budget"]
    if method != "full":
        n_modules = len(budget["ranks"])
        assert n_modules == 12
        # Every adaptive method ends at the budget's total rank (2 per matrix on average), as on the CPU.
        assert sum(budget["ranks"].values()) == 2 * n_modules, budget["ranks"]
        adapter = load_file(run_dir / "adapter.safetensors")
        assert sum(t.numel() for t in adapter.values()) >= budget["adapter_params"] > 0


def test_killed_cuda_run_resumes_exactly(tmp_path):
    """SIGKILL while TriAdaptLoRA is still growing, resume, compare with an uninterrupted run:
    growth on the device, optimizer state of grown groups, RNG of both devices, all restored.
    GPU steps of a tiny model take milliseconds, so the victim is killed as soon as the
    checkpoint of step 30 appears (of 120 steps)."""
    data_dir = write_tiny_mrpc(tmp_path / "glue")

    def job(name: str) -> Job:
        j = Job("triadapt", data_dir, tmp_path / name)
        j.cmd = [
            sys.executable, "run.py", "logger=none", "hparams=none", "model=tiny_bert",
            "method=triadapt", "task=glue/mrpc", f"data.dir={data_dir}", "train.device=cuda",
            "train.precision=auto", "train.max_steps=120", "train.batch_size=8", "train.lr=5e-3",
            "method.dropout=0.1", "method.incre_interval=6", "method.incre_rank_num=1", "train.checkpoint_every=5",
            "train.keep_checkpoints=2", f"hydra.run.dir={j.run_dir}",
        ]  # fmt: skip
        return j

    victim = job("killed").start("killed")
    reference = job("uninterrupted")
    try:
        while not any(step >= 30 for step in checkpoints(victim.run_dir)):
            if victim.proc.poll() is not None:
                pytest.fail(f"run ended (rc={victim.proc.returncode}) before step 30:\n{victim.log.read_text()[-2000:]}")
            time.sleep(0.002)
        victim.proc.kill()
        victim.proc.wait()
        at_kill = sorted(checkpoints(victim.run_dir))
        assert json.loads((victim.run_dir / "result.json").read_text())["status"] == "running"
        victim.start("resumed").wait_ok()
        reference.start("ref").wait_ok()
    finally:
        for j in (victim, reference):
            if j.proc is not None and j.proc.poll() is None:
                j.proc.kill()
    assert f"resumed from {victim.run_dir / 'checkpoints'}" in victim.log.read_text()
    history = json.loads((reference.run_dir / "rank_history.json").read_text())
    assert history[-1]["step"] > max(at_kill), "growth should still be going on at the kill"
    assert json.loads((victim.run_dir / "rank_history.json").read_text()) == history
    ref_result, result = (json.loads((d / "result.json").read_text()) for d in (reference.run_dir, victim.run_dir))
    assert result["status"] == "completed"
    assert result["metrics"] == ref_result["metrics"]
    assert result["budget"] == ref_result["budget"]
    got, want = load_file(victim.run_dir / "adapter.safetensors"), load_file(reference.run_dir / "adapter.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after resume on CUDA"
