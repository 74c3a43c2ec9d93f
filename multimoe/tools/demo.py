"""A local demo page: upload an image, record or upload audio, type text; see the label with its
probabilities, the caption, and the experts each modality's tokens went to.

    python -m multimoe.tools.demo CHECKPOINT [--host 127.0.0.1] [--port 7860]

Needs the ``demo`` extra (Gradio): ``pip install -e ".[demo]"``. The page shows only the inputs the model
reads and the heads it has.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from multimoe.config import Modality

if TYPE_CHECKING:
    from multimoe.model import MultiMoE, MultiMoEOutput


@torch.no_grad()
def answer(
    model: MultiMoE, image: str | None = None, audio: str | None = None, text: str | None = None
) -> dict[str, Any]:
    """``{"probabilities": {label: p}, "caption": str, "experts": [...]}`` for one sample (as the model has
    the heads), with ``experts_used``."""
    from multimoe.tools.infer import one_sample

    batch = one_sample(model, image or None, audio or None, (text or "").strip() or None)
    out = model(batch.inputs)
    result: dict[str, Any] = {"experts": experts_used(model, out)}
    if out.class_logits is not None:
        probs = out.class_logits[0].float().softmax(dim=-1).tolist()
        result["probabilities"] = dict(sorted(zip(model.labels, probs, strict=True), key=lambda x: -x[1]))
    if model.captioner is not None:
        result["caption"] = model.generate(batch.inputs)[0]
    return result


def experts_used(model: MultiMoE, out: MultiMoEOutput) -> list[dict[str, Any]]:
    """Per MoE layer and modality of the (one-sample) batch: ``{expert name: tokens}`` for the experts its
    tokens chose (expert-choice routing: each token's most probable expert). Experts are named by who may
    use them: ``image 0`` is the image tokens' first expert, ``cross 1`` the second cross-modal one."""
    ids = out.encoded.modality_ids[out.encoded.mask]  # (T,) modality of each real token, the router's order
    rows = []
    for index, (layer, stats) in enumerate(zip(model.moe_layers(), out.router_stats, strict=True)):
        names = expert_names(layer.router.allowed)
        chosen = stats.chosen if stats.chosen is not None else stats.top_expert[:, None]  # (T, k)
        for m in sorted(Modality(int(i)) for i in ids.unique()):
            counts = torch.bincount(chosen[ids == m].flatten(), minlength=len(names)).tolist()
            used = {names[e]: n for e, n in sorted(enumerate(counts), key=lambda x: -x[1]) if n}
            rows.append({"layer": index, "modality": m.key, "tokens": int((ids == m).sum()), "experts": used})
    return rows


def expert_names(allowed: torch.Tensor) -> list[str]:
    """``allowed (modalities, E)`` -> a name per expert: its modality and rank among that modality's own
    experts, or ``cross`` and its rank among those several modalities share."""
    names, seen = [], dict[str, int]()
    for e in range(allowed.shape[1]):
        users = allowed[:, e].nonzero().flatten().tolist()
        group = Modality(users[0]).key if len(users) == 1 else "cross"
        names.append(f"{group} {seen.get(group, 0)}")
        seen[group] = seen.get(group, 0) + 1
    return names


def experts_table(rows: list[dict[str, Any]]) -> str:
    """The experts as a markdown table."""
    lines = ["| MoE layer | modality | tokens | experts chosen (times) |", "|---|---|---|---|"]
    for row in rows:
        used = ", ".join(f"{name} ({n})" for name, n in row["experts"].items())
        lines.append(f"| {row['layer']} | {row['modality']} | {row['tokens']} | {used} |")
    return "\n".join(lines)


def build(model: MultiMoE) -> Any:
    """The Gradio page for ``model``."""
    import gradio as gr

    reads = set(model.config.modalities)
    with gr.Blocks(title="multimoe") as page:
        gr.Markdown(f"## multimoe demo\nThe model reads {', '.join(model.config.modalities)}.")
        with gr.Row():
            image = gr.Image(type="filepath", label="Image", elem_id="image", visible="image" in reads)
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="Audio",
                elem_id="audio",
                visible="audio" in reads,
            )
        text = gr.Textbox(label="Text", elem_id="text", visible="text" in reads)
        run = gr.Button("Run", variant="primary", elem_id="run")
        label = gr.Label(label="Label", elem_id="label", visible=model.classifier is not None)
        caption = gr.Textbox(
            label="Caption", elem_id="caption", interactive=False, visible=model.captioner is not None
        )
        experts = gr.Markdown(elem_id="experts")

        def respond(image_path: str | None, audio_path: str | None, words: str) -> tuple[Any, str, str]:
            try:
                result = answer(model, image_path, audio_path, words)
            except (ValueError, FileNotFoundError) as error:
                raise gr.Error(str(error)) from None
            return result.get("probabilities"), result.get("caption", ""), experts_table(result["experts"])

        run.click(respond, [image, audio, text], [label, caption, experts])
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a saved model folder")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)"
    )
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    from multimoe.model import MultiMoE

    try:
        model = MultiMoE.from_pretrained(args.checkpoint).eval()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    build(model).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
