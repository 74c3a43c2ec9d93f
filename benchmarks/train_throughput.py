"""Training-step throughput and peak memory of the default config (configs/default.yaml) on real mmdigits
batches: the MoE model against a dense model with the same active parameters per token, each eager and with
the trunk compiled (``trunk.compile``).

    python benchmarks/train_throughput.py                              # CPU, 2 threads, fp32 (README table)
    python benchmarks/train_throughput.py --device cuda --precision bf16

The dense model sets ``moe.every: 0``: every block then has the dense FFN of ``d_ff = 512``, which is what a
token uses in a MoE block (top-2 of SwiGLU experts with ``expert_d_ff = 256``), so both models do the same
FFN work per token and differ by routing, dispatch and the idle experts' memory. A step is forward, the
losses (task + MoE auxiliary), backward and an AdamW step, on batches collated once up front (no data
loading in the timing). Each variant runs in its own process, so that peak memory is its own: the CPU figure
is the growth of the process's peak RSS during the steps, the CUDA one ``torch.cuda.max_memory_allocated``.
Tokens are the real (unpadded) trunk tokens. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "moe-eager": {},
    "moe-compiled": {"trunk": {"compile": True}},
    "dense-eager": {"moe": {"every": 0}},
    "dense-compiled": {"moe": {"every": 0}, "trunk": {"compile": True}},
}


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a child process: warm-up steps (compilation included), then timed steps."""
    from multimoe.config import MultiMoEConfig
    from multimoe.data.datamodule import MultiModalDataModule
    from multimoe.lit_module import MultiMoEModule

    torch.set_num_threads(args.threads)
    values = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["model"]["config"]
    for part, changes in VARIANTS[variant].items():
        values[part] |= changes
    config = MultiMoEConfig.from_dict(values)
    data = MultiModalDataModule(args.manifest, config=config, batch_size=args.batch_size)
    data.setup()
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = MultiMoEModule(config, data.labels, data.vocab).to(device).train()
    batches = [module.transfer_batch_to_device(b, device, 0) for b in batches]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> int:
        batch = batches[i % len(batches)]
        with autocast:
            out = module(batch)
            loss = module._losses(batch, out)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out.trunk.mask.sum())

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, tokens = [], []
    for i in range(args.steps):
        start = time.perf_counter()
        tokens.append(step(i))
        sync()
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    params = sum(p.numel() for p in module.model.trunk.parameters())
    return {
        "variant": variant,
        "tokens_per_s": round(sum(tokens) / sum(seconds), 1),
        "samples_per_s": round(args.steps * args.batch_size / sum(seconds), 1),
        "median_step_ms": round(statistics.median(seconds) * 1e3, 1),
        "peak_memory_mb": round(peak_mb, 1),
        "trunk_params": params,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--manifest", default=str(ROOT / "datasets/mmdigits/data/train.jsonl"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return {}
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/train_throughput.py", *argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "precision": args.precision,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "results": [],
    }
    for variant in args.variants:
        child = [sys.executable, __file__, *argv, "--child", variant]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress
        report["results"].append(row)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
