"""Proof of correctness against the systems users know. HF transformers' ``MixtralSparseMoeBlock`` and
``SwitchTransformersSparseMLP`` (tiny configs, random weights, fp32) are copied into our layer configured the
same way: same outputs, same gradients, same auxiliary losses. And a uniform router over all experts gives
the dense mixture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, SwitchTransformersConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_balance_loss
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
    router_z_loss_func,
)
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func as switch_balance_loss,
)

from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer, modality_expert_mask
from multimoe.moe.losses import load_balancing_loss
from multimoe.moe.router import Router

D, FF, E = 16, 24, 4


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement to 1e-5 of the largest value: summation order may differ, nothing else."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))


DISPATCHES = ["reference", "sorted", "grouped_mm"]


def all_experts(num_experts: int) -> torch.Tensor:
    """One modality that may use every expert: plain, unmasked routing."""
    return modality_expert_mask([0], 1, 0, num_experts)


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)


def mixtral_pair(backend: str, top_k: int, dispatch: str) -> tuple[MixtralSparseMoeBlock, MoELayer]:
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=D,
        intermediate_size=FF,
        num_local_experts=E,
        num_experts_per_tok=top_k,
        experts_implementation=backend,
    )
    hf = MixtralSparseMoeBlock(config).eval()
    randomize(hf)
    ours = MoELayer(Router(D, all_experts(E), top_k, "mixtral"), Experts(E, D, FF), dispatch=dispatch).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        ours.router.proj.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    return hf, ours


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixtral_block_same_outputs_gradients_and_balance_loss(
    backend: str, dispatch: str, top_k: int
) -> None:
    hf, ours = mixtral_pair(backend, top_k, dispatch)
    x = torch.randn(2, 13, D)
    grad = torch.randn(2, 13, D)
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf = hf(x_hf)
    y_ours, stats = ours(x_ours.view(-1, D), torch.zeros(26, dtype=torch.long))
    close(y_ours.view_as(y_hf), y_hf)
    y_hf.backward(grad)
    y_ours.backward(grad.view(-1, D))
    close(x_ours.grad, x_hf.grad)
    # Top-1 Mixtral gates are p / p = 1: the router gradient is rounding noise, hence an absolute bound.
    torch.testing.assert_close(ours.router.proj.weight.grad, hf.gate.weight.grad, atol=1e-5, rtol=1e-5)
    close(ours.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad)
    close(ours.experts.down_proj.grad, hf.experts.down_proj.grad)
    router_logits = hf.gate(x)[0]
    expected = mixtral_balance_loss((router_logits,), E, top_k)
    close(stats.load_balance_loss, expected)


def test_mixtral_balance_loss_over_real_tokens_only_matches_hf_with_attention_mask() -> None:
    hf, ours = mixtral_pair("eager", 2, "sorted")
    x = torch.randn(3, 11, D)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:], mask[2, 2:] = False, False  # right padding, as our trunk never shows the router
    expected = mixtral_balance_loss((hf.gate(x)[0],), E, 2, attention_mask=mask.long())
    _, stats = ours(x[mask], torch.zeros(int(mask.sum()), dtype=torch.long))
    close(stats.load_balance_loss, expected)


def switch_pair(
    expert_capacity: int, capacity_factor: float, dispatch: str = "sorted", jitter: float = 0.0
) -> tuple[SwitchTransformersSparseMLP, MoELayer]:
    torch.manual_seed(0)
    config = SwitchTransformersConfig(
        d_model=D,
        d_ff=FF,
        num_experts=E,
        expert_capacity=expert_capacity,
        router_jitter_noise=jitter,
        router_bias=False,
        dense_act_fn="relu",
        dropout_rate=0.0,
    )
    hf = SwitchTransformersSparseMLP(config).eval()
    randomize(hf)
    router = Router(D, all_experts(E), 1, "switch", jitter=jitter)
    experts = Experts(E, D, FF, "relu")
    ours = MoELayer(router, experts, dispatch=dispatch, eval_capacity_factor=capacity_factor).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        router.proj.weight.copy_(hf.router.classifier.weight)
        for e in range(E):
            experts.up_proj[e].copy_(hf.experts[f"expert_{e}"].wi.weight)
            experts.down_proj[e].copy_(hf.experts[f"expert_{e}"].wo.weight)
    return hf, ours


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_switch_mlp_dropless_same_outputs_gradients_and_losses(dispatch: str) -> None:
    hf, ours = switch_pair(expert_capacity=64, capacity_factor=0.0, dispatch=dispatch)
    x = torch.randn(3, 10, D)
    grad = torch.randn(3, 10, D)
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf = hf(x_hf)
    y_ours, stats = ours(x_ours.view(-1, D), torch.zeros(30, dtype=torch.long))
    close(y_ours.view_as(y_hf), y_hf)
    y_hf.backward(grad)
    y_ours.backward(grad.view(-1, D))
    close(x_ours.grad, x_hf.grad)
    close(ours.router.proj.weight.grad, hf.router.classifier.weight.grad)
    for e in range(E):
        close(ours.experts.up_proj.grad[e], hf.experts[f"expert_{e}"].wi.weight.grad)

    logits = hf.router(x)[2]  # (B, S, E)
    close(stats.z_loss, router_z_loss_func(logits))
    # HF balances each sequence; ours balances each modality group. One sequence is one group...
    one = switch_balance_loss(logits[:1].softmax(-1), logits[:1].argmax(-1))
    _, first = ours(x[0], torch.zeros(10, dtype=torch.long))
    close(first.load_balance_loss, one)
    # ... and with the sequences as groups, our loss function gives HF's batch value.
    probs = logits.softmax(-1).view(-1, E)
    sequence = torch.arange(3).repeat_interleave(10)
    ours_batch = load_balancing_loss(
        probs, logits.argmax(-1).view(-1, 1), sequence, torch.ones(3, E, dtype=torch.bool)
    )
    close(ours_batch, switch_balance_loss(logits.softmax(-1), logits.argmax(-1)))


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_switch_mlp_with_capacity_drops_the_same_tokens(dispatch: str) -> None:
    # 32 tokens over 4 experts: HF's expert_capacity 6 is our capacity factor 0.75 (6 = 0.75 * 32 / 4).
    hf, ours = switch_pair(expert_capacity=6, capacity_factor=0.75, dispatch=dispatch)
    x = torch.randn(1, 32, D)
    y_hf = hf(x)
    y_ours, stats = ours(x.view(-1, D), torch.zeros(32, dtype=torch.long))
    close(y_ours.view_as(y_hf), y_hf)
    hf_dropped = int((hf.router(x)[0].sum(-1) == 0).sum())
    assert hf_dropped > 0
    assert round(float(stats.dropped_fraction) * 32) == hf_dropped


def test_switch_router_jitter_draws_the_same_noise_as_hf() -> None:
    hf, ours = switch_pair(expert_capacity=64, capacity_factor=0.0, jitter=0.3)
    hf.train(), ours.train()
    x = torch.randn(2, 9, D)
    torch.manual_seed(7)
    _, _, hf_logits = hf.router(x.clone())  # HF multiplies its input in place
    torch.manual_seed(7)
    routing = ours.router(x.view(-1, D), torch.zeros(18, dtype=torch.long))
    close(routing.logits, hf_logits.view(-1, E))
    assert not torch.allclose(
        routing.logits, ours.router.eval()(x.view(-1, D), torch.zeros(18, dtype=torch.long)).logits
    )


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("kind", ["mixtral", "expert_choice"])
def test_uniform_router_over_all_allowed_experts_is_the_dense_mixture(kind: str, dispatch: str) -> None:
    torch.manual_seed(0)
    allowed = modality_expert_mask([0, 1], 2, 1, 2)  # text: {0, 2, 3}, image: {1, 2, 3}
    experts = Experts(4, D, FF)
    # Expert choice with capacity factor 1 and k = 3: every expert takes every token allowed to use it.
    layer = MoELayer(Router(D, allowed, 3, kind), experts, dispatch=dispatch, capacity_factor=1.0)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.router.proj.weight.zero_()
    x, ids = torch.randn(30, D), torch.randint(0, 2, (30,))
    y, _ = layer.train()(x, ids)
    # Every expert on every token, then the mean over the token's allowed experts.
    gate, up = torch.einsum("td,efd->tef", x, experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("tef,edf->ted", F.silu(gate) * up, experts.down_proj)  # (T, E, d)
    mix = allowed[ids].float()
    expected = (out * (mix / mix.sum(-1, keepdim=True))[..., None]).sum(1)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
