#!/bin/bash
# one process, 1,000 clients straight to its port for 90 s, results every 5th unit: old (OLD, a worktree of
# 1f7e038: asyncio's event loop) against new (the working tree: uvloop's), alternated; the loop of
# ../load_half_at_write_2026-12-05/run.sh, with this folder as OUT. Usage: run.sh old new new2 old2
OUT=${OUT:-/work/main/bench/results/load_uvloop_2026-12-05} exec bash "$(dirname "$0")/../load_half_at_write_2026-12-05/run.sh" "$@"
