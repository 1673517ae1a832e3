#!/bin/bash
# snapshot the coordinators during a load run: py-spy dumps and direct /api/v1/cluster latency
OUT=$1; mkdir -p $OUT; T0=$(date +%s)
sleep 20
while true; do
  t=$(( $(date +%s) - T0 ))
  pids=$(pgrep -f "crowdtrain coordinator" | tr '\n' ' ')
  [ -z "$pids" ] && break
  for p in $pids; do
    port=$(cat /proc/$p/cmdline | tr '\0' ' ' | grep -o -- '--port [0-9]*' | cut -d' ' -f2)
    lat=$(curl -s -o /dev/null -m 20 -w '%{time_total}' http://127.0.0.1:$port/api/v1/cluster)
    echo "$t pid=$p port=$port cluster_s=$lat threads=$(ls /proc/$p/task | wc -l) rss=$(grep VmRSS /proc/$p/status | awk '{print $2}')" >> $OUT/cluster.txt
    if [ $t -gt 150 ] && [ $t -lt 290 ]; then
      timeout 20 /work/main/.venv/bin/py-spy dump --pid $p > $OUT/dump-$t-$p.txt 2>&1
    fi
  done
  sleep 8
done
