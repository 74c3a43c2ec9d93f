#!/usr/bin/env bash
# The GPU checks in one run, at most about 8 minutes on one H100; writes one JSON (default gpu_suite.json):
#   tests    the gpu-marked tests: bf16-mixed training, torch._grouped_mm really running under bf16 and
#            matching the per-expert loop, FSDP, the compiled trunk (pass/fail counts and the failures);
#   moe      benchmarks/moe_layer.py --device cuda --dtype bf16: our MoE layer against a dense FFN of the same
#            active width and HF transformers' Mixtral block (eager and grouped_mm backends), forward+backward;
#   train    benchmarks/train_throughput.py --device cuda --precision bf16: whole training steps of the
#            default config, MoE and dense, eager and compiled: tokens/s, model FLOPs and MFU, peak memory.
# Needs the project installed (pip install -e . ; on a machine with torch already there, --no-deps plus
# soundfile and jsonargparse) and the mmdigits dataset (python datasets/mmdigits/prepare.py).
#   bash benchmarks/gpu_suite.sh [OUT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_suite.json}
work=$(mktemp -d)
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
timeout 300 python -m pytest -q -m gpu tests/test_gpu.py --junitxml="$work/tests.xml" | tail -5
timeout 120 python benchmarks/moe_layer.py --device cuda --dtype bf16 > "$work/moe.json"
timeout 240 python benchmarks/train_throughput.py --device cuda --precision bf16 --steps 20 > "$work/train.json"
python - "$work" "$out" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    path = work / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"error": f"{name}: {error}"}
tests = {"error": "no test report"}
if (work / "tests.xml").is_file():
    suite = ET.parse(work / "tests.xml").getroot().iter("testsuite").__next__()
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    tests = counts | {"failed": failed}
report = {"tests": tests, "moe": load("moe.json"), "train": load("train.json")}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}: tests {tests}")
PY
