"""The MoE layer: modality masking, the loss formulas, and fast dispatch against the reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from multimoe.modality import Modality
from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer, modality_expert_mask
from multimoe.moe.losses import load_balancing_loss, router_z_loss
from multimoe.moe.router import Router


def make_layer(
    seed: int = 0, d: int = 16, per_modality: int = 2, cross: int = 2, top_k: int = 2, kind: str = "mixtral"
):
    torch.manual_seed(seed)
    allowed = modality_expert_mask([0, 1, 2], len(Modality), per_modality, cross)
    return MoELayer(Router(d, allowed, top_k, kind), Experts(allowed.shape[1], d, 24))  # type: ignore[arg-type]


def test_expert_mask_layout() -> None:
    allowed = modality_expert_mask([0, 2], 3, experts_per_modality=2, cross_modal_experts=1)
    expected = torch.tensor(
        [[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )  # text: 0-1, audio: 2-3, cross: 4; image has no encoder, so no row
    assert torch.equal(allowed, expected)


def test_routing_never_leaves_own_modality_or_cross_experts() -> None:
    layer = make_layer(per_modality=3, cross=1, top_k=3)
    # Make the other modalities' experts overwhelmingly attractive: masking must still win.
    with torch.no_grad():
        layer.router.proj.weight.normal_(std=10.0)
    x = torch.randn(300, 16)
    modality_ids = torch.arange(300) % 3
    routing = layer.router(x, modality_ids)
    allowed = layer.router.allowed[modality_ids]  # (T, E)
    assert torch.gather(allowed, 1, routing.expert_idx).all()
    assert (routing.probs[~allowed] == 0).all()
    _, stats = layer(x, modality_ids)
    assert (stats.tokens_per_expert[~layer.router.allowed] == 0).all()
    assert stats.tokens_per_expert.sum() == 300 * 3


def test_mixtral_gates_renormalised_switch_gates_not() -> None:
    x, ids = torch.randn(50, 16), torch.zeros(50, dtype=torch.long)
    mixtral = make_layer(top_k=2).router(x, ids)
    torch.testing.assert_close(mixtral.weights.sum(-1), torch.ones(50))
    switch = make_layer(top_k=1, kind="switch").router(x, ids)
    torch.testing.assert_close(switch.weights[:, 0], switch.probs.max(-1).values)
    assert (switch.weights < 1).all()


def test_load_balancing_loss_matches_formula_on_hand_made_case() -> None:
    # Two groups over 3 experts. Group 0 may use experts {0, 1}; group 1 may use {1, 2}. Top-1.
    allowed = torch.tensor([[True, True, False], [False, True, True]])
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    expert_idx = torch.tensor([[0], [1], [0], [2]])
    group_ids = torch.tensor([0, 0, 0, 1])
    # group 0: f = (2/3, 1/3, 0), P = (2.0/3, 1.0/3, 0) -> 2 * (4/9 + 1/9) = 10/9
    # group 1: f = (0, 0, 1), P = (0, 0.2, 0.8) -> 2 * 0.8 = 1.6
    expected = (10 / 9 + 1.6) / 2
    loss = load_balancing_loss(probs, expert_idx, group_ids, allowed)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_load_balancing_loss_is_k_when_perfectly_balanced() -> None:
    allowed = torch.ones(1, 4, dtype=torch.bool)
    probs = torch.full((8, 4), 0.25)
    expert_idx = torch.tensor([[0, 1], [2, 3]] * 4)
    loss = load_balancing_loss(probs, expert_idx, torch.zeros(8, dtype=torch.long), allowed)
    torch.testing.assert_close(loss, torch.tensor(2.0))


def test_z_loss_ignores_masked_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, float("-inf")], [0.0, float("-inf"), 0.0]])
    expected = (math.log(math.e**1 + math.e**2) ** 2 + math.log(2.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sorted_dispatch_equals_reference_forward_and_backward(top_k: int) -> None:
    layer = make_layer(seed=1, top_k=top_k)
    x = torch.randn(97, 16)
    ids = torch.randint(0, 3, (97,))
    grads = []
    outputs = []
    for dispatch in ("reference", "sorted"):
        layer.dispatch = dispatch  # type: ignore[assignment]
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, stats = layer(xi, ids)
        (y.square().sum() + stats.load_balance_loss).backward()
        outputs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in layer.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_experts_with_no_tokens_are_fine() -> None:
    layer = make_layer()
    x = torch.randn(5, 16)
    ids = torch.zeros(5, dtype=torch.long)  # only text: image and audio experts get nothing
    y, stats = layer(x, ids)
    y.sum().backward()
    assert stats.tokens_per_expert[1:].sum() == 0
    assert torch.isfinite(y).all()


def test_router_runs_in_fp32_under_bf16_autocast() -> None:
    layer = make_layer()
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x.bfloat16(), torch.zeros(10, dtype=torch.long))
        y, _ = layer(x.bfloat16(), torch.zeros(10, dtype=torch.long))
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_top_k_larger_than_allowed_experts_is_refused() -> None:
    allowed = modality_expert_mask([0], 3, experts_per_modality=1, cross_modal_experts=0)
    with pytest.raises(ValueError, match="top_k=2"):
        Router(8, allowed, top_k=2)
