#!/bin/bash
# alternate old (45def25: the leader forwards its own port's requests to its service over loopback HTTP) / new (served in-process):
# 2 processes on Redis, every unit a result (the 2026-12-04 scenario), then 4
set -u
OUT=${OUT:-/work/main/bench/out/load_inprocess_2026-12-05}; mkdir -p $OUT
cd /work/main
for run in "$@"; do   # e.g. old2 new2 new4 old4
  code=${NEW:-/work/main}; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  n=${run:3:1}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 200 --duration 60 --hold 0.2 --results-every 1 --model resnet_fast \
      --limit-train 20000 --warmup 15 --redis $n --no-docs --out $OUT/$run --code $code --extra --codec topk --shard-size 64 \
      > $OUT/$run.log 2>&1 &
  pid=$!
  for i in $(seq 1 240); do pgrep -f -- "--client-out" >/dev/null && break; sleep 1; done
  sleep 20
  ps -eo pid,cputimes,args --no-headers | grep -E "coordinator|redis-server|load.py" | grep -v grep > $OUT/$run.cpu-a
  date +%s.%N > $OUT/$run.t-a
  sleep 30
  ps -eo pid,cputimes,args --no-headers | grep -E "coordinator|redis-server|load.py" | grep -v grep > $OUT/$run.cpu-b
  date +%s.%N > $OUT/$run.t-b
  wait $pid
  grep -E '"accepted_per_s"|"errors"' $OUT/$run.log | head -3
done
