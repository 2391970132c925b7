#!/usr/bin/env bash
# Wall-clock A/B of builds of the tunnel on its own (`examples/tunnel_alone`), for changes
# whose cost callgrind does not see (system calls, wakeups): each round runs wrk (-t2 -c64,
# absolute-form GETs with a credential attached, loopback nginx upstream, no sandbox)
# against every binary in turn, and prints each one's requests per second, its voluntary
# context switches per request (all its threads, from /proc), and its rate over the first
# binary's. Every other round runs them in reverse order (the first run after another
# binary's may find the upstream in another state); compare the medians of the ratios.
#
#   tests/bench/tunnel-ab.sh BASE_TUNNEL_ALONE OTHER_TUNNEL_ALONE...
#
# Env: ROUNDS (12), DURATION seconds per run (3). Needs wrk and nginx.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${ROUNDS:-12}
duration=${DURATION:-3}
[ $# -ge 2 ] || { echo "usage: $0 BASE_BINARY OTHER_BINARY..." >&2; exit 2; }
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light" wrk nginx
work=$(mktemp -d /tmp/gateway-bench-ab.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  upstream_nginx_stop "$work"
  rm -rf "$work"
}
trap cleanup EXIT
up_port=$(free_port)
upstream_nginx "$work" "$up_port" 2
bench_policy bench-ab "$up_port" > "$work/policy.toml"
echo "wrk.path = \"http://127.0.0.1:$up_port/\"" > "$work/absolute.lua"
addrs=()
for i in $(seq 0 $(($# - 1))); do
  bin=${*:$((i + 1)):1}
  mkfifo "$work/$i.ctl"
  BENCH_TOKEN=bench-secret-token GATEWAY_STATE_DIR="$work/state-$i" \
    "$bin" "$work/policy.toml" "$work/$i.audit" < "$work/$i.ctl" > "$work/$i.out" 2> "$work/$i.err" &
  pids+=($!)
  exec {fd}> "$work/$i.ctl"
  for _ in $(seq 100); do [ -s "$work/$i.out" ] && break; sleep 0.1; done
  addrs+=("$(head -1 "$work/$i.out")")
  [ -n "${addrs[-1]}" ] || { echo "$bin did not start:" >&2; cat "$work/$i.err" >&2; exit 1; }
done
voluntary() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {s += $2} END {print s}'; }
declare -A ratios
for r in $(seq "$rounds"); do
  order=("${!addrs[@]}")
  if [ $((r % 2)) = 0 ]; then
    order=($(printf '%s\n' "${order[@]}" | sort -rn))
  fi
  declare -A rps=() switches=()
  for i in "${order[@]}"; do
    v0=$(voluntary "${pids[$i]}")
    rps[$i]=$(wrk -t2 -c64 -d"${duration}s" -s "$work/absolute.lua" "http://${addrs[$i]}/" |
      awk '/Requests\/sec/ {printf "%.0f", $2}')
    v1=$(voluntary "${pids[$i]}")
    switches[$i]=$(awk -v v=$((v1 - v0)) -v n="${rps[$i]}" -v d="$duration" \
      'BEGIN {printf "%.2f", v / (n * d)}')
  done
  line="round $r:"
  for i in "${!addrs[@]}"; do
    ratio=$(awk -v a="${rps[$i]}" -v b="${rps[0]}" 'BEGIN {printf "%.2f", a / b}')
    ratios[$i]="${ratios[$i]:-} $ratio"
    line="$line [$i] ${rps[$i]} req/s, ${switches[$i]} voluntary switches/request, x$ratio;"
  done
  echo "$line"
done
for i in "${!addrs[@]}"; do
  [ "$i" = 0 ] && continue
  echo "[$i] ${*:$((i + 1)):1} over [0]: median $(median "${ratios[$i]}")"
done
