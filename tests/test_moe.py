"""The MoE layer: modality masking, routing schemes, capacity, balancing, statistics, and every fast dispatch
path against the reference loop (forward and backward)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from multimoe.config import ConfigError, MoEConfig
from multimoe.modality import Modality
from multimoe.moe import kernels
from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer, modality_expert_mask
from multimoe.moe.losses import load_balancing_loss, router_z_loss
from multimoe.moe.router import Router, expert_capacity, within_capacity
from multimoe.trunk import MLP


def make_layer(
    seed: int = 0,
    d: int = 16,
    per_modality: int = 2,
    cross: int = 2,
    top_k: int = 2,
    kind: str = "mixtral",
    activation: str = "swiglu",
    shared: bool = False,
    **layer: object,
) -> MoELayer:
    torch.manual_seed(seed)
    allowed = modality_expert_mask([0, 1, 2], len(Modality), per_modality, cross)
    router_args = {k: layer.pop(k) for k in ("jitter", "batch_priority", "bias_rate") if k in layer}
    return MoELayer(
        Router(d, allowed, top_k, kind, **router_args),  # type: ignore[arg-type]
        Experts(allowed.shape[1], d, 24, activation),  # type: ignore[arg-type]
        MLP(d, 24) if shared else None,
        **layer,  # type: ignore[arg-type]
    )


def test_expert_mask_layout() -> None:
    allowed = modality_expert_mask([0, 2], 3, experts_per_modality=2, cross_modal_experts=1)
    expected = torch.tensor(
        [[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )  # text: 0-1, audio: 2-3, cross: 4; image has no encoder, so no row
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("kind", ["mixtral", "expert_choice"])
def test_routing_never_leaves_own_modality_or_cross_experts(kind: str) -> None:
    layer = make_layer(per_modality=3, cross=1, top_k=3, kind=kind, capacity_factor=2.0)
    # Make the other modalities' experts overwhelmingly attractive: masking must still win.
    with torch.no_grad():
        layer.router.proj.weight.normal_(std=10.0)
    x = torch.randn(300, 16)
    modality_ids = torch.arange(300) % 3
    routing = layer.router(x, modality_ids, capacity_factor=2.0)
    kept = routing.kept if routing.kept is not None else torch.ones_like(routing.token, dtype=torch.bool)
    assert layer.router.allowed[modality_ids[routing.token], routing.expert][kept].all()
    allowed = layer.router.allowed[modality_ids]  # (T, E)
    assert (routing.probs[~allowed] == 0).all()
    _, stats = layer.eval()(x, modality_ids)
    assert (stats.tokens_per_expert[~layer.router.allowed] == 0).all()
    if kind == "mixtral":
        assert stats.tokens_per_expert.sum() == 300 * 3


def test_mixtral_gates_renormalised_switch_gates_not() -> None:
    x, ids = torch.randn(50, 16), torch.zeros(50, dtype=torch.long)
    mixtral = make_layer(top_k=2).router(x, ids)
    torch.testing.assert_close(mixtral.weight.view(50, 2).sum(-1), torch.ones(50))
    switch = make_layer(top_k=1, kind="switch").router(x, ids)
    torch.testing.assert_close(switch.weight, switch.probs.max(-1).values)
    assert (switch.weight < 1).all()


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


def test_load_balancing_loss_over_ranks_counts_the_global_batch() -> None:
    """Two data-parallel ranks, each with half of a batch (the same tokens per group): when ``total`` sums
    their counts (what the all-reduce does), the mean of their losses is the whole batch's loss, value and
    gradient. On its own counts it is not: rank 0 sends all group-0 tokens to expert 0, rank 1 to expert 1."""
    allowed = torch.tensor([[True, True, False], [False, True, True]])
    group_ids = torch.tensor([0, 0, 0, 1] * 2)
    expert_idx = torch.tensor([[0], [0], [0], [2], [1], [1], [1], [2]])
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    logits = logits.masked_fill(~allowed[group_ids], float("-inf")).requires_grad_()
    probs, halves = logits.softmax(-1), [slice(0, 4), slice(4, 8)]
    sent: list[torch.Tensor] = []

    def send(counts: torch.Tensor) -> torch.Tensor:
        sent.append(counts)
        return counts

    for h in halves:  # each rank's counts
        load_balancing_loss(probs[h], expert_idx[h], group_ids[h], allowed, send)
    summed = sent[0] + sent[1]

    def mean_over_ranks(total: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        return torch.stack(
            [load_balancing_loss(probs[h], expert_idx[h], group_ids[h], allowed, total) for h in halves]
        ).mean()

    whole = load_balancing_loss(probs, expert_idx, group_ids, allowed)
    over_ranks = mean_over_ranks(lambda c: summed)
    torch.testing.assert_close(over_ranks, whole)
    grads = [torch.autograd.grad(loss, logits, retain_graph=True)[0] for loss in (over_ranks, whole)]
    torch.testing.assert_close(*grads)
    assert abs(float(mean_over_ranks(None)) - float(whole)) > 0.01


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


def test_capacity_is_each_expert_even_share_of_its_modalities_pairs() -> None:
    # Text (6 tokens) may use experts {0, 1, 2}; image (2 tokens) may use {3, 2}; expert 2 is cross-modal.
    allowed = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([0] * 6 + [1] * 2)
    # Even loads with top-1: (6/3, 6/3, 6/3 + 2/2, 2/2) = (2, 2, 3, 1).
    assert expert_capacity(ids, allowed, 1, 1.0).tolist() == [2, 2, 3, 1]
    assert expert_capacity(ids, allowed, 1, 1.5).tolist() == [3, 3, 5, 2]
    assert expert_capacity(ids, allowed, 2, 0.75).tolist() == [3, 3, 5, 2]


def test_overflow_drops_later_tokens_or_the_least_confident_ones() -> None:
    expert_idx = torch.tensor([[0], [0], [0], [1]])
    capacity = torch.tensor([2, 2])
    assert within_capacity(expert_idx, capacity).tolist() == [True, True, False, True]
    priority = torch.tensor([0.1, 0.9, 0.5, 0.3])  # token 0 is the least sure of expert 0
    assert within_capacity(expert_idx, capacity, priority).tolist() == [False, True, True, True]
    # Top-2: every first choice is served before any second choice (GShard).
    two = torch.tensor([[0, 1], [1, 0]])
    assert within_capacity(two, torch.tensor([1, 1])).tolist() == [True, False, True, False]


def test_dropped_pairs_pass_through_and_evaluation_is_dropless() -> None:
    layer = make_layer(top_k=1, kind="switch", shared=True, capacity_factor=0.5).train()
    x, ids = torch.randn(120, 16), torch.randint(0, 3, (120,))
    y, stats = layer(x, ids)
    routing = layer.router(x, ids, 0.5)
    assert routing.kept is not None
    dropped = ~routing.kept  # top-1: one pair per token
    assert float(stats.dropped_fraction) > 0.4  # at most about half the tokens fit
    torch.testing.assert_close(float(stats.dropped_fraction), float(dropped.float().mean()))
    assert layer.shared is not None
    torch.testing.assert_close(y[dropped], layer.shared(x[dropped]))  # only the shared expert remains
    assert not torch.allclose(y[~dropped], layer.shared(x[~dropped]))
    y_eval, eval_stats = layer.eval()(x, ids)
    assert float(eval_stats.dropped_fraction) == 0.0
    layer.capacity_factor = 0.0
    torch.testing.assert_close(y_eval, layer.train()(x, ids)[0])


def test_expert_choice_fills_each_expert_up_to_capacity_with_its_best_tokens() -> None:
    layer = make_layer(per_modality=2, cross=1, top_k=1, kind="expert_choice", capacity_factor=1.0)
    x, ids = torch.randn(90, 16), torch.tensor([0] * 60 + [1] * 30)
    routing = layer.router(x, ids, 1.0)
    assert routing.kept is not None and routing.mode == "expert_choice"
    capacity = expert_capacity(ids, layer.router.allowed, 1, 1.0)
    assert capacity.tolist() == [20, 20, 10, 10, 0, 0, 30]  # text: 60/3, image: 30/3, cross: 20 + 10
    taken = torch.zeros_like(capacity).index_add_(0, routing.expert, routing.kept.long())
    assert torch.equal(taken, capacity)
    for e in range(layer.router.num_experts):
        mine = routing.kept & (routing.expert == e)
        tokens = routing.token[mine]
        # The expert took the tokens it likes most among those allowed to use it, at their probability.
        scores = routing.probs[:, e].masked_fill(~layer.router.allowed[ids, e], -1.0)
        assert set(tokens.tolist()) == set(scores.topk(int(taken[e])).indices.tolist())
        torch.testing.assert_close(routing.weight[mine], routing.probs[tokens, e])
    _, stats = layer(x, ids)
    assert float(stats.load_balance_loss) == 0.0
    covered = torch.zeros(90).index_add_(0, routing.token, routing.kept.float())
    torch.testing.assert_close(float(stats.dropped_fraction), float((covered == 0).float().mean()))


def assert_matches_reference(layer: MoELayer, dispatch: str) -> None:
    """Same outputs, drop counts and gradients (input and every parameter) as the reference loop."""
    x = torch.randn(97, layer.router.proj.in_features)
    ids = torch.randint(0, 3, (97,))
    results = []
    for mode in ("reference", dispatch):
        layer.dispatch = mode  # type: ignore[assignment]
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, stats = layer(xi, ids)
        (y.square().sum() + stats.load_balance_loss + stats.z_loss).backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        assert all(g is not None for g in grads.values())
        results.append({"y": y.detach(), "x": xi.grad, **grads, "dropped": stats.dropped_fraction})
    reference, fast = results
    assert set(reference) == set(fast)
    for name, expected in reference.items():  # up to summation order, which differs between the paths
        scale = float(expected.abs().max())
        torch.testing.assert_close(fast[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm"])
@pytest.mark.parametrize(
    ("kind", "top_k", "capacity", "activation", "priority"),
    [
        ("switch", 1, 0.0, "swiglu", False),  # (top-1 Mixtral gates are 1: no router gradient)
        ("mixtral", 2, 0.0, "swiglu", False),
        ("mixtral", 3, 0.0, "gelu", False),
        ("mixtral", 2, 0.6, "swiglu", False),
        ("mixtral", 2, 0.6, "swiglu", True),
        ("switch", 1, 0.8, "relu", False),
        ("expert_choice", 2, 1.0, "swiglu", False),
        ("expert_choice", 1, 0.2, "relu", False),  # fewer pairs than tokens; most tokens get no expert
    ],
)
def test_fast_dispatch_equals_reference_forward_and_backward(
    dispatch: str, kind: str, top_k: int, capacity: float, activation: str, priority: bool
) -> None:
    layer = make_layer(
        seed=1,
        top_k=top_k,
        kind=kind,
        activation=activation,
        batch_priority=priority,
        capacity_factor=capacity,
        shared=True,
    )
    assert_matches_reference(layer, dispatch)


@pytest.mark.parametrize("kind", ["mixtral", "expert_choice"])
def test_fused_kernel_splits_big_experts_into_row_blocks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks per expert: the first writes the expert's weight gradients, the others add to them."""
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1000)  # 5 rows of 48 floats: every expert in several blocks
    layer = make_layer(seed=3, kind=kind, capacity_factor=1.0 if kind == "expert_choice" else 0.0)
    assert_matches_reference(layer, "sorted")


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
def test_fused_kernel_gates_the_narrower_side(activation: str) -> None:
    """The gate scales the (n, d) output where d_ff > d (the other tests) and the (n, d_ff) activation where
    d_ff <= d (here: d 32, d_ff 24)."""
    assert_matches_reference(make_layer(seed=4, d=32, activation=activation), "sorted")


