"""What the routing of a trained model says, from counts gathered over a whole evaluation set.

- **Balance.** Per MoE layer and modality, each allowed expert's share of the modality's (token, expert)
  assignments; an even split gives each ``1 / n`` of them. ``verdict`` tells *collapse* (an expert that gets
  almost nothing, or one that nearly every token picks) from *imbalance* (uneven, every expert still used).
  Tokens identical by nature (blank image patches, silent audio frames, the same word in several samples)
  count once: each token weighs ``1 / its multiplicity``, by its content before the trunk (the projected
  encoder output) within the batch, so that a heap of blank patches sent to one expert is one decision.
- **Specialization.** The mutual information, in bits, between a token's top expert and its class label, its
  position in its modality's sequence, and, for the tokens whose top expert is cross-modal, its modality.

Everything here is a count that adds up over batches and processes (``RoutingTally.reduce``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from multimoe.modality import ModalityTokens
from multimoe.moe.layer import RouterStats

DEAD_OF_EVEN = 0.1  # an expert with less than this part of its even share is left unused: collapse
NEARLY_ALL = 0.9  # an expert chosen by this share of the tokens that may choose among more: collapse
UNEVEN = 2.0  # an expert with over this many times its even share, or under its inverse: imbalance
MAX_POSITION = 256  # positions from here on share the last bin


def mutual_information(joint: torch.Tensor) -> float:
    """``I(A; B)`` in bits from a joint count table ``(A, B)``."""
    p = joint.double() / joint.sum().clamp_min(1)
    outer = p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)
    terms = p * (p / outer.clamp_min(1e-300)).log2()
    return float(terms[p > 0].sum())


def entropy(counts: torch.Tensor) -> float:
    """Entropy in bits of a count vector."""
    p = counts.double().flatten() / counts.sum().clamp_min(1)
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def content_weights(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``(T,)``: ``1 / (number of tokens of the same group with exactly the same content)``; tokens (T, d)."""
    keyed = torch.cat([groups[:, None].to(tokens.dtype), tokens], dim=1)
    _, inverse, counts = torch.unique(keyed, dim=0, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].to(torch.float32)


