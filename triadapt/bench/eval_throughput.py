"""Evaluation throughput on MRPC dev: dynamic padding with length-sorted batches versus max-length padding."""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from triadapt.bench.config import method_config, train_config
from triadapt.bench.machine import sync


def find_glue_dir(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("TRIADAPT_DATA_DIR")):
        if not candidate:
            continue
        d = Path(candidate).expanduser()
        for root in (d, d / "glue"):
            if (root / "MRPC" / "dev.tsv").is_file():
                return root
        if explicit:
            raise SystemExit(f"--data-dir {explicit}: no MRPC/dev.tsv under it (nor under glue/)")
    return None


def run_eval(args, model_cfg, base, tokenizer, device, log) -> list[dict]:
    """Examples/s of evaluation on MRPC dev, three batching modes, interleaved."""
    from triadapt.data.glue import make_collator, predict, read_glue_tsv, tokenize
    from triadapt.methods import RunContext, build_method

    root = find_glue_dir(args.data_dir)
    if root is None:
        log("eval: skipped (no MRPC data: pass --data-dir or set TRIADAPT_DATA_DIR)")
        return []
    texts, labels = read_glue_tsv(root / "MRPC" / "dev.tsv", "mrpc")
    max_len = 128
    ds = tokenize(tokenizer, texts, labels, max_len, False)
    dynamic = make_collator(tokenizer)

    def padded(features):
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              padding="max_length", max_length=max_len, return_tensors="pt")
        return dict(batch)

    model = copy.deepcopy(base)
    build_method(method_config("lora", args.rank), RunContext(total_steps=10, target_modules=list(model_cfg.target_modules))).inject(model)
    model.to(device).eval()
    bs = int(train_config().eval_batch_size)
    lengths = [len(f["input_ids"]) for f in ds.features]

    @torch.no_grad()
    def unsorted(collate):
        tokens = 0
        for s in range(0, len(ds), bs):
            batch = collate([ds.features[i] for i in range(s, min(s + bs, len(ds)))])
            batch.pop("labels", None)
            tokens += batch["input_ids"].numel()
            model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1)
        return tokens

    order = sorted(range(len(ds)), key=lambda i: lengths[i])
    sorted_tokens = sum(max(lengths[i] for i in order[s:s + bs]) * len(order[s:s + bs]) for s in range(0, len(ds), bs))
    modes = {
        "dynamic_sorted": (lambda: (predict(model, ds, dynamic, device, bs, False, "bench"), sorted_tokens)[1]),
        "dynamic_unsorted": (lambda: unsorted(dynamic)),
        "max_length": (lambda: unsorted(padded)),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    tokens: dict[str, int] = {}
    modes["dynamic_sorted"]()  # warm-up
    for _ in range(max(1, args.eval_repeats)):
        for name, fn in modes.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    real = sum(lengths)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"mode": name, "examples": len(ds), "batch_size": bs, "median_s": med,
                     "examples_per_s": len(ds) / med, "padded_tokens": tokens[name], "real_tokens": real,
                     "padding_pct": 100 * (1 - real / tokens[name])})
    ref = next(r for r in rows if r["mode"] == "max_length")
    for r in rows:
        r["speedup_vs_max_length"] = r["examples_per_s"] / ref["examples_per_s"]
        log(f"eval {r['mode']}: {r['examples_per_s']:.1f} ex/s ({r['speedup_vs_max_length']:.2f}×), "
            f"padding {r['padding_pct']:.0f}%")
    return rows
