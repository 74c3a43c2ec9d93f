"""Inference on CPU: the whole model, the model sliced to some modalities, int8 weights, ONNX graphs in
onnxruntime and the dense twin (eager and ONNX), on one checkpoint and its test set, in one process.

    python benchmarks/inference.py CHECKPOINT --manifest datasets/mmdigits/data/test.jsonl \
        --slice image,audio [--dense DENSE_CHECKPOINT]

Per variant:
- test accuracy and caption exact match (the sliced one on the test set without the other modalities, next
  to the whole model on that same input);
- the bytes its weights take when saved (``torch.save`` of the state dict; the ``.onnx`` files);
- latency at batch 1 (median and p90 over the first ``--samples`` test samples), and throughput at batch 64;
- how far the peak RSS rises over one batch-64 forward above the resident set with the model loaded, in
  three fresh processes per variant (Linux: the kernel's peak mark is reset after loading).

Variants run round-robin, one batch-1 sample or one batch-64 pass of each per round. Prints one JSON
document.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def variants(
    checkpoint: str, keep: list[str], onnx: str, dense: str | None = None, threads: int = 2
) -> dict[str, Callable[[], tuple[Any, list[str]]]]:
    """name -> a function that builds (model, modalities dropped from its input); ``onnx``: the folder of
    the checkpoint's graphs (``export_onnx``)."""
    from multimoe.model import MultiMoE
    from multimoe.portable import OnnxModel
    from multimoe.quantize import quantize_int8

    def whole() -> Any:
        return MultiMoE.from_pretrained(checkpoint).eval()

    def on_kept(model: Any, source: Any) -> tuple[Any, list[str]]:
        return model, [m for m in source.config.modalities if m not in keep]

    def sliced() -> tuple[Any, list[str]]:
        source = whole()
        return on_kept(source.sliced(keep), source)

    def fp32_on_kept() -> tuple[Any, list[str]]:
        model = whole()
        return on_kept(model, model)

    builders = {
        "fp32": lambda: (whole(), []),
        "int8": lambda: (quantize_int8(whole()), []),
        # its threads must not spin between runs: the other variants run in between
        "onnx": lambda: (OnnxModel(onnx, threads, spinning=False), []),
        f"fp32 on {','.join(keep)}": fp32_on_kept,
        f"sliced to {','.join(keep)}": sliced,
    }
    if dense:
        builders["dense twin"] = lambda: (MultiMoE.from_pretrained(dense).eval(), [])
        builders["dense twin onnx"] = lambda: (OnnxModel(Path(onnx) / "dense", threads, spinning=False), [])
    return builders


def batches(model: Any, manifest: str, dropped: list[str], batch_size: int) -> list[Any]:
    from multimoe.data.datamodule import MultiModalDataModule

    data = MultiModalDataModule(
        test_manifest=manifest,
        batch_size=batch_size,
        config=model.config,
        drop_modalities=dropped or None,
        base_vocab=model.vocab,
        base_labels=model.labels,
    )
    data.setup("test")
    return list(data.test_dataloader())


@torch.no_grad()
def quality(model: Any, test: list[Any]) -> dict[str, Any]:
    from multimoe.data.dataset import IGNORE_INDEX

    right = labelled = exact = captioned = 0
    for batch in test:
        if model.config.classifier.num_classes:
            predicted = model(batch.inputs).class_logits.argmax(-1)
            keep = batch.labels != IGNORE_INDEX
            right += int((predicted[keep] == batch.labels[keep]).sum())
            labelled += int(keep.sum())
        if model.config.caption.vocab_size:
            for caption, refs in zip(model.generate(batch.inputs), batch.references, strict=True):
                if refs:
                    exact += caption in [model.words.normalize(r) for r in refs]
                    captioned += 1
    return {
        "acc": right / labelled if labelled else None,
        "caption_exact": exact / captioned if captioned else None,
    }


@torch.no_grad()
def agreement(reference: Any, model: Any, test: list[Any]) -> dict[str, Any]:
    """How far ``model`` strays from ``reference`` on the same batches: the largest class-logit difference,
    and the shares of equal top-1 classes and equal captions."""
    diff, same, captions_same, total = 0.0, 0, 0, 0
    for batch in test:
        ours, theirs = model(batch.inputs).class_logits, reference(batch.inputs).class_logits
        if ours is not None:
            diff = max(diff, float((ours - theirs).abs().max()))
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        if model.config.caption.vocab_size:
            pairs = zip(model.generate(batch.inputs), reference.generate(batch.inputs), strict=True)
            captions_same += sum(a == b for a, b in pairs)
        total += len(batch)
    caption = captions_same / total if model.config.caption.vocab_size else None
    return {"max_abs_logit_diff": diff, "same_top1": same / total, "same_caption": caption}


