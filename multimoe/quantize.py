"""int8 weights for CPU inference: the trunk's, the encoders' and the heads' linear layers through torchao
(``Int8WeightOnlyConfig``: per-row int8 weights, activations in float) and the routed experts' stacked weights
per expert and output row (``Int8Experts``). The routers stay in float: they choose the experts, and they
are ``E x d``. Convolutions and the weights inside ``nn.MultiheadAttention`` stay in float too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import multimoe.lora as lora
from multimoe.moe.experts import Experts

if TYPE_CHECKING:
    from multimoe.model import MultiMoE


class Int8Experts(Experts):
    """``Experts`` whose stacked weights are int8 with one float scale per expert and output row (symmetric,
    absmax / 127); ``w_in`` and ``down_proj`` give them back in float for each forward."""

    w_in_int8: torch.Tensor  # (E, width, d)
    w_in_scale: torch.Tensor  # (E, width, 1)
    down_proj_int8: torch.Tensor  # (E, d, d_ff)
    down_proj_scale: torch.Tensor  # (E, d, 1)

    def __init__(self, experts: Experts) -> None:
        nn.Module.__init__(self)
        self.activation, self.w_in_name = experts.activation, experts.w_in_name
        for name, weight in (("w_in", experts.w_in), ("down_proj", experts.down_proj)):
            weight = weight.detach().float()
            scale = weight.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127  # (E, out, 1)
            self.register_buffer(f"{name}_int8", torch.round(weight / scale).to(torch.int8))
            self.register_buffer(f"{name}_scale", scale)

    @property
    def w_in(self) -> torch.Tensor:
        return self.w_in_int8.float() * self.w_in_scale

    @property
    def down_proj(self) -> torch.Tensor:  # type: ignore[override]
        return self.down_proj_int8.float() * self.down_proj_scale


def quantize_int8(model: MultiMoE) -> MultiMoE:
    """``model`` (in place, for inference) with int8 weights: see the module docstring. A model with LoRA
    adapters is merged first."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if model.config.lora.enabled:
        lora.merge(model)
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]

    def linear(module: nn.Module, name: str) -> bool:
        inside_attention = any(name.startswith(a + ".") for a in attention)
        return isinstance(module, nn.Linear) and ".router." not in name and not inside_attention

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=linear)
    for layer in model.moe_layers():
        layer.experts = Int8Experts(layer.experts)
    return model.eval()
