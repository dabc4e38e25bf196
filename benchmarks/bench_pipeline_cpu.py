"""Benchmark: the DVC pipeline's bookkeeping on the CPU (issue 9, item 4).

Run in the project root after a full ``dvc repro`` (``make repro``). Measures, in this checkout:

1. a no-op ``dvc repro`` (everything cached): wall seconds, and that no stage ran;
2. a report-only threshold change (``report.sharp_entry_min`` nudged by +0.01 in params.yaml): wall
   seconds of ``dvc repro`` and the stages it ran (must be exactly ``report``);
3. the restore: params.yaml put back byte for byte and ``dvc repro`` rerun (report again).

Prints one JSON object. A fresh ``dvc repro`` of the whole default is timed by ``make repro`` on a clean
clone (stated in RESULTS.md), not here.

    python benchmarks/bench_pipeline_cpu.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def repro() -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    p = subprocess.run(DVC + ["repro"], cwd=ROOT, env=ENV, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"dvc repro failed:\n{p.stdout}\n{p.stderr}")
    return wall, sorted(re.findall(r"Running stage '([^']+)'", p.stdout + p.stderr))


def main() -> None:
    params = ROOT / "params.yaml"
    original = params.read_bytes()
    m = re.search(rb"(\n  sharp_entry_min: )([0-9.eE+-]+)", original)
    if not m:
        raise SystemExit("params.yaml has no report.sharp_entry_min")
    noop_wall, noop_ran = repro()
    nudged = original.replace(m.group(0), m.group(1) + str(round(float(m.group(2)) + 0.01, 6)).encode(), 1)
    try:
        params.write_bytes(nudged)
        change_wall, change_ran = repro()
    finally:
        params.write_bytes(original)
    restore_wall, restore_ran = repro()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    print(json.dumps({"benchmark": "pipeline_cpu", "commit": commit, "machine": platform.machine(),
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "noop_repro_s": round(noop_wall, 2), "noop_ran": noop_ran,
                      "report_threshold_change_s": round(change_wall, 2), "report_threshold_change_ran": change_ran,
                      "restore_s": round(restore_wall, 2), "restore_ran": restore_ran,
                      "targets": {"noop_repro_s": "< 5", "report_threshold_change_s": "< 30, only 'report'"}},
                     indent=2))


if __name__ == "__main__":
    main()
