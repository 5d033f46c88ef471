"""Full fine-tuning: every weight trains; no adapter, so the adapter budget is 0."""

from __future__ import annotations

from torch import nn

from triadapt.methods.base import Method


class FullFineTuning(Method):
    name = "full"
    freezes_backbone = False

    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(True)
        return [{"params": list(model.parameters()), "weight_decay": self.ctx.weight_decay}]

    def adapter_state(self, model: nn.Module) -> dict:
        return {name: p.detach() for name, p in model.named_parameters()}

    def adapter_params(self, model: nn.Module) -> int:
        return 0

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {}
