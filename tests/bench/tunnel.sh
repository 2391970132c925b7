#!/usr/bin/env bash
# Throughput of the tunnel against nginx doing the same job, with the same client, in one
# run: wrk inside a sandbox sends GETs that get an Authorization header attached on the way
# to a loopback HTTP upstream (nginx `return 200`), either through the tunnel (absolute-form
# proxy requests, a credential injected) or through an nginx reverse proxy (`proxy_pass` with
# `proxy_set_header Authorization`, upstream keepalive). Then the cost of a new TLS connection
# through the tunnel (CONNECT, interception, pooled upstream) against one made directly.
# Run as root after `cargo build --release --workspace --bins` (cargo xtask bench does both);
# GATEWAY=PATH runs another build of the gateway binary (cargo xtask bench passes its
# profile-guided build; also for A/B runs). Env: ROUNDS (20),
# DURATION seconds per run (3), CONNS (64), TLS_CONNECTS (300), TUNNEL_THREADS (the
# gateway's default when unset). Many short rounds, because
# this kind of shared VM drifts by ~30 % within a minute: the two runs of a short round are
# close in time, and 20 ratios give quartiles, not just a median (docs/benchmarks.md).
# Needs wrk, nginx and openssl: apt-get install wrk nginx-light openssl.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
duration=${DURATION:-3}
conns=${CONNS:-64}
rounds=${ROUNDS:-20}
tls_n=${TLS_CONNECTS:-300}
. "$root/tests/bench/lib.sh"
need "apt-get install wrk nginx-light openssl python3" wrk nginx openssl python3
work=$(mktemp -d /tmp/gateway-bench-tunnel.XXXXXX)
chmod 755 "$work"
# NGINX_ACCESS_LOG=1: the nginx baseline also writes one JSON line per request to a file, as
# the tunnel writes an audit record per request (nginx's default unbuffered access log).
nginx_log="access_log off;"
if [ "${NGINX_ACCESS_LOG:-0}" = 1 ]; then
  nginx_log='log_format audit escape=json '"'"'{"ts":"$time_iso8601","method":"$request_method","host":"$host","path":"$request_uri","status":$status,"client":"$remote_addr:$remote_port"}'"'"'; access_log '"$work"'/logs/access.jsonl audit;'
fi
trap 'baseline_nginx_stop "$work"; upstream_nginx_stop "$work"; kill "$tls_up" 2>/dev/null || true; rm -rf "$work"' EXIT
install -m 755 "${GATEWAY:-$root/target/release/gateway}" "$work/gateway"

up_port=$(free_port)
ngx_port=$(free_port)
# Two nginx instances, so the upstream is a separate server for both proxies: the upstream
# (`return 200`) and the reverse proxy that is the tunnel's baseline.
upstream_nginx "$work" "$up_port" 2
baseline_nginx "$work" "$ngx_port" "$up_port" "$nginx_log"

# TLS upstream for the new-connection figure: python's ssl server, one request per connection.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/srv.key" \
  -out "$work/srv.csr" -subj "/CN=api.bench" 2>/dev/null
