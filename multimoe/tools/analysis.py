"""Pictures of what the router does, from a checkpoint and a manifest:

    python -m multimoe.tools.analysis CHECKPOINT MANIFEST --out DIR [--samples 3] [--limit 1000]

writes to DIR: ``routing_shares.png`` (per MoE layer, the share of each modality's assignments that each
expert receives, tokens identical in content counted once), ``router_entropy_drop.png`` (router entropy and
drop rate per layer), ``sample_<id>.png`` (each token's top expert drawn over the image patches and the audio
spectrogram frames of a few samples) and ``routing.json``; and prints, per layer and modality, how many bits
the top expert tells about the class label and the token's position (and, for cross-modal experts, the
modality), with the collapse and imbalance verdicts (``multimoe.moe.diagnostics``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multimoe.modality import Modality
from multimoe.moe.diagnostics import RoutingTally, tally_batch, verdicts

if TYPE_CHECKING:
    from multimoe.data.dataset import ManifestDataset
    from multimoe.model import MultiMoE
    from multimoe.moe.router import Routing


@dataclass
class RoutingSummary:
    """Routing of a whole manifest: per MoE layer, counts ``(num_modalities, E)``, the tally of
    ``multimoe.moe.diagnostics``, and the token-weighted mean router entropy and drop rate; per sample of
    ``keep``, each token's top expert per layer."""

    counts: list[torch.Tensor] = field(default_factory=list)
    tallies: list[RoutingTally] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)
    tokens: int = 0
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)


@torch.no_grad()
def summarize(
    model: MultiMoE, dataset: ManifestDataset, keep: int = 3, batch_size: int = 32
) -> RoutingSummary:
    """Run the trunk over ``dataset`` and record the routing of every MoE layer (evaluation mode)."""
    from torch.utils.data import DataLoader

    from multimoe.data.collate import Collator

    model.eval()
    layers = model.moe_layers()
    if not layers:
        raise ValueError("this model has no MoE layer (moe.every = 0): there is no routing to draw")
    assert model.words is not None
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=Collator.for_model(model.config, model.words)
    )
    captured: list[Routing] = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in layers]
    summary = RoutingSummary()
    try:
        for batch in loader:
            captured.clear()
            x = model.encode(batch.inputs)  # tokens (B, N, d), mask (B, N), modality_ids (B, N)
            _, stats = model.trunk(x.tokens, x.mask, x.modality_ids)
            n = int(x.mask.sum())
            if not summary.tallies:
                m, e = stats[0].tokens_per_expert.shape
                summary.tallies = [
                    RoutingTally.empty(m, e, len(model.labels), x.tokens.device) for _ in stats
                ]
            tally_batch(summary.tallies, stats, x, batch.labels)
            for i, s in enumerate(stats):
                if i == len(summary.counts):
                    summary.counts.append(torch.zeros_like(s.tokens_per_expert))
                    summary.entropy.append(0.0)
                    summary.dropped.append(0.0)
                summary.counts[i] += s.tokens_per_expert
                summary.entropy[i] += float(s.entropy) * n
                summary.dropped[i] += float(s.dropped_fraction) * n
            summary.tokens += n
            for b, sample_id in enumerate(batch.ids):
                if len(summary.samples) < keep:
                    summary.samples[sample_id] = _sample_experts(captured, x.mask, x.modality_ids, b)
    finally:
        for hook in hooks:
            hook.remove()
    summary.entropy = [e / max(summary.tokens, 1) for e in summary.entropy]
    summary.dropped = [d / max(summary.tokens, 1) for d in summary.dropped]
    return summary


def _sample_experts(
    captured: list[Routing], mask: torch.Tensor, modality_ids: torch.Tensor, row: int
) -> dict[str, Any]:
    """``{modality: (layers, tokens) top expert of each real token of the sample}``."""
    out: dict[str, Any] = {}
    for m in Modality:
        where = (modality_ids[row] == m) & mask[row]
        if where.any():
            per_layer = []
            for routing in captured:
                top = torch.full(mask.shape, -1, dtype=torch.long)
                top[mask] = routing.probs.argmax(dim=-1).cpu()  # each real token's most likely expert
                per_layer.append(top[row][where])
            out[m.key] = torch.stack(per_layer)  # (L, N_m)
    return out


