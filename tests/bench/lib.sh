# Shared by the benchmark scripts in this directory; sourced, not run.

# need HINT TOOL...: exits 2 naming the first tool missing from PATH and how to get it.
need() {
  local hint=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$(basename "$0") needs $tool: $hint" >&2; exit 2; }
  done
}

# median VALUE...: the middle value, or the mean of the two middle ones for an even count.
# Values may come as separate words or as one space-separated word.
median() {
  # shellcheck disable=SC2048,SC2086
  printf '%s\n' $* | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# upstream_nginx WORK PORT WORKERS: the loopback upstream the tunnel benchmarks proxy to,
# nginx answering `return 200 "ok\n"`, its config, pid and logs under WORK.
upstream_nginx() {
  mkdir -p "$1/logs"
  cat > "$1/upstream.conf" <<NGINX
worker_processes $3;
pid $1/upstream.pid;
error_log $1/logs/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$2; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
}
NGINX
  nginx -p "$1" -c "$1/upstream.conf"
}

upstream_nginx_stop() { nginx -p "$1" -c "$1/upstream.conf" -s stop 2>/dev/null || true; }

# baseline_nginx WORK PORT UPSTREAM_PORT [LOG]: the tunnel's baseline, an nginx reverse proxy
# on PORT doing the tunnel's job toward the upstream (`proxy_pass`, the credential set,
# upstream keepalive), config and pid under WORK; LOG is its access_log directive
# (default off). Stop it with baseline_nginx_stop WORK.
baseline_nginx() {
  cat > "$1/nginx.conf" <<NGINX
worker_processes 2;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 4096; }
http {
  ${4:-access_log off;}
  upstream up { server 127.0.0.1:$3; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$2;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer \$bench_token";
    }
  }
  map \$host \$bench_token { default "bench-secret-token"; }
}
NGINX
  nginx -p "$1" -c "$1/nginx.conf"
}

baseline_nginx_stop() { nginx -p "$1" -c "$1/nginx.conf" -s stop 2>/dev/null || true; }

# bench_policy NAME PORT: a policy that lets the loopback upstream on PORT through with the
# `bench` credential (from $BENCH_TOKEN) attached, on stdout.
bench_policy() {
  cat <<TOML
version = 1
name = "$1"

[[http.allow]]
host = "127.0.0.1"
port = $2
private = true
credential = "bench"
plain_http = true               # the loopback upstream speaks plain HTTP

[credentials.bench]
env = "BENCH_TOKEN"
TOML
}
