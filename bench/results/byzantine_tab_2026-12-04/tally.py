"""Per run: the bench's results.json fields, with the mean staleness of folded results read from its state.db."""
import json, sqlite3, sys
from pathlib import Path
for d in sys.argv[1:]:
    d = Path(d)
    res = json.loads((d / "results.json").read_text())
    for r in res["runs"]:
        db = sqlite3.connect(d / r["run"] / "state" / "state.db")
        tab = r["tab"]["worker_id"] if r["tab"] else None
        def mean(sql, *a):
            v = db.execute(sql, a).fetchone()[0]
            return None if v is None else round(v, 3)
        st_tab = mean("SELECT avg(staleness) FROM results WHERE worker_id = ? AND applied_step IS NOT NULL", tab)
        st_py = mean("SELECT avg(staleness) FROM results WHERE worker_id != ? AND applied_step IS NOT NULL", tab or "")
        db.close()
        t, h = r["tab"] or {}, r["honest"]
        print(json.dumps(dict(seed=res["config"]["seed"], run=r["run"], acc=round(100 * r["final_test_acc"], 2),
              samples=r["samples"], wall_s=round(r["wall_s"]), tab_results=t.get("results"), tab_folded=t.get("folded"),
              tab_samples_folded=t.get("samples_folded"), tab_checked=t.get("checked"),
              tab_results_until_quarantined=t.get("results_until_quarantined"), tab_fates=t.get("fates"),
              tab_disagreements=t.get("disagreements"), honest_samples_folded=h["samples_folded"],
              honest_results=h["results"], replicas=h["replicas"], honest_checked=h["checked"],
              staleness_tab=st_tab, staleness_python=st_py)))