def test_experts_with_no_tokens_are_fine() -> None:
    layer = make_layer()
    x = torch.randn(5, 16)
    ids = torch.zeros(5, dtype=torch.long)  # only text: image and audio experts get nothing
    for dispatch in ("sorted", "grouped_mm"):
        layer.dispatch = dispatch  # type: ignore[assignment]
        y, stats = layer(x, ids)
        y.sum().backward()
        assert stats.tokens_per_expert[1:].sum() == 0
        assert torch.isfinite(y).all()
        assert layer.experts.gate_up_proj.grad is not None
        assert (layer.experts.gate_up_proj.grad[2:6] == 0).all()  # image and audio experts


@pytest.mark.parametrize("dispatch", ["reference", "sorted", "grouped_mm"])
def test_router_runs_in_fp32_under_bf16_autocast(dispatch: str) -> None:
    layer = make_layer(dispatch=dispatch)
    x = torch.randn(40, 16).bfloat16().float()  # the router then sees the same values in both runs
    ids = torch.arange(40) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x.bfloat16(), ids)
        y, stats = layer(x.bfloat16(), ids)
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32
    assert stats.load_balance_loss.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x, ids)[0], atol=0.05, rtol=0.05)


def test_top_k_larger_than_allowed_experts_is_refused() -> None:
    allowed = modality_expert_mask([0], 3, experts_per_modality=1, cross_modal_experts=0)
    with pytest.raises(ValueError, match="top_k=2"):
        Router(8, allowed, top_k=2)


