#!/bin/bash
# profile the Redis leader under the 2-process results load
set -u
N=${N:-2}; OUT=${OUT:-/tmp/s24/redis_prof}; mkdir -p $OUT
cd /work/main
.venv/bin/python bench/load.py --clients 200 --duration 60 --hold 0.2 --results-every 1 --model resnet_fast \
  --limit-train 20000 --warmup 15 --redis $N --no-docs --out $OUT/run --extra --codec topk --shard-size 64 > $OUT/run.log 2>&1 &
pid=$!
for i in $(seq 1 240); do pgrep -f -- "--client-out" >/dev/null && break; sleep 1; done
sleep 15
ps -eo pid,cputimes,args --no-headers | grep -E "crowdtrain.*coordinator" | grep -v grep > $OUT/cpu-a
sleep 3
ps -eo pid,cputimes,args --no-headers | grep -E "crowdtrain.*coordinator" | grep -v grep > $OUT/cpu-b
leader=$(sort -k2 -n $OUT/cpu-b | tail -1 | awk "{print \$1}")
echo "leader $leader"
.venv/bin/py-spy record -p $leader -r 100 -d 25 -f raw --threads -o $OUT/leader.raw > /dev/null 2>&1
wait $pid
tail -3 $OUT/run.log
