"""Pictures of what the router does, from a checkpoint and a manifest:

    python -m multimoe.analysis CHECKPOINT MANIFEST --out DIR [--samples 3] [--limit 1000]

writes to DIR: ``routing_shares.png`` (per MoE layer, the share of each modality's tokens that each expert
receives), ``router_entropy_drop.png`` (router entropy and drop rate per layer) and ``sample_<id>.png``
(each token's top expert drawn over the image patches and the audio spectrogram frames of a few samples).
``share_heatmap`` draws the first figure for TensorBoard during validation too.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multimoe.modality import Modality

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from multimoe.data.dataset import ManifestDataset
    from multimoe.lit_module import MultiMoEModule
    from multimoe.moe.router import Routing


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def share_heatmap(counts: list[torch.Tensor], allowed: list[torch.Tensor], modalities: list[str]) -> Figure:
    """One heatmap per MoE layer: rows are modalities, columns experts, cells the share of the modality's
    (token, expert) assignments that went to the expert; blank where the modality may not go."""
    plt = _pyplot()
    rows = [Modality.from_name(m) for m in modalities]
    fig, axes = plt.subplots(1, len(counts), figsize=(0.6 + 0.55 * counts[0].shape[1] * len(counts), 2.7))
    axes = [axes] if len(counts) == 1 else list(axes)
    for layer, (ax, c, a) in enumerate(zip(axes, counts, allowed, strict=True)):
        c, a = c[rows].double().cpu(), a[rows].cpu()
        share = c / c.sum(dim=1, keepdim=True).clamp_min(1)
        share[~a] = float("nan")
        ax.imshow(share.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        for m, e in a.nonzero().tolist():
            value = float(share[m, e])
            ax.text(
                e, m, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
            )
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_xticks(range(share.shape[1]), [str(e) for e in range(share.shape[1])], fontsize=7)
        ax.set_yticks(range(len(rows)), modalities if layer == 0 else [""] * len(rows), fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
    fig.suptitle("share of each modality's tokens per expert", fontsize=9)
    fig.tight_layout()
    return fig


@dataclass
class RoutingSummary:
    """Routing of a whole manifest: per MoE layer, counts ``(num_modalities, E)``, and the token-weighted
    mean router entropy and drop rate; per sample of ``keep``, each token's top expert per layer."""

    counts: list[torch.Tensor] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)
    tokens: int = 0
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)


@torch.no_grad()
def summarize(
    module: MultiMoEModule, dataset: ManifestDataset, keep: int = 3, batch_size: int = 32
) -> RoutingSummary:
    """Run the trunk over ``dataset`` and record the routing of every MoE layer (evaluation mode)."""
    from torch.utils.data import DataLoader

    from multimoe.data.collate import Collator
    from multimoe.data.processors import TextProcessor

    model = module.model.eval()
    layers = model.moe_layers()
    if not layers:
        raise ValueError("this model has no MoE layer (moe.every = 0): there is no routing to draw")
    assert module.words is not None
    text = TextProcessor(module.config.text, module.words) if "text" in module.config.modalities else None
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(text, module.words.pad_id))
    captured: list[Routing] = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in layers]
    summary = RoutingSummary()
    try:
        for batch in loader:
            captured.clear()
            x = model.encode(batch.inputs)  # tokens (B, N, d), mask (B, N), modality_ids (B, N)
            _, stats = model.trunk(x.tokens, x.mask, x.modality_ids)
            n = int(x.mask.sum())
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


def entropy_drop_figure(summary: RoutingSummary, allowed: list[torch.Tensor]) -> Figure:
    plt = _pyplot()
    layers = range(len(summary.entropy))
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 2.6))
    left.bar(layers, summary.entropy, color="tab:blue", label="mean router entropy")
    most = [math.log(int(a.sum(dim=1).max())) for a in allowed]
    left.plot(layers, most, "k_", markersize=20, label="uniform over allowed experts")
    left.set(xlabel="MoE layer", ylabel="nats", title="router entropy", xticks=list(layers))
    left.set_ylim(0, max(most) * 1.5)
    left.legend(fontsize=7, loc="upper left")
    right.bar(layers, [100 * d for d in summary.dropped], color="tab:red")
    right.set(xlabel="MoE layer", ylabel="% of (token, expert) pairs", title="dropped over capacity")
    right.set_xticks(list(layers))
    right.set_ylim(0, max(1.0, 100 * max(summary.dropped) * 1.2))
    fig.tight_layout()
    return fig


