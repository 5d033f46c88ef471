"""Cache the hub models (weights, config, tokenizer) a run or a sweep will load.

For clusters whose nodes have no internet: run it where the hub is reachable with the same
``HF_HOME`` the nodes will use (a shared file system), with the overrides of the sweep::

    python scripts/prefetch_models.py experiment=paper_glue_r8
    python scripts/prefetch_models.py model=deberta_v3_base,bert_base_uncased

The overrides are composed as ``run.py`` composes them; the models are the run's ``model`` plus every
``model=`` value swept (on the command line or in the experiment's ``hydra.sweeper.params``).
Models shipped in a package (``minilm_l6``) or random ones (``tiny_*``) need nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PrefetchError(Exception):
    pass


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def models_of(overrides: Sequence[str]) -> list[str]:
    """Names of the model configs a run/sweep with ``overrides`` loads, in order of first mention."""
    swept: list[str] = []
    fixed = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "model" and "," in value:
            swept += [v.strip() for v in value.split(",") if v.strip()]
        else:
            fixed.append(o)
    try:
        cfg = _compose(fixed + ([f"model={swept[0]}"] if swept else []))
    except Exception as err:  # Hydra's errors name the bad override
        raise PrefetchError(
            f"cannot compose {' '.join(overrides) or 'the default config'}: {str(err).splitlines()[0]}"
        ) from None
    params = cfg.hydra.get("sweeper", {}).get("params") or {}
    for key, value in params.items():
        if key == "model":
            swept += [v.strip() for v in str(value).split(",")]
    names = [cfg.model.name, *swept]
    return list(dict.fromkeys(names))


def model_config(name: str):
    from omegaconf import OmegaConf

    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise PrefetchError(f"unknown model {name!r}; choose from {choices}")
    return OmegaConf.load(path)


def fetch_from_hub(repo_id: str) -> None:
    """Download what the harness will load: tokenizer, config and weights (into the HF cache)."""
    from transformers import AutoModel, AutoTokenizer

    AutoTokenizer.from_pretrained(repo_id)
    AutoModel.from_pretrained(repo_id)


def prefetch(overrides: Sequence[str], fetch: Callable[[str], None] = fetch_from_hub, log=print) -> list[str]:
    """Fetch every hub model the run/sweep needs; returns the repo ids fetched."""
    fetched = []
    for name in models_of(overrides):
        cfg = model_config(name)
        if cfg.source != "hub":
            log(f"{name}: nothing to fetch ({cfg.source} model)")
            continue
        try:
            fetch(cfg.pretrained)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PrefetchError(
                f"cannot fetch {cfg.pretrained} ({type(err).__name__}: {reason}); run this script on a machine "
                "with internet access (and HF_HUB_OFFLINE unset), with the HF_HOME the cluster nodes use"
            ) from None
        log(f"{name}: {cfg.pretrained} cached")
        fetched.append(cfg.pretrained)
    return fetched


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return []
    try:
        return prefetch(args)
    except PrefetchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
