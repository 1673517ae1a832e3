#!/bin/bash
# side by side: old = /work/wt-cap-old (c78ddde, with this bench file copied in), new = /work/wt-cap (branch
# cap10m); each runs its own bench/coordinator_capacity.py (the same file) with its own code; alternated.
# ROUNDS rounds of 10M fp16 (each result a delta of its own), SMALL_ROUNDS of 0.1M + 1M fp16, then one
# round of 10M with --same-delta (every result the same bytes, as the bench ran before).
OUT=${OUT:-/work/wt-cap/bench/results/coordinator_capacity_2026-12-04b}
ROUNDS=${ROUNDS:-3}; SMALL_ROUNDS=${SMALL_ROUNDS:-2}
run() {   # code tag args...
  local code=$1 tag=$2; shift 2
  if [ $code = old ]; then cd /work/wt-cap-old; else cd /work/wt-cap; fi
  echo "[$(date -u +%T)] $tag $code $(git rev-parse --short HEAD) load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/coordinator_capacity.py --clients 16 --codec fp16 --no-docs --out $OUT/$tag-$code "$@" 2>&1 | grep bench_mlp
}
for round in $(seq 1 $ROUNDS); do
  for code in old new; do run $code r$round-10m --sizes 10 --submissions 120; done
done
for round in $(seq 1 $SMALL_ROUNDS); do
  for code in old new; do run $code r$round-small --sizes 0.1 1 --submissions 1000; done
done
for code in old new; do run $code same-10m --sizes 10 --submissions 120 --same-delta; done
echo "[$(date -u +%T)] done load $(cut -d' ' -f1-3 /proc/loadavg)"
