#!/usr/bin/env python3
"""Where a process's resident memory is: its largest mappings by Rss from
/proc/PID/smaps, and totals by kind (binary, heap, other anonymous, stacks).

    python3 ops/smaps-top.py PID [N]

Thread stacks are anonymous mappings of 2 MiB + guard; glibc malloc arenas of
threads other than main are anonymous mappings of up to 64 MiB (reserved, touched on
use); one large anonymous mapping is usually one large allocation (a preallocated
buffer)."""
import re
import sys

pid, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
maps, cur = [], None
for line in open(f"/proc/{pid}/smaps"):
    head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
    if head:
        lo, hi = int(head[1], 16), int(head[2], 16)
        cur = {"size": (hi - lo) // 1024, "perms": head[3], "name": head[4] or "[anon]",
               "rss": 0}
        maps.append(cur)
    elif line.startswith("Rss:"):
        cur["rss"] = int(line.split()[1])

def kind(m):
    n = m["name"]
    if n.startswith("/"):
        return "file: " + n.rsplit("/", 1)[-1]
    return n

totals = {}
for m in maps:
    totals[kind(m)] = totals.get(kind(m), 0) + m["rss"]
total = sum(totals.values())
print(f"total Rss {total / 1024:.1f} MiB in {len(maps)} mappings")
for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {v / 1024:7.1f} MiB  {k}")
print(f"largest mappings:")
for m in sorted(maps, key=lambda m: -m["rss"])[:top]:
    print(f"  {m['rss'] / 1024:7.1f} MiB resident of {m['size'] / 1024:8.1f} MiB  {m['perms']}  {m['name']}")
