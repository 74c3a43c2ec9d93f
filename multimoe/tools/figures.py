"""The routing figures (matplotlib, drawn into files; imported only when drawing): the share of each
modality's tokens per expert, router entropy and drops per layer, and each token's top expert over a sample's
image patches and spectrogram frames."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multimoe.modality import Modality

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from multimoe.data.manifest import ManifestRow
    from multimoe.model import MultiMoE
    from multimoe.tools.analysis import RoutingSummary


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def share_heatmap(counts: list[torch.Tensor], allowed: list[torch.Tensor], modalities: list[str]) -> Figure:
    """One heatmap per MoE layer: rows are modalities, columns experts, cells the share of the modality's
    (token, expert) assignments that went to the expert; blank where the modality may not go."""
    plt = pyplot()
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


def entropy_drop_figure(summary: RoutingSummary, allowed: list[torch.Tensor]) -> Figure:
    plt = pyplot()
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


def sample_figure(model: MultiMoE, row: ManifestRow, experts: dict[str, Any], num_experts: int) -> Figure:
    """Each token's top expert per MoE layer, over the image patches and the audio spectrogram frames."""
    plt = pyplot()
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
            draw = _draw_image if m == "image" else _draw_audio
            draw(ax, model, getattr(row, m), top, colors, norm)
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


def _draw_image(ax: Any, model: MultiMoE, path: Path, top: Any, colors: Any, norm: Any) -> None:
    from PIL import Image

    size = model.config.image.image_size
    grid = math.isqrt(len(top))
    if grid * grid != len(top):  # a class token first (ViT)
        top, grid = top[1:], math.isqrt(len(top) - 1)
    ax.imshow(Image.open(path).convert("L").resize((size, size)), cmap="gray", extent=(0, size, size, 0))
    if grid * grid == len(top):
        ax.imshow(top.reshape(grid, grid), cmap=colors, norm=norm, alpha=0.45, extent=(0, size, size, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_audio(ax: Any, model: MultiMoE, path: Path, top: Any, colors: Any, norm: Any) -> None:
    from multimoe.data.processors import AudioProcessor

    waveform = AudioProcessor(model.config.audio)(path)
    encoder = model.encoders["audio"]
    frontend = getattr(encoder, "frontend", None)
    if frontend is not None:  # the scratch encoder's own log-mel: token j covers patch_frames frames
        features, frames = frontend.eval()(waveform[None], torch.tensor([len(waveform)]))
        spec = features[0, :, : int(frames[0])].numpy()
    else:
        import torchaudio

        spec = torchaudio.transforms.MelSpectrogram(model.config.audio.sample_rate, n_mels=64)(waveform)
        spec = spec.clamp_min(1e-6).log().numpy()
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, len(top), 0, spec.shape[0]))
    band = max(1.0, spec.shape[0] / 8)
    ax.imshow(top[None], cmap=colors, norm=norm, aspect="auto", extent=(0, len(top), -band, 0))
    ax.set_ylim(-band, spec.shape[0])
    ax.set_xlabel("audio token (time)", fontsize=7)
    ax.set_yticks([])
