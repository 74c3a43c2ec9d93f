"""Data parallelism through Lightning's strategies, with real processes: two CPU processes (DDP over gloo)
follow the loss trajectory of one process that sees the same global batches (FSDP needs GPUs:
tests/test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.probes import finish, fit_command, losses, start
from tests.test_moe import make_layer

# No randomness, so that the two layouts can match: dropout and SpecAugment off.
DETERMINISTIC = [
    "--model.config.text.dropout=0",
    "--model.config.audio.spec_augment=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.max_epochs=1",
]


def test_two_processes_follow_the_one_process_loss_trajectory(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """One process with batch 8 against DDP with 2 x 4: the sampler gives rank r every second sample of the
    same shuffled order, so the global batches are the same. The per-step losses (averaged over ranks) agree
    to float noise plus one real difference: each rank's MoE load-balancing loss takes the assignment counts
    of the global batch but its own tokens' mean router probabilities (whose gradients DDP averages), and
    the ranks' token counts per modality differ a little. Measured: 6.7e-6 relative at most. Wrong global
    batches or a missing gradient all-reduce move the loss by > 1e-3 from step 1 or 2 on."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = start(fit_command(one, digit_manifests, *DETERMINISTIC, "--data.batch_size=8"), one / "out.txt")
    ddp = [*DETERMINISTIC, "--data.batch_size=4", "--trainer.strategy=ddp", "--trainer.devices=2"]
    double = start(fit_command(two, digit_manifests, *ddp), two / "out.txt")
    finish(single, one / "out.txt")
    finish(double, two / "out.txt")

    reference, distributed = losses(one), losses(two)
    assert [s for s, _ in reference] == [s for s, _ in distributed] == list(range(1, 7))
    for (step, a), (_, b) in zip(reference, distributed, strict=True):
        assert b == pytest.approx(a, rel=2e-5), f"step {step}"
    worst = max(abs(b / a - 1) for (_, a), (_, b) in zip(reference, distributed, strict=True))
    print(f"largest relative loss difference to one process: {worst:.1e}")


@pytest.mark.parametrize("dispatch", ["sorted", "reference"])
def test_experts_without_tokens_still_get_gradients(dispatch: str) -> None:
    """DDP (find_unused_parameters=False) all-reduces a gradient for every parameter each step; a rank whose
    batch sends no token to some experts must still produce one, or the ranks fall out of step. The experts'
    weights are stacked tensors, so an idle expert gets a zero gradient slice, never a missing one."""
    layer = make_layer(dispatch=dispatch, shared=True)
    x = torch.randn(20, 16)
    y, stats = layer(x, torch.zeros(20, dtype=torch.long))  # text tokens only: image/audio experts idle
    (y.sum() + stats.load_balance_loss + stats.z_loss).backward()
    assert stats.tokens_per_expert[1:].sum() == 0
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
    idle = layer.router.allowed[1:].any(dim=0) & ~layer.router.allowed[0]
    assert layer.experts.w_in.grad[idle].abs().sum() == 0
