#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit: old (OLD, a worktree of
# db2c003: every request for a version whose fp16 copy is not made yet waits for it) against new (the working
# tree, 6c40957: such a request is cut from the newest version whose copy is made), alternated; the loop of
# ../load_half_at_write_2026-12-05/run.sh, with this folder as OUT. Usage: run.sh old new new2 old2
OUT=${OUT:-/work/main/bench/results/load_ready_half_2026-12-05} exec bash "$(dirname "$0")/../load_half_at_write_2026-12-05/run.sh" "$@"
