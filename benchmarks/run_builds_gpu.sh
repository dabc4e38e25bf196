#!/usr/bin/env bash
# The cross-build robustness record (bench_builds.py) on a lent GPU machine's CPUs, in the background across
# calls. The machine has torch but no network and no DVC: the first call installs the carried wheels
# (.whl/core: transformers and its needs, see fetch_wheels.sh; .whl/dvc: DVC; .whl/seed: math-verify and the
# rest of the seed's needs), starts bench_builds.py in its own session (it outlives the call while the machine
# is held) and every call waits up to WAIT_S seconds, then copies the record so far to $OUT.
#
#   OUT=$OUT bash benchmarks/run_builds_gpu.sh [WAIT_S] [bench_builds args ...]
#       (carry .whl/core .whl/dvc .whl/seed; default args: --seeds 0 1 2 --threads 1 2 --jobs 6 --cpu-only)
set -u
OUT=${OUT:?set OUT}
WAIT_S=${1:-540}
shift || true
[ $# -eq 0 ] && set -- --seeds 0 1 2 --threads 1 2 --jobs 6 --cpu-only
S=/tmp/builds_state
mkdir -p $S
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
if [ ! -f $S/started ]; then
  PIP="python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site"
  $PIP .whl/core/*.whl .whl/dvc/*.whl .whl/dvc/*.tar.gz .whl/seed/*.whl >$S/install.log 2>&1 || { tail -5 $S/install.log; exit 1; }
  PYTHONPATH=/tmp/site python3 -c "import sys, torch, transformers, dvc, pandas; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'dvc', dvc.__version__, 'cpus', __import__('os').cpu_count())" | tee $S/machine.txt
  touch $S/started
  PYTHONPATH=/tmp/site setsid nohup bash -c "python3 benchmarks/bench_builds.py --workdir /tmp/builds --out $S/builds.json --markdown $* > $S/builds.log 2>&1; echo \$? > $S/rc" >/dev/null 2>&1 &
fi
t0=$SECONDS
while [ ! -f $S/rc ] && [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do sleep 5; done
for d in /tmp/builds/*/; do echo "== $d $(grep -c "Running stage" $d/repro.log 2>/dev/null) stages"; tail -3 "$d/repro.log" 2>/dev/null; done > $S/tails.log 2>&1
cp $S/*.json $S/*.log $S/machine.txt "$OUT"/ 2>/dev/null
[ -f $S/rc ] && echo "bench_builds rc $(cat $S/rc)" || echo "still running after ${WAIT_S}s"
grep '"seed"' $S/builds.log | cut -c1-300
