#!/bin/bash
OUT=/work/main/bench/results/load_caddy_2026-12-05; mkdir -p $OUT
cd /work/main
for n in 2 0 4; do
  echo "[$(date -u +%H:%M:%S)] redis $n caddy load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 120 --hold 5 --results-every 5 --model resnet_fast \
      --redis $n --caddy --no-docs --out $OUT/redis$n-caddy --extra --codec topk > $OUT/redis$n-caddy.log 2>&1
  grep -E '"errors"|"accepted_per_s"' $OUT/redis$n-caddy.log
done
