#!/usr/bin/env bash
# The detour lab of the thesis's Fig. 5.1 (seed 003) in six network namespaces: a single-homed client,
# three routers, a detour host and a server. The client's default path to the server crosses link 2;
# the detour path crosses links 4, 6 (twice) and 5.
#
#   client (PREFIX-cli)      r1 (PREFIX-r1)        r2 (PREFIX-r2)       server (PREFIX-srv)
#   l1 10.1.1.2 --link 1-- l1 10.1.1.1
#                           l2 10.1.2.1 --link 2-- l2 10.1.2.2
#                                                  l3 10.1.3.1 --link 3-- l3 10.1.3.2
#                           l4 10.1.4.1 --link 4-- l4 10.1.4.2 (r3)
#                                      (r3) l5 10.1.5.1 --link 5-- l5 10.1.5.2 (r2)
#                                      (r3) l6 10.1.6.1 --link 6-- l6 10.1.6.2  detour (PREFIX-dtr)
#
# Access links are 1, 3 and 6; core links 2, 4 and 5 (thesis §5.1.2). Every interface is named after its
# link, so shaping link k means both ends' `lk`.
#
# Usage:
#   detour.sh up PREFIX [--mode none|core-limited|symmetric] [--link-delay MS] [--loss2 PCT]
#                       [--delay2 MS] [--second-address]
#   detour.sh vpn PREFIX WORKDIR      start OpenVPN (detour: server, client: tun0 10.8.0.2) and wait
#   detour.sh down PREFIX
#   detour.sh exec PREFIX cli|r1|r2|r3|dtr|srv CMD...
#
# Modes (HTB on both ends of each link, so both directions): core-limited = access 20 Mbit/s, core
# 10 Mbit/s (the detour path has its own core bottleneck, so MPTCP can aggregate); symmetric = every
# link 10 Mbit/s (both subflows share link 1). Loss on link 2 is nftables `numgen random` in r1's
# forward chain, both directions (this kernel has no netem). Delay comes from the testbed's user-space
# delay line (`testbed-delay`, on each link end's egress): --link-delay MS on every link, each direction
# (the thesis gave every link 5 ms, as Mininet's link `delay`: a round trip crosses it twice);
# --delay2 MS on link 2 instead (the thesis's 100 ms "delayed" variant). --second-address gives the client a second interface (l7 10.1.7.2 on
# r1) with an MPTCP `subflow` endpoint, for the two-homed client test.
set -euo pipefail