def analyze(
    checkpoint: str | Path, manifest: str | Path, out: str | Path, samples: int = 3, limit: int = 0
) -> list[Path]:
    """Write the routing figures of ``checkpoint`` (a ``.ckpt`` or a saved model folder) on ``manifest``
    (its first ``limit`` rows; 0 = all)."""
    from multimoe.data.dataset import ManifestDataset
    from multimoe.data.manifest import read_manifest
    from multimoe.model import MultiMoE
    from multimoe.tools.figures import entropy_drop_figure, pyplot, sample_figure, share_heatmap

    model = MultiMoE.from_pretrained(checkpoint)
    rows = read_manifest(Path(manifest), model.labels or None)[: limit or None]
    assert model.words is not None
    dataset = ManifestDataset.for_model(rows, model.config, model.labels, model.words)
    summary = summarize(model, dataset, keep=samples)
    allowed = [layer.router.allowed for layer in model.moe_layers()]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report = routing_report(model, summary)
    (folder / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report_lines(report))
    figures = {
        "routing_shares.png": share_heatmap(
            [t.assigned for t in summary.tallies], allowed, model.config.modalities
        ),
        "router_entropy_drop.png": entropy_drop_figure(summary, allowed),
    }
    by_id = {row.id: row for row in rows}
    for sample_id, experts in summary.samples.items():
        figures[f"sample_{sample_id}.png"] = sample_figure(
            model, by_id[sample_id], experts, allowed[0].shape[1]
        )
    plt = pyplot()
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
    return [folder / "routing.json", *(folder / name for name in figures)]


def routing_report(model: MultiMoE, summary: RoutingSummary) -> dict[str, Any]:
    """Per MoE layer: each modality's expert shares, bits of specialization, and the verdicts."""
    layers = []
    for index, (layer, tally) in enumerate(zip(model.moe_layers(), summary.tallies, strict=True)):
        allowed = layer.router.allowed
        shares = tally.shares(allowed)
        cross = [e for e in range(allowed.shape[1]) if int(allowed[:, e].sum()) > 1]
        modalities: dict[str, dict[str, Any]] = {}
        for name in model.config.modalities:
            m = Modality.from_name(name)
            experts = allowed[m].nonzero().flatten().tolist()
            modalities[name] = {"shares": {str(e): round(float(shares[m, e]), 4) for e in experts}}
            modalities[name] |= {k: round(v, 4) for k, v in tally.specialization(m).items()}
        found = verdicts(shares, allowed, layer.router.top_k)
        layers.append(
            {
                "layer": index,
                "cross_modal_experts": cross,
                "cross_modality_bits": round(tally.cross_modality_bits(cross), 4),
                "modalities": modalities,
                "verdicts": [
                    f"{v.kind}: {Modality(v.modality).key}, expert {v.expert} {v.what}" for v in found
                ],
            }
        )
    return {"tokens": summary.tokens, "layers": layers}


def report_lines(report: dict[str, Any]) -> str:
    """The report as the command prints it."""
    lines = [f"routing of {report['tokens']:,} tokens (bits of mutual information with the top expert)"]
    for layer in report["layers"]:
        at = f"  MoE layer {layer['layer']}"
        for name, m in layer["modalities"].items():
            lines.append(
                f"{at}, {name}: label {m['label_bits']:.3f}, position {m['position_bits']:.3f} "
                f"(top expert: {m['expert_bits']:.3f})"
            )
        if layer["cross_modal_experts"]:
            lines.append(f"{at}, cross-modal experts: modality {layer['cross_modality_bits']:.3f}")
        lines += [f"{at}: {verdict}" for verdict in layer["verdicts"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.analysis", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a saved model folder")
    parser.add_argument("manifest", help="a JSONL manifest to route")
    parser.add_argument("--out", required=True, help="folder for the PNG figures")
    parser.add_argument("--samples", type=int, default=3, help="samples to draw token maps for")
    parser.add_argument("--limit", type=int, default=0, help="route only the first N rows (0 = all)")
    args = parser.parse_args(argv)
    try:
        written = analyze(args.checkpoint, args.manifest, args.out, args.samples, args.limit)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(f"wrote {path}" for path in written))


if __name__ == "__main__":
    main()
