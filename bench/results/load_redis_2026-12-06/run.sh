# The runs of this folder: 2 coordinator processes on Redis behind Caddy, 1,000 protocol clients, 120 s each.
# Usage (from the repository root): OUT=DIR OLD=/path/to/worktree bash bench/results/load_redis_2026-12-06/run.sh RUN...
# A run named old* runs the coordinator of the worktree $OLD (bench/load.py --code), the others this checkout's.
OUT=${OUT:-bench/results/load_redis_2026-12-06}
for r in "$@"; do
  case $r in old*) code="--code $OLD";; *) code="";; esac
  .venv/bin/python bench/load.py --clients 1000 --duration 120 --hold 5 --results-every 5 --model resnet_fast \
     --no-docs --caddy --redis 2 $code --out "$OUT/$r" --extra --codec topk > "$OUT/$r.log" 2>&1
done
