import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1] + "/state.db")
print("results", db.execute("SELECT COUNT(*), SUM(check_state IS NOT NULL), SUM(applied_step IS NOT NULL), SUM(dropped IS NOT NULL) FROM results").fetchone())
print("dropped", db.execute("SELECT dropped, COUNT(*) FROM results WHERE dropped IS NOT NULL GROUP BY dropped").fetchall())
print("replicas", db.execute("SELECT COUNT(*) FROM units WHERE replica_of IS NOT NULL").fetchone())
for (r,) in db.execute("SELECT record FROM trust"):
    print(json.loads(r))
print("evals", db.execute("SELECT * FROM evals ORDER BY rowid DESC LIMIT 3").fetchall() if db.execute("SELECT name FROM sqlite_master WHERE name='evals'").fetchone() else "-")
