#!/usr/bin/env bash
# For a later GPU lease (prepared 2026-12-04, not yet run on a GPU): where does the README main job's wall
# time go when its 2 workers train on CUDA, and what do bigger units or whole-version downloads buy?
# On the H200 (docs/results.md, "On a GPU machine") the job took 100-197 s against 30 s for one process on
# the same GPU, at -0.5 to -0.8 points: a unit of 1,024 samples is ~13 ms of GPU compute and ~0.4-0.8 s of
# cycle. Runs, one after the other on a quiet machine (same seed, same 500k-sample budget; the
# workers' --device auto finds the GPU):
#   default         the README's job (units of 8 steps x 128, version deltas)
#   fp32-versions   --version-download fp32 (no per-unit version delta on the coordinator)
#   shards-4        --shards-per-unit 4 (one pass over 4 shards: 32 steps, 4x the samples per unit, 4x fewer
#                   cycles, staler units)
#   shards-16       --shards-per-unit 16 (128 steps)
#   one-process     crowdtrain train --model resnet_fast --device cuda (the yardstick)
# Each job's log (progress every 10 s, the final accuracy, samples/s per worker) lands in OUT/gpu_units.tgz.
#
#   device run:  bash bench/gpu_units.sh                (data from .devdata/, results under $OUT)
#   here, a dry run on the CPU:  DEVICE=cpu LIMIT=2000 EPOCHS=1 OUT=/tmp/gu bash bench/gpu_units.sh
# Before the device call, here: mkdir -p .devdata && cp ../shared/data/cifar10-jpeg.tar.gz .devdata/ &&
# echo /.devdata/ >> .git/info/exclude; then run with carry [".devdata"] (19.6 MB; the GPU machine has no data).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_units}
DATA=${CROWDTRAIN_DATA:-.devdata/cifar10-jpeg.tar.gz}
DEVICE=${DEVICE:-cuda}                 # the one-process run's device (the workers take auto)
SEED=${SEED:-0}
LIMIT=${LIMIT:-}                       # dry runs: fewer training images
EPOCHS=${EPOCHS:-}                     # dry runs: a smaller budget (default: the recipe's)
RUN_S=${RUN_S:-130}                    # each job is stopped (Ctrl-C: a summary) after this long (4 x 130 s + one
                                       # process fits one 10-minute call)
PY=${PY:-python3}
W=${W:-/tmp/gpu_units}
export PYTHONUNBUFFERED=1 CROWDTRAIN_CACHE=$W/cache
rm -rf "$W" && mkdir -p "$W" "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$W/lease.log"; }
trap 'tar czf "$OUT/gpu_units.tgz" --exclude="*.pt" --exclude=cache --exclude="state-*" -C "$W" . 2>/dev/null' EXIT

$PY crowdtrain.py data --data "$DATA" > "$W/data.log" 2>&1 || { log "data failed"; cat "$W/data.log"; exit 1; }
common=(--data "$DATA" --seed "$SEED" --exit-when-done --progress-every 10 ${LIMIT:+--limit-train $LIMIT}
        ${EPOCHS:+--epochs $EPOCHS})
job() {   # name, extra flags...
  local name=$1; shift
  log "job $name: $*"
  $PY crowdtrain.py run "${common[@]}" --state "$W/state-$name" --port 18095 "$@" \
    > "$W/$name.log" 2>&1 &
  local pid=$! t0=$SECONDS
  while kill -0 $pid 2>/dev/null && (( SECONDS - t0 < RUN_S )); do sleep 2; done
  kill -INT $pid 2>/dev/null; wait $pid
  log "job $name: $(grep -E '^(finished|stopped)' "$W/$name.log" | tail -1)"
}
job default
job fp32-versions --version-download fp32
job shards-4 --shards-per-unit 4
job shards-16 --shards-per-unit 16
log "one process"
$PY crowdtrain.py train --model resnet_fast --device "$DEVICE" --seed "$SEED" --data "$DATA" --no-progress \
  ${LIMIT:+--limit-train $LIMIT} ${EPOCHS:+--epochs $EPOCHS} --out "$W/one-process" > "$W/one-process.log" 2>&1
log "one process: $(grep 'test accuracy' "$W/one-process.log")"
