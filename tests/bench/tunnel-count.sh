#!/usr/bin/env bash
# What one proxied request costs the tunnel, for A/B comparisons of builds: its user-space
# instructions, which a busy machine barely moves (two runs of one build agree within
# 0.5 %, where tunnel.sh's requests per second swing by 10-30 % here). The tunnel runs on its own (`examples/tunnel_alone.rs`: no sandbox, no eBPF) in
# front of a loopback nginx upstream, and wrk sends it the same absolute-form GETs with a
# credential attached as tunnel.sh does. Per request, over the middle of each run:
# - user-space instructions, counted by valgrind's callgrind (every thread of the tunnel,
#   the audit writer included; this machine's VM exposes no hardware counters to perf);
# - system calls and context switches (perf's software events) and user/system CPU time
#   from /proc, with the tunnel running natively (these do move with the machine's load:
#   a tunnel that is not saturated makes more epoll_wait calls per request).
# Requests are counted from the audit log (one record per request).
#
#   cargo build --release -p gateway --example tunnel_alone
#   tests/bench/tunnel-count.sh [TUNNEL_ALONE_BINARY...]
#
# With several binaries, rounds are interleaved (A B A B ...). Env: ROUNDS (2), WINDOW
# seconds counted (8), CONNS (64), NATIVE=0 to skip the native counts, KEEP_PROFILE=FILE keeps
# the last callgrind profile there (for callgrind_annotate).
# Needs wrk, nginx, valgrind, perf: apt-get install wrk nginx-light valgrind linux-perf.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${ROUNDS:-2}
window=${WINDOW:-8}
conns=${CONNS:-64}
native=${NATIVE:-1}
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/examples/tunnel_alone")
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light valgrind linux-perf" wrk nginx valgrind callgrind_control perf python3
work=$(mktemp -d /tmp/gateway-bench-count.XXXXXX)
chmod 755 "$work"
tunnel_pid=
stop_tunnel() {
  if [ -n "$tunnel_pid" ]; then
    exec 3>&-
    wait "$tunnel_pid" 2>/dev/null || true
    tunnel_pid=
  fi
}
trap 'stop_tunnel; upstream_nginx_stop "$work"; rm -rf "$work"' EXIT

up_port=$(free_port)
upstream_nginx "$work" "$up_port" 2
bench_policy bench-count "$up_port" > "$work/policy.toml"
echo "wrk.path = \"http://127.0.0.1:$up_port/\"" > "$work/absolute.lua"

# Starts the tunnel (under PREFIX...) with its stdin on fd 3; sets tunnel_pid and addr.
start_tunnel() { # BINARY PREFIX...
  local bin=$1
  shift
  rm -f "$work/ctl" "$work/addr" "$work/audit.jsonl"
  mkfifo "$work/ctl"
  BENCH_TOKEN=bench-secret-token GATEWAY_STATE_DIR="$work/state" \
    "$@" "$bin" "$work/policy.toml" "$work/audit.jsonl" < "$work/ctl" > "$work/addr" 2>> "$work/tunnel.err" &
  tunnel_pid=$!
  exec 3> "$work/ctl"
  for _ in $(seq 300); do [ -s "$work/addr" ] && break; sleep 0.1; done
  addr=$(head -1 "$work/addr")
  [ -n "$addr" ] || { echo "the tunnel did not start:" >&2; cat "$work/tunnel.err" >&2; exit 1; }
}
records() { wc -l < "$work/audit.jsonl"; }
load() { wrk -t2 -c"$conns" -d"$1"s -s "$work/absolute.lua" "http://$addr/" > "$work/wrk.out"; }

count_instructions() { # BINARY: prints user instructions per request
  start_tunnel "$1" valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" -q
  load $((window + 8)) &
  local wrk_pid=$! a b
  sleep 4
  callgrind_control -z "$tunnel_pid" > /dev/null 2>&1
  a=$(records)
  sleep "$window"
  callgrind_control -d "$tunnel_pid" > /dev/null 2>&1
  b=$(records)
  wait "$wrk_pid"
  stop_tunnel
  local dump ir sha
  dump=$(ls "$work"/cg.out.* | head -1)
  ir=$(awk '/^totals:/ {print $2}' "$dump")
  # The audit chain's SHA-256 runs on SHA-NI instructions natively; valgrind hides them
  # and counts the portable code instead, so it is also shown apart.
  sha=$(callgrind_annotate --threshold=100 "$dump" 2>/dev/null |
    awk '/sha2::sha256::compress256/ {gsub(",", "", $1); print $1; exit}')
  [ -z "${KEEP_PROFILE:-}" ] || cp "$dump" "$KEEP_PROFILE"; rm -f "$work"/cg.out*
  awk -v ir="$ir" -v sha="${sha:-0}" -v n=$((b - a)) \
    'BEGIN { printf "%.0f, of which sha256 blocks %.0f (%d requests)", ir / n, sha / n, n }'
}

count_native() { # BINARY: prints syscalls, context switches, user/sys us per request
  start_tunnel "$1"
  load $((window + 4)) &
  local wrk_pid=$! a b u0 s0 u1 s1
  sleep 2
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$tunnel_pid/stat")
  a=$(records)
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$tunnel_pid" -o "$work/perf.out" -- sleep "$window"
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$tunnel_pid/stat")
  b=$(records)
  wait "$wrk_pid"
  stop_tunnel
  local sys cs
  sys=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$work/perf.out")
  cs=$(awk -F, '/context-switches/ {print $1}' "$work/perf.out")
  awk -v n=$((b - a)) -v sys="$sys" -v cs="$cs" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v w="$window" \
    'BEGIN { hz = 100; printf "%.2f syscalls, %.2f cs, %.1f/%.1f us user/sys, %.0f req/s", sys / n, cs / n, u / hz / n * 1e6, s / hz / n * 1e6, n / w }'
}

echo "tunnel alone, wrk -t2 -c$conns, ${window}s counted per run, $rounds rounds"
for r in $(seq "$rounds"); do
  for i in "${!bins[@]}"; do
    echo "round $r, binary $i ($(basename "$(dirname "${bins[$i]}")")/$(basename "${bins[$i]}")): user instructions/request $(count_instructions "${bins[$i]}")"
    if [ "$native" = 1 ]; then
      echo "round $r, binary $i: per request $(count_native "${bins[$i]}")"
    fi
  done
done