def token_positions(mask: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
    """``(T,)``: each real token's place in its modality's part of the sequence (``mask``, ids ``(B, N)``;
    the parts are contiguous, in the same columns in every row)."""
    column = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    start = torch.full((int(modality_ids.max()) + 1,), mask.shape[1], device=mask.device, dtype=torch.long)
    start = start.scatter_reduce(0, modality_ids[0], column[0], reduce="amin")
    return (column - start[modality_ids])[mask]


@dataclass
class RoutingTally:
    """Counts of one MoE layer over an evaluation set; ``M`` modalities, ``E`` experts, ``C`` classes."""

    assigned: torch.Tensor  # (M, E) content-weighted (token, expert) assignments
    label: torch.Tensor  # (M, E, C) tokens by top expert and class label
    position: torch.Tensor  # (M, E, MAX_POSITION) tokens by top expert and position
    top: torch.Tensor  # (M, E) tokens by top expert

    @classmethod
    def empty(
        cls, num_modalities: int, num_experts: int, num_classes: int, device: torch.device
    ) -> RoutingTally:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        m, e = num_modalities, num_experts
        return cls(
            zeros(m, e, dtype=torch.float64),
            zeros(m, e, max(num_classes, 1)),
            zeros(m, e, MAX_POSITION),
            zeros(m, e),
        )

    def add(
        self,
        modality: torch.Tensor,
        top_expert: torch.Tensor,
        chosen: torch.Tensor | None,
        weight: torch.Tensor,
        label: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        """One batch's real tokens, all ``(T,)`` but ``chosen (T, k)`` (the experts each token was sent to;
        ``None`` for expert choice, which has no per-token set); ``label`` < 0 where unlabelled."""
        m, e = self.top.shape
        self.top += torch.bincount(modality * e + top_expert, minlength=m * e).view(m, e)
        if chosen is not None:
            cells = (modality[:, None] * e + chosen).flatten()
            weights = weight.double().repeat_interleave(chosen.shape[1])
            self.assigned += torch.bincount(cells, weights, minlength=m * e).view(m, e)
        keep = label >= 0
        c = self.label.shape[2]
        cells = (modality * e + top_expert)[keep] * c + label[keep].clamp_max(c - 1)
        self.label += torch.bincount(cells, minlength=m * e * c).view(m, e, c)
        cells = (modality * e + top_expert) * MAX_POSITION + position.clamp_max(MAX_POSITION - 1)
        self.position += torch.bincount(cells, minlength=m * e * MAX_POSITION).view(m, e, MAX_POSITION)

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RoutingTally:
        """The tally with every count passed through ``fn`` (a sum over processes, say)."""
        return RoutingTally(*(fn(getattr(self, f.name)) for f in fields(self)))

    def shares(self, allowed: torch.Tensor) -> torch.Tensor:
        """``(M, E)``: each expert's share of its modality's assignments (content-weighted), NaN where the
        modality may not go."""
        total = self.assigned.sum(dim=1, keepdim=True)
        share = self.assigned / total.clamp_min(1e-12)
        return share.masked_fill(~allowed.to(share.device), float("nan")).float()

    def specialization(self, modality: int) -> dict[str, float]:
        """Bits of mutual information between a ``modality`` token's top expert and its class label, and its
        position; and the entropy of its top expert, the most either can be."""
        return {
            "label_bits": mutual_information(self.label[modality]),
            "position_bits": mutual_information(self.position[modality]),
            "expert_bits": entropy(self.top[modality]),
        }

    def cross_modality_bits(self, cross: list[int]) -> float:
        """Over the tokens whose top expert is one of the ``cross``-modal experts: the bits their top expert
        tells about their modality (0: the cross-modal experts mix modalities evenly)."""
        return mutual_information(self.top[:, cross].t()) if cross else 0.0


def tally_batch(
    tallies: list[RoutingTally], stats: list[RouterStats], encoded: ModalityTokens, labels: torch.Tensor
) -> None:
    """Add one batch to each MoE layer's tally: ``stats`` (``MultiMoEOutput.router_stats``), the trunk's input
    ``encoded`` (whose content weighs identical tokens) and the samples' class ``labels (B,)`` (< 0: none)."""
    mask, ids = encoded.mask, encoded.modality_ids
    modality = ids[mask]
    weight = content_weights(encoded.tokens.detach()[mask].float(), modality)
    label = labels[:, None].expand_as(mask)[mask]
    position = token_positions(mask, ids)
    for tally, layer in zip(tallies, stats, strict=True):
        tally.add(modality, layer.top_expert, layer.chosen, weight, label, position)


@dataclass
class Verdict:
    kind: str  # "collapse" or "imbalance"
    modality: int
    expert: int
    share: float  # of the modality's assignments
    even: float  # 1 / the number of experts the modality may use
    what: str


def verdicts(shares: torch.Tensor, allowed: torch.Tensor, top_k: int) -> list[Verdict]:
    """Collapse and imbalance per modality from ``shares (M, E)`` (``RoutingTally.shares``) and
    ``allowed (M, E)``. Only for a modality that may choose among more than ``top_k`` experts: with no more,
    every token uses all of them."""
    found = []
    for m in range(shares.shape[0]):
        options = allowed[m].nonzero().flatten().tolist()
        row = shares[m, options]
        if len(options) <= top_k or not torch.isfinite(row).all() or row.sum() == 0:
            continue
        even = 1.0 / len(options)
        low, high = int(row.argmin()), int(row.argmax())
        if float(row[high]) * top_k >= NEARLY_ALL:
            what = f"picked by {float(row[high]) * top_k:.0%} of the tokens"
            found.append(Verdict("collapse", m, options[high], float(row[high]), even, what))
        elif float(row[low]) < DEAD_OF_EVEN * even:
            what = f"left almost unused ({float(row[low]):.3f} of the assignments)"
            kind = "collapse"
            if _used_by_another(shares, allowed, m, options[low]):  # a cross-modal expert: not wasted
                kind, what = "imbalance", what + " but used by another modality"
            found.append(Verdict(kind, m, options[low], float(row[low]), even, what))
        elif float(row[high]) > UNEVEN * even or float(row[low]) < even / UNEVEN:
            e = high if float(row[high]) / even >= even / max(float(row[low]), 1e-12) else low
            what = f"gets {float(row[e]):.2f} of the assignments"
            found.append(Verdict("imbalance", m, options[e], float(row[e]), even, what))
    return found


def _used_by_another(shares: torch.Tensor, allowed: torch.Tensor, modality: int, expert: int) -> bool:
    """Whether a modality other than ``modality`` gives ``expert`` at least a tenth of its even share."""
    others = [m for m in range(shares.shape[0]) if m != modality and bool(allowed[m, expert])]
    return any(float(shares[m, expert]) >= DEAD_OF_EVEN / int(allowed[m].sum()) for m in others)
