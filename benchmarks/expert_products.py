"""Time of the six matrix products of one SwiGLU FFN training step, experts against the dense FFN.

For each shape of ``moe_layer.py``, each product of a forward + backward (``torch.mm``, fp32): run over
every expert's weights and its ``rows = tokens * top_k / experts`` rows in turn, as the layer does
(``experts``); the same number of times on expert 0's operands, hot in cache (``hot``); and once for the
dense FFN with the same active FLOPs (``tokens`` rows, ``d_ff * top_k`` wide). Each side does the same
FLOPs, so ``experts / dense`` is how much of the layer's gap to the dense FFN the products alone make.

    python benchmarks/expert_products.py                # 2 threads; prints JSON, medians in ms
    python benchmarks/expert_products.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from moe_layer import SHAPES, cpu_name, pin_malloc  # type: ignore[import-not-found]  # run from benchmarks/

# name: (out, a, b) of out = a @ b for one expert i, in the step's order. Operands of one expert, with
# n rows and f = d_ff: x (n, d), w_in (2f, d), h and grad_h (n, 2f), a and grad_a (n, f), w_down (d, f),
# g (n, d) the output gradient.
PRODUCTS = {
    "forward: h = x @ w_in.T": ("h", "x", "w_in.T"),
    "forward: y = a @ w_down.T": ("y", "a", "w_down.T"),
    "backward: grad_a = g @ w_down": ("grad_a", "g", "w_down"),
    "backward: grad_w_down = g.T @ a": ("grad_w_down", "g.T", "a"),
    "backward: grad_w_in = grad_h.T @ x": ("grad_w_in", "grad_h.T", "x"),
    "backward: grad_x = grad_h @ w_in": ("grad_x", "grad_h", "w_in"),
}


def median_ms(step: Callable[[], None], repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def operands(experts: int, rows: int, d: int, d_ff: int) -> list[dict[str, torch.Tensor]]:
    """Every expert's operands, as views into one buffer per kind (the layer's sorted rows)."""
    row_widths = dict.fromkeys(("x", "g", "y", "grad_x"), d) | {"a": d_ff, "grad_a": d_ff}
    row_widths |= {"h": 2 * d_ff, "grad_h": 2 * d_ff}
    weights = {"w_in": (2 * d_ff, d), "w_down": (d, d_ff)}
    weights |= {f"grad_{k}": shape for k, shape in weights.items()}
    rows_kind = {k: torch.randn(experts * rows, width).split(rows) for k, width in row_widths.items()}
    weight_kind = {k: torch.randn(experts, *s).unbind() for k, s in weights.items()}
    out = []
    for i in range(experts):
        ops = {k: v[i] for k, v in {**rows_kind, **weight_kind}.items()}
        ops.update({f"{k}.T": ops[k].t() for k in ("w_in", "w_down", "g", "grad_h")})
        out.append(ops)
    return out


def measure(shape: dict[str, int], repeats: int) -> dict[str, object]:
    t, d, d_ff, e, k = shape["tokens"], shape["d"], shape["d_ff"], shape["experts"], shape["top_k"]
    rows = t * k // e
    per_expert, dense = operands(e, rows, d, d_ff), operands(1, t, d, d_ff * k)[0]

    def run(ops: list[dict[str, torch.Tensor]], product: tuple[str, str, str]) -> Callable[[], None]:
        out, a, b = product

        def step() -> None:
            for o in ops:
                torch.mm(o[a], o[b], out=o[out])

        return step

    products: dict[str, dict[str, float]] = {}
    for name, product in PRODUCTS.items():
        products[name] = {
            "experts": median_ms(run(per_expert, product), repeats),
            "hot": median_ms(run([per_expert[0]] * e, product), repeats),
            "dense": median_ms(run([dense], product), repeats),
        }
    total = {side: sum(p[side] for p in products.values()) for side in ("experts", "hot", "dense")}
    rounded = {n: {s: round(v, 2) for s, v in p.items()} for n, p in products.items()}
    return {
        "rows_per_expert": rows,
        "products_ms": rounded,
        "total_ms": {s: round(v, 1) for s, v in total.items()},
        "experts / dense": round(total["experts"] / total["dense"], 3),
        "hot / dense": round(total["hot"] / total["dense"], 3),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    malloc = pin_malloc()  # as moe_layer.py: freed buffers are reused, not faulted in afresh
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict[str, object] = {"cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads}
    report["malloc"] = malloc
    report["shapes"] = {name: measure(SHAPES[name], args.repeats) for name in args.shapes}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
