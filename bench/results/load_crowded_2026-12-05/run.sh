#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit: old (OLD, a worktree of
# d19a27d: a unit request waits for a version with its worker's own last result folded and written) against new
# (the working tree: not while 64 or more units are out, Job.crowded), alternated; the loop of
# ../load_half_at_write_2026-12-05/run.sh, with this folder as OUT. HELD=1: the clients name the base of their last
# unit as held (--held). Usage: [HELD=1] [EXTRA=...] run.sh old new new2 old2 (a run's name is its folder and log)
OUT=${OUT:-/work/main/bench/results/load_crowded_2026-12-05} exec bash "$(dirname "$0")/../load_half_at_write_2026-12-05/run.sh" "$@"
