#!/bin/bash
# side by side: old = /tmp/wt-old (9b75d27, with the new bench file), new = /work/main (24afc87)
cd /work/main
OUT=bench/out/cap-2026-12-04
for round in 1 2; do
  for code in old new; do
    if [ $code = old ]; then B=/tmp/wt-old/bench/coordinator_capacity.py; else B=bench/coordinator_capacity.py; fi
    for codec in fp16 fp32; do
      echo "[$(date +%T)] round $round $code $codec load $(cut -d' ' -f1 /proc/loadavg)"
      .venv/bin/python $B --sizes 10 --submissions 120 --clients 16 --codec $codec --no-docs --out $OUT/r$round-$code-$codec-10m 2>&1 | tail -1
      .venv/bin/python $B --sizes 0.1 1 --submissions 1000 --clients 16 --codec $codec --no-docs --out $OUT/r$round-$code-$codec-small 2>&1 | tail -2
    done
  done
done
echo "[$(date +%T)] done"
