"""Splits each request's time through the tunnel into legs, from the gateway's socket calls.

Reads `perf script` output of syscalls:sys_{enter,exit}_* tracepoints for the gateway's
threads on stdin. Argument: a file of `ss -tnpH` lines taken during the run, and the
tunnel's and the upstream's ports, which tell client sockets from upstream ones by fd.
Per socket, a read that returns data followed by a write is one exchange:
- a client socket: the request read, then the response written (time in the tunnel);
- an upstream socket: the request written, then the response read (the upstream leg);
- a client socket, the other way round: the response written, then the next request read
  (the client's turn, and the time the request waited before the tunnel read it).
"""

import re
import sys

READS = {"read", "recvfrom", "recvmsg", "readv"}
WRITES = {"write", "writev", "sendto", "sendmsg"}
EVENT = re.compile(
    r"^\s*\S+\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)$"
)
FD = re.compile(r"\bfd: (0x[0-9a-f]+)")


def roles(ss_file, pid, tunnel_port, upstream_port):
    """fd -> "client" or "upstream" for the gateway's TCP sockets."""
    found = {}
    for line in open(ss_file):
        cols = line.split()
        if len(cols) < 5:
            continue
        local, peer = cols[3].rsplit(":", 1)[1], cols[4].rsplit(":", 1)[1]
        for fd in re.findall(rf"pid={pid},fd=(\d+)", line):
            if local == tunnel_port:
                found[int(fd)] = "client"
            elif peer == upstream_port:
                found[int(fd)] = "upstream"
    return found


def main():
    ss_file, pid, tunnel_port, upstream_port = sys.argv[1:5]
    role = roles(ss_file, pid, tunnel_port, upstream_port)
    reading = {}  # thread -> fd of the read it is in
    read_at, wrote_at = {}, {}
    legs = {"in the tunnel": [], "upstream": [], "client's turn": []}
    for line in sys.stdin:
        m = EVENT.match(line)
        if not m:
            continue
        tid, t, phase, call, rest = m.groups()
        t = float(t)
        if phase == "enter":
            fd_match = FD.search(rest)
            if not fd_match:
                continue
            fd = int(fd_match.group(1), 16)
            if call in READS:
                reading[tid] = fd
            elif call in WRITES:
                if role.get(fd) == "client" and fd in read_at:
                    legs["in the tunnel"].append(t - read_at.pop(fd))
                    wrote_at[fd] = t
                elif role.get(fd) == "upstream":
                    wrote_at[fd] = t
        elif call in READS and tid in reading:
            fd = reading.pop(tid)
            ret = rest.strip()
            got = int(ret, 16) if ret.startswith("0x") else int(ret)
            if got <= 0 or got >= 1 << 63:
                continue
            if role.get(fd) == "upstream" and fd in wrote_at:
                legs["upstream"].append(t - wrote_at.pop(fd))
            elif role.get(fd) == "client":
                if fd in wrote_at:
                    legs["client's turn"].append(t - wrote_at.pop(fd))
                read_at[fd] = t
    for name, xs in legs.items():
        xs.sort()
        n = len(xs)
        if n == 0:
            print(f"  {name:14} no exchanges seen")
            continue

        def q(p):
            return xs[min(n - 1, int(n * p))] * 1e3

        print(
            f"  {name:14} p50 {q(0.5):6.2f}  p90 {q(0.9):6.2f}  p99 {q(0.99):6.2f}  "
            f"p99.9 {q(0.999):6.2f}  max {xs[-1] * 1e3:6.2f} ms  ({n} exchanges)"
        )


main()
