#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit: old (OLD, a worktree of
# f0799cc: model versions and their fp16 copies written through the page cache) against new (the working tree:
# written with O_DIRECT from 1 MiB), alternated. HELD=1: the clients name the base of their last unit as held
# (--held). EXTRA: more coordinator options (after --extra). Usage: [HELD=1] [EXTRA=...] run.sh old new new2 old2
# (a run's name is its folder and log)
set -u
OUT=${OUT:-/work/main/bench/results/load_direct_2026-12-05}; mkdir -p $OUT
held=(); [[ ${HELD:-0} == 1 ]] && held=(--held)
cd /work/main
for run in "$@"; do
  code=/work/main; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 90 --hold 5 --results-every 5 --model resnet_fast \
      --no-docs "${held[@]}" --out $OUT/$run --code $code --extra --codec topk ${EXTRA:-} > $OUT/$run.log 2>&1
  grep -E '"errors"' $OUT/$run.log | head -1
done
