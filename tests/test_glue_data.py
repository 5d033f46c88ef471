"""Local GLUE TSV loading: every task present in the shared folder, and bad files."""

import pytest
from omegaconf import OmegaConf

from triadapt.data.glue import build_glue_task, read_glue_tsv
from triadapt.errors import DataError

from conftest import compose

# (task, folder, split, rows, label counts) from ../shared/data/README.md
SHARED_SPLITS = [
    ("cola", "CoLA", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "CoLA", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "SST-2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "SST-2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "MRPC", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "MRPC", "dev", 408, {1: 279, 0: 129}),
    ("stsb", "STS-B", "train", 5749, None),
    ("stsb", "STS-B", "dev", 1500, None),
    ("qnli", "QNLI", "dev", 5463, {0: 2702, 1: 2761}),
    ("rte", "RTE", "train", 2490, {0: 1249, 1: 1241}),
    ("rte", "RTE", "dev", 277, {0: 146, 1: 131}),
    ("wnli", "WNLI", "train", 635, {1: 312, 0: 323}),
    ("wnli", "WNLI", "dev", 71, {1: 31, 0: 40}),
]


@pytest.mark.parametrize(("task", "folder", "split", "rows", "counts"), SHARED_SPLITS)
def test_shared_glue_files_parse_with_published_counts(glue_dir, task, folder, split, rows, counts):
    texts, labels = read_glue_tsv(glue_dir / folder / f"{split}.tsv", task)
    assert len(texts) == len(labels) == rows
    assert all(all(isinstance(t, str) and t for t in row) for row in texts)
    if counts is None:
        assert 0.0 <= min(labels) and max(labels) <= 5.0
    else:
        assert {k: labels.count(k) for k in counts} == counts


def test_mrpc_bom_header_and_two_sentences(glue_dir):
    texts, _ = read_glue_tsv(glue_dir / "MRPC" / "dev.tsv", "mrpc")
    assert texts[0][0].startswith("He said the foodservice pie business")
    assert len(texts[0]) == 2


def test_build_task_tokenizes_with_dynamic_padding(glue_dir):
    from triadapt.models import load_tokenizer

    cfg = compose(["task=glue/rte", "model=tiny_bert"])
    tok = load_tokenizer(cfg.model)
    data = OmegaConf.create({"dir": str(glue_dir), "source": "auto", "max_train_samples": 16, "max_eval_samples": 8})
    task = build_glue_task(cfg.task, data, tok)
    assert len(task.train) == 16 and task.info["eval_sizes"] == {"validation": 8}
    batch = task.collate([task.train[i] for i in range(4)])
    longest = max(len(task.train[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest)  # padded to the batch, not to max_seq_length
    assert batch["labels"].tolist() == [task.train[i]["labels"] for i in range(4)]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_column_names_file_and_expected(tmp_path):
    path = _write(tmp_path, "dev.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['sentence2'\]"):
        read_glue_tsv(path, "rte")


def test_label_outside_label_set(tmp_path):
    path = _write(tmp_path, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"dev.tsv:2 label 'maybe' is not one of"):
        read_glue_tsv(path, "rte")


def test_short_row(tmp_path):
    path = _write(tmp_path, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\n")
    with pytest.raises(DataError, match="has 2 columns"):
        read_glue_tsv(path, "rte")


def test_missing_task_folder_and_data_dir(tmp_path):
    from triadapt.models import load_tokenizer

    cfg = compose(["task=glue/cola", "model=tiny_bert"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(DataError, match="task folder .*CoLA not found"):
        build_glue_task(cfg.task, OmegaConf.create({"dir": str(tmp_path)}), tok)
    with pytest.raises(DataError, match="does not exist"):
        build_glue_task(cfg.task, OmegaConf.create({"dir": str(tmp_path / "nope")}), tok)


def test_empty_split_after_max_samples(tiny_glue_dir):
    from triadapt.models import load_tokenizer

    cfg = compose(["task=glue/mrpc", "model=tiny_bert"])
    data = OmegaConf.create({"dir": str(tiny_glue_dir), "max_train_samples": 0})
    with pytest.raises(DataError, match="train split is empty"):
        build_glue_task(cfg.task, data, load_tokenizer(cfg.model))
