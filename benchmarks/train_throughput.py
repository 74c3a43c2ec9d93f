"""Training-step throughput and peak memory of the default config (configs/default.yaml) on real mmdigits
batches: the MoE model against a dense model with the same active parameters per token, each eager and with
the trunk compiled (``trunk.compile``).

    python benchmarks/train_throughput.py                              # CPU, 2 threads, fp32 (README table)
    python benchmarks/train_throughput.py --device cuda --precision bf16

The dense model sets ``moe.every: 0``: every block then has the dense FFN of ``d_ff = 512``, which is what a
token uses in a MoE block (top-2 of SwiGLU experts with ``expert_d_ff = 256``), so both models do the same
FFN work per token and differ by routing, dispatch and the idle experts' memory. A step is forward, the
losses (task + MoE auxiliary), backward and an AdamW step, on batches collated once up front (no data
loading in the timing). Timing runs all variants in one process, round-robin (one step of each per round,
after warm-up), and reports median step times: a shared machine's changing load then hits all alike.
Peak memory comes from a fresh process per variant (warm-up + one step): on CPU the growth of the peak RSS
from before the first step (for the compiled variants it includes the compiler's own memory), on CUDA
``torch.cuda.max_memory_allocated``. Tokens are the real (unpadded) trunk tokens. Model FLOPs per step are
counted by ``torch.utils.flop_counter`` on the dense model's forward and backward (the work of every variant);
MFU divides the achieved rate by the device's dense bf16 peak. Prints one JSON document.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "moe-eager": {},
    "moe-compiled": {"trunk": {"compile": True}},
    "dense-eager": {"moe": {"every": 0}},
    "dense-compiled": {"moe": {"every": 0}, "trunk": {"compile": True}},
}


def build(variant: str, args: argparse.Namespace) -> Callable[[int], int]:
    """The model of ``variant`` with its optimizer and batches: ``step(i)`` trains on batch ``i`` (cycled) and
    returns its number of trunk tokens."""
    from multimoe.config import MultiMoEConfig
    from multimoe.data.datamodule import MultiModalDataModule
    from multimoe.training.module import MultiMoEModule

    values = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["model"]["config"]
    for part, changes in VARIANTS[variant].items():
        values[part] |= changes
    config = MultiMoEConfig.from_dict(values)
    data = MultiModalDataModule(args.manifest, config=config, batch_size=args.batch_size)
    data.setup()
    loader = iter(data.train_dataloader())
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = MultiMoEModule(config, data.labels, data.vocab).to(device).train()
    batches = [module.transfer_batch_to_device(next(loader), device, 0) for _ in range(args.batches)]
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
        if device.type == "cuda":
            torch.cuda.synchronize()
        return int(out.trunk.mask.sum())

    def flops(i: int) -> int:
        """Forward and backward of batch ``i``, counted by ``torch.utils.flop_counter`` (no update)."""
        batch = batches[i % len(batches)]
        with FlopCounterMode(display=False) as counter:
            with autocast:
                loss = module._losses(batch, module(batch))["loss"]
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    step.trunk_params = sum(p.numel() for p in module.model.trunk.parameters())  # type: ignore[attr-defined]
    step.flops = flops  # type: ignore[attr-defined]
    return step


def model_flops(steps: dict[str, Callable[[int], int]], args: argparse.Namespace) -> float:
    """FLOPs of one training step, the same for every variant: counted on the dense model, which does the
    work a MoE token does (the MoE kernels are custom operators that the counter does not see)."""
    dense = steps.get("dense-eager") or build("dense-eager", args)
    return statistics.mean(dense.flops(i) for i in range(args.batches))  # type: ignore[attr-defined]


def peak_tflops(args: argparse.Namespace) -> float | None:
    """The device's dense bf16 peak (``--peak_tflops``, or known for H100/H200/A100), for MFU."""
    if args.peak_tflops or args.device != "cuda" or args.precision != "bf16":
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    known = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # SXM parts, dense bf16 tensor cores
    return next((peak for part, peak in known.items() if part in name), None)


def peak_memory(variant: str, args: argparse.Namespace) -> float:
    """MB over warm-up + one step, in a fresh process (see the module docstring)."""
    step = build(variant, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()  # model, optimizer and batches in memory, no step taken yet
    for i in range(args.warmup + 1):
        step(i)
    if args.device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(_rss_mb() - rss_before, 1)


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All variants in this process; after their warm-up, rounds run one step of each variant in turn, so a
    change in the machine's load hits all of them alike."""
    steps = {variant: build(variant, args) for variant in args.variants}
    for step in steps.values():
        for i in range(args.warmup):
            step(i)
    seconds: dict[str, list[float]] = {v: [] for v in steps}
    tokens: dict[str, list[int]] = {v: [] for v in steps}
    for i in range(args.steps):
        for variant, step in steps.items():
            start = time.perf_counter()
            tokens[variant].append(step(args.warmup + i))
            seconds[variant].append(time.perf_counter() - start)
    flops, peak = model_flops(steps, args), peak_tflops(args)
    rows = []
    for variant, step in steps.items():
        median = statistics.median(seconds[variant])
        achieved = flops / median / 1e12
        rows.append(
            {
                "variant": variant,
                "tokens_per_s": round(statistics.mean(tokens[variant]) / median, 1),
                "samples_per_s": round(args.batch_size / median, 2),
                "median_step_ms": round(median * 1e3, 1),
                "trunk_params": step.trunk_params,  # type: ignore[attr-defined]
                "model_gflops_per_step": round(flops / 1e9, 2),
                "model_tflops_per_s": round(achieved, 4),
                "mfu": None if peak is None else round(achieved / peak, 5),
            }
        )
    return rows


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    parser.add_argument(
        "--peak_tflops", type=float, help="the device's peak, for MFU (known: H100, H200, A100)"
    )
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(peak_memory(args.child, args)))
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
    }
    memory = {}
    for variant in args.variants:
        child = [sys.executable, __file__, *argv, "--child", variant]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        memory[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps({variant: memory[variant]}), file=sys.stderr, flush=True)  # progress
    key = "peak_allocated_mb" if args.device == "cuda" else "peak_rss_growth_mb"
    report["results"] = [row | {key: memory[row["variant"]]} for row in throughput(args)]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
