#!/usr/bin/env bash
# One lease of a GPU machine, every GPU measurement side by side in one prepared run (the device
# tool gives a session about 15 minutes of one H200, start included; nothing there can be fetched):
#   1. bench/gpu_unit.py      a Python worker's unit throughput, CUDA against the machine's CPU
#   2. bench/seed_models.py   the paper's three models at its 50 epochs, 3 seeds, one process per run,
#                             all on the one GPU at once (their seconds are shared-GPU seconds)
#   3. bench/replica_tolerance.py   an honest unit on the CPU against the same unit on CUDA
#   4. crowdtrain run         the README's main job with its 2 local workers training on CUDA
# At BUDGET_S seconds whatever still runs is stopped (SIGINT: the trainers keep what they wrote),
# and everything small comes back as OUT/gpu_lease.tgz (no model files).
#
#   device run:  bash bench/gpu_lease.sh          (data from .devdata/, results under $OUT)
#   here, a dry run on the CPU:  DEVICE=cpu EPOCHS=1 LIMIT=2000 BUDGET_S=200 OUT=/tmp/g bash bench/gpu_lease.sh
# Before the device call, here: mkdir -p .devdata && cp ../shared/data/cifar10-jpeg.tar.gz .devdata/ &&
# echo /.devdata/ >> .git/info/exclude; then run with carry [".devdata"] (19.6 MB; the GPU machine has no data).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_lease}
DATA=${CROWDTRAIN_DATA:-.devdata/cifar10-jpeg.tar.gz}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-50}
SEEDS=${SEEDS:-"0 1 2"}
MODELS=${MODELS:-"cnn alexnet physics_alexnet"}
BUDGET_S=${BUDGET_S:-470}
LIMIT=${LIMIT:-}                       # dry runs: fewer training images for the main job
PY=${PY:-python3}
W=${W:-/tmp/gpu_lease}
export PYTHONUNBUFFERED=1 CROWDTRAIN_CACHE=$W/cache
rm -rf "$W" && mkdir -p "$W/seed" "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$W/lease.log"; }

bundle() {
  log "bundling"
  tar czf "$OUT/gpu_lease.tgz" --exclude='*.pt' --exclude='cache' --exclude='main_state' -C "$W" . 2>/dev/null
  cp "$W/lease.log" "$OUT/lease.log" 2>/dev/null
}
trap bundle EXIT

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g; } > "$W/machine.txt" 2>&1
$PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" >> "$W/machine.txt" 2>&1
cat "$W/machine.txt"
(command -v nvidia-smi >/dev/null && nvidia-smi dmon -s um -d 5 > "$W/dmon.txt" 2>&1) &
dmon=$!

log "decoding CIFAR-10 once into the cache"
$PY crowdtrain.py data --data "$DATA" > "$W/data.log" 2>&1 || { log "data failed"; cat "$W/data.log"; exit 1; }

log "1. unit throughput (alone on the machine)"
timeout 100 $PY bench/gpu_unit.py --data "$DATA" --devices "$DEVICE" --steps 20 --repeats 3 \
  --out "$W/gpu_unit" > "$W/gpu_unit.log" 2>&1
cat "$W/gpu_unit.log"

log "2. seed models: $MODELS x seeds $SEEDS at $EPOCHS epochs on $DEVICE, one process each"
pids=()
for s in $SEEDS; do
  for m in $MODELS; do
    $PY bench/seed_models.py --data "$DATA" --device "$DEVICE" --threads 1 --epochs "$EPOCHS" --models "$m" \
      --seeds "$s" --out "$W/seed/$m-s$s" --no-docs > "$W/seed/$m-s$s.log" 2>&1 &
    pids+=($!)
  done
done

log "3. replica tolerance, CPU against $DEVICE"
timeout 200 $PY bench/replica_tolerance.py --data "$DATA" --models cnn resnet_fast --threads 4 --devices "$DEVICE" \
  --out "$W/replica" --results-md "$W/replica.md" > "$W/replica.log" 2>&1 &
replica=$!

log "4. the README's main job, its 2 workers on $DEVICE"
$PY crowdtrain.py run --data "$DATA" --state "$W/main_state" --port 18080 --exit-when-done --progress-every 20 \
  ${LIMIT:+--limit-train $LIMIT} > "$W/main_job.log" 2>&1 &
main=$!

# the CPU side of the unit throughput, beside the rest (it needs no GPU; its cores are shared)
timeout 150 $PY bench/gpu_unit.py --data "$DATA" --devices cpu --models cnn resnet_fast --steps 5 --repeats 2 \
  --threads 4 --out "$W/cpu_unit" > "$W/cpu_unit.log" 2>&1 &

while (( SECONDS - start < BUDGET_S )); do
  running=0
  for p in "${pids[@]}" "$main" "$replica"; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
  (( running == 0 )) && break
  sleep 5
done
log "stopping what still runs"
for p in "${pids[@]}" "$main" "$replica"; do kill -INT "$p" 2>/dev/null; done
sleep 8
for p in "${pids[@]}" "$main" "$replica"; do kill -KILL "$p" 2>/dev/null; done
kill "$dmon" 2>/dev/null
pkill -f "crowdtrain worker" 2>/dev/null
for f in "$W"/seed/*.log; do echo "== $f"; grep -E "seed [0-9]+:|^epoch (1|10|20|30|40|50):" "$f" | tail -4; done
tail -5 "$W/main_job.log"; tail -3 "$W/replica.log"; cat "$W/cpu_unit.log"
