#!/usr/bin/env bash
# The cross-build robustness record (bench_builds.py) on a GPU machine that has torch but no network and no
# DVC: installs the carried wheels (.whl/core: transformers and its needs, see fetch_wheels.sh; .whl/dvc: DVC
# and what it needs that the machine lacks), then builds seeds x threads side by side.
#
#   OUT=/tmp/out bash benchmarks/run_builds_gpu.sh [--seeds 0 1 2] [--threads 1 2] [--jobs 6]
set -u
OUT=${OUT:-/tmp/builds_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
PIP="python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site"
$PIP .whl/core/*.whl .whl/dvc/*.whl .whl/dvc/*.tar.gz >"$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
python3 -c "import sys, torch, transformers, dvc, pandas; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'dvc', dvc.__version__, 'pandas', pandas.__version__, 'cuda', torch.cuda.is_available())"
[ $# -eq 0 ] && set -- --jobs 6
python3 benchmarks/bench_builds.py --workdir /tmp/builds --out "$OUT/builds.json" --markdown "$@"
rc=$?
for d in /tmp/builds/*/; do echo "== $d"; tail -4 "$d/repro.log"; done > "$OUT/tails.log" 2>&1
exit $rc
