#!/usr/bin/env bash
# The seeds' lab on one machine (seed 002, Fig. 1): an MPTCP client with two paths to the proxy, and the
# proxy with one link to a legacy server.
#
#   client ns (PREFIX-cli)            proxy ns (PREFIX-prx)              server ns (PREFIX-srv)
#   c1 10.0.1.2  fd00:1::2  <-- path 1 -->  p1 10.0.1.1  fd00:1::1
#   c2 10.0.2.2  fd00:2::2  <-- path 2 -->  p2 10.0.2.1  fd00:2::1
#                                           p3 10.0.3.1  fd00:3::1  <-->  s1 10.0.3.2  fd00:3::2
#
#   with --second-client, a second two-path client (IPv4 only):
#   second client ns (PREFIX-cl2)
#   d1 10.0.4.2             <-- path 1 -->  p4 10.0.4.1
#   d2 10.0.5.2             <-- path 2 -->  p5 10.0.5.1
#
#   with --clients N, N more two-path clients (IPv4 only) on two access networks, as an ISP's: each
#   path is a bridge in the proxy namespace, and client K (1..N, namespace PREFIX-cK) has
#   a1 10.1.K.2/16          <-- path 1 -->  br1 10.1.0.1/16   (bridge; port qKa)
#   a2 10.2.K.2/16          <-- path 2 -->  br2 10.2.0.1/16   (bridge; port qKb)
#
# The client has an MPTCP `subflow` endpoint on c2 and policy routing, so each subflow leaves through the
# interface that owns its source address. The proxy namespace forwards, so the direct routed path
# client -> server works too (the benchmarks' baseline).
#
# Usage:
#   testbed.sh up PREFIX [--rate1 MBIT] [--rate2 MBIT] [--loss1 PCT] [--loss2 PCT] [--no-endpoint]
#                        [--second-client] [--clients N] [--delay1 MS] [--delay2 MS] [--delay3 MS]
#   testbed.sh delay PREFIX cli|cl2|prx|srv DEV egress|ingress DELAY [testbed-delay options...]
#   testbed.sh down PREFIX
#   testbed.sh exec PREFIX cli|cl2|prx|srv|cK CMD...
#
# Rates are HTB on both ends of a path (download: p1/p2 egress; upload: c1/c2 egress). Loss is nftables
# `numgen random` in the client namespace, both directions. There is no netem on the target kernels:
# delay is the testbed's user-space delay line (`testbed-delay`, nfqueue). `--delayN MS` adds MS
# milliseconds to the round trip of path N (3: the proxy-server link), half on each direction, both halves
# on the proxy's interface (pN egress and ingress). `delay` starts one more line with any settings (e.g.
# `testbed.sh delay P prx p1 egress 20ms --loss 1%`) and prints its log path. Lines run in the background
# inside their namespace until `down`. The binary is $TESTBED_DELAY, else the newer of
# target/{release,debug}/testbed-delay (build it with `cargo build -p testbed --bin testbed-delay`), else
# `testbed-delay` on PATH.
set -euo pipefail