die() { echo "detour.sh: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: detour.sh up|vpn|down|exec PREFIX ..."
action=$1 prefix=$2
shift 2
hosts=(cli r1 r2 r3 dtr srv)
ns() { echo "$prefix-$1"; }
# Where this lab's delay lines keep their logs.
delay_dir="${TMPDIR:-/tmp}/mpx-detour-$prefix"
# shellcheck source=deploy/testbed/delay-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/delay-lib.sh"

down() {
  local h n
  for h in "${hosts[@]}"; do
    n=$(ns "$h")
    if ip netns list | grep -qw "^$n"; then
      for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$n" 2>/dev/null || true
    fi
  done
  rm -rf "$delay_dir"
}

link() { # host-a host-b link-number addr-a addr-b
  ip link add name "l$3" netns "$(ns "$1")" type veth peer name "l$3" netns "$(ns "$2")"
  ip -n "$(ns "$1")" addr add "$4/24" dev "l$3"
  ip -n "$(ns "$2")" addr add "$5/24" dev "l$3"
  ip -n "$(ns "$1")" link set "l$3" up
  ip -n "$(ns "$2")" link set "l$3" up
}

shape() { # link-number mbit host-a host-b
  local h
  for h in "$3" "$4"; do
    ip netns exec "$(ns "$h")" tc qdisc replace dev "l$1" root handle 1: htb default 1
    ip netns exec "$(ns "$h")" tc class replace dev "l$1" parent 1: classid 1:1 htb rate "$2mbit" ceil "$2mbit" quantum 1514
  done
}

up() {
  local mode=none loss2="" delay2="" link_delay="" second=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --mode) mode=$2; shift 2 ;;
      --loss2) loss2=$2; shift 2 ;;
      --delay2) delay2=$2; shift 2 ;;
      --link-delay) link_delay=$2; shift 2 ;;
      --second-address) second=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  case "$mode" in none|core-limited|symmetric) ;; *) die "unknown mode $mode" ;; esac
  down
  local h
  for h in "${hosts[@]}"; do
    ip netns add "$(ns "$h")"
    ip -n "$(ns "$h")" link set lo up
  done
  link cli r1 1 10.1.1.2 10.1.1.1
  link r1 r2 2 10.1.2.1 10.1.2.2
  link r2 srv 3 10.1.3.1 10.1.3.2
  link r1 r3 4 10.1.4.1 10.1.4.2
  link r3 r2 5 10.1.5.1 10.1.5.2
  link r3 dtr 6 10.1.6.1 10.1.6.2

  ip -n "$(ns cli)" route add default via 10.1.1.1
  ip -n "$(ns srv)" route add default via 10.1.3.1
  ip -n "$(ns dtr)" route add default via 10.1.6.1
  # Static routes: client <-> server over link 2; anything to or from the detour over links 4 and 5.
  ip -n "$(ns r1)" route add 10.1.3.0/24 via 10.1.2.2
  ip -n "$(ns r1)" route add 10.1.5.0/24 via 10.1.4.2
  ip -n "$(ns r1)" route add 10.1.6.0/24 via 10.1.4.2
  ip -n "$(ns r2)" route add 10.1.1.0/24 via 10.1.2.1
  ip -n "$(ns r2)" route add 10.1.4.0/24 via 10.1.5.1
  ip -n "$(ns r2)" route add 10.1.6.0/24 via 10.1.5.1
  ip -n "$(ns r3)" route add 10.1.1.0/24 via 10.1.4.1
  ip -n "$(ns r3)" route add 10.1.2.0/24 via 10.1.4.1
  ip -n "$(ns r3)" route add 10.1.3.0/24 via 10.1.5.2
  for h in r1 r2 r3; do
    ip netns exec "$(ns "$h")" sysctl -qw net.ipv4.ip_forward=1
  done
  if [ "$second" = 1 ]; then
    link cli r1 7 10.1.7.2 10.1.7.1
    ip -n "$(ns r2)" route add 10.1.7.0/24 via 10.1.2.1
    ip -n "$(ns r3)" route add 10.1.7.0/24 via 10.1.4.1
    ip -n "$(ns cli)" rule add from 10.1.7.2 table 107
    ip -n "$(ns cli)" route add default via 10.1.7.1 dev l7 table 107
    ip -n "$(ns cli)" mptcp endpoint add 10.1.7.2 dev l7 id 7 subflow
  fi

  # MPTCP: the server accepts joins (from the detour's address too); the client may open several.
  ip -n "$(ns srv)" mptcp limits set subflow 8 add_addr_accepted 8
  ip -n "$(ns cli)" mptcp limits set subflow 8 add_addr_accepted 8

  case "$mode" in
    core-limited) access=20 core=10 ;;
    symmetric) access=10 core=10 ;;
    none) access="" core="" ;;
  esac
  if [ -n "$access" ]; then
    shape 1 "$access" cli r1
    shape 3 "$access" r2 srv
    shape 6 "$access" r3 dtr
    shape 2 "$core" r1 r2
    shape 4 "$core" r1 r3
    shape 5 "$core" r3 r2
    [ "$second" = 0 ] || shape 7 "$access" cli r1
  fi
  if [ -n "$loss2" ]; then
    # Per ten thousand, so fractions of a percent work.
    local per10k
    per10k=$(awk -v p="$loss2" 'BEGIN { printf "%d", p * 100 }')
    ip netns exec "$(ns r1)" nft -f - <<EOF
