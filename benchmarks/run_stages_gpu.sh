#!/usr/bin/env bash
# Run the model stages of one pair of the embedded organisms on the GPU(s) of this machine, as the pipeline
# would (same stage scripts, a params copy with smaller sweeps), and print where each model was placed.
# Needs artifacts/models and data/filtered/<pair> (run `dvc repro filter_shared` first, or carry them).
#
#   OUT=/tmp/stages_gpu bash benchmarks/run_stages_gpu.sh [pair]
set -euo pipefail
PAIR=${1:-cultural}
OUT=${OUT:-/tmp/stages_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl/core ]; then  # the project's pinned transformers, whatever the machine has
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/core/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 - "$OUT/params.yaml" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["steer"].update(ks=[1, 2], alphas=[1.0, 2.0], max_prompts=16, n_bootstrap=50)
p["head_patch"].update(max_prompts=16, n_random=5, n_bootstrap=50)
p["behaviour"].update(max_prompts=32, n_bootstrap=100)
p["attribution"].update(max_prompts=32)
p["cka"].update(n_permutations=20, n_bootstrap=20)
open(sys.argv[1], "w").write(yaml.safe_dump(p, sort_keys=False))
PY
P="--params $OUT/params.yaml"
R="$OUT/results"; mkdir -p "$R"
python3 - "$OUT/params.yaml" "$PAIR" <<'PY'
import sys, torch
from stages.common import load_stage_params
from stages.pair_io import load_models
params = load_stage_params(sys.argv[1])
models = load_models(params, params.pairs[sys.argv[2]])
print("gpus", torch.cuda.device_count(), "placement", [str(next(m.parameters()).device) for m in models],
      "dtype", [str(next(m.parameters()).dtype) for m in models])
PY
t() { local name=$1; shift; local t0=$SECONDS; python3 -m "stages.$name" "$@" $P 2>&1 | grep -v -E "Loading weights|Writing|warn" | tail -4; echo "=== $name rc=${PIPESTATUS[0]} $((SECONDS - t0)) s"; }
t behaviour --pair "$PAIR" --filtered "data/filtered/$PAIR" --table "$R/behaviour.csv" --metrics "$R/behaviour.json" --fig "$R/behaviour.png"
t collect_acts --pair "$PAIR" --filtered "data/filtered/$PAIR" --out "$R/acts"
t cka --pair "$PAIR" --acts "$R/acts" --table "$R/cka.csv" --metrics "$R/cka.json" --fig "$R/cka.png" --change-rank "$R/change_rank.csv"
t layer_patch --pair "$PAIR" --filtered "data/filtered/$PAIR" --cka "$R/cka.csv" --table "$R/layer_patch.csv" --chosen "$R/layers.json" --fig "$R/lp.png"
t fit_clt --pair "$PAIR" --acts "$R/acts" --filtered "data/filtered/$PAIR" --chosen "$R/layers.json" --maps "$R/clt" --metrics "$R/clt.json" --fig "$R/clt.png"
t attribution scores --pair "$PAIR" --filtered "data/filtered/$PAIR" --out "$R/attribution.parquet"
t steer_sweep sweep --pair "$PAIR" --filtered "data/filtered/$PAIR" --layers "$R/layers.json" --table "$R/steer.csv" --info "$R/steer_info.json"
t head_patch --pair "$PAIR" --filtered "data/filtered/$PAIR" --layers "$R/layers.json" --table "$R/hp.csv" --metrics "$R/hp.json" --fig "$R/hp.png" --attribution "$R/attribution.parquet"
cp "$R/behaviour.csv" "$R/layer_patch.csv" "$R/layers.json" "$R/clt.json" "$OUT/" 2>/dev/null || true
