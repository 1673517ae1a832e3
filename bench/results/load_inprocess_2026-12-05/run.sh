#!/bin/bash
# alternate old (45def25: the leader forwards its own port's requests to its service over loopback HTTP) / new
# (served in-process, not kept): 2 processes on Redis, every unit a result, then 4; the 2026-12-05 script:
#   bash bench/results/load_inprocess_2026-12-05/run.sh old2 new2 old2b new2b new4 old4   (OLD=/work/wt-old)
OUT=${OUT:-/work/main/bench/out/load_inprocess_2026-12-05} exec bash "$(dirname "$0")/../load_redis_2026-12-05/run.sh" "$@"