def test_jitter_perturbs_routing_in_training_only() -> None:
    layer = make_layer(jitter=0.3)
    x, ids = torch.randn(200, 16), torch.zeros(200, dtype=torch.long)
    a, b = layer.router.train()(x, ids), layer.router(x, ids)
    assert not torch.equal(a.logits, b.logits)
    c, d = layer.router.eval()(x, ids), layer.router(x, ids)
    assert torch.equal(c.logits, d.logits) and torch.equal(c.expert, d.expert)


def test_bias_changes_selection_only_and_balances_each_modality() -> None:
    layer = make_layer(per_modality=4, cross=0, top_k=1, kind="switch", bias_rate=0.05)
    router = layer.router
    assert router.bias is not None and "router.bias" in layer.state_dict()
    with torch.no_grad():
        router.proj.weight[0] += 1.0  # text tokens all prefer expert 0...
    x = torch.randn(400, 16) + 0.5
    ids = torch.tensor([0] * 300 + [2] * 100)

    def text_shares() -> torch.Tensor:
        counts = layer(x, ids)[1].tokens_per_expert
        return counts[0, :4].float() / 300

    before = text_shares()
    assert before.max() > 0.8
    for _ in range(200):
        stats = layer(x, ids)[1]
        router.update_bias(stats.tokens_per_expert)
    after = text_shares()
    assert after.max() < 0.4, after
    assert (router.bias[1] == 0).all()  # no image tokens, no image step
    assert (router.bias[~router.allowed] == 0).all()
    routing = router(x, ids)
    torch.testing.assert_close(routing.weight, routing.probs.gather(1, routing.expert_idx).flatten())


