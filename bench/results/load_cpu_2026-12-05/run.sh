#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit (the load section's scenario):
# old (OLD, a worktree of the code before) against new (NEW, default the working tree), alternated, with the coordinator's CPU
# seconds sampled 30 s apart in the steady state (<run>.cpu-a, <run>.cpu-b: `ps` cputimes). HELD=1: --held.
# Usage: run.sh old new new2 old2 (a run's name is its folder and log; names starting "old" run OLD's code)
set -u
OUT=${OUT:-/work/main/bench/results/load_cpu_2026-12-05}; mkdir -p $OUT
held=(); [[ ${HELD:-0} == 1 ]] && held=(--held)
cd /work/main
for run in "$@"; do
  code=${NEW:-/work/main}; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 90 --hold 5 --results-every 5 --model resnet_fast \
      --no-docs "${held[@]}" --out $OUT/$run --code $code --extra --codec topk ${EXTRA:-} > $OUT/$run.log 2>&1 &
  pid=$!
  for i in $(seq 1 240); do pgrep -f -- "--client-out" >/dev/null && break; sleep 1; done
  sleep 30
  ps -eo pid,cputimes,etimes,args --no-headers | grep -E "crowdtrain.*coordinator" | grep -v grep > $OUT/$run.cpu-a
  sleep 30
  ps -eo pid,cputimes,etimes,args --no-headers | grep -E "crowdtrain.*coordinator" | grep -v grep > $OUT/$run.cpu-b
  wait $pid
  grep -E '"errors"' $OUT/$run.log | head -1
done
