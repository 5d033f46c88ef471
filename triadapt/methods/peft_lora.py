"""LoRA through peft (reference backend): same knobs as ``method=lora``.

peft's ``LoraModel`` is applied in place, so the harness keeps calling the model itself.
"""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from triadapt.methods.lora import LoRA


class PeftLoRA(LoRA):
    name = "peft_lora"

    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=float(self.cfg.dropout),
            target_modules=list(self.ctx.target_modules),
            bias="none",
        )
        self.tuner = LoraModel(model, config, "default")
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        return [{"params": params, "weight_decay": self.ctx.weight_decay}]

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: m.r["default"] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
