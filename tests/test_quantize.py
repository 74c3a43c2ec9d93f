"""int8 weights for CPU inference: the experts' int8 weights are the float ones rounded per expert and output
row, and the quantized model computes nearly what the float one does."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from multimoe.config import LoraConfig
from multimoe.model import build_model
from multimoe.moe.experts import Experts
from multimoe.quantize import Int8Experts, quantize_int8
from multimoe.surgery import transfer
from tests.test_finetune import batch_of, tiny_config, trained_like


def test_int8_experts_round_each_expert_row_and_run_as_their_float_weights(
    digit_manifests: dict[str, Path],
) -> None:
    dm, _ = batch_of(digit_manifests, tiny_config())
    model = trained_like(tiny_config(), dm)
    layer = model.moe_layers()[0]
    experts = layer.experts
    assert isinstance(experts, Experts)
    int8 = Int8Experts(experts)
    for weight, q, scale in [
        (experts.w_in, int8.w_in_int8, int8.w_in_scale),
        (experts.down_proj, int8.down_proj_int8, int8.down_proj_scale),
    ]:
        assert q.dtype == torch.int8 and scale.shape == (*weight.shape[:2], 1)
        torch.testing.assert_close(scale, weight.abs().amax(dim=-1, keepdim=True) / 127)
        error = (q.float() * scale - weight).abs()
        assert bool((error <= scale / 2 + 1e-7).all())  # rounded to the nearest step
        assert int(q.abs().max()) == 127  # each row's largest weight is +-127
    torch.manual_seed(0)
    x = torch.randn(24, experts.w_in.shape[-1])
    routing = layer.router.eval()(x, torch.randint(0, 3, (24,)), 0.0)
    float_copy = copy.deepcopy(experts)
    with torch.no_grad():
        float_copy.w_in.copy_(int8.w_in)
        float_copy.down_proj.copy_(int8.down_proj)
        torch.testing.assert_close(int8(x, routing), float_copy(x, routing), rtol=0, atol=0)


def test_an_int8_model_computes_nearly_what_the_float_one_does(digit_manifests: dict[str, Path]) -> None:
    """Including a model with LoRA adapters, which is merged first."""
    dm, batch = batch_of(digit_manifests, tiny_config())
    base = trained_like(tiny_config(), dm)
    config = dataclasses.replace(base.config, lora=LoraConfig(r=2, targets=["attention", "experts"]))
    adapted = build_model(config, base.labels, base.vocab)
    transfer(base, adapted)
    for model in (base.eval(), adapted.eval()):
        with torch.no_grad():
            want = model(batch.inputs)  # type: ignore[attr-defined]
            quantized = quantize_int8(copy.deepcopy(model))
            got = quantized(batch.inputs)  # type: ignore[attr-defined]
        assert quantized.config.lora.r == 0
        assert all(isinstance(layer.experts, Int8Experts) for layer in quantized.moe_layers())
        linears = [m for n, m in quantized.trunk.named_modules() if isinstance(m, nn.Linear)]
        quantized_weights = [m for m in linears if type(m.weight).__name__ == "Int8Tensor"]
        routers = [layer.router.proj.weight for layer in quantized.moe_layers()]
        assert len(quantized_weights) == len(linears) - len(routers)
        assert all(type(w) is torch.nn.Parameter and w.dtype == torch.float32 for w in routers)
        scale = want.class_logits.abs().max()
        assert 0 < float((got.class_logits - want.class_logits).abs().max()) < 0.05 * float(scale)
        torch.testing.assert_close(got.trunk.tokens, want.trunk.tokens, rtol=0.05, atol=0.05)
