#!/bin/bash
# 200 clients, every unit answered with a top-k result after 0.2 s, against one process (SQLite) and 2 and 4
# processes on Redis; the CPU seconds each process used during the load (ps, sampled after the warm-up and
# before the end).
set -u
OUT=${OUT:-bench/results/load_redis_2026-12-04}
for n in 0 2 4; do
  echo "[$(date -u +%H:%M:%S)] redis $n load $(cut -d' ' -f1-3 /proc/loadavg)"
  python bench/load.py --clients 200 --duration 60 --hold 0.2 --results-every 1 --model resnet_fast \
      --limit-train 20000 --warmup 15 --redis $n --no-docs --out $OUT/redis$n --extra --codec topk --shard-size 64 \
      > $OUT/redis$n.log 2>&1 &
  pid=$!
  # the clients start once the coordinators' start-up is done: wait for the clients' process, then 20 s
  for i in $(seq 1 240); do pgrep -f -- "--client-out" >/dev/null && break; sleep 1; done
  sleep 20
  ps -eo pid,cputimes,args --no-headers | grep -E "coordinator|redis-server|load.py" | grep -v grep > $OUT/redis$n.cpu-a
  date +%s.%N > $OUT/redis$n.t-a
  sleep 30
  ps -eo pid,cputimes,args --no-headers | grep -E "coordinator|redis-server|load.py" | grep -v grep > $OUT/redis$n.cpu-b
  date +%s.%N > $OUT/redis$n.t-b
  wait $pid
  tail -1 $OUT/redis$n.log
done
