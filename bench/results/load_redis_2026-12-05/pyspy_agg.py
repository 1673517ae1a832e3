import collections, re, sys
inc = collections.Counter(); selfc = collections.Counter(); total = 0; threads = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(' '); n = int(n); total += n
    frames = stack.split(';'); threads[frames[0]] += n
    seen = set()
    for f in frames[1:]:
        key = re.sub(r':\d+\)', ')', f)
        if key not in seen: inc[key] += n; seen.add(key)
    selfc[re.sub(r':\d+\)', ')', frames[-1])] += n
pat = sys.argv[2] if len(sys.argv) > 2 else 'coordinator/|contract/'
print('total', total); print('threads', threads.most_common(8))
print('--- inclusive (matching)')
for k, v in inc.most_common(400):
    if re.search(pat, k): print(f'{v:6d} {100*v/total:5.1f}% {k}')
print('--- self top')
for k, v in selfc.most_common(25): print(f'{v:6d} {100*v/total:5.1f}% {k}')