table inet testbed_loss {
  chain forward { type filter hook forward priority 0;
    oifname "l2" numgen random mod 10000 < $per10k counter drop
    iifname "l2" numgen random mod 10000 < $per10k counter drop
  }
}
EOF
  fi
  # Each link, each direction: link 2 gets --delay2 when given, every link --link-delay. A line sits on a
  # router (egress of both ends between routers; egress and ingress of the router's end of an access
  # link), never on an end host's egress, where held packets would count against TCP Small Queues and
  # throttle the sender.
  local k d
  for k in 1 2 3 4 5 6 7; do
    d=$link_delay
    [ "$k" = 2 ] && [ -n "$delay2" ] && d=$delay2
    [ -n "$d" ] && [ "$d" != 0 ] || continue
    case $k in
      2) lines="r1:egress r2:egress" ;; 4) lines="r1:egress r3:egress" ;; 5) lines="r3:egress r2:egress" ;;
      1) lines="r1:egress r1:ingress" ;; 3) lines="r2:egress r2:ingress" ;; 6) lines="r3:egress r3:ingress" ;;
      7) [ "$second" = 1 ] || continue; lines="r1:egress r1:ingress" ;;
    esac
    for line in $lines; do
      start_delay "$(ns "${line%%:*}")" "l$k" "${line##*:}" "${d}ms" >/dev/null
    done
  done
}

vpn() { # WORKDIR: certificates, configs and logs go there
  local work=$1
  mkdir -p "$work"
  local side
  for side in server client; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=detour-$side" -keyout "$work/$side.key" -out "$work/$side.crt" 2>/dev/null
  done
  fp() { openssl x509 -in "$work/$1.crt" -noout -fingerprint -sha256 | cut -d= -f2; }
  # Point-to-point TLS mode, peers pinned by fingerprint. As in the thesis (§4.1.1), the data channel is
  # neither encrypted nor signed once the TLS handshake has authenticated both ends.
  local common="--dev tun0 --dev-type tun --proto udp --port 1194 --dh none --disable-dco --data-ciphers none --cipher none --auth none --verb 3 --ping 5 --ping-exit 60 --allow-compression no"
  # shellcheck disable=SC2086
  ip netns exec "$(ns dtr)" openvpn $common --local 10.1.6.2 --tls-server --cert "$work/server.crt" \
    --key "$work/server.key" --peer-fingerprint "$(fp client)" --ifconfig 10.8.0.1 10.8.0.2 \
    --log "$work/server.log" --daemon --writepid "$work/server.pid"
  # shellcheck disable=SC2086
  ip netns exec "$(ns cli)" openvpn $common --remote 10.1.6.2 --tls-client --cert "$work/client.crt" \
    --key "$work/client.key" --peer-fingerprint "$(fp server)" --ifconfig 10.8.0.2 10.8.0.1 \
    --log "$work/client.log" --daemon --writepid "$work/client.pid"
  # The detour forwards tunnel traffic and masquerades it (thesis §4.1.1: OpenVPN does not NAT).
  ip netns exec "$(ns dtr)" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$(ns dtr)" nft -f - <<EOF
table ip testbed_vpn {
  chain postrouting { type nat hook postrouting priority srcnat;
    ip saddr 10.8.0.0/24 oifname "l6" masquerade
  }
}
EOF
  # Sockets bound to the tunnel address leave through the tunnel (iperf3 --bind, TCP via tunnel).
  ip -n "$(ns cli)" rule add from 10.8.0.2 table 108
  local i
  for i in $(seq 1 100); do
    if grep -q "Initialization Sequence Completed" "$work/client.log" 2>/dev/null &&
       grep -q "Initialization Sequence Completed" "$work/server.log" 2>/dev/null; then
      ip -n "$(ns cli)" route add default dev tun0 table 108
      return 0
    fi
    sleep 0.1
  done
  echo "OpenVPN did not come up; logs:" >&2
  cat "$work/server.log" "$work/client.log" >&2 || true
  return 1
}

case "$action" in
  up) up "$@" ;;
  vpn) [ $# -ge 1 ] || die "usage: detour.sh vpn PREFIX WORKDIR"; vpn "$1" ;;
  down) down ;;
  exec)
    [ $# -ge 2 ] || die "usage: detour.sh exec PREFIX HOST CMD..."
    host=$1; shift
    case " ${hosts[*]} " in *" $host "*) ;; *) die "unknown host $host" ;; esac
    exec ip netns exec "$(ns "$host")" "$@"
    ;;
  *) die "unknown action $action" ;;
esac
