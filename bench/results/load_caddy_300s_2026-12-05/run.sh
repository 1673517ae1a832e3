#!/bin/bash
# 1,000 clients through Caddy for 5 minutes, after the job tail's index (4c7cb61): one process, 2 and 4 on Redis
OUT=/work/main/bench/results/load_caddy_300s_2026-12-05; mkdir -p $OUT
cd /work/main
for n in 2 4 0; do
  echo "[$(date -u +%H:%M:%S)] redis $n caddy 300 s, load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration 300 --hold 5 --results-every 5 --model resnet_fast \
      --redis $n --caddy --no-docs --out $OUT/redis$n --extra --codec topk > $OUT/redis$n.log 2>&1
  grep -E '"errors"|"accepted_per_s"' $OUT/redis$n.log
done
