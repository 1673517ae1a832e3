#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit: old (OLD, a worktree of
# f0799cc: model versions and their fp16 copies written through the page cache) against new (the working tree:
# written with O_DIRECT from 1 MiB), alternated; the loop of ../load_half_at_write_2026-12-05/run.sh, with this
# folder as OUT. HELD=1: the clients name the base of their last unit as held (--held). EXTRA: more coordinator
# options (after --extra). Usage: [HELD=1] [EXTRA=...] run.sh old new new2 old2 (a run's name is its folder and log)
OUT=${OUT:-/work/main/bench/results/load_direct_2026-12-05} exec bash "$(dirname "$0")/../load_half_at_write_2026-12-05/run.sh" "$@"
