"""Shared fixtures: the real data folder (../shared/data in CI), config composition, tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: tests start many small runs side by side, and oversubscribed
# threads make a tiny-model step ~15× slower on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _shared_data() -> Path | None:
    for candidate in (os.environ.get("TRIADAPT_TEST_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "glue").is_dir():
            return Path(candidate).resolve()
    return None


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED_DATA is None:
        pytest.skip("real data folder (../shared/data) not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glue_dir(shared_data) -> Path:
    return shared_data / "glue"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


WORDS = ["the cat sat", "a dog ran", "stocks fell sharply", "he said so", "rain is coming", "it was late"]


def write_tiny_mrpc(root: Path) -> Path:
    """A hand-made MRPC folder (64 pairs, train = dev) in the GLUE TSV layout under ``root``."""
    (root / "MRPC").mkdir(parents=True)
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = [f"{i % 2}\t{i}\t{i + 100}\t{WORDS[i % 6]} today\t{WORDS[(i * 5) % 6]} now\n" for i in range(64)]
    for split in ("train", "dev"):
        (root / "MRPC" / f"{split}.tsv").write_text(header + "".join(rows), encoding="utf-8")
    return root


@pytest.fixture
def tiny_glue_dir(tmp_path) -> Path:
    """A small MRPC/STS-B/CoLA folder in the GLUE TSV layout, made by hand (no real data needed)."""
    root = write_tiny_mrpc(tmp_path / "glue")
    words = WORDS
    (root / "STS-B").mkdir()
    sts_header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    sts = [f"{i}\tg\tf\ty\t{i}\ts\ts\t{words[i % 6]}\t{words[(i + 1) % 6]}\t{(i % 6) * 1.0:.3f}\n" for i in range(48)]
    for split in ("train", "dev"):
        (root / "STS-B" / f"{split}.tsv").write_text(sts_header + "".join(sts), encoding="utf-8")
    return root


def save_tiny_checkpoint(model_name: str, folder: Path) -> Path:
    """A checkpoint as the hub serves one, written with ``save_pretrained``: the backbone of the
    tiny random ``model=<model_name>`` (no task head) and its tokenizer (MiniLM's)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModel

    from triadapt.models import load_tokenizer

    model_cfg = compose([f"model={model_name}"]).model
    tokenizer = load_tokenizer(model_cfg)
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    model_type = arch.pop("model_type")
    vocab = len(tokenizer)
    while True:  # read back as the hub path reads it: beside a Qwen2 config the tokenizer gains a token
        AutoModel.from_config(AutoConfig.for_model(model_type, vocab_size=vocab, **arch)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded = len(load_tokenizer(OmegaConf.create({"source": "hub", "pretrained": str(folder)})))
        if loaded <= vocab:
            return folder
        vocab = loaded


def hub_cache_with(checkpoints: dict[str, Path], cache: Path) -> Path:
    """An HF hub cache (the layout ``HF_HUB_CACHE`` points at) holding ``checkpoints`` under
    their hub ids, so ``from_pretrained("<hub id>")`` offline loads them through the hub code."""
    import shutil

    revision = "0" * 40
    for hub_id, folder in checkpoints.items():
        repo = cache / f"models--{hub_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copytree(folder, repo / "snapshots" / revision, dirs_exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny BERT, DeBERTa-v2, LLaMA and Qwen2 checkpoints: {architecture: folder}."""
    root = tmp_path_factory.mktemp("checkpoints")
    archs = (("bert", "tiny_bert"), ("deberta-v2", "tiny_deberta"), ("llama", "tiny_llama"), ("qwen2", "tiny_qwen2"))
    return {arch: save_tiny_checkpoint(name, root / arch) for arch, name in archs}
