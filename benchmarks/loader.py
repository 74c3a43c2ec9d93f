"""Training data loading: a manifest of loose files against the same samples packed into litdata shards.

    python benchmarks/loader.py datasets/mmdigits/data/train.jsonl [--config configs/default.yaml]

Packs the manifest into a temporary folder (timed), then reads one training epoch's first ``--batches``
batches through the datamodule's training loader for each source, with 0 and 2 DataLoader workers: shuffled,
decoded and collated as ``train.py fit`` gets them. The manifest loader keeps decoded files in memory
(``data.cache``), so it is timed with the cache off (every file decoded, as shards always do) and on.
Prints one JSON document: samples/s per variant.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def samples_per_second(data: Any, batches: int) -> float:
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # workers started, first chunk read
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += len(next(iterator))
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="a training manifest")
    parser.add_argument(
        "--config", default=str(ROOT / "configs/default.yaml"), help="its model and batch size"
    )
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from multimoe.config import MultiMoEConfig
    from multimoe.data.datamodule import MultiModalDataModule
    from multimoe.data.pack import pack

    settings = yaml.safe_load(Path(args.config).read_text())
    config = MultiMoEConfig.from_dict(settings["model"]["config"])
    batch_size = settings["data"].get("batch_size", 64)
    report: dict[str, Any] = {"manifest": args.manifest, "batch_size": batch_size, "batches": args.batches}
    with tempfile.TemporaryDirectory() as shards:
        start = time.perf_counter()
        pack(args.manifest, shards)
        report["pack_s"] = time.perf_counter() - start
        report["shards_mb"] = sum(p.stat().st_size for p in Path(shards).iterdir()) / 1e6
        for workers in (0, 2):
            common = {"batch_size": batch_size, "num_workers": workers, "config": config}
            sources = {
                "manifest": MultiModalDataModule(args.manifest, cache=False, **common),
                "manifest, cached": MultiModalDataModule(args.manifest, **common),
                "shards": MultiModalDataModule(train_shards=shards, **common),
            }
            for name, data in sources.items():
                report[f"{name}, {workers} workers"] = samples_per_second(data, args.batches)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
