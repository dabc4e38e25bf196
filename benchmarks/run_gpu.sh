#!/usr/bin/env bash
# All GPU benchmarks of issue 9 in one go, on one CUDA machine, most important first.
#
#   OUT=/tmp/bench bash benchmarks/run_gpu.sh [capture collect heads sweep ridge]
#
# Writes <name>.json per benchmark and bench.log (progress, errors) under $OUT. If a .whl/ folder with
# core/ and extra/ wheels is present (a machine without the project's packages and no network), the
# wheels are installed into /tmp/site (transformers and its needs) and /tmp/site_extra (nnsight,
# TransformerLens and their needs) first. MECHDIFF_COMMIT names the commit in the JSON (no .git there).
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
LOG="$OUT/bench.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
if [ -d .whl/core ]; then
  $PIP --target /tmp/site .whl/core/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site || echo "core wheels failed" | tee -a "$LOG"
  $PIP --target /tmp/site_extra .whl/extra/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=${PYTHONPATH:-}:/tmp/site_extra \
    || echo "extra wheels (nnsight, TransformerLens) failed" | tee -a "$LOG"
fi
{
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, transformers.__file__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  python3 -m pip list 2>/dev/null | grep -i -E "^(torch|numpy|pandas|pyarrow|scikit-learn|safetensors|jaxtyping|einops) "
} 2>&1 | tee -a "$LOG"

run() {  # name timeout script args...
  local name=$1 limit=$2; shift 2
  echo "=== $name: python3 $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" python3 "$@" --out "$OUT/$name.json" 2>&1 >/dev/null | grep -v -E "^WARNING|warnings.warn" | tee -a "$LOG"
  echo "=== $name rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
}

SELECTED=" ${*:-capture collect heads sweep ridge} "
want() { [[ "$SELECTED" == *" $1 "* ]]; }
want capture && run capture 200 benchmarks/bench_capture.py --device cuda
want collect && run collect 200 benchmarks/bench_collect.py --device cuda --breakdown
want heads && run heads 150 benchmarks/bench_heads.py --device cuda --layer 22
want sweep && run sweep 330 benchmarks/bench_sweep.py --shape 8b --device cuda --prompts 50 --length 64 --new 16 --repeats 2
if want ridge; then
  echo "=== ridge: python3 benchmarks/bench_ridge_grid.py --n 10000 --d 4096 --device cuda" | tee -a "$LOG"
  t0=$SECONDS
  timeout 150 python3 benchmarks/bench_ridge_grid.py --n 10000 --d 4096 --device cuda >"$OUT/ridge.json" 2>>"$LOG"
  echo "=== ridge rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
fi
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        d = json.loads(p.read_text())
    except Exception as e:
        print(p.name, "unreadable:", e); continue
    keys = [k for k in d if "ratio" in k or "target" in k or k in ("median_s", "tokens_per_s", "speedup_sklearn_over_grid")]
    print(p.name, json.dumps({k: d[k] for k in keys}))
    for sub in ("steering_sweep", "head_patch"):
        if sub in d:
            print("  ", sub, json.dumps({k: v for k, v in d[sub].items() if not k.endswith("_s")}))
EOF