def test_moe_config_refuses_inconsistent_routing_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match=r"MoEConfig.capacity_factor: must be > 0 with router='expert"):
        MoEConfig(router="expert_choice")
    with pytest.raises(ConfigError, match=r"MoEConfig.bias_update_rate: must be 0 with"):
        MoEConfig(router="expert_choice", capacity_factor=1.0, bias_update_rate=0.01)
    with pytest.raises(ConfigError, match=r"MoEConfig.dispatch: must be one of 'auto'"):
        MoEConfig(dispatch="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"MoEConfig.capacity_factor: must be >= 0"):
        MoEConfig(capacity_factor=-1.0)
    with pytest.raises(ConfigError, match=r"MoEConfig.cross_modal_from_layer: must be 0"):
        MoEConfig(experts_per_modality=0, cross_modal_from_layer=2)
    with pytest.raises(ConfigError, match=r"MoEConfig.router_jitter"):
        MoEConfig(router_jitter=1.5)


@pytest.mark.slow
def test_training_updates_the_bias_and_logs_drops(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    from multimoe.data.datamodule import MultiModalDataModule
    from multimoe.training.cli import MultiMoECLI
    from multimoe.training.module import MultiMoEModule

    cli = MultiMoECLI(
        MultiMoEModule,
        MultiModalDataModule,
        args=[
            "fit",
            "--config",
            "configs/tiny.yaml",
            *[f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()],
            "--model.config.moe.bias_update_rate=0.01",
            "--model.config.moe.capacity_factor=1.0",
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    module = cli.model
    assert isinstance(module, MultiMoEModule)
    biases = [layer.router.bias for layer in module.model.moe_layers()]
    assert biases and all(b is not None and b.abs().sum() > 0 for b in biases)
    for bias in biases:  # two steps of +-rate: every bias is -2, -1, 0, 1 or 2 rates
        assert bias is not None and set((bias / 0.01).round().unique().tolist()) <= {-2, -1, 0, 1, 2}
    assert {"test/dropped", "test/router_entropy"} <= set(cli.trainer.callback_metrics)


def test_balance_per_batch_treats_all_tokens_as_one_group_over_all_experts() -> None:
    """Per modality, each modality's tokens are balanced over the experts it may use; per batch, all
    tokens over all experts: a batch of text only then leaves the image and audio experts idle and costs
    more, while per modality it is as cheap as any balanced routing."""
    x, ids = torch.randn(64, 16), torch.zeros(64, dtype=torch.long)  # text only
    per_modality = make_layer(seed=5)(x, ids)[1].load_balance_loss
    layer = make_layer(seed=5, balance_groups="batch")
    routing = layer.router(x, ids)
    everything = layer.router.allowed.any(dim=0, keepdim=True)
    expected = load_balancing_loss(routing.probs, routing.expert_idx, torch.zeros_like(ids), everything)
    per_batch = layer(x, ids)[1].load_balance_loss
    torch.testing.assert_close(per_batch, expected)
    assert float(per_batch) > float(per_modality) * 1.5  # 8 experts, 4 of them reachable
