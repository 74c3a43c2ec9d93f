"""Forward + backward time of the MoE layer, against a dense SwiGLU FFN with the same active FLOPs
(``d_ff * top_k`` wide) and against HF transformers' ``MixtralSparseMoeBlock`` with each experts backend.

``dense`` is this project's FFN (``multimoe.trunk.MLP``): the ratio to it is the cost of routing.

    python benchmarks/moe_layer.py                                  # CPU, 2 threads, fp32
    python benchmarks/moe_layer.py --device cuda --dtype bf16       # GPU targets

All contenders run in one process on the same input, the same output gradient and the same weights (HF's
block gets a copy of ours, so both route identically). Rounds go round-robin over the contenders after a
warm-up round; each time is one forward + backward (input and weight gradients, our aux losses included)
right after an untimed one of the same contender, and the JSON reports medians in ms and the ratios
ours / dense and ours / HF per experts backend.

On glibc, ``--malloc pinned`` (the default) first fixes malloc's mmap and trim thresholds at 1 GiB: freed
blocks are then reused instead of glibc's adaptive threshold deciding, by what ran before, whether a
tensor of 16-128 MiB comes back as fresh pages that fault in at first touch. Left adaptive
(``--malloc default``), the same code moved between 0.87x and 1.37x dense from run to run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer, modality_expert_mask
from multimoe.moe.router import Router
from multimoe.trunk import MLP

SHAPES = {
    "coarse-1k": {"tokens": 1024, "d": 512, "d_ff": 1024, "experts": 8, "top_k": 2},
    "coarse-8k": {"tokens": 8192, "d": 512, "d_ff": 1024, "experts": 8, "top_k": 2},
    "coarse-32k": {"tokens": 32768, "d": 512, "d_ff": 1024, "experts": 8, "top_k": 2},
    "fine-8k": {"tokens": 8192, "d": 512, "d_ff": 256, "experts": 64, "top_k": 8},
}
# Ratio of our layer to the dense FFN that counts as "near dense speed", per device and shape kind.
TARGET_TO_DENSE = {"cpu": {"coarse": 1.10, "fine": 1.10}, "cuda": {"coarse": 1.15, "fine": 1.5}}
HF_BACKENDS = ("eager", "grouped_mm")
PINNED_BYTES = 1 << 30

Step = Callable[[], None]


def pin_malloc() -> str:
    """Fix glibc's mmap and trim thresholds (``mallopt``); returns what was done."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return "unchanged (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, PINNED_BYTES) and libc.mallopt(m_trim_threshold, PINNED_BYTES)):
        return "unchanged (mallopt refused)"
    return f"glibc mmap and trim thresholds pinned at {PINNED_BYTES >> 20} MiB"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "cpu"


def build(shape: dict[str, int], dtype: torch.dtype, device: str, dispatch: str) -> dict[str, Step]:
    """One forward+backward closure per contender, all on the same data and weights."""
    t, d, d_ff, e, k = shape["tokens"], shape["d"], shape["d_ff"], shape["experts"], shape["top_k"]
    torch.manual_seed(0)
    allowed = modality_expert_mask([0], 1, 0, e)  # one modality, every expert allowed: plain Mixtral routing
    ours = MoELayer(Router(d, allowed, k), Experts(e, d, d_ff), dispatch=dispatch)  # type: ignore[arg-type]
    dense = MLP(d, d_ff * k)
    ids = torch.zeros(t, dtype=torch.long, device=device)
    x = torch.randn(t, d, device=device, dtype=dtype)
    grad = torch.randn(t, d, device=device, dtype=dtype)

    def ours_step() -> None:
        y, stats = ours(x, ids)
        aux = 0.01 * stats.load_balance_loss + 0.001 * stats.z_loss
        torch.autograd.backward([y, aux], [grad, None])

    def plain_step(module: torch.nn.Module, shape_in: tuple[int, ...]) -> Step:
        def step() -> None:
            module(x.view(shape_in)).backward(grad.view(shape_in))

        return step

    steps: dict[str, Step] = {"dense": plain_step(dense, (t, d)), "ours": ours_step}
    modules: list[torch.nn.Module] = [ours, dense]
    for backend in HF_BACKENDS:
        config = MixtralConfig(
            hidden_size=d,
            intermediate_size=d_ff,
            num_local_experts=e,
            num_experts_per_tok=k,
            experts_implementation=backend,
        )
        hf = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            hf.gate.weight.copy_(ours.router.proj.weight)
            hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            hf.experts.down_proj.copy_(ours.experts.down_proj)
        steps[f"hf_{backend}"] = plain_step(hf, (1, t, d))
        modules.append(hf)
    for module in modules:
        module.to(device=device, dtype=dtype).train()
    x.requires_grad_(True)

    def fresh(step: Step) -> Step:
        def run() -> None:
            x.grad = None
            for module in modules:
                module.zero_grad(set_to_none=True)
            step()

        return run

    return {name: fresh(step) for name, step in steps.items()}


def time_round_robin(steps: dict[str, Step], warmup: int, repeats: int, device: str) -> dict[str, float]:
    """Median ms per contender. Every round runs each contender in turn, twice: the first, untimed run puts
    the allocator back in that contender's own steady state (as in a training loop) instead of the state the
    previous contender left behind, which otherwise shifts times by 10 % and more."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(ms), 2) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--dispatch", default="auto", choices=["auto", "sorted", "grouped_mm"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--malloc", default="pinned", choices=["pinned", "default"])
    args = parser.parse_args(argv)
    malloc = pin_malloc() if args.malloc == "pinned" else "glibc default (adaptive thresholds)"
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/moe_layer.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "dispatch": args.dispatch,
        "malloc": malloc,
        "onednn": torch.backends.mkldnn.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "shapes": [],
    }
    for name in args.shapes:
        shape = SHAPES[name]
        with torch.device(args.device):
            steps = build(shape, dtype, args.device, args.dispatch)
        median = time_round_robin(steps, args.warmup, args.repeats, args.device)
        ratio = {other: round(median["ours"] / median[other], 3) for other in median if other != "ours"}
        target = TARGET_TO_DENSE[args.device]["fine" if name.startswith("fine") else "coarse"]
        hf_best = min(median[f"hf_{b}"] for b in HF_BACKENDS)
        row = {"shape": name, **shape, "median_ms": median, "ratio": ratio, "target_to_dense": target}
        row["meets_targets"] = ratio["dense"] <= target and median["ours"] <= hf_best
        report["shapes"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress
        del steps
    report["all_targets_met"] = all(row["meets_targets"] for row in report["shapes"])
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
