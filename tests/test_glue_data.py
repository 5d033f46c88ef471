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
    with pytest.raises(DataError, match="dev.tsv:2 has 2 tab-separated fields, the header has 4$"):
        read_glue_tsv(path, "rte")


MRPC = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tAmrozi accused his brother\tReferring to him\n"


@pytest.mark.parametrize(
    "text, message",
    [
        # A tab inside a quoted field: no quoting in GLUE files, so it is an extra field, refused
        # (it used to shift sentence 2 into the rest of sentence 1).
        (MRPC + '0\t3\t4\t"Amrozi\taccused"\tx\n', r"train.tsv:3 has 6 tab-separated fields, the header has 5 \(a tab"),
        (MRPC + "0\t3\t4\tonly four\n", r"train.tsv:3 has 4 tab-separated fields, the header has 5$"),
        (MRPC + "\n0\t3\t4\ta\tb\n", r"train.tsv:3 is blank; only blank lines at the end"),
        ("gj04\t1\t\tfine\ngj04\t1\t\ttoo\tmany\n", r"train.tsv:2 has 5 tab-separated fields, cola files have 4"),
    ],
    ids=["quoted-tab", "narrow-row", "inner-blank-line", "cola-wide-row"],
)
def test_malformed_rows_are_refused_with_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "train.tsv", text)
    with pytest.raises(DataError, match=message):
        read_glue_tsv(path, "cola" if text.startswith("gj04") else "mrpc")


def test_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(MRPC.encode() + b"0\t3\t4\tna\xefve\xff\tb\n")
    with pytest.raises(DataError, match=r"train.tsv:3 is not valid UTF-8 \(byte 0xef\)"):
        read_glue_tsv(path, "mrpc")


def test_trailing_blank_lines_and_crlf_are_tolerated(tmp_path):
    """The documented tolerance: blank lines at the end of a file (and CRLF line ends)."""
    path = _write(tmp_path, "train.tsv", MRPC.replace("\n", "\r\n") + "\n\n  \n")
    texts, labels = read_glue_tsv(path, "mrpc")
    assert texts == [("Amrozi accused his brother", "Referring to him")] and labels == [1]


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