def saved_bytes(model: Any) -> int:
    from multimoe.portable import OnnxModel

    if isinstance(model, OnnxModel):
        return sum(p.stat().st_size for p in Path(model.folder).glob("*.onnx"))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def timings(runs: dict[str, tuple[Any, list[Any], list[Any]]], rounds: int) -> dict[str, dict[str, float]]:
    """Round-robin: batch-1 latency over each variant's single samples, then batch-64 throughput."""
    single: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds + 1):  # round 0 warms up
        for name, (model, ones, _) in runs.items():
            start = time.perf_counter()
            model(ones[i % len(ones)].inputs)
            if i:
                single[name].append(time.perf_counter() - start)
    per_sample: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(4):
        for name, (model, _, full) in runs.items():
            start = time.perf_counter()
            model(full[i % len(full)].inputs)
            if i:
                per_sample[name].append((time.perf_counter() - start) / len(full[i % len(full)]))
    return {
        name: {
            "batch1_median_ms": 1000 * statistics.median(single[name]),
            "batch1_p90_ms": 1000 * statistics.quantiles(single[name], n=10)[-1],
            "batch64_samples_per_s": 1 / statistics.median(per_sample[name]),
        }
        for name in runs
    }


def peak_memory(args: argparse.Namespace, name: str) -> list[float]:
    """MB the peak RSS rises over one batch-64 forward of ``name``, in 3 fresh processes (``forward_peak``),
    sorted: the allocator's reuse of what loading freed makes single runs vary by tens of MB."""
    command = [sys.executable, __file__, args.checkpoint, "--manifest", args.manifest, "--slice", args.slice]
    command += ["--onnx-dir", args.onnx_dir, "--threads", str(args.threads)]
    command += ["--dense", args.dense] if args.dense else []
    runs = [
        subprocess.run([*command, "--memory-of", name], capture_output=True, text=True, check=True)
        for _ in range(3)
    ]
    return sorted(round(float(r.stdout.strip().splitlines()[-1]), 1) for r in runs)


def forward_peak(build: Callable[[], tuple[Any, list[str]]], manifest: str) -> float:
    """Build one variant, reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), run one batch-64
    forward and return how far the peak (``VmHWM``) rose above the resident set before it: what the forward
    needs on top of the loaded weights (loading leftovers and the weights themselves excluded)."""
    model, dropped = build()
    batch = batches(model, manifest, dropped, 64)[0]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    with torch.no_grad():
        model(batch.inputs)
    return _status_mb("VmHWM") - before


def _status_mb(key: str) -> float:
    found = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert found, key
    return int(found.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a train.py checkpoint or a saved model folder")
    parser.add_argument("--manifest", required=True, help="the test manifest")
    parser.add_argument("--slice", default="image,audio", help="modalities the sliced variant keeps")
    parser.add_argument("--dense", help="the dense twin's checkpoint (moe.every: 0), to run beside")
    parser.add_argument("--samples", type=int, default=50, help="batch-1 samples timed per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep = [m for m in args.slice.split(",") if m]
    if args.memory_of:
        builders = variants(args.checkpoint, keep, args.onnx_dir, args.dense, args.threads)
        print(forward_peak(builders[args.memory_of], args.manifest))
        return
    with tempfile.TemporaryDirectory() as onnx_dir:
        args.onnx_dir = onnx_dir
        run(args, keep)


def run(args: argparse.Namespace, keep: list[str]) -> None:
    from multimoe.model import MultiMoE
    from multimoe.portable import export_onnx

    start = time.perf_counter()
    export_onnx(MultiMoE.from_pretrained(args.checkpoint), args.onnx_dir)
    export_s = time.perf_counter() - start
    if args.dense:
        export_onnx(MultiMoE.from_pretrained(args.dense), Path(args.onnx_dir) / "dense")
    builders = variants(args.checkpoint, keep, args.onnx_dir, args.dense, args.threads)
    runs: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, build in builders.items():
        model, dropped = build()
        full = batches(model, args.manifest, dropped, 64)
        ones = batches(model, args.manifest, dropped, 1)[: args.samples]
        runs[name] = (model, ones, full)
        report[name] = quality(model, full) | {"saved_bytes": saved_bytes(model)}
    for name, times in timings(runs, args.samples).items():
        report[name] |= times | {"forward_rss_growth_mb": peak_memory(args, name)}
    report["onnx"] |= {"export_s": export_s} | agreement(runs["fp32"][0], runs["onnx"][0], runs["fp32"][2])
    header = {"checkpoint": args.checkpoint, "manifest": args.manifest, "threads": args.threads}
    print(json.dumps(header | {"torch": torch.__version__, "variants": report}, indent=2))


if __name__ == "__main__":
    main()
