"""Full fine-tuning, frozen encoders and LoRA at several ranks, on the fine-tuning walkthrough
(docs/finetune.md): test accuracy and caption exact match, trainable parameters, the size of what a run must
ship (the adapter folder for LoRA, the whole saved model otherwise), peak memory and median step time.

    python benchmarks/lora_finetune.py --base runs/default/lightning_logs/version_0/checkpoints/last.ckpt \
        --manifests mydigits [--seeds 0] [--out runs/lora_finetune]

Each variant is one ``train.py fit --config configs/finetune_digits.yaml`` process; its peak resident memory
comes from ``os.wait4`` and its step times from the ``StepTimer`` callback put into the run. One JSON line
per run, then a table of means over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
ALL = "[text,image,audio,attention,experts,router]"
VARIANTS = {
    "full": ["--finetune.freeze=[]"],
    "frozen encoders": ["--finetune.freeze=[encoders]"],
    "heads only": ["--finetune.freeze=[encoders,projectors,router,experts,trunk]"],
    "LoRA r=4": ["--finetune.freeze=[]", "--finetune.lora.r=4", f"--finetune.lora.targets={ALL}"],
    "LoRA r=8": ["--finetune.freeze=[]", "--finetune.lora.r=8", f"--finetune.lora.targets={ALL}"],
    "LoRA r=16": ["--finetune.freeze=[]", "--finetune.lora.r=16", f"--finetune.lora.targets={ALL}"],
}


class StepTimer(Callback):
    """Appends each training step's wall time (seconds, batch fetch excluded) to a JSON list file."""

    def __init__(self, path: str) -> None:
        self.path, self.start = Path(path), 0.0
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(json.dumps(self.times))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run(
    name: str, lr: float, seed: int, base: str, manifests: Path, out: Path, extra: list[str]
) -> dict[str, Any]:
    root = out / f"{name.replace(' ', '_').replace('=', '')}-lr{lr:g}-seed{seed}"
    timer = {
        "class_path": "benchmarks.lora_finetune.StepTimer",
        "init_args": {"path": str(root / "steps.json")},
    }
    command = [sys.executable, "train.py", "fit", "--config=configs/finetune_digits.yaml"]
    command += [f"--data.{s}_manifest={manifests / f'{s}.csv'}" for s in ("train", "val", "test")]
    command += [f"--finetune.checkpoint={base}", f"--seed_everything={seed}", f"--model.lr={lr}"]
    command += ["--trainer.logger=false"]
    command += [f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={json.dumps(timer)}"]
    command += ["--trainer.enable_progress_bar=false", *VARIANTS[name], *extra]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "out.txt").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    text = (root / "out.txt").read_text()
    if status != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{text[-3000:]}")
    trainable = re.search(r"; ([\d,]+) of ([\d,]+) parameters train", text)
    assert trainable, text[-2000:]
    best = next((root / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads(Path(f"{best}.metrics.json").read_text())["metrics"]
    shipped = root / "shipped"
    subprocess.run(
        [sys.executable, "-m", "multimoe.tools.convert", str(best), str(shipped)], cwd=ROOT, check=True
    )
    steps = json.loads((root / "steps.json").read_text())[5:]  # past the first steps' warm-up
    return {
        "variant": name,
        "lr": lr,
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "test_caption_exact": metrics.get("test/caption_exact"),
        "trainable": int(trainable.group(1).replace(",", "")),
        "total": int(trainable.group(2).replace(",", "")),
        "shipped_mb": folder_bytes(shipped) / 1e6,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "step_ms": 1000 * statistics.median(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the checkpoint to fine-tune (the main job's)")
    parser.add_argument("--manifests", type=Path, required=True, help="folder of train/val/test.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0005], help="finetune_digits.yaml's")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lora_finetune")
    parser.add_argument("--extra", action="append", default=[], help="a train.py argument: --extra=--x=1")
    args = parser.parse_args()
    results = []
    runs = [(name, lr) for name in args.variants for lr in args.lrs]
    for name, lr in runs:
        for seed in args.seeds:
            results.append(run(name, lr, seed, args.base, args.manifests.resolve(), args.out, args.extra))
            print(json.dumps(results[-1]), flush=True)
    header = ["variant", "lr", "test acc", "caption exact", "trainable", "shipped (MB)", "peak RSS (MB)"]
    print("\n| " + " | ".join([*header, "step (ms)"]) + " |\n" + "|---" * (len(header) + 1) + "|")
    for name, lr in runs:
        rows = [r for r in results if (r["variant"], r["lr"]) == (name, lr)]
        mean = {
            k: statistics.mean(r[k] for r in rows)
            for k in ("test_acc", "shipped_mb", "peak_rss_mb", "step_ms")
        }
        exact = statistics.mean(r["test_caption_exact"] or 0.0 for r in rows)
        accs = [r["test_acc"] for r in rows]
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        cells = [
            name,
            f"{lr:g}",
            f"{mean['test_acc']:.3f}{spread}",
            f"{exact:.3f}",
            f"{rows[0]['trainable']:,} of {rows[0]['total']:,}",
            f"{mean['shipped_mb']:.2f}",
            f"{mean['peak_rss_mb']:.0f}",
            f"{mean['step_ms']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
