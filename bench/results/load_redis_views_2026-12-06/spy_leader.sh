#!/bin/bash
# usage: spy_leader.sh OUTFILE DELAY SECONDS : wait DELAY s after coordinators listen, find the leader, py-spy it
OUT=$1; DELAY=${2:-70}; SECS=${3:-30}
for i in $(seq 1 300); do
  n=$(pgrep -f "crowdtrain coordinator.*--redis" | wc -l)
  [ "$n" -ge 2 ] && break; sleep 1
done
sleep $DELAY
for pid in $(pgrep -f "crowdtrain coordinator.*--redis"); do
  port=$(tr '\0' ' ' < /proc/$pid/cmdline | sed -n 's/.*--port \([0-9]*\).*/\1/p')
  lead=$(curl -s --max-time 20 http://127.0.0.1:$port/api/v1/cluster | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
  echo "pid $pid port $port leader $lead"
  if [ "$lead" = "True" ]; then
    /tmp/pyspy/bin/py-spy record -p $pid -d $SECS -r 200 -f raw --threads --idle -o $OUT >/dev/null 2>&1
    echo "recorded $OUT"
  fi
done
