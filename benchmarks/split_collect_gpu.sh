#!/usr/bin/env bash
# collect_acts split over two GPUs (one worker per GPU, then the assembling run), compared byte for byte with
# the single-GPU output of the same pair. Run after benchmarks/scale_8b.py (it uses that pair's inputs).
#
#   OUT=/tmp/split bash benchmarks/split_collect_gpu.sh [pair]
set -euo pipefail
PAIR=${1:-scale8b}
OUT=${OUT:-/tmp/split_out}
mkdir -p "$OUT"
F=data/filtered/$PAIR
SPLIT=/tmp/acts_split_$PAIR
rm -rf "$SPLIT" "/tmp/.acts_split_$PAIR.partial"
t0=$(date +%s.%N)
for i in 0 1; do
  CUDA_VISIBLE_DEVICES=$i python3 -m stages.collect_acts --pair "$PAIR" --filtered "$F" --out "$SPLIT" --worker "$i/2" \
    > "$OUT/worker$i.log" 2>&1 &
done
wait
t1=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 python3 -m stages.collect_acts --pair "$PAIR" --filtered "$F" --out "$SPLIT" > "$OUT/assemble.log" 2>&1
t2=$(date +%s.%N)
n=0; bad=0
while IFS= read -r f; do
  n=$((n + 1)); cmp -s "artifacts/acts/$PAIR/$f" "$SPLIT/$f" || { bad=$((bad + 1)); echo "differs: $f"; }
done < <(cd "artifacts/acts/$PAIR" && find . -type f | sort)
python3 - "$OUT/split.json" "$t0" "$t1" "$t2" "$n" "$bad" <<'PY'
import json, sys
out, t0, t1, t2, n, bad = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5]), int(sys.argv[6])
r = {"workers_wall_s": round(t1 - t0, 1), "assemble_wall_s": round(t2 - t1, 1), "files_compared": n,
     "files_differing": bad, "byte_identical": bad == 0}
json.dump(r, open(out, "w"), indent=1); print(json.dumps(r))
PY
grep -h "finished its shards\|shard" "$OUT"/worker*.log | tail -8
