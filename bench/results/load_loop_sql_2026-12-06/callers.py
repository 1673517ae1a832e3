"""Per innermost frame and its last coordinator callers: the samples of a loop_stack_watchdog_sitecustomize.py file
(each a 2-ms sample of the event loop's thread while one callback had run over 5 ms). Usage: callers.py FILE.stacks [N]"""
import collections, sys
c, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    n = int(n); total += n
    frames = [x.rsplit(":", 1)[0] for x in stack.split(";")]
    chain = [f for f in frames if "coordinator/" in f or "strategies/" in f]
    c[(frames[-1], " < ".join(reversed(chain[-4:])))] += n
print("samples", total)
for (leaf, chain), n in c.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    print(f"{n:5d} {leaf} | {chain}")
