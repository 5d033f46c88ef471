"""LoRA on the shared core: exact formula, peft equivalence, exact budgets."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModel, BertConfig, BertForSequenceClassification, DebertaV2Config

from triadapt.errors import ConfigError
from triadapt.methods import RunContext, build_method
from triadapt.methods.core import AdaptedLinear, adapted_layers

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertForSequenceClassification(cfg).eval()


def lora(name="lora", r=4, alpha=8, dropout=0.0, targets=BERT_TARGETS):
    cfg = OmegaConf.create({"name": name, "r": r, "alpha": alpha, "dropout": dropout})
    return build_method(cfg, RunContext(total_steps=10, target_modules=targets))


def test_forward_is_w0x_plus_scaled_BAx():
    model = tiny_bert()
    lora(r=4, alpha=8).inject(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, AdaptedLinear)
    torch.nn.init.normal_(layer.lora_B[0])
    x = torch.randn(3, 5, 32)
    expected = x @ layer.base.weight.T + layer.base.bias + (8 / 4) * x @ layer.lora_A[0].T @ layer.lora_B[0].T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_zero_delta_at_init_and_only_adapters_train():
    base, model = tiny_bert(), tiny_bert()
    groups = lora().inject(model)
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # 2 layers × 6 matrices, never the pooler or classifier
    names = [n for n, _ in adapted_layers(model)]
    assert len(names) == 12 and not any("pooler" in n or "classifier" in n for n in names)


def test_native_lora_equals_peft_lora_outputs_and_gradients():
    native_model, peft_model = tiny_bert(), tiny_bert()
    native, reference = lora(), lora(name="peft_lora")
    native.inject(native_model)
    reference.inject(peft_model)
    torch.manual_seed(1)
    peft_modules = dict(peft_model.named_modules())
    for name, layer in adapted_layers(native_model):
        twin = peft_modules[name]
        a, b = torch.randn_like(layer.lora_A[0]), torch.randn_like(layer.lora_B[0]) * 0.1
        with torch.no_grad():
            layer.lora_A[0].copy_(a)
            layer.lora_B[0].copy_(b)
            twin.lora_A["default"].weight.copy_(a)
            twin.lora_B["default"].weight.copy_(b)
    ids = torch.randint(0, 100, (3, 9))
    labels = torch.tensor([0, 1, 1])
    out_n = native_model(input_ids=ids, labels=labels)
    out_p = peft_model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_n.logits, out_p.logits, atol=1e-6, rtol=1e-6)
    out_n.loss.backward()
    out_p.loss.backward()
    for name, layer in adapted_layers(native_model):
        twin = peft_modules[name]
        torch.testing.assert_close(layer.lora_A[0].grad, twin.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B[0].grad, twin.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)
    assert native.ranks(native_model) == reference.ranks(peft_model)
    assert native.adapter_params(native_model) == reference.adapter_params(peft_model)


def test_deberta_v3_base_budget_is_exact():
    """72 matrices of DeBERTaV3-base at r=2 cost 2 × 165,888 = 331,776 parameters (methods.md §1.3)."""
    cfg = DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    method = lora(r=2, targets=DEBERTA_TARGETS)
    method.inject(model)
    assert len(method.ranks(model)) == 72
    assert method.adapter_params(model) == 331_776


def test_rank_larger_than_module_is_rejected():
    with pytest.raises(ConfigError, match="exceeds"):
        lora(r=33).inject(tiny_bert())
    with pytest.raises(ConfigError, match="positive"):
        lora(r=0)


def test_dropout_only_on_adapter_path():
    model = tiny_bert()
    lora(dropout=0.5).inject(model)
    layer = copy.deepcopy(model.bert.encoder.layer[0].attention.self.query).train()
    x = torch.randn(4, 32)
    # B = 0 → the adapter path adds nothing, so dropout must not touch the base path either
    torch.testing.assert_close(layer(x), layer.base(x))
