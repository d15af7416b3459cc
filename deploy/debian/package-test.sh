#!/usr/bin/env bash
# The Debian package, end to end (issue 11): builds it, checks it with dpkg-deb and lintian, installs it
# with dpkg -i, verifies the installed systemd units, runs the installed mptcp-proxy with the installed
# configuration as its system user in a netns testbed, and purges it, leaving nothing behind.
# Needs root; deploy/test.sh runs it after the cargo tests. Usage: deploy/debian/package-test.sh [DEB]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "package-test.sh needs root" >&2; exit 2; }
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

# dpkg waits for other package managers on this machine instead of failing on their lock.
dpkg_retry() {
  local try out
  for try in $(seq 1 60); do
    if out=$(dpkg "$@" 2>&1); then echo "$out"; return 0; fi
    case $out in *"lock"*) sleep 5 ;; *) echo "$out" >&2; return 1 ;; esac
  done
  echo "$out" >&2; return 1
}

# Files and state of the package: the same list before install and after purge.
leftovers() {
  { find /etc /lib/systemd /usr/lib/systemd /usr/bin /usr/share/doc /var/log /var/lib/systemd \
      /var/lib/dpkg/info -xdev 2>/dev/null | grep -E '(^|/)(mptcp-proxy|mptcp-convert|mptcp-sniffer|mpip-proxy|mpipd|mptcp-detourd|mptcp-detour)([./]|$)' || true
    getent passwd mptcp-proxy || true
    getent group mptcp-proxy || true
  } | sort
}

deb=${1:-}
if [ -z "$deb" ]; then
  echo "== building the package"
  deb=$(bash deploy/debian/build-deb.sh)
fi
echo "== $deb"
case $(basename "$deb") in
  mptcp-proxy_*_amd64.deb) pass "named mptcp-proxy_<version>_amd64.deb" ;;
  *) fail "package name $(basename "$deb")" ;;
esac

info=$(dpkg-deb --info "$deb")
contents=$(dpkg-deb --contents "$deb")
check "dpkg-deb --info: package, architecture, dependencies" \
  grep -q "Package: mptcp-proxy" <<<"$info"
check "dpkg-deb --info: amd64, depends on adduser and libnftnl" \
  bash -c 'grep -q "Architecture: amd64" <<<"$1" && grep -q "Depends:.*adduser.*libnftnl" <<<"$1"' _ "$info"
for path in usr/bin/mptcp-proxy usr/bin/mptcp-convert usr/bin/mptcp-sniffer usr/bin/mpip-proxy usr/bin/mpipd \
  etc/mptcp-proxy/mptcp-proxy.toml etc/mptcp-proxy/mpip-proxy.toml etc/mptcp-proxy/mpipd.toml \
  etc/logrotate.d/mptcp-proxy lib/systemd/system/mptcp-proxy.service lib/systemd/system/mpip-proxy.service \
  lib/systemd/system/mpipd.service usr/share/doc/mptcp-proxy/help/mptcp-proxy.txt \
  usr/bin/mptcp-detourd usr/bin/mptcp-detour etc/mptcp-proxy/mptcp-detourd.toml etc/mptcp-proxy/mptcp-detour.toml \
  lib/systemd/system/mptcp-detourd.service lib/systemd/system/mptcp-detour.service; do
  check "dpkg-deb --contents has /$path" grep -q " \./$path\$" <<<"$contents"
done
control=$(mktemp -d)
dpkg-deb --control "$deb" "$control"
check "configurations are conffiles" \
  bash -c 'for f in mptcp-proxy mpip-proxy mpipd mptcp-detourd mptcp-detour; do grep -qx "/etc/mptcp-proxy/$f.toml" "$1/conffiles" || exit 1; done' _ "$control"
rm -rf "$control"
lintian_out=$(lintian --fail-on error "$deb" 2>&1) && lintian_rc=0 || lintian_rc=$?
echo "$lintian_out" | sed 's/^/  lintian: /'
check "lintian reports no errors" test "$lintian_rc" = 0

# Install on a host where it is not (a failed earlier run may have left it).
if dpkg-query -W -f='${Status}' mptcp-proxy 2>/dev/null | grep -q installed; then
  dpkg_retry --purge mptcp-proxy >/dev/null
fi
before=$(leftovers)
echo "== dpkg -i"
check "dpkg -i installs it" dpkg_retry -i "$deb"
check "the system user mptcp-proxy exists" getent passwd mptcp-proxy
check "/var/log/mptcp-proxy belongs to mptcp-proxy" \
  test "$(stat -c %U "/var/log/mptcp-proxy" 2>/dev/null)" = mptcp-proxy
