#!/usr/bin/env bash
# How much of the tunnel's gap to nginx is hyper's own: three proxies in front of the same
# loopback nginx upstream, driven by the same wrk (-t2 -c64, absolute-form GETs for the two
# forward proxies), rounds alternating in a rotating order:
# - nginx as a reverse proxy doing the job of tunnel.sh's baseline;
# - the floor (`examples/hyper_floor.rs`): a bare forward proxy on the tunnel's hyper, tokio,
#   allocator and thread layout, with no identity, policy, checks or audit record;
# - the tunnel on its own (`examples/tunnel_alone.rs`, as in tunnel-count.sh), with the
#   credential attached and one audit record per request.
# No sandbox on either side (wrk runs outside one), so it needs no privileges beyond nginx's.
# Prints each round's requests per second and ratios, and their medians. With COUNT=1 it
# also counts user-space instructions per request of the floor and the tunnel under
# valgrind's callgrind, as tunnel-count.sh does (the tunnel's SHA-256 shown apart).
#
#   cargo build --release -p gateway --example tunnel_alone --example hyper_floor
#   tests/bench/floor.sh
#
# Env: ROUNDS (15), DURATION seconds per run (3), COUNT=1, WINDOW seconds counted (8).
# Needs wrk and nginx (apt-get install wrk nginx-light), and valgrind for COUNT=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${ROUNDS:-15}
duration=${DURATION:-3}
window=${WINDOW:-8}
examples=$root/target/release/examples
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light" wrk nginx python3
for bin in tunnel_alone hyper_floor; do
  [ -x "$examples/$bin" ] || { echo "build it first: cargo build --release -p gateway --example $bin" >&2; exit 2; }
done
work=$(mktemp -d /tmp/gateway-bench-floor.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  exec 3>&- 4>&- 2>/dev/null || true
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  baseline_nginx_stop "$work"
  upstream_nginx_stop "$work"
  rm -rf "$work"
}
trap cleanup EXIT

up_port=$(free_port)
ngx_port=$(free_port)
upstream_nginx "$work" "$up_port" 2
baseline_nginx "$work" "$ngx_port" "$up_port"
bench_policy bench-floor "$up_port" > "$work/policy.toml"
echo "wrk.path = \"http://127.0.0.1:$up_port/\"" > "$work/absolute.lua"

# start NAME FD PREFIX... BINARY ARGS...: runs it with its stdin on fd FD (closing FD stops
# it); sets addr to the address it listens on.
start() {
  local name=$1 fd=$2
  shift 2
  mkfifo "$work/$name.ctl"
  BENCH_TOKEN=bench-secret-token GATEWAY_STATE_DIR="$work/state" \
    "$@" < "$work/$name.ctl" > "$work/$name.out" 2>> "$work/$name.err" &
  pids+=($!)
  eval "exec $fd> \"$work/$name.ctl\""
  for _ in $(seq 300); do [ -s "$work/$name.out" ] && break; sleep 0.1; done
  addr=$(head -1 "$work/$name.out")
  [ -n "$addr" ] || { echo "$name did not start:" >&2; cat "$work/$name.err" >&2; exit 1; }
}
stop() { # FD
  eval "exec $1>&-"
  wait "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
}

rps() { wrk -t2 -c64 -d"${duration}s" "$@" | awk '/Requests\/sec/ {printf "%.0f", $2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

if [ "${COUNT:-0}" = 1 ]; then
  need "apt-get install valgrind" valgrind callgrind_control
  # count NAME FD BINARY ARGS...: user instructions per request over WINDOW seconds.
  count() {
    local name=$1 fd=$2 a b dump ir sha
    shift 2
    rm -f "$work"/cg.out* "$work/audit.jsonl" "$work/$name.ctl" "$work/$name.out"
    start "$name" "$fd" valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" -q "$@"
    answered() { # the floor prints its count for each line on its stdin; the tunnel audits
      if [ "$name" = floor ]; then echo >&"$fd"; sleep 0.5; tail -1 "$work/$name.out"; else wc -l < "$work/audit.jsonl"; fi
    }
    wrk -t2 -c64 -d$((window + 8))s -s "$work/absolute.lua" "http://$addr/" > /dev/null &
    local wrk_pid=$!
    sleep 4
    callgrind_control -z "${pids[-1]}" > /dev/null 2>&1
    a=$(answered)
    sleep "$window"
    callgrind_control -d "${pids[-1]}" > /dev/null 2>&1
    b=$(answered)
    wait "$wrk_pid"
    stop "$fd"
    dump=$(ls "$work"/cg.out.* | head -1)
    ir=$(awk '/^totals:/ {print $2}' "$dump")
    sha=$(callgrind_annotate --threshold=100 "$dump" 2>/dev/null |
      awk '/sha2::sha256::compress256/ && !n++ {gsub(",", "", $1); print $1}')
    awk -v ir="$ir" -v sha="${sha:-0}" -v n=$((b - a)) \
      'BEGIN { printf "%.0f, of which sha256 blocks %.0f (%d requests)\n", ir / n, sha / n, n }'
  }
  echo -n "floor:  user instructions/request "
  count floor 4 "$examples/hyper_floor" "127.0.0.1:$up_port"
  echo -n "tunnel: user instructions/request "
  count tunnel 3 "$examples/tunnel_alone" "$work/policy.toml" "$work/audit.jsonl"
  rm -f "$work"/*.ctl "$work"/*.out
fi

start tunnel 3 "$examples/tunnel_alone" "$work/policy.toml" "$work/audit.jsonl"
tunnel=$addr
start floor 4 "$examples/hyper_floor" "127.0.0.1:$up_port"
floor=$addr
run() {
  case $1 in
    nginx) rps "http://127.0.0.1:$ngx_port/" ;;
    floor) rps -s "$work/absolute.lua" "http://$floor/" ;;
    tunnel) rps -s "$work/absolute.lua" "http://$tunnel/" ;;
  esac
}
echo "wrk -t2 -c64, $rounds rounds of ${duration}s each per proxy, req/s"
declare -a fl_ngx tun_ngx tun_fl
for r in $(seq "$rounds"); do
  case $((r % 3)) in
    0) order="nginx floor tunnel" ;;
    1) order="floor tunnel nginx" ;;
    *) order="tunnel nginx floor" ;;
  esac
  declare -A got=()
  for p in $order; do got[$p]=$(run "$p"); done
  fl_ngx+=("$(ratio "${got[floor]}" "${got[nginx]}")")
  tun_ngx+=("$(ratio "${got[tunnel]}" "${got[nginx]}")")
  tun_fl+=("$(ratio "${got[tunnel]}" "${got[floor]}")")
  echo "round $r: nginx ${got[nginx]}, floor ${got[floor]}, tunnel ${got[tunnel]}; floor/nginx ${fl_ngx[-1]}, tunnel/nginx ${tun_ngx[-1]}, tunnel/floor ${tun_fl[-1]}"
done
echo "medians of each round's ratio: floor/nginx $(median "${fl_ngx[@]}"), tunnel/nginx $(median "${tun_ngx[@]}"), tunnel/floor $(median "${tun_fl[@]}")"
