#!/bin/bash
# Old (407c0e8, a worktree at /work/wt-old) and new (the delta log) alternated; each runs its own tree's
# bench/coordinator_capacity.py (the same file in both) with the main checkout's venv.
set -u
OUT=${OUT:-bench/results/coordinator_capacity_2026-12-04c}
PY=/work/main/.venv/bin/python
for round in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then dir=/work/wt-old; else dir=/work/main; fi
    echo "[$(date -u +%H:%M:%S)] r$round small $side load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd $dir && $PY bench/coordinator_capacity.py --clients 16 --codec fp16 --no-docs --sizes 0.1 1 --submissions 1000 \
       --out /work/main/$OUT/r$round-small-$side 2>&1 | grep bench_mlp)
  done
done
for round in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then dir=/work/wt-old; else dir=/work/main; fi
    echo "[$(date -u +%H:%M:%S)] r$round 10m $side load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd $dir && $PY bench/coordinator_capacity.py --clients 16 --codec fp16 --no-docs --sizes 10 --submissions 120 \
       --out /work/main/$OUT/r$round-10m-$side 2>&1 | grep bench_mlp)
  done
done
