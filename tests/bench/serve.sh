#!/usr/bin/env bash
# `gateway serve` with 1 and with 10 sandboxes: the time to lock them all down (programs
# loaded and attached per sandbox) and to stop, and the cost the sandbox lookup adds to each
# new tunnel connection. The tunnel asks each sandbox's TUNNEL_CLIENTS map in config order, so
# wrk runs in the last sandbox (the longest walk), sending `Connection: close` so every
# request is a new connection. Same upstream (nginx `return 200` on loopback) in both runs.
# Run as root after `cargo build --release --workspace --bins` (cargo xtask bench does both).
# GATEWAY=PATH runs that gateway binary instead of target/release/gateway (cargo xtask bench
# passes its profile-guided build).
# Needs wrk and nginx: apt-get install wrk nginx-light.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
duration=${DURATION:-8}
rounds=${ROUNDS:-3}
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light python3" wrk nginx python3 setpriv
work=$(mktemp -d /tmp/gateway-bench-serve.XXXXXX)
chmod 755 "$work"
cgroup_root=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
parent="gateway-bench-serve-$$"
serve_pid=
trap '[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; wait 2>/dev/null; upstream_nginx_stop "$work"; rmdir "$cgroup_root/$parent"/* "$cgroup_root/$parent" 2>/dev/null || true; rm -rf "$work"' EXIT
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

up_port=$(free_port)
upstream_nginx "$work" "$up_port" 1
cat > "$work/absolute.lua" <<LUA
wrk.path = "http://127.0.0.1:$up_port/"
wrk.headers["Connection"] = "close"
LUA
chmod 644 "$work/absolute.lua"

# Writes a config with N sandboxes, each allowed the upstream with a credential attached.
config() {
  local n=$1 i
  { echo "version = 1"; echo "audit_log = \"$work/audit-$n.jsonl\""; } > "$work/serve-$n.toml"
  for i in $(seq "$n"); do
    bench_policy "bench-serve-$i" "$up_port" > "$work/p$i.toml"
    printf '[[sandbox]]\ncgroup = "%s/s%d"\npolicy = "p%d.toml"\n' "$parent" "$i" "$i" >> "$work/serve-$n.toml"
  done
}

now() { date +%s.%N; }
declare -A start_s stop_s rps
for n in 1 10; do
  config "$n"
  for r in $(seq "$rounds"); do
    t0=$(now)
    BENCH_TOKEN=bench-secret-token GATEWAY_STATE_DIR="$work/state" \
      "$work/gateway" serve --config "$work/serve-$n.toml" 2> "$work/serve.err" &
    serve_pid=$!
    until grep -q "serving;" "$work/serve.err"; do
      kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.err" >&2; exit 1; }
      sleep 0.01
    done
    t1=$(now)
    out=$(sh -c 'echo $$ > "$1/cgroup.procs" && set -a && . "$2" && set +a && exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs sh -c "wrk -t2 -c32 -d${3}s -s $4 \"\$HTTP_PROXY/\""' \
      sh "$cgroup_root/$parent/s$n" "/run/gateway/serve/bench-serve-$n/env" "$duration" "$work/absolute.lua")
    t2=$(now)
    kill -TERM "$serve_pid"; wait "$serve_pid" || true; serve_pid=
    t3=$(now)
    start_s[$n]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') "
    stop_s[$n]+="$(awk -v a="$t2" -v b="$t3" 'BEGIN {printf "%.2f", b - a}') "
    rps[$n]+="$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out") "
  done
done
echo "gateway serve, $rounds rounds, medians in brackets"
for n in 1 10; do
  echo "$n sandbox(es): lock down ${start_s[$n]}s [$(median "${start_s[$n]}")], stop ${stop_s[$n]}s [$(median "${stop_s[$n]}")], new connections ${rps[$n]}req/s [$(median "${rps[$n]}")]"
done
awk -v a="$(median "${rps[10]}")" -v b="$(median "${rps[1]}")" \
  'BEGIN { printf "ratio new-connection requests per second, last of 10 sandboxes / 1 sandbox: %.2f\n", a/b }'
