#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit (issue 12's load scenario,
# shorter): old (OLD, a worktree of db2c003: every request for a version whose fp16 copy is not made yet waits
# for it) against new (the working tree, 6c40957: such a request is cut from the newest version whose copy is
# made, under publish's lag rule; the worker whose own result is in the newest still waits), alternated
set -u
OUT=${OUT:-/work/main/bench/results/load_ready_half_2026-12-05}; mkdir -p $OUT
cd /work/main
for run in "$@"; do   # e.g. old new new2 old2
  code=/work/main; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 90 --hold 5 --results-every 5 --model resnet_fast \
      --no-docs --out $OUT/$run --code $code --extra --codec topk > $OUT/$run.log 2>&1
  grep -E '"errors"' $OUT/$run.log | head -1
done
