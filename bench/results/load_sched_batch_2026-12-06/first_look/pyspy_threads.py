"""pyspy_threads.py FILE[.gz] [N_SELF] [N_INCL]: per thread of a `py-spy record -f raw --threads` file, its share of the
samples and its top frames, self (innermost) and inclusive."""
import collections, gzip, re, sys
by_thread = collections.Counter(); self_c = collections.defaultdict(collections.Counter); incl = collections.defaultdict(collections.Counter)
for line in (gzip.open if sys.argv[1].endswith('.gz') else open)(sys.argv[1], 'rt'):
    stack, n = line.rstrip().rsplit(" ", 1); n = int(n)
    frames = stack.split(";")
    th = frames[0]
    # name thread by its outermost python frames
    key = th.split(" ")[0] + " " + (frames[1] if len(frames) > 1 else "")
    tname = th
    by_thread[tname] += n
    leaf = frames[-1]
    self_c[tname][re.sub(r"\s*\((.*/)?", " (", leaf)] += n
    for f in set(frames[1:]):
        incl[tname][re.sub(r"\s*\((.*/)?", " (", f)] += n
tot = sum(by_thread.values())
for t, n in by_thread.most_common():
    print(f"=== {t}: {n} ({n/tot:.1%})")
    for f, m in self_c[t].most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 12):
        print(f"   self {m:6d} {m/n:6.1%} {f}")
    for f, m in incl[t].most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 0):
        print(f"   incl {m:6d} {m/n:6.1%} {f}")
