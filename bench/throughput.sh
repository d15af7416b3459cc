#!/usr/bin/env bash
# Bulk throughput, side by side in one run on the netns testbed (issue 2 "Performance", issue 7 (a)):
#   mptcp_limit   iperf3 -R over MPTCP, proxy namespace -> client, memory to memory, both paths
#   direct_tcp    the client fetches from nginx over the routed path, plain TCP, no proxy
#   proxy_copy    mptcpize curl through mptcp-proxy, relay.mode = copy
#   proxy_splice  the same with relay.mode = splice
#   squid         mptcpize curl through Squid run under `mptcpize run` (caching off), as in the seeds
# Absolute-form requests; CONNECT with CONNECT=1. Writes bench/results/throughput-<time>.csv and prints
# the medians and ratios. Usage: bench/throughput.sh [SIZE_MIB=256] [RUNS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256} runs=${2:-5}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
for tool in nginx squid iperf3 mptcpize curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light squid iperf3 mptcpd curl" >&2; exit 2; }
done
cargo build --release -q -p mptcp-proxy --bin mptcp-proxy
proxy_bin=$PWD/target/release/mptcp-proxy

tb=bench$$
work=$(mktemp -d)
tbsh=deploy/testbed/testbed.sh
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  "$tbsh" down "$tb" || true
  rm -rf "$work"
}
trap cleanup EXIT
"$tbsh" up "$tb"
cli=$tb-cli prx=$tb-prx srv=$tb-srv

mkdir -p "$work/www"
head -c "$((size_mib << 20))" /dev/urandom > "$work/www/big.bin"
cat > "$work/nginx.conf" <<CONF
daemon on; user root; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx-error.log;
events { worker_connections 1024; }
http { access_log off; sendfile on; client_body_temp_path $work/b; proxy_temp_path $work/p;
  fastcgi_temp_path $work/f; uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  server { listen 10.0.3.2:80; root $work/www; } }
CONF
ip netns exec "$srv" nginx -c "$work/nginx.conf"

for mode in copy splice; do
  port=$([ $mode = copy ] && echo 3128 || echo 3130)
  cat > "$work/proxy-$mode.toml" <<CONF
[[listener]]
address = "10.0.1.1:$port"
[access_log]
path = "off"
[relay]
mode = "$mode"
CONF
  ip netns exec "$prx" "$proxy_bin" --config "$work/proxy-$mode.toml" 2>"$work/proxy-$mode.log" &
done
mkdir -p "$work/squid-cache"; chown proxy:proxy "$work/squid-cache" 2>/dev/null || true
cat > "$work/squid.conf" <<CONF
http_port 10.0.1.1:3129
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_log $work/squid-cache.log
pid_filename $work/squid.pid
coredump_dir $work/squid-cache
shutdown_lifetime 0 seconds
CONF
ip netns exec "$prx" mptcpize run squid -N -f "$work/squid.conf" 2>"$work/squid.err" &
ip netns exec "$prx" mptcpize run iperf3 -s -B 10.0.1.1 -p 5201 -D --logfile "$work/iperf3.log"
sleep 2

csv=bench/results/throughput-$(date -u +%Y%m%dT%H%M%SZ).csv
echo "subject,run,bytes,seconds,bits_per_second" > "$csv"
record() { # subject run bytes seconds
  awk -v s="$1" -v r="$2" -v b="$3" -v t="$4" 'BEGIN { printf "%s,%d,%d,%.6f,%.0f\n", s, r, b, t, b * 8 / t }' >> "$csv"
}
fetch() { # subject run [curl args...]
  local subject=$1 run=$2; shift 2
  local out
  out=$(ip netns exec "$cli" "$@" -sS --fail -o /dev/null -w '%{size_download} %{time_total}\n' http://10.0.3.2/big.bin)
  record "$subject" "$run" ${out% *} ${out#* }
}
tunnel=(); [ "${CONNECT:-0}" = 1 ] && tunnel=(-p)
for run in $(seq 1 "$runs"); do
  json=$(ip netns exec "$cli" mptcpize run iperf3 -c 10.0.1.1 -p 5201 -R -t 3 -J)
  bps=$(echo "$json" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]))')
  record mptcp_limit "$run" "$((bps * 3 / 8))" 3
  fetch direct_tcp "$run" curl
  fetch proxy_copy "$run" mptcpize run curl "${tunnel[@]}" -x http://10.0.1.1:3128
  fetch proxy_splice "$run" mptcpize run curl "${tunnel[@]}" -x http://10.0.1.1:3130
  fetch squid "$run" mptcpize run curl "${tunnel[@]}" -x http://10.0.1.1:3129
done
ip netns exec "$srv" nginx -c "$work/nginx.conf" -s stop || true

echo "results: $csv (size ${size_mib} MiB, runs $runs, ${CONNECT:+CONNECT}${CONNECT:-absolute-form})"
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
median = {s: statistics.median(float(r["bits_per_second"]) for r in rows if r["subject"] == s)
          for s in {r["subject"] for r in rows}}
print(f"{'subject':<14} {'median Gb/s':>12} {'x limit':>8} {'x squid':>8}")
for s in ["mptcp_limit", "direct_tcp", "proxy_copy", "proxy_splice", "squid"]:
    print(f"{s:<14} {median[s] / 1e9:>12.2f} {median[s] / median['mptcp_limit']:>8.2f} {median[s] / median['squid']:>8.2f}")
PY
