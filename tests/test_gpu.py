"""The CUDA path (skipped without a GPU): bf16-mixed training through the grouped-GEMM dispatch (checked to
really run ``torch._grouped_mm``), FSDP through Lightning's strategy (Lightning 2.6 refuses FSDP on CPU), and
the compiled trunk and the MoE layer compiled whole (``fullgraph=True``; compiling takes 15-50 s, too long for
the CPU suite)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from multimoe.training.callbacks import NonFiniteGuard
from tests.test_moe import make_layer
from tests.test_training_numerics import tiny, trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.values.append(float(outputs["loss"]))


def fit_tiny(manifests: dict[str, Path], steps: int, **kwargs: Any) -> list[float]:
    module, data = tiny(manifests, **kwargs.pop("trunk", {}))
    losses = Losses()
    run = trainer(steps, NonFiniteGuard(), losses, accelerator="gpu", devices=1, **kwargs)
    run.fit(module, datamodule=data)
    assert len(losses.values) == steps and all(math.isfinite(v) for v in losses.values)
    return losses.values


def test_bf16_mixed_on_cuda_matches_fp32_closely(digit_manifests: dict[str, Path]) -> None:
    """dispatch 'auto' runs torch._grouped_mm in bf16 on CUDA; the first loss (same weights, same batch)
    agrees with fp32 to bf16 precision."""
    bf16 = fit_tiny(digit_manifests, 3, precision="bf16-mixed")
    fp32 = fit_tiny(digit_manifests, 3, precision="32-true")
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)


def test_experts_run_grouped_mm_in_bf16_and_match_the_reference() -> None:
    """Under bf16 autocast, dispatch 'auto' on CUDA runs both expert projections, forward and backward,
    through ``torch._grouped_mm`` (seen by the profiler), and agrees with the per-expert loop to bf16
    precision."""
    layer = make_layer(d=64).cuda()
    x = torch.randn(512, 64, device="cuda", requires_grad=True)
    modality = torch.randint(0, 3, (512,), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, modality)
        y.float().square().sum().backward()
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("aten::_grouped_mm", 0) >= 4, sorted(calls)  # 2 forward, at least 2 backward
    layer.dispatch = "reference"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference, _ = layer(x, modality)
    torch.testing.assert_close(y.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_fsdp_strategy_trains(digit_manifests: dict[str, Path]) -> None:
    fit_tiny(digit_manifests, 3, strategy="fsdp", precision="bf16-mixed")


@pytest.mark.slow
def test_compiled_trunk_trains_like_eager(digit_manifests: dict[str, Path]) -> None:
    eager = fit_tiny(digit_manifests, 3)
    compiled = fit_tiny(digit_manifests, 3, trunk={"compile": True})
    assert compiled == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize("capacity", [0.0, 0.8])
def test_layer_compiles_fullgraph_and_matches_eager(capacity: float) -> None:
    layer = make_layer(seed=2, capacity_factor=capacity, shared=True, dispatch="sorted").cuda().train()
    compiled = torch.compile(layer, fullgraph=True)
    x, ids = torch.randn(64, 16, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    results = []
    for module in (layer, compiled):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, stats = module(xi, ids)
        (y.square().sum() + stats.load_balance_loss + stats.z_loss).backward()
        results.append([y.detach(), xi.grad, stats.dropped_fraction] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
