#!/usr/bin/env python3
"""A small UDP echo for bench.py's `mpip` latency test.

  mpip_echo.py server PORT
  mpip_echo.py client PORT SIZE COUNT INTERVAL_S TARGET [TARGET...]

The client sends COUNT rounds of SIZE-byte datagrams, one request in flight at a time. Each round sends to
every TARGET in turn (the order alternates between rounds, so neither target always goes first), waits for
the echo, then sleeps until INTERVAL_S after the round started. Measuring the targets interleaved keeps
them under the same conditions (CPU contention, background load) in the same second. It prints one JSON
object: {"TARGET": {"rtt_ns": [...], "lost": n}, ...}.
"""

import json
import socket
import struct
import sys
import time


def server(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def client(port, size, count, interval, targets):
    socks = {}
    for t in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((t, port))
        s.settimeout(1.0)
        socks[t] = s
    out = {t: {"rtt_ns": [], "lost": 0} for t in targets}
    pad = b"\0" * max(0, size - 8)
    for i in range(count):
        started = time.perf_counter()
        order = targets if i % 2 == 0 else targets[::-1]
        for t in order:
            s = socks[t]
            request = struct.pack("!Q", i) + pad
            # Before send(): on a veth the echo can come back before send() returns.
            sent = time.perf_counter_ns()
            s.send(request)
            while True:
                try:
                    data = s.recv(65535)
                except (socket.timeout, ConnectionRefusedError):
                    out[t]["lost"] += 1
                    break
                if struct.unpack("!Q", data[:8])[0] == i:
                    out[t]["rtt_ns"].append(time.perf_counter_ns() - sent)
                    break
                # a late echo of an earlier round: keep waiting for this one
        left = interval - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:])
