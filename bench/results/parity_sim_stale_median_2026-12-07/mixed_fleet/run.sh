#!/bin/bash
# A tab among 2 local Python workers on the README's default job, with --stale-median 2: whose results are refused?
cd /tmp/x2
rm -rf /tmp/mixed_state; mkdir -p /tmp/mixed_out
.venv/bin/python -m crowdtrain run --data /work/shared/data --state /tmp/mixed_state --port 8391 --workers 2 $EXTRA > /tmp/mixed_out/run.log 2>&1 &
RUN=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8391/api/status > /dev/null && break; sleep 2; done
timeout 400 node worker_web/drive.mjs "http://127.0.0.1:8391/?throttle=100" --click --units 8 --timeout 360 > /tmp/mixed_out/drive.json 2>/tmp/mixed_out/drive.err
curl -s http://127.0.0.1:8391/api/status > /tmp/mixed_out/status.json
kill -INT $RUN; wait $RUN
.venv/bin/python - <<'PY'
import sqlite3, json, collections
db = sqlite3.connect('/tmp/mixed_state/state.db')
backend = {w: json.loads(r).get("backend") for w, r in db.execute("select worker_id, record from trust")}
for w, in db.execute("select distinct worker_id from units"):
    st = collections.Counter(s for s, in db.execute("select status from units where worker_id=? and replica_of is null", (w,)))
    stale = [s for s, in db.execute("select staleness from results where worker_id=?", (w,))]
    print(w, backend.get(w), dict(st), "accepted staleness: mean %.2f max %s" % (sum(stale) / max(1, len(stale)), max(stale, default=None)), "n", len(stale))
print(json.load(open('/tmp/mixed_out/status.json')).get("staleness_cap"), json.load(open('/tmp/mixed_out/status.json')).get("units_rejected"))
PY
