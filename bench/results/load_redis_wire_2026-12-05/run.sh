#!/bin/bash
# Redis's memory per unit with every unit answered by a result (all decided): old (OLD, a worktree of 9840e3e: a
# decided unit keeps its JSON as sent) against new (the working tree: RedisStore._decide drops it), 2 processes
set -u
OUT=${OUT:-/work/main/bench/results/load_redis_wire_2026-12-05}; mkdir -p $OUT
cd /work/main
for run in "$@"; do   # e.g. old new
  code=/work/main; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 200 --duration 60 --hold 0.2 --results-every 1 --model resnet_fast \
      --limit-train 20000 --warmup 15 --redis 2 --no-docs --out $OUT/$run --code $code --extra --codec topk \
      --shard-size 64 > $OUT/$run.log 2>&1
  grep -E '"errors"' $OUT/$run.log | head -1
done
