#!/usr/bin/env bash
# Cost of the sandbox's kernel programs, inside a sandbox vs outside any sandbox, interleaved
# in one run: connect()+close() to an allowed loopback listener (connect4, sock_create and
# the packet backstop on the handshake), and bulk throughput on one allowed loopback TCP
# connection (the packet backstop on every segment). Run as root, after
# `cargo build --release --workspace --bins` (cargo xtask bench does both).
# GATEWAY=PATH runs that gateway binary instead of target/release/gateway (cargo xtask bench
# passes its profile-guided build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/bench/lib.sh"
n=${CONNECTS:-20000}
mib=${MIB:-2048}
rounds=${ROUNDS:-5}
work=$(mktemp -d /tmp/gateway-bench.XXXXXX)
chmod 755 "$work"
trap 'kill "$server" "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT
# Copies the sandbox user can execute wherever the checkout lives.
install -m 755 "$root/target/release/connect-loop" "$work/"
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

"$work/connect-loop" serve 127.0.0.1:0 > "$work/port" &
server=$!
while [ ! -s "$work/port" ]; do sleep 0.05; done
port=$(cat "$work/port")
"$work/connect-loop" sink 127.0.0.1:0 > "$work/sink-port" &
sink=$!
while [ ! -s "$work/sink-port" ]; do sleep 0.05; done
sink_port=$(cat "$work/sink-port")
cat > "$work/policy.toml" <<TOML
version = 1
name = "bench-connect"
[[network.allow]]
cidr = "127.0.0.1/32"
ports = [$port, $sink_port]
TOML
sandboxed() {
  GATEWAY_LOG=warn "$work/gateway" run --policy "$work/policy.toml" \
    --audit-log "$work/audit.jsonl" --user nobody -- "$@"
}

inside=()
outside=()
bulk_in=()
bulk_out=()
for r in $(seq "$rounds"); do
  outside+=("$("$work/connect-loop" connect "127.0.0.1:$port" "$n")")
  inside+=("$(sandboxed "$work/connect-loop" connect "127.0.0.1:$port" "$n")")
  bulk_out+=("$("$work/connect-loop" send "127.0.0.1:$sink_port" "$mib")")
  bulk_in+=("$(sandboxed "$work/connect-loop" send "127.0.0.1:$sink_port" "$mib")")
done
out=$(median "${outside[@]}")
in=$(median "${inside[@]}")
echo "connect()+close() to an allowed loopback listener, $n per round, $rounds rounds"
echo "outside any sandbox: ${outside[*]} ns/op (median $out)"
echo "inside the sandbox:  ${inside[*]} ns/op (median $in)"
awk -v i="$in" -v o="$out" 'BEGIN { printf "ratio inside/outside: %.3f (%+.1f%% per connect)\n", i/o, (i/o-1)*100 }'
bout=$(median "${bulk_out[@]}")
bin=$(median "${bulk_in[@]}")
echo
echo "bulk TCP throughput over one allowed loopback connection, $mib MiB per round"
echo "outside any sandbox: ${bulk_out[*]} MB/s (median $bout)"
echo "inside the sandbox:  ${bulk_in[*]} MB/s (median $bin)"
awk -v i="$bin" -v o="$bout" 'BEGIN { printf "ratio inside/outside: %.3f (%+.1f%% throughput)\n", i/o, (i/o-1)*100 }'