printf 'subjectAltName=DNS:api.bench\nextendedKeyUsage=serverAuth\n' > "$work/ext"
openssl x509 -req -in "$work/srv.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -out "$work/srv.pem" -days 1 -extfile "$work/ext" 2>/dev/null
chmod 644 "$work"/*.pem
tls_port=$(free_port)
python3 - "$work" "$tls_port" <<'PY' &
import http.server, ssl, sys
work, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in separate small writes would meet delayed ACKs (40 ms a response).
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain(f"{work}/srv.pem", f"{work}/srv.key")
s.socket = c.wrap_socket(s.socket, server_side=True)
s.serve_forever()
PY
tls_up=$!

cat > "$work/policy.toml" <<TOML
version = 1
name = "bench-tunnel"

[[network.allow]]               # the nginx proxy, reached directly for the baseline
cidr = "127.0.0.1/32"
ports = [$ngx_port, $tls_port]

[[http.allow]]
host = "127.0.0.1"
port = $up_port
private = true
credential = "bench"
plain_http = true               # the loopback upstream speaks plain HTTP

[[http.allow]]
host = "api.bench"
connect = "127.0.0.1:$tls_port"
private = true                  # a loopback address, dialled as written

[credentials.bench]
env = "BENCH_TOKEN"

[tls]
upstream_ca = ["$work/ca.pem"]
TOML
cat > "$work/absolute.lua" <<LUA
wrk.path = "http://127.0.0.1:$up_port/"
LUA
cat > "$work/tls.py" <<'PY'
import http.client, os, socket, ssl, sys, time
mode, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
work = os.path.dirname(os.path.abspath(__file__))
if mode == "direct":
    ctx = ssl.create_default_context(cafile=f"{work}/ca.pem")
else:
    ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    proxy = os.environ["HTTPS_PROXY"].removeprefix("http://")
    phost, pport = proxy.rsplit(":", 1)
class Direct(http.client.HTTPSConnection):
    """api.bench is not in DNS: dial the loopback upstream, verify the name."""
    def connect(self):
        raw = socket.create_connection(("127.0.0.1", port))
        self.sock = ctx.wrap_socket(raw, server_hostname="api.bench")
def one():
    if mode == "direct":
        c = Direct("api.bench", port, context=ctx)
    else:
        c = http.client.HTTPSConnection(phost, int(pport), context=ctx)
        c.set_tunnel("api.bench", 443)
    c.request("GET", "/")
    r = c.getresponse(); r.read(); c.close()
for _ in range(20):
    one()
t = time.perf_counter()
for _ in range(n):
    one()
print(int((time.perf_counter() - t) / n * 1e6))
PY
chmod 644 "$work"/*.lua "$work"/*.py "$work/policy.toml"

sandboxed() {
  BENCH_TOKEN=bench-secret-token GATEWAY_LOG=warn GATEWAY_STATE_DIR="$work/state" \
    "$work/gateway" run --policy "$work/policy.toml" --audit-log "$work/audit.jsonl" \
    --user nobody ${TUNNEL_THREADS:+--tunnel-threads "$TUNNEL_THREADS"} -- "$@"
}
rps() { awk '/Requests\/sec/ {print $2}'; }
lat() { awk -v q="$1" '$1 == q {print $2}'; }

# CPU the proxy itself spends per request (user and system, from /proc), sampled over the
# middle of each run: steadier than requests per second on a shared machine. Also the share
# of the machine's CPU time the hypervisor took for others (steal) meanwhile.
ticks() { local u=0 s=0 a b; for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
machine() { awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9}' /proc/stat; }
sample_cpu() { # PIDS-COMMAND: prints "user_ticks sys_ticks seconds steal_percent"
  sleep 1
  local pids a b m0 m1
  pids=$(eval "$1")
  a=$(ticks $pids); m0=$(machine)
  sleep $((duration - 2))
  b=$(ticks $pids); m1=$(machine)
  echo "$a $b $m0 $m1" | awk -v d=$((duration - 2)) \
    '{print $3 - $1, $4 - $2, d, ($8 - $6) * 100 / ($7 - $5 + ($7 == $5))}'
}
per_req() { awk -v rps="$2" '{ hz = 100; printf "%.1f/%.1f", $1 / hz / ($3 * rps) * 1e6, $2 / hz / ($3 * rps) * 1e6 }' <<<"$1"; }
steal_of() { awk '{printf "%.0f%%", $4}' <<<"$1"; }
tun_rps=(); ngx_rps=(); tun_p50=(); ngx_p50=(); tun_p99=(); ngx_p99=(); tun_cpu=(); ngx_cpu=()
ratios=(); steal=()
run_tunnel() {
  sample_cpu "pgrep -f '$work/gateway run' | head -1" > "$work/cpu" &
  out=$(sandboxed sh -c "wrk -t2 -c$conns -d${duration}s --latency -s $work/absolute.lua \"\$HTTP_PROXY/\"")
  wait $!
  tun_rps+=("$(rps <<<"$out")"); tun_p50+=("$(lat 50% <<<"$out")"); tun_p99+=("$(lat 99% <<<"$out")")
  tun_cpu+=("$(per_req "$(cat "$work/cpu")" "$(rps <<<"$out")")"); steal+=("t$(steal_of "$(cat "$work/cpu")")")
}
run_nginx() {
  sample_cpu "pgrep -P $(cat "$work/nginx.pid")" > "$work/cpu" &
  out=$(sandboxed wrk -t2 -c"$conns" -d"${duration}"s --latency "http://127.0.0.1:$ngx_port/")
  wait $!
  ngx_rps+=("$(rps <<<"$out")"); ngx_p50+=("$(lat 50% <<<"$out")"); ngx_p99+=("$(lat 99% <<<"$out")")
  ngx_cpu+=("$(per_req "$(cat "$work/cpu")" "$(rps <<<"$out")")"); steal+=("n$(steal_of "$(cat "$work/cpu")")")
}
# Each round runs both, the order alternating, so a machine that speeds up or slows down
# during the benchmark favours neither; each round's own ratio is kept.
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run_tunnel; run_nginx; else run_nginx; run_tunnel; fi
  ratios+=("$(awk -v t="${tun_rps[-1]}" -v n="${ngx_rps[-1]}" 'BEGIN { printf "%.2f", t / n }')")
done
deny=$(grep -c '"verdict":"deny"' "$work/audit.jsonl" || true)
deny_reasons=$(grep '"verdict":"deny"' "$work/audit.jsonl" | grep -o '"reason":"[^"]*"' | sort | uniq -c | tr -s ' \n' ' ' || true)
echo "HTTP GET with a credential attached, wrk -t2 -c$conns -d${duration}s inside the sandbox, $rounds rounds"
echo "tunnel: ${tun_rps[*]} req/s (median $(median "${tun_rps[@]}")); p50 ${tun_p50[*]}; p99 ${tun_p99[*]}"
echo "nginx:  ${ngx_rps[*]} req/s (median $(median "${ngx_rps[@]}")); p50 ${ngx_p50[*]}; p99 ${ngx_p99[*]}"
echo "ratio tunnel/nginx requests per second, each round: ${ratios[*]}; median $(median "${ratios[@]}")"
printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1; if ($1 >= 0.8) k++}
  END {printf "ratio quartiles %s-%s; %d of %d rounds at 0.8 or more\n", a[int((NR+3)/4)], a[int((3*NR+3)/4)], k, NR}'
awk -v t="$(median "${tun_rps[@]}")" -v n="$(median "${ngx_rps[@]}")" \
  'BEGIN { printf "ratio of the medians: %.2f\n", t/n }'
echo "proxy CPU per request, user/system us: tunnel ${tun_cpu[*]}; nginx ${ngx_cpu[*]}"
echo "CPU stolen by the hypervisor during each run (t tunnel, n nginx): ${steal[*]}"
echo "(deny records during the run: $deny${deny_reasons:+:$deny_reasons})"
if [ "${NGINX_ACCESS_LOG:-0}" = 1 ]; then
  echo "(nginx access log lines written: $(wc -l < "$work/logs/access.jsonl"))"
fi

tls_tun=(); tls_dir=()
for r in $(seq "$rounds"); do
  tls_dir+=("$(sandboxed python3 "$work/tls.py" direct "$tls_n" "$tls_port")")
  tls_tun+=("$(sandboxed python3 "$work/tls.py" tunnel "$tls_n" "$tls_port")")
done
echo
echo "new TLS connection + one GET, python http.client inside the sandbox, $tls_n per round"
echo "direct to the upstream: ${tls_dir[*]} us (median $(median "${tls_dir[@]}"))"
echo "through the tunnel:     ${tls_tun[*]} us (median $(median "${tls_tun[@]}"))"
awk -v t="$(median "${tls_tun[@]}")" -v d="$(median "${tls_dir[@]}")" \
  'BEGIN { printf "ratio tunnel/direct per new TLS connection: %.2f\n", t/d }'
