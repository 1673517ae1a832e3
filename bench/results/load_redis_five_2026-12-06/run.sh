cd /work/main
for n in 2 4; do
  .venv/bin/python bench/load.py --clients 1000 --duration 300 --hold 5 --results-every 5 --model resnet_fast --no-docs --caddy --redis $n --out ${OUT:-bench/results/load_redis_five_2026-12-06}/redis$n --extra --codec topk > ${OUT:-bench/results/load_redis_five_2026-12-06}/redis$n.log 2>&1
done
