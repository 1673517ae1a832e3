#!/bin/bash
cd /work/main
export CROWDTRAIN_DATA=/work/shared/data
for round in 1 2; do
  for side in old new; do
    code=/work/main; [ $side = old ] && code=/tmp/wt-old
    echo "== $side round $round $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    .venv/bin/python bench/load.py --clients 1000 --duration 120 --hold 5 --results-every 5 --model resnet_fast \
      --no-docs --code $code --label $side-$round --out bench/out/load-2026-12-03/$side-$round --extra --codec topk 2>&1 | tail -25
  done
done
echo "== done $(date +%T)"
