#!/usr/bin/env bash
# Policy scale in the kernel: connect()+close() to an allowed loopback listener inside a
# sandbox whose policy has 100 `[[network.allow]]` entries vs 100,000 (the LPM trie the
# connect4/6 programs look up), interleaved in one run; and the time `gateway run -- true`
# takes with each (policy read and checked, maps filled, programs attached, torn down).
# The tunnel's decision time and the policy load time are in
# `cargo bench -p gateway --bench policy_scale`. Run as root after
# `cargo build --release --workspace --bins` (cargo xtask bench does both).
# GATEWAY=PATH runs that gateway binary instead of target/release/gateway (cargo xtask bench
# passes its profile-guided build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/bench/lib.sh"
n=${CONNECTS:-20000}
rounds=${ROUNDS:-5}
work=$(mktemp -d /tmp/gateway-bench-scale.XXXXXX)
chmod 755 "$work"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
install -m 755 "$root/target/release/connect-loop" "$work/"
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

"$work/connect-loop" serve 127.0.0.1:0 > "$work/port" &
server=$!
while [ ! -s "$work/port" ]; do sleep 0.05; done
port=$(cat "$work/port")

# Every entry is a loopback /32 next to the listener's address, so the lookup for 127.0.0.1
# walks a trie crowded around it. Nothing but 127.0.0.1:$port is ever dialled.
policy() {
  python3 - "$1" "$port" <<'PY'
import sys
n, port = int(sys.argv[1]), sys.argv[2]
out = ['version = 1\nname = "bench-scale"\n']
for i in range(1, n):
    out.append(f'[[network.allow]]\ncidr = "127.{((i + 256) >> 16) & 255}.{((i + 256) >> 8) & 255}.{(i + 256) & 255}/32"\nports = [5432]\n')
out.append(f'[[network.allow]]\ncidr = "127.0.0.1/32"\nports = [{port}]\n')
print("\n".join(out))
PY
}
policy 100 > "$work/small.toml"
policy 100000 > "$work/large.toml"
chmod 644 "$work"/*.toml
sandboxed() {
  local p=$1
  shift
  GATEWAY_LOG=warn "$work/gateway" run --policy "$work/$p.toml" \
    --audit-log "$work/audit.jsonl" --user nobody -- "$@"
}
wall_ms() {
  local t0 t1
  t0=$(date +%s%N)
  sandboxed "$1" true
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}

small=(); large=(); run_small=(); run_large=()
for r in $(seq "$rounds"); do
  small+=("$(sandboxed small "$work/connect-loop" connect "127.0.0.1:$port" "$n")")
  large+=("$(sandboxed large "$work/connect-loop" connect "127.0.0.1:$port" "$n")")
  run_small+=("$(wall_ms small)")
  run_large+=("$(wall_ms large)")
done
s=$(median "${small[@]}")
l=$(median "${large[@]}")
echo "connect()+close() to an allowed loopback listener inside the sandbox, $n per round, $rounds rounds"
echo "100 network entries:     ${small[*]} ns/op (median $s)"
echo "100,000 network entries: ${large[*]} ns/op (median $l)"
awk -v l="$l" -v s="$s" 'BEGIN { printf "ratio large/small: %.3f\n", l/s }'
echo
echo "gateway run -- true (read, check, fill maps, attach, tear down), ms"
echo "100 network entries:     ${run_small[*]} (median $(median "${run_small[@]}"))"
echo "100,000 network entries: ${run_large[*]} (median $(median "${run_large[@]}"))"
