#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit (the scenario, shorter):
# old (OLD, a worktree of 9926caa: a version's fp16 copy made by the first unit request that wants it) against
# new (the working tree: made with the version's write while copies are in use), alternated. Optional: HELD=1, the
# clients name the base of their last unit as held (--held); EXTRA, more coordinator options (after --extra)
set -u
OUT=${OUT:-/work/main/bench/results/load_half_at_write_2026-12-05}; mkdir -p $OUT
held=(); [[ ${HELD:-0} == 1 ]] && held=(--held)
cd /work/main
for run in "$@"; do   # e.g. old new old2 new2
  code=/work/main; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 90 --hold 5 --results-every 5 --model resnet_fast \
      --no-docs "${held[@]}" --out $OUT/$run --code $code --extra --codec topk ${EXTRA:-} > $OUT/$run.log 2>&1
  grep -E '"errors"' $OUT/$run.log | head -1
done
