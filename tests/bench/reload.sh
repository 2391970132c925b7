#!/usr/bin/env bash
# Reload time: SIGHUP to a running `gateway run`, from reading the policy file to the kernel
# maps and the tunnel's rules both switched (the `elapsed_ms` of the audit note), for a small
# policy and for a large one (10,000 [[http.allow]] rules, 100,000 [[network.allow]] CIDRs),
# plus the time to empty the kernel buffer the old policy was in (after the switch, logged
# as `cleared_ms`). No traffic is sent: the CIDRs only fill the kernel maps. Run as root,
# after `cargo build --release --workspace --bins` (cargo xtask bench does both).
# GATEWAY=PATH runs that gateway binary instead of target/release/gateway (cargo xtask bench
# passes its profile-guided build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/bench/lib.sh"
rounds=${ROUNDS:-5}
http_rules=${HTTP_RULES:-10000}
cidrs=${CIDRS:-100000}
work=$(mktemp -d /tmp/gateway-bench-reload.XXXXXX)
chmod 755 "$work"
gw=
trap '[ -n "$gw" ] && kill "$gw" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

cat > "$work/small.toml" <<'TOML'
version = 1
name = "bench-reload"
[[network.allow]]
cidr = "127.0.0.1/32"
ports = [5432]
[[http.allow]]
host = "api.bench.test"
methods = ["GET"]
paths = ["/v1/**"]
[[http.allow]]
host = "*.pkg.bench.test"
TOML

python3 - "$work/large.toml" "$http_rules" "$cidrs" <<'PY'
import sys
path, rules, cidrs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    f.write('version = 1\nname = "bench-reload"\n')
    for i in range(cidrs):
        # Distinct /32s in 10.0.0.0/8, every 16th a distinct /24 that covers none of them.
        if i % 16 == 0:
            j = i >> 4
            f.write(f'[[network.allow]]\ncidr = "10.{128 + (j >> 8)}.{j & 255}.0/24"\n'
                    f'ports = [443, "8000-8100"]\n')
        else:
            f.write(f'[[network.allow]]\ncidr = "10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32"\n'
                    f'ports = [{1024 + i % 50000}]\nprotocol = "{"udp" if i % 3 == 0 else "tcp"}"\n')
    for i in range(rules):
        f.write(f'[[http.allow]]\nhost = "h{i}.bench.test"\nmethods = ["GET", "POST"]\n'
                f'paths = ["/v1/{i}/**", "/health"]\n')
PY
echo "large policy: $(wc -c < "$work/large.toml") bytes, $http_rules http rules, $cidrs CIDRs"

cp "$work/small.toml" "$work/policy.toml"
GATEWAY_LOG=info "$work/gateway" run --policy "$work/policy.toml" \
  --audit-log "$work/audit.jsonl" --user nobody -- sleep 3600 2> "$work/stderr" &
gw=$!
for _ in $(seq 600); do
  grep -q "sandbox ready" "$work/stderr" && break
  kill -0 "$gw" 2>/dev/null || { cat "$work/stderr"; exit 1; }
  sleep 0.05
done

notes() { grep -c '"policy_file"' "$work/audit.jsonl" 2>/dev/null || true; }
# Reloads FILE; prints "elapsed_ms cleared_ms check_ms prepare_ms" of that reload.
reload() {
  local before
  before=$(notes)
  cp "$1" "$work/policy.toml"
  kill -HUP "$gw"
  for _ in $(seq 1200); do
    [ "$(notes)" -gt "$before" ] && break
    sleep 0.05
  done
  if ! tail -n 1 "$work/audit.jsonl" | grep -q '"policy-reloaded"'; then
    echo "reload of $1 refused:" >&2
    tail -n 1 "$work/audit.jsonl" >&2
    exit 1
  fi
  local elapsed line
  elapsed=$(tail -n 1 "$work/audit.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["elapsed_ms"])')
  line=$(grep "policy reloaded" "$work/stderr" | tail -n 1)
  field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<< "$line"; }
  echo "$elapsed $(field cleared_ms) $(field check_ms) $(field prepare_ms)"
}

small=()
to_large=()
large=()
to_small=()
cleared_large=()
check_large=()
prepare_large=()
for _ in $(seq "$rounds"); do
  # An assignment from $(...) stops the script (set -e) when a reload is refused.
  out=$(reload "$work/small.toml"); read -r e _ <<< "$out"; small+=("$e")
  out=$(reload "$work/large.toml"); read -r e _ <<< "$out"; to_large+=("$e")
  out=$(reload "$work/large.toml"); read -r e c k p <<< "$out"
  large+=("$e"); cleared_large+=("$c"); check_large+=("$k"); prepare_large+=("$p")
  out=$(reload "$work/small.toml"); read -r e _ <<< "$out"; to_small+=("$e")
done
kill -TERM "$gw"
wait "$gw" || true
gw=

echo "reload time (read + check + compile + kernel fill + switch + tunnel swap), ms, $rounds rounds"
echo "small -> small: ${small[*]} (median $(median "${small[@]}"))"
echo "small -> large: ${to_large[*]} (median $(median "${to_large[@]}"))"
echo "large -> large: ${large[*]} (median $(median "${large[@]}"))"
echo "large -> small: ${to_small[*]} (median $(median "${to_small[@]}"))"
echo "of large -> large, reading and checking the file: ${check_large[*]} (median $(median "${check_large[@]}"))"
echo "of large -> large, kernel fill beside the tunnel's rules: ${prepare_large[*]} (median $(median "${prepare_large[@]}"))"
echo "emptying the retired large buffer after the switch, ms: ${cleared_large[*]} (median $(median "${cleared_large[@]}"))"
echo "CPU time of \`gateway policy check\` on the large file alone:"
TIMEFORMAT='%R s wall, %U s user, %S s system'
time "$work/gateway" policy check "$work/large.toml"
