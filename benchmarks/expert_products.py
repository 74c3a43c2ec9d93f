"""Throughput of the matrix products inside the MoE layer benchmark's shapes, one product at a time.

For each shape of ``moe_layer.py``, the first projection (``rows x d -> 2 * d_ff``, ``torch.mm``) of one
expert (``rows = tokens * top_k / experts``) and of the dense FFN with the same active FLOPs
(``rows = tokens``, ``2 * d_ff * top_k`` wide), on 1 and 2 threads. ``experts`` runs the product over every
expert's weights and rows in turn, as the layer does; ``hot`` repeats one expert's product on the same
operands. It shows how much of the layer's gap to the dense FFN the products alone make.

    python benchmarks/expert_products.py            # prints JSON, GFLOP/s
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch
from moe_layer import SHAPES, cpu_name  # type: ignore[import-not-found]  # run as a script from benchmarks/


def gflops(step: Callable[[], None], flop: float, repeats: int = 15) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return round(flop / statistics.median(times) / 1e9, 1)


def measure(shape: dict[str, int]) -> dict[str, float]:
    t, d, d_ff, e, k = shape["tokens"], shape["d"], shape["d_ff"], shape["experts"], shape["top_k"]
    rows = t * k // e
    x, w = torch.randn(rows * e, d), torch.randn(e, 2 * d_ff, d)
    h = torch.empty(rows * e, 2 * d_ff)
    dense_x, dense_w, dense_h = torch.randn(t, d), torch.randn(2 * d_ff * k, d), torch.empty(t, 2 * d_ff * k)

    def experts() -> None:
        for i in range(e):
            torch.mm(x[i * rows : (i + 1) * rows], w[i].t(), out=h[i * rows : (i + 1) * rows])

    def hot() -> None:
        for _ in range(e):
            torch.mm(x[:rows], w[0].t(), out=h[:rows])

    flop = 2.0 * rows * e * d * 2 * d_ff  # equal for the experts and the dense FFN
    row: dict[str, float] = {"rows_per_expert": rows}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row[f"experts_{threads}t"] = gflops(experts, flop)
        row[f"hot_{threads}t"] = gflops(hot, flop)
        row[f"dense_{threads}t"] = gflops(lambda: torch.mm(dense_x, dense_w.t(), out=dense_h), flop)
    return row


def main() -> None:
    torch.manual_seed(0)
    report = {"cpu": cpu_name(), "torch": torch.__version__}
    report["gflops"] = {name: measure(shape) for name, shape in SHAPES.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
