#!/usr/bin/env bash
# Issue 23 on one GPU machine: the seed's study (benchmarks/seed_study_gpu.py) in the background, across calls.
#
#   [PAIRS="cultural"] OUT=$OUT bash benchmarks/run_seed_study_gpu.sh [WAIT_S]     (carry .gpu_tgz .whl/core .whl/seed .whl/extra)
#
# The first call installs the wheels, unpacks the carried tokenizers and data, and starts the study in its own
# session (it outlives the call while the machine is held); every call then waits up to WAIT_S (default 540) for
# it, runs the capture benchmark once the study is done, and packs the logs and JSONs into $OUT/seed.tgz.
set -u
OUT=${OUT:?set OUT}
WAIT_S=${1:-540}
S=/tmp/seed_state
mkdir -p $S/out
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
if [ ! -f $S/started ]; then
  $PIP --target /tmp/site .whl/core/*.whl .whl/seed/*.whl >$S/out/pip.log 2>&1 || { echo "core wheels failed"; cat $S/out/pip.log; }
  $PIP --target /tmp/site_extra .whl/extra/*.whl >>$S/out/pip.log 2>&1 || echo "extra wheels failed"
  mkdir -p $S/carry && tar xzf .gpu_tgz/seed.tgz -C $S/carry
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    PYTHONPATH=/tmp/site python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  } > $S/out/machine.txt 2>&1
  cat $S/out/machine.txt
  touch $S/started
  PYTHONPATH=/tmp/site setsid nohup bash -c "python3 benchmarks/seed_study_gpu.py run --carry $S/carry/seed \
      --out $S/out --workdir /tmp/seed --budget-s 100000 --pairs ${PAIRS:-cultural cognitive} > $S/out/study.log 2>&1; echo \$? > $S/study_rc" \
      >/dev/null 2>&1 &
fi
t0=$SECONDS
while [ ! -f $S/study_rc ] && [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do sleep 5; done
if [ -f $S/study_rc ] && [ ! -f $S/capture_done ] && [ $((SECONDS - t0)) -lt $((WAIT_S - 200)) ]; then
  echo "study rc $(cat $S/study_rc); capture benchmark"
  (PYTHONPATH=/tmp/site:/tmp/site_extra timeout 200 python3 benchmarks/bench_capture.py \
      --device cuda --shape 8b --out $S/out/capture.json > $S/out/capture.log 2>&1)
  touch $S/capture_done
fi
grep -h '"stage"\|recovered\|stopped_before\|Error\|error' $S/out/study.log | cut -c1-400 | tail -40
tar czf "$OUT/seed.tgz" -C $S out
