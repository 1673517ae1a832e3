#!/bin/bash
# threads.sh PID [SECONDS]: per thread of PID, from /proc/PID/task/*/{schedstat,status} sampled SECONDS apart:
# CPU time and run-queue wait (as % of wall time), voluntary and involuntary context switches a second.
# The event loop's thread is the one whose id is the PID (first line).
PID=$1; D=${2:-10}
snap() { for t in /proc/$PID/task/*; do echo "$(basename $t) $(cat $t/schedstat) $(grep -E '^(voluntary|nonvoluntary)_ctxt' $t/status | awk '{print $2}' | tr '\n' ' ')"; done; }
a=$(mktemp); b=$(mktemp)
snap | sort > $a; sleep $D; snap | sort > $b
join $a $b | awk -v d=$D -v pid=$PID '{printf "%-8s %s cpu %5.1f%%  rqwait %5.1f%%  vol/s %7.1f  invol/s %6.1f\n", $1, ($1==pid ? "loop  " : "thread"), ($7-$2)/d/1e7, ($8-$3)/d/1e7, ($10-$5)/d, ($11-$6)/d}' | sort -k2,2r -k4,4nr
rm -f $a $b
