"""benchmarks/gpu_check.sh, the one prepared GPU check, runs end to end on the CPU (--small), so it
is known to work before a GPU ever sees it: every stage reports, the table and its JSON are
written, and a failing check makes the exit status non-zero."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_cpu_dry_run_passes_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--small",
                           "--results", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check-cpu-small.json").read_text())
    checks = {r["check"].split(",")[0].split(" (")[0]: r for r in report["checks"]}
    for stage in ("test suite", "parity fp32", "parity bf16 autocast vs fp32 on cpu", "train bf16", "train fp16",
                  "train fp32", "torchrun --nproc_per_node=1", "data loader",
                  "training vs the public recipe in fp32 as published", "training vs the public recipe with bf16 "
                  "autocast added", "peak memory vs the recipe's", "model FLOP utilisation"):
        assert stage in checks, (stage, list(checks))
    assert all(r["status"] in ("pass", "info", "n/a (cpu)") for r in report["checks"]), report["checks"]
    assert checks["train fp16"]["status"] == "pass" and checks["torchrun --nproc_per_node=1"]["status"] == "pass"
    table = (tmp_path / "gpu_check-cpu-small.md").read_text()
    assert table.count("\n| ") == len(report["checks"]) + 1 and table in proc.stdout
