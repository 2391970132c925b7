#!/usr/bin/env bash
# Where a request's time through the tunnel goes, to tell the tunnel's own latency from the
# machine's: wrk inside a sandbox sends tunnel.sh's credential-attaching GETs while perf
# records the gateway's socket calls (reads and writes, with their fds). Per round it prints
# wrk's p50/p99, then the legs of each exchange (tests/bench/latency_legs.py):
# - in the tunnel: a client's request read until its response is written, upstream leg
#   included;
# - upstream: the request written to the pooled upstream connection until its response is
#   read;
# - client's turn: a response written until that client's next request is read (wrk's own
#   time, and any wait in the socket before the tunnel read it).
# Recording costs the gateway CPU, so the rates here are lower than tunnel.sh's; compare
# legs within a round, not these rates with tunnel.sh's.
# Run as root after `cargo build --release --workspace --bins`. Env: ROUNDS (4), DURATION
# seconds per round (4), CONNS (64). Needs wrk, nginx and perf: apt-get install wrk
# nginx-light linux-perf.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
duration=${DURATION:-4}
conns=${CONNS:-64}
rounds=${ROUNDS:-4}
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light linux-perf python3" wrk nginx perf python3 ss
work=$(mktemp -d /tmp/gateway-bench-legs.XXXXXX)
chmod 755 "$work"
trap 'upstream_nginx_stop "$work"; rm -rf "$work"' EXIT
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

up_port=$(free_port)
upstream_nginx "$work" "$up_port" 2
bench_policy bench-legs "$up_port" > "$work/policy.toml"
echo "wrk.path = \"http://127.0.0.1:$up_port/\"" > "$work/absolute.lua"
chmod 644 "$work/policy.toml" "$work/absolute.lua"

reads=syscalls:sys_enter_read,syscalls:sys_exit_read,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom
writes=syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto
echo "wrk -t2 -c$conns -d${duration}s inside the sandbox, through the tunnel; legs over the middle $((duration - 2)) s"
for r in $(seq "$rounds"); do
  BENCH_TOKEN=bench-secret-token GATEWAY_LOG=warn GATEWAY_STATE_DIR="$work/state" \
    "$work/gateway" run --policy "$work/policy.toml" --audit-log "$work/audit.jsonl" \
    --user nobody -- sh -c "wrk -t2 -c$conns -d${duration}s --latency -s $work/absolute.lua \"\$HTTP_PROXY/\"" \
    > "$work/wrk.out" &
  run=$!
  sleep 1
  gw=$(pgrep -f "$work/gateway run" | head -1)
  tunnel_port=$(ss -tlnpH | awk -v p="pid=$gw," '$0 ~ p {n = split($4, a, ":"); print a[n]; exit}')
  ss -tnpH > "$work/ss"
  perf record -q -o "$work/perf.data" -e "$reads,$writes" -p "$gw" -- sleep $((duration - 2)) \
    > /dev/null 2>&1
  wait "$run"
  echo "round $r: wrk p50 $(awk '$1 == "50%" {print $2}' "$work/wrk.out")," \
    "p99 $(awk '$1 == "99%" {print $2}' "$work/wrk.out")," \
    "$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out") req/s"
  perf script -i "$work/perf.data" 2>/dev/null |
    python3 "$root/tests/bench/latency_legs.py" "$work/ss" "$gw" "$tunnel_port" "$up_port"
done