for unit in mptcp-proxy mpip-proxy mpipd mptcp-detourd mptcp-detour; do
  verify=$(systemd-analyze verify "/lib/systemd/system/$unit.service" 2>&1) && rc=0 || rc=$?
  # Offline (PID 1 is not systemd here), verify may only warn that no manager runs; anything about the
  # unit itself fails.
  problems=$(grep -i "$unit" <<<"$verify" || true)
  [ -n "$problems" ] && echo "$problems" | sed 's/^/  systemd-analyze: /'
  check "systemd-analyze verify $unit.service" test "$rc" = 0 -a -z "$problems"
done
# Each daemon reloads its configuration on SIGHUP (before READY=1 the handlers are in place).
for unit in mptcp-proxy mpip-proxy mpipd; do
  check "$unit.service reloads with SIGHUP" \
    grep -qx 'ExecReload=/bin/kill -HUP \$MAINPID' "/lib/systemd/system/$unit.service"
done
check "logrotate accepts /etc/logrotate.d/mptcp-proxy" \
  logrotate --debug --state /dev/null /etc/logrotate.d/mptcp-proxy
check "the installed configuration checks" /usr/bin/mptcp-proxy --config /etc/mptcp-proxy/mptcp-proxy.toml --check-config
# The detour daemons' configurations name a key the administrator creates; check them with a temporary one.
openssl rand -hex 32 >/etc/mptcp-proxy/detour.key
for daemon in mptcp-detourd mptcp-detour; do
  check "the installed $daemon configuration checks" \
    /usr/bin/$daemon --config /etc/mptcp-proxy/$daemon.toml --check-config
done
rm -f /etc/mptcp-proxy/detour.key

echo "== the installed proxy in a testbed, as its system user with the unit's capabilities"
prefix="mpx$$n900"
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "${nginx_pid:-}" ] && kill "$nginx_pid" 2>/dev/null || true
  deploy/testbed/testbed.sh down "$prefix" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
deploy/testbed/testbed.sh up "$prefix" >/dev/null
mkdir -p "$work/www"
echo "hello from the packaged proxy" >"$work/www/hello.txt"
cat >"$work/nginx.conf" <<NGINX
daemon off; user root; worker_processes 1; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 64; }
http { access_log off; client_body_temp_path $work/body; proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
  server { listen 10.0.3.2:80; root $work/www; } }
NGINX
ip netns exec "$prefix-srv" nginx -c "$work/nginx.conf" &
nginx_pid=$!
caps=+net_admin,+net_raw,+net_bind_service
ip netns exec "$prefix-prx" setpriv --reuid=mptcp-proxy --regid=mptcp-proxy --clear-groups \
  --inh-caps="$caps" --ambient-caps="$caps" \
  /usr/bin/mptcp-proxy --config /etc/mptcp-proxy/mptcp-proxy.toml 2>"$work/proxy.log" &
proxy_pid=$!
for _ in $(seq 1 100); do
  ip netns exec "$prefix-prx" bash -c 'exec 3<>/dev/tcp/10.0.1.1/3128' 2>/dev/null && break
  sleep 0.1
done
body=$(ip netns exec "$prefix-cli" mptcpize run curl -sS --fail --max-time 20 -x http://10.0.1.1:3128 \
  http://10.0.3.2/hello.txt 2>&1) || true
check "a client downloads through the installed proxy" test "$body" = "hello from the packaged proxy"
check "the access log goes to /var/log/mptcp-proxy/access.log" \
  grep -q "TCP_MISS/200 .* http://10.0.3.2/hello.txt" /var/log/mptcp-proxy/access.log
check "the diagnostics carry no terminal escapes" bash -c '! grep -q $'"'"'\e'"'"' "$1"' _ "$work/proxy.log"
view=$(ip netns exec "$prefix-prx" /usr/bin/mptcp-proxy connections --admin 127.0.0.1:9464 2>&1) || true
check "mptcp-proxy connections reads the installed admin listener" grep -q "^ID  TRANSPORT" <<<"$view"
kill -TERM "$proxy_pid"
wait "$proxy_pid" && rc=0 || rc=$?
proxy_pid=
check "SIGTERM: the installed proxy exits 0" test "$rc" = 0
sed 's/^/  proxy: /' "$work/proxy.log" | tail -5

echo "== dpkg --purge"
check "dpkg --purge removes it" dpkg_retry --purge mptcp-proxy
after=$(leftovers)
if [ "$before" = "$after" ]; then
  pass "purge leaves nothing behind"
else
  fail "purge left: $(diff <(echo "$before") <(echo "$after") | grep '^>' | tr '\n' ' ')"
fi

echo "package: $passed passed, $failed failed"
[ "$failed" = 0 ]