def sample_figure(module: MultiMoEModule, row: Any, experts: dict[str, Any], num_experts: int) -> Figure:
    """Each token's top expert per MoE layer, over the image patches and the audio spectrogram frames."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    shown = [m for m in ("image", "audio") if m in experts]
    num_layers = next(iter(experts.values())).shape[0] if experts else 0
    fig, axes = plt.subplots(
        max(len(shown), 1), max(num_layers, 1), figsize=(3.2 * num_layers, 2.6 * len(shown)), squeeze=False
    )
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # no grey: it hides
    colors = ListedColormap((palette + list(plt.get_cmap("tab20b").colors))[:num_experts])
    norm = BoundaryNorm([e - 0.5 for e in range(num_experts + 1)], num_experts)
    for r, m in enumerate(shown):
        for layer in range(num_layers):
            ax = axes[r][layer]
            top = experts[m][layer].numpy()
            if m == "image":
                _draw_image(ax, module, row.image, top, colors, norm)
            else:
                _draw_audio(ax, module, row.audio, top, colors, norm)
            ax.set_title(f"{m}, MoE layer {layer}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(e)) for e in range(num_experts)]
    fig.legend(
        handles,
        [f"expert {e}" for e in range(num_experts)],
        loc="lower center",
        ncol=min(num_experts, 5),
        fontsize=7,
    )
    caption = f" - {row.captions[0]}" if row.captions else ""
    fig.suptitle(f"top expert of each token: {row.id}{caption}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * math.ceil(num_experts / 5), 1, 1))
    return fig


def _draw_image(ax: Any, module: MultiMoEModule, path: Path, top: Any, colors: Any, norm: Any) -> None:
    from PIL import Image

    size = module.config.image.image_size
    grid = math.isqrt(len(top))
    if grid * grid != len(top):  # a class token first (ViT)
        top, grid = top[1:], math.isqrt(len(top) - 1)
    ax.imshow(Image.open(path).convert("L").resize((size, size)), cmap="gray", extent=(0, size, size, 0))
    if grid * grid == len(top):
        ax.imshow(top.reshape(grid, grid), cmap=colors, norm=norm, alpha=0.45, extent=(0, size, size, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_audio(ax: Any, module: MultiMoEModule, path: Path, top: Any, colors: Any, norm: Any) -> None:
    from multimoe.data.processors import AudioProcessor

    waveform = AudioProcessor(module.config.audio)(path)
    encoder = module.model.encoders["audio"]
    frontend = getattr(encoder, "frontend", None)
    if frontend is not None:  # the scratch encoder's own log-mel: token j covers patch_frames frames
        features, frames = frontend.eval()(waveform[None], torch.tensor([len(waveform)]))
        spec = features[0, :, : int(frames[0])].numpy()
    else:
        import torchaudio

        spec = torchaudio.transforms.MelSpectrogram(module.config.audio.sample_rate, n_mels=64)(waveform)
        spec = spec.clamp_min(1e-6).log().numpy()
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, len(top), 0, spec.shape[0]))
    band = max(1.0, spec.shape[0] / 8)
    ax.imshow(top[None], cmap=colors, norm=norm, aspect="auto", extent=(0, len(top), -band, 0))
    ax.set_ylim(-band, spec.shape[0])
    ax.set_xlabel("audio token (time)", fontsize=7)
    ax.set_yticks([])


def analyze(
    checkpoint: str | Path, manifest: str | Path, out: str | Path, samples: int = 3, limit: int = 0
) -> list[Path]:
    """Write the routing figures of ``checkpoint`` on ``manifest`` (its first ``limit`` rows; 0 = all)."""
    from multimoe.data.dataset import ManifestDataset
    from multimoe.data.manifest import read_manifest
    from multimoe.data.processors import AudioProcessor, ImageProcessor
    from multimoe.lit_module import MultiMoEModule

    module = MultiMoEModule.load_from_checkpoint(checkpoint, map_location="cpu")
    config = module.config
    rows = read_manifest(Path(manifest))[: limit or None]
    assert module.words is not None
    dataset = ManifestDataset(
        rows,
        config.modalities,
        [],  # labels play no part in routing
        module.words,
        ImageProcessor(config.image) if "image" in config.modalities else None,
        AudioProcessor(config.audio) if "audio" in config.modalities else None,
        config.caption.max_length,
    )
    summary = summarize(module, dataset, keep=samples)
    allowed = [layer.router.allowed for layer in module.model.moe_layers()]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "routing_shares.png": share_heatmap(summary.counts, allowed, config.modalities),
        "router_entropy_drop.png": entropy_drop_figure(summary, allowed),
    }
    by_id = {row.id: row for row in rows}
    for sample_id, experts in summary.samples.items():
        figures[f"sample_{sample_id}.png"] = sample_figure(
            module, by_id[sample_id], experts, allowed[0].shape[1]
        )
    plt = _pyplot()
    written = []
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m multimoe.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
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
