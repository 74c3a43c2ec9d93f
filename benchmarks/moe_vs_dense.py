"""MoE against its dense twin, and the MoE balancing remedies, over several seeds: one ``train.py fit`` per
(variant, seed), each a fresh process, then a JSON of every run and a markdown table of mean and spread.

    python benchmarks/moe_vs_dense.py --config configs/avmnist.yaml                       # moe, dense
    python benchmarks/moe_vs_dense.py --config configs/avmnist.yaml --variants remedies   # every remedy
    python benchmarks/moe_vs_dense.py --config configs/default.yaml --variants remedies dense --jobs 2
    python benchmarks/moe_vs_dense.py --config configs/avmnist.yaml --variants upcycling --seeds 0 1 2
    python benchmarks/moe_vs_dense.py --config configs/fashion.yaml --variants moe dense --seeds 0 1 2

``upcycling``: the dense twin is trained once (seed 0) as the base (or ``--base CKPT`` names one); then, per
seed, it is trained further for the config's epochs as it is (``dense-continued``) and upcycled into MoE
(``upcycled``, ``--finetune.upcycle true``: top-1 experts that start as copies of each MoE block's dense
FFN), with the same optimiser settings: the sparse upcycling recipe against spending the same steps on the
dense model.

Variants change only the MoE settings of the config (``VARIANTS``); ``dense`` puts the dense FFN of the same
active parameters in place of every MoE FFN (``moe.every: 0``, see ``configs/default_dense.yaml``). Each run
tests its final or best checkpoint (as the config says) on the config's test manifest; the table reports the
test scores, the routing verdicts the run's validation printed, and the bits of specialization of its last
validation. Writes ``<out>/study.json`` and ``<out>/study.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOE = "--model.config.moe."
VARIANTS: dict[str, list[str]] = {
    "moe": [],
    "dense": [f"{MOE}every=0"],
    "balance-0.1": [f"{MOE}load_balance_coef=0.1"],  # Switch coefficient x10
    "balance-0": [f"{MOE}load_balance_coef=0"],
    "bias-balancing": [f"{MOE}load_balance_coef=0", f"{MOE}bias_update_rate=0.001"],  # DeepSeek-V3
    "z-loss-0": [f"{MOE}z_loss_coef=0"],
    "z-loss-0.01": [f"{MOE}z_loss_coef=0.01"],
    "expert-choice": [f"{MOE}router=expert_choice", f"{MOE}capacity_factor=1.0"],
    "balance-per-batch": [f"{MOE}balance_groups=batch"],
    "balance-per-modality": [f"{MOE}balance_groups=modality"],
    "dense-continued": ["--finetune.checkpoint={base}"],
    "upcycled": ["--finetune.checkpoint={base}", "--finetune.upcycle=true"],
}
REMEDIES = ["balance-0.1", "balance-0", "bias-balancing", "z-loss-0", "z-loss-0.01", "expert-choice"]
GROUPS = {
    "remedies": ["moe", *REMEDIES, "balance-per-batch", "balance-per-modality"],
    "upcycling": ["dense-continued", "upcycled"],
}
SCORES = ("test/acc", "test/macro_f1", "test/caption_exact", "test/bleu4")


def run(
    config: str, variant: str, seed: int, out: Path, extra: list[str], base: str = "", threads: int = 0
) -> dict[str, Any]:
    folder = out / variant / f"seed{seed}"
    metrics = folder / "metrics.json"
    command = [sys.executable, "train.py", "fit", f"--config={config}", f"--seed_everything={seed}"]
    command += [f"--trainer.default_root_dir={folder}", "--trainer.enable_progress_bar=false"]
    command += [f"--metrics_file={metrics}", *(a.format(base=base) for a in VARIANTS[variant]), *extra]
    start = time.monotonic()
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    (folder / "stderr.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    report = json.loads(metrics.read_text())
    bits = {k: v for k, v in summary_values(result.stdout).items() if "_specialization/" in k}
    return {
        "variant": variant,
        "seed": seed,
        "seconds": round(seconds, 1),
        "scores": {k: report["metrics"][k] for k in SCORES if k in report["metrics"]},
        "collapse_warnings": len(re.findall(r"routing collapse in val", result.stderr)),
        "lasting_imbalance": "lasting routing imbalance" in result.stderr,
        "specialization": bits,
    }


def summary_values(stdout: str) -> dict[str, float]:
    """The metric lines of the summary that ``train.py fit`` prints."""
    values = {}
    for line in stdout.split("multimoe summary")[-1].splitlines():
        parts = line.split()
        if len(parts) == 2 and "/" in parts[0]:
            values[parts[0]] = float(parts[1])
    return values


def table(runs: list[dict[str, Any]]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    scores = [s for s in SCORES if any(s in r["scores"] for r in runs)]
    lines = [
        "| variant | "
        + " | ".join(f"{s} (mean ± sd; per seed)" for s in scores)
        + " | collapse warnings | min / run |",
        "|---" * (len(scores) + 3) + "|",
    ]
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        cells = []
        for s in scores:
            values = [r["scores"][s] for r in mine if s in r["scores"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            per_seed = " / ".join(f"{v:.3f}" for v in values)
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}; {per_seed}")
        warnings = sum(r["collapse_warnings"] for r in mine)
        minutes = statistics.mean(r["seconds"] for r in mine) / 60
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {warnings} | {minutes:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/avmnist.yaml")
    parser.add_argument(
        "--variants", nargs="+", default=["moe", "dense"], help=f"of {list(VARIANTS)} or {list(GROUPS)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--base", default="", help="upcycling: start from this dense checkpoint")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, the CPU threads split among them (small models "
        "keep 2 cores busier as 2 one-thread runs than as one two-thread run)",
    )
    parser.add_argument("extra", nargs="*", help="more train.py options for every run, after --")
    args = parser.parse_args(argv)
    variants = [v for name in args.variants for v in GROUPS.get(name, [name])]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    base = args.base
    if not base and any("{base}" in a for v in variants for a in VARIANTS[v]):  # upcycling: train a base
        run(args.config, "dense", 0, out / "base", args.extra)
        [base_path] = (out / "base" / "dense" / "seed0").rglob("last.ckpt")
        base = str(base_path)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    todo = [(v, seed) for seed in args.seeds for v in variants]  # seeds outermost: a stopped study has all
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, args.config, v, seed, out, args.extra, base, threads) for v, seed in todo]
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:  # a failed run stops the study
                pool.shutdown(cancel_futures=True)
            print(json.dumps(future.result()), file=sys.stderr, flush=True)
    runs = [future.result() for future in futures]
    study = {
        "config": args.config,
        "command": " ".join(["python", "benchmarks/moe_vs_dense.py", *sys.argv[1:]]),
    }
    (out / "study.json").write_text(json.dumps(study | {"runs": runs}, indent=2) + "\n")
    (out / "study.md").write_text(f"`{study['command']}`\n\n{table(runs)}\n")
    print(table(runs))


if __name__ == "__main__":
    main()
