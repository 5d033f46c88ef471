"""Download GLUE and SQuAD 2.0 from the hub into the local folder layout the harness reads.

For clusters whose nodes have no internet: run this where the hub is reachable, copy OUT over,
and point the runs at it (``data.dir=OUT/glue`` for GLUE, ``data.dir=OUT`` for SQuAD, or
``TRIADAPT_DATA_DIR``)::

    python scripts/prepare_data.py OUT                      # every GLUE task of conf/task/glue and SQuAD 2.0
    python scripts/prepare_data.py OUT --tasks mrpc,rte,squad_v2

Writes ``OUT/glue/<MRPC|CoLA|…>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv``, ``dev_mismatched.tsv``)
with the columns the harness reads (``triadapt.data.glue.LOCAL_FORMATS``; CoLA without header, as
the original), and ``OUT/squad_v2/{train,dev}-v2.0.json`` in the official format. Every file is read
back with the harness's own readers before the script reports it. Existing files are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
GLUE_CONF = REPO / "conf" / "task" / "glue"
SQUAD_CONF = REPO / "conf" / "task" / "squad_v2.yaml"
SQUAD_FILES = {"train": "train-v2.0.json", "validation": "dev-v2.0.json"}


class PrepareError(Exception):
    pass


def glue_tasks() -> list[str]:
    return sorted(p.stem for p in GLUE_CONF.glob("*.yaml"))


def _clean(text: str) -> str:
    # The reader splits on tabs and lines, with no quoting: neither may appear inside a field.
    return " ".join(str(text).split())


def glue_rows(task: str, rows, text_keys: Sequence[str]) -> list[list[str]]:
    """Hub rows → TSV rows (header first unless the format has none) in the harness's local format."""
    from triadapt.data.glue import LOCAL_FORMATS

    fmt = LOCAL_FORMATS[task]
    raw_label = None if fmt.labels is None else {i: raw for raw, i in fmt.labels.items()}
    width = max(c for c in (*fmt.text_columns, fmt.label_column) if isinstance(c, int)) + 1 if not fmt.header else 0
    out = [] if not fmt.header else [[*fmt.text_columns, fmt.label_column]]
    for row in rows:
        label = row["label"]
        label = repr(float(label)) if raw_label is None else raw_label[int(label)]
        texts = [_clean(row[key]) for key in text_keys]
        if fmt.header:
            out.append([*texts, label])
        else:  # CoLA: source, label, original label, sentence
            line = [""] * width
            line[fmt.label_column] = label
            for column, text in zip(fmt.text_columns, texts):
                line[column] = text
            out.append(line)
    return out


def squad_official(rows) -> dict:
    """Hub rows → the official SQuAD 2.0 json (consecutive rows of one title/context grouped, order kept)."""
    articles: list[dict] = []
    for row in rows:
        if not articles or articles[-1]["title"] != row["title"]:
            articles.append({"title": row["title"], "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        answers = [{"text": t, "answer_start": int(s)}
                   for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]  # fmt: skip
        paragraphs[-1]["qas"].append(
            {"id": row["id"], "question": row["question"], "answers": answers, "is_impossible": not answers}
        )
    return {"version": "v2.0", "data": articles}


def _download(load_dataset: Callable, path: str, name: str | None):
    try:
        return load_dataset(path, name) if name else load_dataset(path)
    except Exception as err:  # offline, unknown repo, bad cache: one line for all of them
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PrepareError(
            f"cannot download {path}{'/' + name if name else ''} from the hub ({type(err).__name__}: {reason}); "
            "run this script on a machine with internet access and copy the folder over"
        ) from None


def _write(path: Path, text: str, written: list[str]) -> None:
    from triadapt.tracking import atomic_write_text

    atomic_write_text(path, text)
    written.append(str(path))


def prepare_glue(out: Path, task: str, load_dataset: Callable, log=print) -> list[str]:
    from triadapt.data.glue import read_glue_tsv

    cfg = OmegaConf.load(GLUE_CONF / f"{task}.yaml")
    folder = out / "glue" / cfg.local_dir
    stems = {cfg.splits.train: cfg.splits.train, **cfg.splits.eval}  # hub split → file stem
    targets = {split: folder / f"{stem}.tsv" for split, stem in stems.items()}
    if all(p.is_file() for p in targets.values()):
        log(f"{folder} already holds {', '.join(p.name for p in targets.values())}; kept (delete to download again)")
        return []
    dataset = _download(load_dataset, cfg.hub.path, cfg.hub.name)
    written: list[str] = []
    for split, path in targets.items():
        if path.is_file():
            continue
        rows = glue_rows(task, dataset[split], list(cfg.text_keys))
        _write(path, "".join("\t".join(r) + "\n" for r in rows), written)
        _, labels = read_glue_tsv(path, task)  # the harness reads back what was written
        if len(labels) != len(dataset[split]):
            raise PrepareError(f"{path} reads back {len(labels)} examples, the hub split has {len(dataset[split])}")
        log(f"{path}: {len(labels)} examples")
    return written


def prepare_squad(out: Path, load_dataset: Callable, log=print) -> list[str]:
    from triadapt.data.squad import load_official_json

    cfg = OmegaConf.load(SQUAD_CONF)
    folder = out / cfg.local_dir
    if all((folder / name).is_file() for name in SQUAD_FILES.values()):
        log(f"{folder} already holds {', '.join(SQUAD_FILES.values())}; kept (delete to download again)")
        return []
    dataset = _download(load_dataset, cfg.hub.path, cfg.hub.get("name"))
    written: list[str] = []
    for split, name in SQUAD_FILES.items():
        path = folder / name
        if path.is_file():
            continue
        _write(path, json.dumps(squad_official(dataset[split]), ensure_ascii=False) + "\n", written)
        n = len(load_official_json(path))
        if n != len(dataset[split]):
            raise PrepareError(f"{path} reads back {n} questions, the hub split has {len(dataset[split])}")
        log(f"{path}: {n} questions")
    return written


def prepare(out: str | Path, tasks: Sequence[str], load_dataset: Callable | None = None, log=print) -> list[str]:
    """Write the local layout for ``tasks`` (GLUE short names and/or ``squad_v2``); returns the files written."""
    if load_dataset is None:
        import datasets

        load_dataset = datasets.load_dataset
    known = [*glue_tasks(), "squad_v2"]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise PrepareError(f"unknown task(s) {unknown}; choose from {', '.join(known)}")
    out = Path(out)
    written: list[str] = []
    for task in tasks:
        written += (
            prepare_squad(out, load_dataset, log) if task == "squad_v2" else prepare_glue(out, task, load_dataset, log)
        )
    return written


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (it gets glue/ and squad_v2/)")
    parser.add_argument(
        "--tasks", default="all", help="comma-separated: GLUE short names and/or squad_v2 (default: all)"
    )
    args = parser.parse_args(argv)
    tasks = (
        [*glue_tasks(), "squad_v2"] if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    )
    try:
        written = prepare(args.out, tasks)
    except PrepareError as err:
        sys.exit(f"error: {err}")
    print(
        f"wrote {len(written)} file(s) under {args.out}; use data.dir={Path(args.out) / 'glue'} "
        f"(GLUE) or data.dir={args.out} (SQuAD)"
    )
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the harness's readers, also from a fresh clone
    main()
