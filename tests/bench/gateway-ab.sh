#!/usr/bin/env bash
# Wall-clock A/B of two builds of the gateway binary, as tunnel.sh runs it: each round starts
# `gateway run` of one build with wrk inside the sandbox (-t2 -c64, absolute-form GETs with
# a credential attached, loopback nginx upstream), then of the other, the order alternating
# by round; prints each round's requests per second and B's rate over A's, and their median.
# For changes to how the gateway is built (the profile-guided build against a plain one),
# where tunnel-ab.sh's `tunnel_alone` cannot stand in: a profile is matched by the names
# cargo gives the gateway binary's own build.
#
#   tests/bench/gateway-ab.sh A_GATEWAY B_GATEWAY
#
# Run as root. Env: ROUNDS (16), DURATION seconds per run (3). Needs wrk and nginx.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${ROUNDS:-16}
duration=${DURATION:-3}
[ $# = 2 ] || { echo "usage: $0 A_GATEWAY B_GATEWAY" >&2; exit 2; }
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light" wrk nginx
work=$(mktemp -d /tmp/gateway-bench-gwab.XXXXXX)
chmod 755 "$work"
trap 'upstream_nginx_stop "$work"; rm -rf "$work"' EXIT
install -m 755 "$1" "$work/a"
install -m 755 "$2" "$work/b"
up_port=$(free_port)
upstream_nginx "$work" "$up_port" 2
bench_policy bench-gateway-ab "$up_port" > "$work/policy.toml"
echo "wrk.path = \"http://127.0.0.1:$up_port/\"" > "$work/absolute.lua"
chmod 644 "$work/policy.toml" "$work/absolute.lua"
rps() { # BUILD: requests per second through that build's tunnel
  BENCH_TOKEN=bench-secret-token GATEWAY_LOG=warn GATEWAY_STATE_DIR="$work/state" \
    "$work/$1" run --policy "$work/policy.toml" --audit-log "$work/audit.jsonl" --user nobody -- \
    sh -c "wrk -t2 -c64 -d${duration}s -s $work/absolute.lua \"\$HTTP_PROXY/\"" |
    awk '/Requests\/sec/ {printf "%.0f", $2}'
}
ratios=()
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then a=$(rps a); b=$(rps b); else b=$(rps b); a=$(rps a); fi
  ratios+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b / a}')")
  echo "round $r: A $a, B $b req/s, B/A ${ratios[-1]}"
done
echo "B/A requests per second: median $(median "${ratios[@]}")"
printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {printf "quartiles %s-%s\n", a[int((NR+3)/4)], a[int((3*NR+3)/4)]}'
