#!/bin/bash
# 2 processes on Redis, every unit a result (the 2026-12-04 scenario): clients on both ports (as so far) against
# clients only on the port of the process that does not lead (--skip-leader), alternated
set -u
OUT=${OUT:-/work/main/bench/results/load_skip_leader_2026-12-05}; mkdir -p $OUT
cd /work/main
for run in "$@"; do   # e.g. both2 skip2 both2b skip2b
  flag=""; [[ $run == skip* ]] && flag="--skip-leader"
  n=${run:4:1}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 200 --duration 60 --hold 0.2 --results-every 1 --model resnet_fast \
      --limit-train 20000 --warmup 15 --redis $n $flag --no-docs --out $OUT/$run --extra --codec topk --shard-size 64 \
      > $OUT/$run.log 2>&1
  grep -E '"accepted_per_s"|"errors"' $OUT/$run.log | head -3
done
