#!/usr/bin/env bash
# The scale-out lab (issue 14): MPTCP clients reach a shared service address that several mptcp-proxy
# instances announce over BGP; a router spreads new connections over them with ECMP, and every later
# subflow goes straight to the instance that owns its connection (ADD_ADDR of the instance's own
# address, C flag on the shared one).
#
#   client A (PREFIX-cla)                 router (PREFIX-rtr)                 instance k (PREFIX-in<k>)
#   a1 10.1.1.2 <-- path 1 -->  ca1 10.1.1.1        ik 10.2.k.1 <------>  e1 10.2.k.2  (+ 10.99.0.1 on lo,
#   a2 10.1.2.2 <-- path 2 -->  ca2 10.1.2.1                                             added by the proxy)
#   client B (PREFIX-clb)                                                 server (PREFIX-srv)
#   b1 10.1.3.2 <-- path 1 -->  cb1 10.1.3.1        sv 10.3.0.1 <------>  s1 10.3.0.2
#   b2 10.1.4.2 <-- path 2 -->  cb2 10.1.4.1
#
# The router runs bird2 (deploy/bird/router.conf) with dynamic eBGP sessions from 10.2.0.0/16 and
# installs 10.99.0.1/32 as one ECMP route, hashed on L4 (`fib_multipath_hash_policy = 1`). Every
# instance runs bird2 (deploy/bird/instance.conf) announcing 10.99.0.1/32 while the proxy's TUN device
# `mptcp-anycast` exists; the proxy itself is started by the caller (`exec PREFIX in<k> mptcp-proxy
# --listen 10.99.0.1:3128 --announce 10.2.k.2`). The clients have `fullmesh` endpoints on both paths,
# accept one ADD_ADDR, and route each source address out of its own path. Downloads are shaped on the
# router's client-facing links (HTB; there is no netem here).
#
# Usage:
#   cluster.sh up PREFIX DIR [--instances N] [--rate MBIT]
#   cluster.sh down PREFIX
#   cluster.sh exec PREFIX rtr|cla|clb|srv|in<k> CMD...
#
# DIR receives the bird configurations, control sockets and logs. N is 1 to 9 (default 3).
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: cluster.sh up|down|exec|birdc PREFIX ..."
action=$1 prefix=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
bird_dir="$here/../bird"
service=10.99.0.1

namespaces() {
  ip netns list | awk -v p="$prefix-" 'index($1, p) == 1 {print $1}'
}

down() {
  local ns pid
  for ns in $(namespaces); do
    # Kill whatever still runs inside (bird, proxies, nginx), then drop the namespace.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

shape() { # ns dev mbit
  ip netns exec "$1" tc qdisc replace dev "$2" root handle 1: htb default 1
  ip netns exec "$1" tc class replace dev "$2" parent 1: classid 1:1 htb rate "$3mbit" ceil "$3mbit"
}

# Writes a copy of a shipped bird configuration with its `define` lines set: site FILE OUT NAME=VALUE...
site() {
  local file=$1 out=$2 expr=() kv
  shift 2
  for kv in "$@"; do
    expr+=(-e "s|^define ${kv%%=*} = [^;]*;|define ${kv%%=*} = ${kv#*=};|")
  done
  sed "${expr[@]}" "$file" > "$out"
}

start_bird() { # ns name conf
  ip netns exec "$1" bird -c "$3" -s "$dir/bird-$2.ctl" -P "$dir/bird-$2.pid" 2>>"$dir/bird-$2.log"
}

link() { # ns1 dev1 addr1 ns2 dev2 addr2
  ip link add name "$2" netns "$1" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3/24" dev "$2"
  ip -n "$4" addr add "$6/24" dev "$5"
  ip -n "$1" link set "$2" up
  ip -n "$4" link set "$5" up
}

client() { # ns letter first-path-number rate
  local ns=$1 l=$2 n=$3 rate=$4 i net
  for i in 1 2; do
    net=10.1.$((n + i - 1))
    link "$ns" "$l$i" "$net.2" "$rtr" "c$l$i" "$net.1"
    ip -n "$ns" rule add from "$net.2" table "10$i"
    ip -n "$ns" route add default via "$net.1" dev "$l$i" table "10$i"
    # fullmesh: a subflow from this address to every address the server announces. `subflow`
    # endpoints would join the initial (shared) address, which the C flag forbids.
    ip -n "$ns" mptcp endpoint add "$net.2" dev "$l$i" id "$i" fullmesh
    [ -z "$rate" ] || shape "$rtr" "c$l$i" "$rate"
  done
  ip -n "$ns" route add default via "10.1.$n.1" dev "${l}1"
  ip -n "$ns" mptcp limits set subflow 4 add_addr_accepted 1
}

up() {
  [ $# -ge 1 ] || die "usage: cluster.sh up PREFIX DIR [--instances N] [--rate MBIT]"
  dir=$(cd "$1" && pwd)
  shift
  local instances=3 rate="" k ns
  while [ $# -gt 0 ]; do
    case "$1" in
      --instances) instances=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  case "$instances" in [1-9]) ;; *) die "--instances must be 1 to 9" ;; esac
  down
  rtr="$prefix-rtr"
  for ns in "$rtr" "$prefix-cla" "$prefix-clb" "$prefix-srv"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip netns exec "$rtr" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1

  client "$prefix-cla" a 1 "$rate"
  client "$prefix-clb" b 3 "$rate"
  link "$prefix-srv" s1 10.3.0.2 "$rtr" sv 10.3.0.1
  ip -n "$prefix-srv" route add default via 10.3.0.1 dev s1

  site "$bird_dir/router.conf" "$dir/bird-rtr.conf" ROUTER_ID=10.3.0.1 LOCAL_AS=65000 \
    INSTANCES=10.2.0.0/16 INSTANCE_AS=65010 "SERVICES=[ $service/32 ]"
  start_bird "$rtr" rtr "$dir/bird-rtr.conf"
  for k in $(seq 1 "$instances"); do
    ns="$prefix-in$k"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    link "$ns" e1 "10.2.$k.2" "$rtr" "i$k" "10.2.$k.1"
    ip -n "$ns" route add default via "10.2.$k.1" dev e1
    site "$bird_dir/instance.conf" "$dir/bird-in$k.conf" ROUTER_ID="10.2.$k.2" LOCAL_AS=65010 \
      PEER="10.2.$k.1" PEER_AS=65000 SERVICE="$service/32"
    start_bird "$ns" "in$k" "$dir/bird-in$k.conf"
  done
  # Every BGP session established (the announcements follow the proxies).
  local i
  for i in $(seq 1 100); do
    [ "$(ip netns exec "$rtr" birdc -s "$dir/bird-rtr.ctl" show protocols 2>/dev/null | grep -c Established)" = "$instances" ] && return 0
    sleep 0.1
  done
  die "BGP sessions did not come up: $(ip netns exec "$rtr" birdc -s "$dir/bird-rtr.ctl" show protocols 2>&1)"
}

case "$action" in
  up) up "$@" ;;
  down) down ;;
  exec)
    [ $# -ge 2 ] || die "usage: cluster.sh exec PREFIX HOST CMD..."
    host=$1; shift
    exec ip netns exec "$prefix-$host" "$@"
    ;;
  *) die "unknown action $action" ;;
esac
