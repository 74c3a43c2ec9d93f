"""The routed experts: ``E`` feed-forward networks in stacked weights (HF Mixtral layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from multimoe.config import DispatchKind, ExpertActivation
from multimoe.moe.dispatch import run_experts
from multimoe.moe.kernels import activate
from multimoe.moe.router import Routing


class Experts(nn.Module):
    """``E`` experts. ``swiglu`` (Mixtral): ``gate_up_proj (E, 2*d_ff, d)`` (gate rows first, then up) and
    ``down_proj (E, d, d_ff)``, the layout of HF's ``MixtralExperts``. ``relu`` / ``gelu`` (Switch, T5):
    ``up_proj (E, d_ff, d)`` and ``down_proj``, one plain two-layer MLP per expert."""

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: ExpertActivation = "swiglu"
    ) -> None:
        super().__init__()
        self.activation = activation
        self.w_in_name = "gate_up_proj" if activation == "swiglu" else "up_proj"
        width = 2 * d_ff if activation == "swiglu" else d_ff
        w_in = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.register_parameter(self.w_in_name, w_in)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        nn.init.normal_(w_in, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(d_ff))

    def forward(self, x: torch.Tensor, routing: Routing, dispatch: DispatchKind = "auto") -> torch.Tensor:
        """Tokens ``x (T, d)`` through the experts ``routing`` chose, gated and summed per token: ``(T, d)``.
        The weights are read here, so a wrapper that adapts them for a forward pass (PEFT's LoRA on
        parameters) reaches every dispatch path."""
        return run_experts(x, routing, self, dispatch)

    @property
    def num_experts(self) -> int:
        return self.down_proj.shape[0]

    @property
    def w_in(self) -> torch.Tensor:
        """The first projection: ``gate_up_proj`` or ``up_proj``."""
        return getattr(self, self.w_in_name)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x (n, d)`` -> ``(n, d)``; the formula the fast paths must equal."""
        return F.linear(activate(F.linear(x, self.w_in[e]), self.activation), self.down_proj[e])