die() { echo "testbed.sh: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: testbed.sh up|down|exec PREFIX ..."
action=$1 prefix=$2
shift 2
cli="$prefix-cli" cl2="$prefix-cl2" prx="$prefix-prx" srv="$prefix-srv"

# Where the delay lines of this testbed keep their logs.
delay_dir="${TMPDIR:-/tmp}/mpx-testbed-$prefix"

# delay_binary and start_delay (shared with detour.sh).
# shellcheck source=deploy/testbed/delay-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/delay-lib.sh"

down() {
  local ns
  for ns in "$cli" "$cl2" "$prx" "$srv" $(ip netns list | awk -v p="$prefix-c" 'index($1, p) == 1 && substr($1, length(p) + 1) ~ /^[0-9]+$/ { print $1 }'); do
    if ip netns list | grep -qw "^$ns"; then
      # Kill whatever still runs inside, then drop the namespace (its veths go with it).
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
    # Files a test gave the namespace (Testbed::set_etc_file).
    rm -rf "/etc/netns/$ns"
  done
  # Delay lines ran inside the namespaces (killed above); their rules went with them.
  rm -rf "$delay_dir"
}

shape() { # ns dev mbit
  ip netns exec "$1" tc qdisc replace dev "$2" root handle 1: htb default 1
  ip netns exec "$1" tc class replace dev "$2" parent 1: classid 1:1 htb rate "$3mbit" ceil "$3mbit"
}

up() {
  local rate1="" rate2="" loss1="" loss2="" endpoint=1 second=0 delay1="" delay2="" delay3="" clients=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --rate1) rate1=$2; shift 2 ;;
      --rate2) rate2=$2; shift 2 ;;
      --loss1) loss1=$2; shift 2 ;;
      --loss2) loss2=$2; shift 2 ;;
      --no-endpoint) endpoint=0; shift ;;
      --second-client) second=1; shift ;;
      --clients) clients=$2; shift 2 ;;
      --delay1) delay1=$2; shift 2 ;;
      --delay2) delay2=$2; shift 2 ;;
      --delay3) delay3=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  down
  for ns in "$cli" "$prx" "$srv"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  # Create each veth end directly inside its namespace, so names never collide between testbeds.
  ip link add name c1 netns "$cli" type veth peer name p1 netns "$prx"
  ip link add name c2 netns "$cli" type veth peer name p2 netns "$prx"
  ip link add name p3 netns "$prx" type veth peer name s1 netns "$srv"

  addr() { # ns dev v4 v6
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" addr add "$4/64" dev "$2" nodad
    ip -n "$1" link set "$2" up
  }
  addr "$cli" c1 10.0.1.2 fd00:1::2
  addr "$cli" c2 10.0.2.2 fd00:2::2
  addr "$prx" p1 10.0.1.1 fd00:1::1
  addr "$prx" p2 10.0.2.1 fd00:2::1
  addr "$prx" p3 10.0.3.1 fd00:3::1
  addr "$srv" s1 10.0.3.2 fd00:3::2

  # Client: path 1 is the default; policy routing sends each source address out of its own path.
  ip -n "$cli" route add default via 10.0.1.1 dev c1
  ip -n "$cli" -6 route add default via fd00:1::1 dev c1
  local i
  for i in 1 2; do
    ip -n "$cli" rule add from "10.0.$i.2" table "10$i"
    ip -n "$cli" route add default via "10.0.$i.1" dev "c$i" table "10$i"
    ip -n "$cli" -6 rule add from "fd00:$i::2" table "10$i"
    ip -n "$cli" -6 route add default via "fd00:$i::1" dev "c$i" table "10$i"
  done
  if [ "$second" = 1 ]; then
    ip netns add "$cl2"
    ip -n "$cl2" link set lo up
    ip link add name d1 netns "$cl2" type veth peer name p4 netns "$prx"
    ip link add name d2 netns "$cl2" type veth peer name p5 netns "$prx"
    for i in 1 2; do
      ip -n "$cl2" addr add "10.0.$((i + 3)).2/24" dev "d$i"
      ip -n "$cl2" link set "d$i" up
      ip -n "$prx" addr add "10.0.$((i + 3)).1/24" dev "p$((i + 3))"
      ip -n "$prx" link set "p$((i + 3))" up
    done
    ip -n "$cl2" route add default via 10.0.4.1 dev d1
  fi
  if [ "$clients" -gt 0 ]; then
    [[ "$clients" =~ ^[0-9]+$ ]] && [ "$clients" -le 250 ] || die "--clients takes 1..250, not $clients"
    local k
    for i in 1 2; do
      ip -n "$prx" link add "br$i" type bridge
      ip -n "$prx" addr add "10.$i.0.1/16" dev "br$i"
      ip -n "$prx" link set "br$i" up
    done
    for k in $(seq 1 "$clients"); do
      ip netns add "$prefix-c$k"
      ip -n "$prefix-c$k" link set lo up
      ip link add name a1 netns "$prefix-c$k" type veth peer name "q${k}a" netns "$prx"
      ip link add name a2 netns "$prefix-c$k" type veth peer name "q${k}b" netns "$prx"
      for i in 1 2; do
        local port="q${k}a"
        [ "$i" = 2 ] && port="q${k}b"
        ip -n "$prx" link set "$port" master "br$i" up
        ip -n "$prefix-c$k" addr add "10.$i.$k.2/16" dev "a$i"
        ip -n "$prefix-c$k" link set "a$i" up
      done
      ip -n "$prefix-c$k" route add default via 10.1.0.1 dev a1
    done
  fi
  ip -n "$srv" route add default via 10.0.3.1 dev s1
  ip -n "$srv" -6 route add default via fd00:3::1 dev s1
  ip netns exec "$prx" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

  # MPTCP: the client may open a second subflow from c2; the proxy accepts it.
  ip -n "$cli" mptcp limits set subflow 2 add_addr_accepted 2
  ip -n "$prx" mptcp limits set subflow 2 add_addr_accepted 2
  if [ "$endpoint" = 1 ]; then
    ip -n "$cli" mptcp endpoint add 10.0.2.2 dev c2 id 2 subflow
    ip -n "$cli" mptcp endpoint add fd00:2::2 dev c2 id 12 subflow
  fi

  [ -z "$rate1" ] || { shape "$prx" p1 "$rate1"; shape "$cli" c1 "$rate1"; }
  [ -z "$rate2" ] || { shape "$prx" p2 "$rate2"; shape "$cli" c2 "$rate2"; }
  if [ -n "$loss1$loss2" ]; then
    {
      echo "table inet testbed_loss {"
      echo "  chain in { type filter hook input priority 0;"
      [ -z "$loss1" ] || echo "    iifname \"c1\" numgen random mod 100 < $loss1 counter drop"
      [ -z "$loss2" ] || echo "    iifname \"c2\" numgen random mod 100 < $loss2 counter drop"
      echo "  }"
      echo "  chain out { type filter hook output priority 0;"
      [ -z "$loss1" ] || echo "    oifname \"c1\" numgen random mod 100 < $loss1 counter drop"
      [ -z "$loss2" ] || echo "    oifname \"c2\" numgen random mod 100 < $loss2 counter drop"
      echo "  }"
      echo "}"
    } | ip netns exec "$cli" nft -f -
  fi
  local n ms half
  for n in 1 2 3; do
    eval "ms=\$delay$n"
    [ -n "$ms" ] || continue
    [[ "$ms" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--delay$n takes milliseconds, not $ms"
    half=$(awk -v ms="$ms" 'BEGIN { printf "%.3fms", ms / 2 }')
    start_delay "$prx" "p$n" egress "$half" >/dev/null
    start_delay "$prx" "p$n" ingress "$half" >/dev/null
  done
}

case "$action" in
  up) up "$@" ;;
  down) down ;;
  delay)
    [ $# -ge 4 ] || die "usage: testbed.sh delay PREFIX cli|cl2|prx|srv DEV egress|ingress DELAY [options...]"
    role=$1; shift
    case "$role" in cli) ns=$cli ;; cl2) ns=$cl2 ;; prx) ns=$prx ;; srv) ns=$srv ;; *) die "unknown host $role" ;; esac
    start_delay "$ns" "$@"
    ;;
  exec)
    [ $# -ge 2 ] || die "usage: testbed.sh exec PREFIX cli|cl2|prx|srv CMD..."
    role=$1; shift
    case "$role" in
      cli) ns=$cli ;; cl2) ns=$cl2 ;; prx) ns=$prx ;; srv) ns=$srv ;;
      c[0-9]*) ns="$prefix-$role" ;;
      *) die "unknown host $role" ;;
    esac
    exec ip netns exec "$ns" "$@"
    ;;
  *) die "unknown action $action" ;;
esac
