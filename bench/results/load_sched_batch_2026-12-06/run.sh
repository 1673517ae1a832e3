#!/bin/bash
# One process, 1,000 clients straight to its port, results every 5th unit (the load section's scenario), 90 s
# (DURATION), old (OLD, a worktree of the code before) against new (NEW, default /work/main), alternated; the
# coordinator's threads' scheduler counters over 15 s of the steady state (<run>.threads: threads.sh).
# Usage: run.sh new1 old1 old2 new2   (names starting "old" run OLD's code)
set -u
HERE=$(cd "$(dirname "$0")" && pwd); OUT=${OUT:-$HERE}; mkdir -p "$OUT"
cd /work/main
for run in "$@"; do
  code=${NEW:-/work/main}; [[ $run == old* ]] && code=${OLD:-/work/wt-old}
  echo "[$(date -u +%H:%M:%S)] $run load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python bench/load.py --clients 1000 --duration ${DURATION:-90} --hold 5 --results-every 5 --model resnet_fast \
      --no-docs --out "$OUT/$run" --code "$code" --extra --codec topk > "$OUT/$run.log" 2>&1 &
  lp=$!
  for i in $(seq 1 240); do pgrep -f -- "--client-out" >/dev/null && break; sleep 1; done
  sleep 30
  "$HERE/threads.sh" "$(pgrep -f "crowdtrain coordinator" | head -1)" 15 > "$OUT/$run.threads"
  wait $lp
  python3 "$HERE/row.py" "$OUT" "$run"
done
