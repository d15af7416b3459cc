#!/usr/bin/env python3
"""mptcp-proxy benchmarks, measured side by side in one run on the netns testbed (issue 7).

Subjects: mptcp-proxy; HAProxy 3.4 terminating MPTCP natively (`bind mptcp@`, built from the shared anchors
with build-haproxy.sh), configured for speed; Squid (Debian) run under `mptcpize run` with caching off, as in
the seeds; and the direct routed path without a proxy. The client is always MPTCP (`mptcpize run curl|wrk`)
with two paths. Proxies' CPU (user + system, all threads) comes from /proc/PID/stat.

  bench.py throughput [--size-mib 256] [--runs 5]   (a) bulk download, plus the iperf3 -R MPTCP limit
  bench.py requests   [--seconds 10] [--runs 3] [--compare BIN]... [--perf] [--skip squid]
                                                    (b) keep-alive small objects with wrk: req/s, p50/p99,
                                                    CPU and context switches per request; --compare adds a
                                                    second mptcp-proxy build (A/B in the same run); --perf
                                                    records a profile of mptcp-proxy under the same load
  bench.py conversion [--requests 200] [--rounds 30]   (c) seed 002 Table 1: SYN and data conversion delay,
                                                     with RFC 8803 Convert (mptcp-convert) beside CONNECT
                                                     and Squid; time to first byte over 20 ms RTT paths
  bench.py aggregation [--seconds 10] [--runs 3]    (d) thesis Table 1: 10 Mbit paths, 0/1% loss
  bench.py concurrency [--tunnels 9900] [--downloads 1000]    (f) idle tunnels, fairness
      (9900, not 10000: a tunnel holds two fds in the proxy, and where RLIMIT_NOFILE's hard limit is
      20000 and cannot be raised, as on the sandbox these numbers come from, 10000 do not fit)
  bench.py throttle   [--connections 500]             (e) seed 002 Figs. 6/7 per-path time series;
                                                     rule-install latency; cost of the nft rules
  bench.py throttle-scale [--subflows 10000] [--runs 3]  (e') issue 15: 10,000 steered subflows from two
                                                     client namespaces: rule-install latency p50/p99
                                                     (exact), bulk download with them against none,
                                                     memory per steered subflow, resync time
  bench.py fig9                                     (i) Fig. 9 with headless Chromium: a 720p video and a download
                                                     over 2 x 2 Mbit/s (+20 ms on one), coordinated routing at 60 s,
                                                     download stopped at 120 s: per-second CSV and plot
  bench.py mpip --clients 32 [--seconds 10]          (g) N real mpipd clients at once against one: aggregate
                                                     Gbit/s and CPU s/GB of each end (capacity, issue 16)
  bench.py mpip [--seconds 10] [--runs 3] [--perf]   (g) MPIP tunnel (mpipd <-> mpip-proxy, two unshaped
                                                     paths) against the direct path: iperf3 throughput,
                                                     CPU s/GB per end, added latency p50/p99 idle and
                                                     loaded; --perf also records a perf profile
  bench.py detour [--runs 5] [--seconds 10] [--scenario S]
                                                     (h) thesis Table 1 (seed 003): symmetric and core-limited,
                                                     plain, 1% loss and 100 ms delay on link 2; TCP, TCP via
                                                     the NAT detour, TCP via OpenVPN, 1-subflow MPTCP, MPTCP +
                                                     NAT detour, MPTCP + tunnel detour (iperf3 upload, bytes
                                                     of seconds 1-10 / 9 s, as the thesis measured); and
                                                     TCP through the NAT detour with 10 vs 10,000 mappings
                                                     (--scenario scale runs only that)
  bench.py all

Each run writes bench/results/<bench>-<UTC time>.csv (bench,scenario,subject,run,metric,value,unit),
prints a summary with ratios against the peers measured in the same run, and draws PNG plots with
gnuplot when it is installed. Needs root (network namespaces).
"""

import argparse
import csv
import json
import datetime
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT / "deploy/testbed/testbed.sh"
RESULTS = ROOT / "bench/results"
TARGET = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")  # an absolute CARGO_TARGET_DIR replaces it
PROXY_BIN = TARGET / "release/mptcp-proxy"
MPIP_PROXY_BIN = TARGET / "release/mpip-proxy"
MPIPD_BIN = TARGET / "release/mpipd"
CONVERT_BIN = TARGET / "release/mptcp-convert"
DELAY_BIN = TARGET / "release/testbed-delay"
ECHO = Path(__file__).resolve().parent / "mpip_echo.py"
IPPROTO_MPTCP = 262
STAMP = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def haproxy_binary():
    """HAProxy 3.4.0 built by the shared anchors' build-haproxy.sh (the unchanged release; the Debian 12
    package is 2.6, without MPTCP). The script lies in `shared/anchors/` beside the checkout (found from
    a worktree too) or where $HAPROXY_BUILD_SCRIPT says; it builds once and reuses the build."""
    script = os.environ.get("HAPROXY_BUILD_SCRIPT")
    if not script:
        found = [p / "shared/anchors/build-haproxy.sh" for p in ROOT.parents
                 if (p / "shared/anchors/build-haproxy.sh").exists()]
        if not found:
            raise RuntimeError("build-haproxy.sh not found in shared/anchors/ beside the checkout "
                               "(set HAPROXY_BUILD_SCRIPT)")
        script = found[0]
    out = run(["bash", str(script)], check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script}: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


class Lab:
    """One testbed (three namespaces) with nginx, and the proxies under test in the proxy namespace."""

    def __init__(self, name, rates=(None, None), losses=(None, None), server_rate=None, delays=(None, None),
                 clients=0, extra=(), second_client=False):
        self.prefix = f"b{os.getpid() % 100000}{name}"
        args = [str(TESTBED), "up", self.prefix, *extra] + (["--second-client"] if second_client else [])
        if clients:
            args += ["--clients", str(clients)]
        for i, delay in enumerate(delays, 1):
            if delay:  # added round-trip time in ms, the testbed's user-space delay line
                args += [f"--delay{i}", str(delay)]
        for i, rate in enumerate(rates, 1):
            if rate:
                args += [f"--rate{i}", str(rate)]
        for i, loss in enumerate(losses, 1):
            if loss:
                args += [f"--loss{i}", str(loss)]
        run(args, env={**os.environ, "TESTBED_DELAY": str(DELAY_BIN)})
        self.ns = {h: f"{self.prefix}-{h}" for h in ("cli", "cl2", "prx", "srv")}
        self.ns.update({f"c{k}": f"{self.prefix}-c{k}" for k in range(1, clients + 1)})
        self.work = Path(tempfile.mkdtemp(prefix="mpx-bench-"))
        self.procs = []
        if server_rate:
            for ns, dev in (("prx", "p3"), ("srv", "s1")):
                self.exec(ns, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
                self.exec(ns, "tc", "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1",
                          "htb", "rate", f"{server_rate}mbit", "ceil", f"{server_rate}mbit")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        run([str(TESTBED), "down", self.prefix], check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def exec(self, host, *cmd, check=True, **kw):
        return run(["ip", "netns", "exec", self.ns[host], *cmd], check=check, **kw)

    def spawn(self, host, *cmd, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd], **kw)
        self.procs.append(p)
        return p

    def wait_port(self, host, address, port, timeout=20.0):
        code = (f"import socket,time\nend=time.time()+{timeout}\n"
                f"while time.time()<end:\n"
                f"  try: socket.create_connection(('{address}',{port}),0.2).close(); raise SystemExit(0)\n"
                f"  except OSError: time.sleep(0.05)\nraise SystemExit(1)")
        if self.exec(host, sys.executable, "-c", code, check=False).returncode != 0:
            raise RuntimeError(f"{address}:{port} did not come up in {host}")

    def nginx(self, files):
        www = self.work / "www"
        www.mkdir(exist_ok=True)
        for name, size in files.items():
            with open(www / name, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        conf = self.work / "nginx.conf"
        w = self.work
        conf.write_text(
            f"daemon on; user root; worker_processes 1; worker_rlimit_nofile 65536;\n"
            f"pid {w}/nginx.pid; error_log {w}/nginx-error.log;\n"
            f"events {{ worker_connections 30000; }}\n"
            f"http {{ access_log off; sendfile on; keepalive_requests 1000000; client_header_timeout 600s;\n"
            f"  client_body_temp_path {w}/b; proxy_temp_path {w}/p; fastcgi_temp_path {w}/f;\n"
            f"  uwsgi_temp_path {w}/u; scgi_temp_path {w}/s;\n"
            f"  server {{ listen 10.0.3.2:80 backlog=65535; root {www}; }} }}\n")
        self.exec("srv", "nginx", "-c", str(conf))
        self.wait_port("srv", "10.0.3.2", 80)

    def proxy(self, port, mode="auto", extra="", binary=None):
        conf = self.work / f"proxy-{port}.toml"
        conf.write_text(f'[[listener]]\naddress = "0.0.0.0:{port}"\n[access_log]\npath = "off"\n'
                        f'[metrics]\naddress = "off"\n[relay]\nmode = "{mode}"\n'
                        f'[acl]\nconnect_ports = [80, 443]\n{extra}')
        p = self.spawn("prx", "prlimit", "--nofile=20000", str(binary or PROXY_BIN), "--config", str(conf))
        self.wait_port("prx", "10.0.1.1", port)
        return p

    def haproxy(self, http_port, tcp_port, reuse="always"):
        """HAProxy 3.4 terminating MPTCP natively, set up as its users would for speed: one thread per core,
        `mode http` with `http-reuse {reuse}` on `http_port` (absolute-form requests are forwarded to nginx
        like origin-form ones), `mode tcp` with `option splice-auto` on `tcp_port` (the relay, as a
        CONNECT tunnel would carry it). Plain TCP to nginx. Returns the process (pid = haproxy's)."""
        conf = self.work / f"haproxy-{http_port}.cfg"
        conf.write_text(
            f"global\n  nbthread {os.cpu_count()}\n"  # maxconn follows RLIMIT_NOFILE (20000 here)
            f"  stats socket {self.work}/haproxy-{http_port}.sock\n"
            f"defaults\n  timeout connect 10s\n  timeout client 5m\n  timeout server 5m\n"
            f"  timeout http-keep-alive 5m\n  timeout http-request 30s\n"
            f"frontend http\n  mode http\n  bind mptcp@0.0.0.0:{http_port}\n  default_backend nginx_http\n"
            f"backend nginx_http\n  mode http\n  http-reuse {reuse}\n  server nginx 10.0.3.2:80\n"
            f"listen tcp\n  mode tcp\n  bind mptcp@0.0.0.0:{tcp_port}\n  option splice-auto\n"
            f"  server nginx 10.0.3.2:80\n")
        binary = haproxy_binary()
        check = run([binary, "-c", "-f", str(conf)], check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout} {check.stderr}")
        p = self.spawn("prx", "prlimit", "--nofile=20000", binary, "-f", str(conf))
        self.wait_port("prx", "10.0.1.1", http_port)
        self.wait_port("prx", "10.0.1.1", tcp_port)
        return p

    def squid(self, port, persistent=True):
        cache = self.work / "squid-cache"
        cache.mkdir(exist_ok=True)
        shutil.chown(cache, "proxy", "proxy")
        conf = self.work / f"squid-{port}.conf"
        conf.write_text(
            f"http_port 0.0.0.0:{port}\nhttp_access allow all\ncache deny all\ncache_mem 0 MB\n"
            f"access_log none\ncache_log {cache}/cache.log\npid_filename {self.work}/squid-{port}.pid\n"
            f"coredump_dir {cache}\nshutdown_lifetime 0 seconds\nmax_filedescriptors 20000\n"
            f"server_persistent_connections {'on' if persistent else 'off'}\n")
        p = self.spawn("prx", "prlimit", "--nofile=20000", "mptcpize", "run", "squid", "-N", "-f", str(conf))
        self.wait_port("prx", "10.0.1.1", port)
        return p


CONVERT_LISTENER = '[[listener]]\naddress = "0.0.0.0:5124"\nmode = "convert"\n'


def start_convert_agent(lab):
    """The RFC 8803 client agent in the client namespace (SOCKS5 on 127.0.0.1:1080), converter 10.0.1.1:5124;
    the proxy namespace gets the TFO server bit (namespace-local sysctl)."""
    lab.exec("prx", "sysctl", "-qw", "net.ipv4.tcp_fastopen=3")
    lab.spawn("cli", str(CONVERT_BIN), "--converter", "10.0.1.1")
    lab.wait_port("cli", "127.0.0.1", 1080)


def via_convert():
    """curl options for a request through mptcp-convert (curl resolves nothing: the URLs are addresses)."""
    return ["--socks5", "127.0.0.1:1080"]


class Results:
    """Rows of one benchmark run, written as CSV."""

    def __init__(self, bench):
        self.bench = bench
        self.rows = []

    def add(self, scenario, subject, run_no, metric, value, unit):
        self.rows.append(dict(bench=self.bench, scenario=scenario, subject=subject, run=run_no,
                              metric=metric, value=value, unit=unit))

    def values(self, scenario, subject, metric):
        return [r["value"] for r in self.rows
                if r["scenario"] == scenario and r["subject"] == subject and r["metric"] == metric]

    def median(self, scenario, subject, metric):
        v = self.values(scenario, subject, metric)
        return statistics.median(v) if v else float("nan")

    def save(self):
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.bench}-{STAMP}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["bench", "scenario", "subject", "run", "metric", "value", "unit"])
            w.writeheader()
            w.writerows(self.rows)
        print(f"wrote {path.relative_to(ROOT)}")
        return path


MPTCP = ["mptcpize", "run"]


def curl_fetch(lab, wrapper, options, url, max_time=None):
    """Downloads url with `wrapper curl options` in the client namespace; returns (bytes, seconds)."""
    cmd = [*wrapper, "curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}\n", *options]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    r = lab.exec("cli", *cmd, url, check=False)
    if r.returncode not in (0, 28):  # 28: --max-time reached, the rate is still measured
        raise RuntimeError(f"{' '.join(cmd)} {url}: {r.stderr.strip()}")
    size, seconds = r.stdout.split()
    return int(size), float(seconds)


def via_proxy(port, tunnel=False):
    """curl options for a request through the proxy on `port` (CONNECT when `tunnel`)."""
    return ["-x", f"http://10.0.1.1:{port}"] + (["-p"] if tunnel else [])


def proxy_pids(lab, procs):
    """{subject: pid} of the proxies under test (the process under `ip netns exec`, prlimit, mptcpize)."""
    names = {"mptcp-proxy": "mptcp-proxy", "haproxy": "haproxy", "squid": "squid"}
    pids = {}
    for subject, p in procs.items():
        name = next(n for prefix, n in names.items() if subject.startswith(prefix))
        pids[subject] = child_pid(p.pid, name)
    return pids


def bench_throughput(size_mib=256, runs=5):
    res = Results("throughput")
    with Lab("tp") as lab:
        lab.nginx({"big.bin": size_mib << 20})
        procs = {"mptcp-proxy": lab.proxy(3128, "copy"), "mptcp-proxy-splice": lab.proxy(3130, "splice"),
                 "squid": lab.squid(3129), "haproxy": lab.haproxy(3140, 3141)}
        pids = proxy_pids(lab, procs)
        lab.spawn("prx", "mptcpize", "run", "iperf3", "-s", "-B", "10.0.1.1", "-p", "5201")
        lab.wait_port("prx", "10.0.1.1", 5201)
        url = "http://10.0.3.2/big.bin"
        # absolute-form: HAProxy `mode http` with the same absolute-form request; connect: our and Squid's
        # CONNECT tunnels against HAProxy's `mode tcp` relay (splice-auto) to the same server.
        subjects = {
            "absolute-form": [("mptcp-proxy", via_proxy(3128), url), ("mptcp-proxy-splice", via_proxy(3130), url),
                              ("haproxy", via_proxy(3140), url), ("squid", via_proxy(3129), url)],
            "connect": [("mptcp-proxy", via_proxy(3128, True), url),
                        ("mptcp-proxy-splice", via_proxy(3130, True), url),
                        ("haproxy", [], "http://10.0.1.1:3141/big.bin"), ("squid", via_proxy(3129, True), url)],
        }
        for scenario, tunnel in (("absolute-form", False), ("connect", True)):
            for n in range(1, runs + 1):
                # The kernel's own MPTCP rate, interleaved with the proxies in every round.
                out = lab.exec("cli", "mptcpize", "run", "iperf3", "-c", "10.0.1.1", "-p", "5201",
                               "-R", "-t", "3", "-J")
                bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
                res.add(scenario, "mptcp_limit", n, "throughput", bps, "bit/s")
                if not tunnel:
                    size, sec = curl_fetch(lab, [], [], url)
                    res.add(scenario, "direct_tcp", n, "throughput", size * 8 / sec, "bit/s")
                order = subjects[scenario][n % 2:] + subjects[scenario][:n % 2]  # alternate who goes first
                for subject, options, target in order:
                    cpu0 = proc_cpu(pids[subject])
                    size, sec = curl_fetch(lab, MPTCP, options, target)
                    cpu = proc_cpu(pids[subject]) - cpu0
                    if size != size_mib << 20:
                        raise RuntimeError(f"{subject} delivered {size} bytes")
                    res.add(scenario, subject, n, "throughput", size * 8 / sec, "bit/s")
                    res.add(scenario, subject, n, "cpu_per_gb", cpu / (size / 1e9), "s/GB")
    res.save()
    print(f"\n(a) bulk throughput, {size_mib} MiB, median of {runs}, Gbit/s, ratios and proxy CPU s/GB")
    print(f"{'scenario':<14}{'subject':<20}{'Gbit/s':>8}{'x limit':>9}{'x haproxy':>10}{'x squid':>9}"
          f"{'CPU s/GB':>9}{'x haproxy':>10}")
    for scenario in ("absolute-form", "connect"):
        limit = res.median(scenario, "mptcp_limit", "throughput")
        squid = res.median(scenario, "squid", "throughput")
        haproxy = res.median(scenario, "haproxy", "throughput")
        haproxy_cpu = res.median(scenario, "haproxy", "cpu_per_gb")
        for subject in ("mptcp_limit", "direct_tcp", "mptcp-proxy", "mptcp-proxy-splice", "haproxy", "squid"):
            m = res.median(scenario, subject, "throughput")
            cpu = res.median(scenario, subject, "cpu_per_gb")
            if m == m:
                cpu_text = f"{cpu:>9.3f}{cpu / haproxy_cpu:>10.2f}" if cpu == cpu else f"{'-':>9}{'-':>10}"
                print(f"{scenario:<14}{subject:<20}{m / 1e9:>8.2f}{m / limit:>9.2f}{m / haproxy:>10.2f}"
                      f"{m / squid:>9.2f}{cpu_text}")
    plot_bars(res, "throughput", "Throughput (Gbit/s)", 1e-9)
    return res


def parse_wrk(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\b", text, re.M):
        lat[pct] = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    return rps, lat.get("50"), lat.get("99")


def wrk_counts(text):
    """(requests completed, responses that were not 2xx/3xx, socket errors) from wrk's output."""
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return requests, int(bad.group(1)) if bad else 0, sum(map(int, errors.groups())) if errors else 0


def proc_switches(pid):
    """Context switches (voluntary + involuntary) of all threads of a process."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        total += sum(int(v) for v in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M))
    return total


def perf_profile(pid, seconds, name):
    """Records `perf record -g` of pid for `seconds` and writes the flat and per-symbol reports to
    bench/results/NAME-perf-STAMP.txt (software cpu-clock: this VM has no hardware counters)."""
    if not shutil.which("perf"):
        print("perf is not installed: no profile")
        return None
    data = Path(tempfile.mkdtemp(prefix="mpx-perf-")) / "perf.data"
    run(["perf", "record", "-e", "cpu-clock", "-g", "-o", str(data), "-p", str(pid), "--", "sleep",
         str(seconds)], check=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / f"{name}-perf-{STAMP}.txt"
    with open(report, "w") as f:
        for sort in ("dso", "dso,sym"):
            f.write(run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                         "--percent-limit", "0.3", "-g", "none"], check=False).stdout)
        f.write(run(["perf", "report", "-i", str(data), "--stdio", "--children", "--sort", "sym",
                     "--percent-limit", "2", "-g", "none"], check=False).stdout)
    shutil.rmtree(data.parent, ignore_errors=True)
    print(f"wrote {report.relative_to(ROOT)}")
    return report


PERF_COUNTS = ["raw_syscalls:sys_enter", "sched:sched_switch", "sched:sched_wakeup", "syscalls:sys_enter_futex",
               "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_recvmsg",
               "syscalls:sys_enter_read", "syscalls:sys_enter_writev", "syscalls:sys_enter_sendmsg",
               "syscalls:sys_enter_sendto", "syscalls:sys_enter_write"]
PERF_NAMES = [e.split(":")[1].replace("sys_enter_", "") for e in PERF_COUNTS]


def perf_stat_counts(text):
    """{event: count} from `perf stat -x,` output (event names without their tracepoint group)."""
    counts = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 3 and fields[0].replace(".", "", 1).isdigit():
            counts[fields[2].split(":")[-1].replace("sys_enter_", "")] = float(fields[0])
    return counts


REQUEST_METRICS = (("requests_per_second", "req/s", 1, ".0f"), ("latency_p50", "p50 ms", 1e3, ".3f"),
                   ("latency_p99", "p99 ms", 1e3, ".3f"), ("cpu_per_request", "CPU us", 1e6, ".1f"),
                   ("switches_per_request", "cs/req", 1, ".2f"),
                   ("second_path_packets_per_request", "p2 pk", 1, ".2f"))


def link_packets(lab, host, ifname):
    """Packets received + sent on `ifname` in `host`'s namespace."""
    out = lab.exec(host, "ip", "-j", "-s", "link", "show", "dev", ifname).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["packets"] + stats["tx"]["packets"]


def bench_requests(seconds=10, connections=32, runs=3, compare=None, perf=False, skip=()):
    """Keep-alive 1 KiB objects through each subject with `wrk -t2 -cN`, subjects interleaved round by round
    (the order rotates each round). `compare` lists more mptcp-proxy binaries measured the same way, each as the
    subject `mptcp-proxy@NAME` (an A/B of builds in one run)."""
    res = Results("requests")
    with Lab("rq") as lab:
        lab.nginx({"small.txt": 1024})
        procs = {"mptcp-proxy": lab.proxy(3128), "haproxy": lab.haproxy(3140, 3141)}
        if "squid" not in skip:
            procs["squid"] = lab.squid(3129)
        ports = {"mptcp-proxy": 3128, "haproxy": 3140, "squid": 3129}
        for i, binary in enumerate(compare or []):
            subject = f"mptcp-proxy@{Path(binary).name}"
            procs[subject] = lab.proxy(3150 + i, binary=binary)
            ports[subject] = 3150 + i
        pids = proxy_pids(lab, procs)
        script = lab.work / "absolute.lua"
        # Every proxy gets the same absolute-form request over MPTCP, with the Host a proxy client sends
        # (curl -x): HAProxy answers 400 when Host differs from the absolute-form authority.
        script.write_text('wrk.path = "http://10.0.3.2/small.txt"\nwrk.headers["Host"] = "10.0.3.2"\n')
        subjects = {s: ["mptcpize", "run", "wrk", "-s", str(script), f"http://10.0.1.1:{ports[s]}"] for s in procs}
        if "direct_tcp" not in skip:
            subjects["direct_tcp"] = ["wrk", "http://10.0.3.2/small.txt"]
        names = list(subjects)
        for n in range(1, runs + 1):
            for subject in names[n % len(names):] + names[:n % len(names)]:
                cmd = subjects[subject]
                prog, rest = cmd[:cmd.index("wrk") + 1], cmd[cmd.index("wrk") + 1:]
                pid = pids.get(subject)
                cpu0, cs0 = (proc_cpu(pid), proc_switches(pid)) if pid else (0, 0)
                p2_before = link_packets(lab, "prx", "p2")
                out = lab.exec("cli", *prog, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *rest)
                p2_after = link_packets(lab, "prx", "p2")
                rps, p50, p99 = parse_wrk(out.stdout)
                requests, bad, errors = wrk_counts(out.stdout)
                if bad or errors:
                    raise RuntimeError(f"{subject}: {bad} non-2xx responses, {errors} socket errors\n{out.stdout}")
                res.add("keep-alive", subject, n, "requests_per_second", rps, "1/s")
                res.add("keep-alive", subject, n, "latency_p50", p50, "s")
                res.add("keep-alive", subject, n, "latency_p99", p99, "s")
                res.add("keep-alive", subject, n, "requests", requests, "1")
                # The proxies' MPTCP clients have a second path (p2): in some rounds the kernel moves part of
                # the traffic onto it, and such rounds run slower for every subject (bench/README.md, issue 17).
                res.add("keep-alive", subject, n, "second_path_packets_per_request",
                        (p2_after - p2_before) / requests, "1")
                if pid:
                    res.add("keep-alive", subject, n, "cpu_per_request", (proc_cpu(pid) - cpu0) / requests, "s")
                    res.add("keep-alive", subject, n, "switches_per_request",
                            (proc_switches(pid) - cs0) / requests, "1")
                time.sleep(1.0)  # let TIME_WAIT and the proxies' idle work settle between subjects
        if perf:
            for subject in [s for s in procs if s.startswith("mptcp-proxy")] + ["haproxy"]:
                cmd = subjects[subject]
                prog, rest = cmd[:cmd.index("wrk") + 1], cmd[cmd.index("wrk") + 1:]
                # System calls, context switches and wakeups per request: counts that do not depend on how
                # busy the shared machine is.
                counting = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(PERF_COUNTS), "-p",
                                             str(pids[subject])], stderr=subprocess.PIPE, text=True)
                time.sleep(0.5)
                out = lab.exec("cli", *prog, "-t2", f"-c{connections}", f"-d{seconds}s", *rest)
                counting.send_signal(signal.SIGINT)
                requests = wrk_counts(out.stdout)[0]
                for event, count in perf_stat_counts(counting.communicate()[1]).items():
                    res.add("keep-alive", subject, 1, f"{event}_per_request", count / requests, "1")
                load = lab.spawn("cli", *prog, "-t2", f"-c{connections}", f"-d{seconds + 4}s", *rest)
                time.sleep(2.0)
                perf_profile(pids[subject], seconds, f"requests-{subject}")
                load.wait()
    res.save()
    print(f"\n(b) keep-alive 1 KiB objects, wrk -t2 -c{connections} -d{seconds}s, median of {runs}; CPU is the "
          f"proxy's user + system time per request, cs the context switches of its threads per request")
    print(f"{'subject':<22}" + "".join(f"{label:>10}{'x hap':>7}" for _, label, _, _ in REQUEST_METRICS))
    for subject in names:
        line = f"{subject:<22}"
        for metric, _, scale, fmt in REQUEST_METRICS:
            v = res.median("keep-alive", subject, metric)
            ratio = v / res.median("keep-alive", "haproxy", metric)
            line += f"{format(v * scale, fmt):>10}{ratio:>7.2f}" if v == v else f"{'-':>10}{'':>7}"
        print(line)
    print("\nround by round (req/s @ packets per request on the second client path)")
    for subject in names:
        rounds = zip(res.values("keep-alive", subject, "requests_per_second"),
                     res.values("keep-alive", subject, "second_path_packets_per_request"))
        print(f"{subject:<22}" + "  ".join(f"{rps:>7.0f} @ {p2:.2f}" for rps, p2 in rounds))
    if perf:
        print("\nper request, perf stat over one more run (syscalls, context switches, wakeups it causes, ...)")
        print(f"{'subject':<22}" + "".join(f"{e[:8]:>9}" for e in PERF_NAMES))
        for subject in [s for s in names if s.startswith("mptcp-proxy")] + ["haproxy"]:
            print(f"{subject:<22}" + "".join(f"{res.median('keep-alive', subject, f'{e}_per_request'):>9.2f}"
                                             for e in PERF_NAMES))
    if "squid" not in skip:
        squid = res.median("keep-alive", "squid", "requests_per_second")
        print(f"mptcp-proxy x squid: {res.median('keep-alive', 'mptcp-proxy', 'requests_per_second') / squid:.2f} req/s")
    return res


def tshark_rows(pcap):
    out = run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=,", "-e", "frame.time_epoch",
               "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.srcport", "-e", "tcp.dstport",
               "-e", "tcp.flags.syn", "-e", "tcp.flags.ack", "-e", "tcp.len"]).stdout
    rows = []
    for line in out.splitlines():
        f = line.split(",")
        if len(f) < 8 or not f[7]:
            continue
        rows.append((float(f[0]), f[1], f[2], int(f[3]), int(f[4]), f[5] in ("1", "True"), f[6] in ("1", "True"), int(f[7])))
    return rows


def conversion_delays(rows, proxy_port):
    """Pairs each client SYN to the proxy with the proxy's next SYN to the server, and each first server
    data segment of a connection with the proxy's next data segment to the client."""
    syn, data = [], []
    pending_syn = None
    pending_data = None
    seen_server_data = set()
    for t, src, dst, sport, dport, is_syn, is_ack, length in rows:
        if is_syn and not is_ack and src == "10.0.1.2" and dport == proxy_port:
            pending_syn = t
        elif is_syn and not is_ack and src == "10.0.3.1" and dst == "10.0.3.2" and pending_syn is not None:
            syn.append(t - pending_syn)
            pending_syn = None
        elif src == "10.0.3.2" and sport == 80 and length > 0 and (dport not in seen_server_data):
            seen_server_data.add(dport)
            pending_data = t
        elif src in ("10.0.1.1", "10.0.2.1") and sport == proxy_port and length > 0 and pending_data is not None:
            data.append(t - pending_data)
            pending_data = None
    return syn, data


def request_conversions(rows, proxy_ports):
    """Per request, in order: the SYN conversion (client SYN to a proxy port -> the proxy's next SYN to the
    server) and the data conversion (the server's first data segment of a connection -> the proxy's next data
    segment to the client). Requests run one at a time, so the n-th client SYN from path 1 is the n-th request
    (MP_JOINs come from path 2)."""
    syn, data = {}, {}
    index = -1
    pending_syn = pending_data = None
    seen_server_data = set()
    for t, src, dst, sport, dport, is_syn, is_ack, length in rows:
        if is_syn and not is_ack and src == "10.0.1.2" and dport in proxy_ports:
            index += 1
            pending_syn = t
        elif is_syn and not is_ack and src == "10.0.3.1" and dst == "10.0.3.2" and pending_syn is not None:
            syn[index] = t - pending_syn
            pending_syn = None
        elif src == "10.0.3.2" and sport == 80 and length > 0 and (dport not in seen_server_data):
            seen_server_data.add(dport)
            pending_data = t
        elif src in ("10.0.1.1", "10.0.2.1") and sport in proxy_ports and length > 0 and pending_data is not None:
            data[index] = t - pending_data
            pending_data = None
    return index + 1, syn, data


def bench_conversion(requests=200, rounds=30):
    res = Results("conversion")
    # (scenario, subject, proxy port, curl wrapper, curl options), run in interleaved rounds.
    subjects = [
        ("absolute-form", "mptcp-proxy", 3128, MPTCP, via_proxy(3128)),
        ("absolute-form", "squid", 3129, MPTCP, via_proxy(3129)),
        ("connect", "mptcp-proxy", 3128, MPTCP, via_proxy(3128, tunnel=True)),
        # The same tunnel with `relay.mode = "copy"` (what auto falls back to past the pipe budget).
        ("connect", "mptcp-proxy-copy", 3132, MPTCP, via_proxy(3132, tunnel=True)),
        ("connect", "squid", 3129, MPTCP, via_proxy(3129, tunnel=True)),
        ("connect", "convert", 5124, [], via_convert()),
        # HAProxy: `mode http` (http-reuse never: each client connection opens its own server connection, as
        # with the others), and `mode tcp` as the relay, which connects at accept, before any request.
        ("absolute-form", "haproxy", 3140, MPTCP, via_proxy(3140)),
        ("connect", "haproxy", 3141, MPTCP, [], "http://10.0.1.1:3141/small.txt"),
    ]
    url = "http://10.0.3.2/small.txt"
    ports = {subject[2] for subject in subjects}
    with Lab("cv") as lab:
        lab.nginx({"small.txt": 1024})
        lab.proxy(3128, extra=CONVERT_LISTENER)
        lab.proxy(3132, "copy")
        lab.squid(3129, persistent=False)
        lab.haproxy(3140, 3141, reuse="never")
        start_convert_agent(lab)
        for _, _, _, wrapper, options, *target in subjects:  # warm-up; the agent gets its TFO cookie
            curl_fetch(lab, wrapper, options, (target or [url])[0])
        pcap = lab.work / "conversion.pcap"
        cap = lab.spawn("prx", "tcpdump", "-i", "any", "-n", "-s", "128", "--time-stamp-precision=nano",
                        "--immediate-mode", "-w", str(pcap),
                        " or ".join(f"tcp port {port}" for port in sorted(ports | {80})))
        time.sleep(1.0)
        order = []
        for _ in range(requests):
            for subject in subjects:
                curl_fetch(lab, subject[3], subject[4], (subject[5:] or [url])[0])
                order.append(subject)
        time.sleep(0.5)
        cap.terminate()
        cap.wait()
        count, syn, data = request_conversions(tshark_rows(pcap), ports)
        if count != len(order):
            raise RuntimeError(f"captured {count} client SYNs for {len(order)} requests")
        for i, (scenario, subject, *_rest) in enumerate(order):
            if i in syn:
                res.add(scenario, subject, i // len(subjects) + 1, "syn_conversion", syn[i], "s")
            if i in data:
                res.add(scenario, subject, i // len(subjects) + 1, "data_conversion", data[i], "s")
    # Time to first byte over 20 ms round-trip paths (both client paths, the testbed's delay line).
    ttfb_subjects = [
        ("absolute-form", "mptcp-proxy", MPTCP, via_proxy(3128)),
        ("connect", "mptcp-proxy", MPTCP, via_proxy(3128, tunnel=True)),
        ("connect", "squid", MPTCP, via_proxy(3129, tunnel=True)),
        ("connect", "convert", [], via_convert()),
    ]
    with Lab("cd", delays=(20, 20)) as lab:
        lab.nginx({"small.txt": 1024})
        lab.proxy(3128, extra=CONVERT_LISTENER)
        lab.squid(3129, persistent=False)
        start_convert_agent(lab)
        for _, _, wrapper, options in ttfb_subjects:
            curl_fetch(lab, wrapper, options, url)
        rtt = statistics.median(
            float(lab.exec("cli", "curl", "-sS", "-o", "/dev/null", "-w", "%{time_connect}", "http://10.0.1.1:3128/",
                           check=False).stdout or "nan") for _ in range(5))
        tfo_before = int(lab.exec("cli", "nstat", "-az", "TcpExtTCPFastOpenActive").stdout.split()[-2])
        for n in range(1, rounds + 1):
            for scenario, subject, wrapper, options in ttfb_subjects:
                cmd = [*wrapper, "curl", "-sS", "-o", "/dev/null", "-w", "%{time_starttransfer}", *options, url]
                out = lab.exec("cli", *cmd)
                res.add(f"ttfb-{scenario}", subject, n, "time_to_first_byte", float(out.stdout), "s")
        tfo = int(lab.exec("cli", "nstat", "-az", "TcpExtTCPFastOpenActive").stdout.split()[-2]) - tfo_before
    res.add("ttfb", "path", 0, "rtt", rtt, "s")
    res.save()
    print(f"\n(c) seed 002 Table 1, {requests} interleaved rounds of one request per subject "
          f"(paper: SYN 7.83 ± 0.68 ms, data 15.3 ± 8.1 ms); convert = RFC 8803 via mptcp-convert (SOCKS5)")
    print(f"{'scenario':<14}{'subject':<17}{'metric':<16}{'mean ms':>9}{'sd':>8}{'p50':>8}{'p99':>8}{'p50 x squid':>12}"
          f"{'x haproxy':>10}")
    for scenario in ("absolute-form", "connect"):
        for metric in ("syn_conversion", "data_conversion"):
            squid = res.median(scenario, "squid", metric)
            haproxy = res.median(scenario, "haproxy", metric)
            for subject in ("mptcp-proxy", "mptcp-proxy-copy", "haproxy", "squid", "convert"):
                v = sorted(res.values(scenario, subject, metric))
                if len(v) < 2:
                    continue
                p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
                print(f"{scenario:<14}{subject:<17}{metric:<16}{statistics.mean(v) * 1e3:>9.3f}"
                      f"{statistics.stdev(v) * 1e3:>8.3f}{statistics.median(v) * 1e3:>8.3f}{p(0.99) * 1e3:>8.3f}"
                      f"{statistics.median(v) / squid:>12.2f}{statistics.median(v) / haproxy:>10.2f}")
    convert_syn = res.median("connect", "convert", "syn_conversion")
    print(f"convert SYN conversion p50 {convert_syn * 1e6:.0f} us (target <= 50 us), "
          f"{convert_syn / res.median('connect', 'mptcp-proxy', 'syn_conversion'):.2f}x CONNECT")
    print(f"\ntime to first byte, 1 KiB object, both paths 20 ms RTT (measured handshake {rtt * 1e3:.1f} ms), "
          f"median of {rounds} interleaved rounds; {tfo} of {rounds} convert SYNs carried data (TFO)")
    connect = res.median("ttfb-connect", "mptcp-proxy", "time_to_first_byte")
    for scenario, subject, *_ in ttfb_subjects:
        m = res.median(f"ttfb-{scenario}", subject, "time_to_first_byte")
        print(f"{scenario:<14}{subject:<13}{m * 1e3:>8.1f} ms  {(m - connect) * 1e3:>+7.1f} ms vs CONNECT"
              f"  {(m - connect) / rtt:>+5.2f} RTT")
    plot_cdf(res, "syn_conversion")
    return res


def bench_aggregation(seconds=10, runs=3):
    res = Results("aggregation")
    scenarios = {
        "core-limited": dict(rates=(10, 10)),
        "core-limited 1% loss": dict(rates=(10, 10), losses=(1, 1)),
        "symmetric": dict(server_rate=10),
        "symmetric 1% loss": dict(server_rate=10, losses=(1, 1)),
    }
    for scenario, kw in scenarios.items():
        with Lab("ag", **kw) as lab:
            lab.nginx({"big.bin": 256 << 20})
            lab.proxy(3128)
            url = "http://10.0.3.2/big.bin"
            for n in range(1, runs + 1):
                for subject, wrapper, options in (
                    ("tcp_path1", [], ["--interface", "10.0.1.2", "-x", "http://10.0.1.1:3128"]),
                    ("tcp_path2", [], ["--interface", "10.0.2.2", "-x", "http://10.0.2.1:3128"]),
                    ("mptcp_via_proxy", MPTCP, via_proxy(3128)),
                ):
                    size, sec = curl_fetch(lab, wrapper, options, url, max_time=seconds)
                    res.add(scenario, subject, n, "throughput", size * 8 / sec, "bit/s")
    res.save()
    print(f"\n(d) thesis Table 1: {seconds}s transfers, median of {runs} (thesis: core-limited 98.5% of the sum)")
    print(f"{'scenario':<22}{'path1':>8}{'path2':>8}{'mptcp':>8}{'% of sum':>10}{'% of best':>10}  (Mbit/s)")
    for scenario in scenarios:
        p1, p2, m = (res.median(scenario, s, "throughput") / 1e6 for s in ("tcp_path1", "tcp_path2", "mptcp_via_proxy"))
        print(f"{scenario:<22}{p1:>8.2f}{p2:>8.2f}{m:>8.2f}{100 * m / (p1 + p2):>10.1f}{100 * m / max(p1, p2):>10.1f}")
    return res


def rss_and_fds(lab, pid):
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def child_pid(pid, name):
    """The pid of `name` under `ip netns exec` / prlimit / mptcpize wrappers (they exec, so usually pid)."""
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm.startswith(name[:15]):
        return pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found = child_pid(int(child), name)
        if found:
            return found
    return None


IDLE_CLIENT = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.connect(("10.0.1.1", port))
    s.sendall(b"CONNECT 10.0.3.2:80 HTTP/1.1\r\nHost: 10.0.3.2:80\r\n\r\n")
    socks.append(s)
for s in socks:
    if not s.recv(64).startswith(b"HTTP/1.1 200"):
        sys.exit("tunnel refused")
print("ready", flush=True)
sys.stdin.read()
"""


def jain(values):
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else float("nan")


def bench_concurrency(tunnels=10000, downloads=1000, size_mib=4):
    res = Results("concurrency")
    with Lab("cc") as lab:
        lab.nginx({"obj.bin": size_mib << 20})
        limits = f"[limits]\nmax_connections = {tunnels + 1000}\nmax_connections_per_client = {tunnels + 1000}\n"
        proxy = lab.proxy(3128, extra=limits)
        squid = lab.squid(3129)
        for subject, port, wrapper in (("mptcp-proxy", 3128, proxy), ("squid", 3129, squid)):
            pid = child_pid(wrapper.pid, "mptcp-proxy" if subject == "mptcp-proxy" else "squid")
            rss0, fds0 = rss_and_fds(lab, pid)
            client = lab.spawn("cli", sys.executable, "-c", IDLE_CLIENT, str(tunnels), str(port),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = client.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{subject}: idle client failed ({line!r})")
            time.sleep(1.0)
            rss1, fds1 = rss_and_fds(lab, pid)
            client.stdin.close()
            client.wait()
            res.add("idle-tunnels", subject, 1, "rss_per_tunnel", (rss1 - rss0) / tunnels, "byte")
            res.add("idle-tunnels", subject, 1, "fds_per_tunnel", (fds1 - fds0) / tunnels, "1")
            res.add("idle-tunnels", subject, 1, "rss_total", rss1, "byte")
            time.sleep(2.0)
        urls = lab.work / "urls.txt"
        urls.write_text("".join(f'url = "http://10.0.3.2/obj.bin"\noutput = "/dev/null"\n' for _ in range(downloads)))
        for subject, wrapper, options in (
            ("mptcp-proxy", MPTCP, via_proxy(3128)),
            ("squid", MPTCP, via_proxy(3129)),
            ("direct_tcp", [], []),
        ):
            started = time.time()
            out = lab.exec("cli", "prlimit", "--nofile=20000", *wrapper, "curl", *options, "-sS", "--parallel", "--parallel-max",
                           str(downloads), "-K", str(urls), "-w", "%{size_download} %{speed_download}\n", check=False)
            wall = time.time() - started
            rows = [l.split() for l in out.stdout.splitlines() if len(l.split()) == 2]
            sizes = [int(s) for s, _ in rows]
            speeds = [float(v) * 8 for _, v in rows]
            complete = sum(1 for s in sizes if s == size_mib << 20)
            res.add("active-downloads", subject, 1, "aggregate_throughput", sum(sizes) * 8 / wall, "bit/s")
            res.add("active-downloads", subject, 1, "jain_fairness", jain(speeds), "1")
            res.add("active-downloads", subject, 1, "complete", complete, "1")
    res.save()
    print(f"\n(f) concurrency: {tunnels} idle CONNECT tunnels; {downloads} parallel {size_mib} MiB downloads")
    for subject in ("mptcp-proxy", "squid"):
        print(f"{subject:<13} idle: {res.median('idle-tunnels', subject, 'rss_per_tunnel') / 1024:8.2f} KiB RSS/tunnel "
              f"{res.median('idle-tunnels', subject, 'fds_per_tunnel'):5.2f} fds/tunnel")
    for subject in ("mptcp-proxy", "squid", "direct_tcp"):
        print(f"{subject:<13} active: {res.median('active-downloads', subject, 'aggregate_throughput') / 1e9:6.2f} Gbit/s "
              f"Jain {res.median('active-downloads', subject, 'jain_fairness'):.3f} "
              f"complete {res.median('active-downloads', subject, 'complete'):.0f}/{downloads}")
    return res


def interface_tx(lab, dev):
    return int(lab.exec("prx", "cat", f"/sys/class/net/{dev}/statistics/tx_bytes").stdout)


def histogram_quantiles(text, name, quantiles):
    """Quantiles (upper bucket bounds) of a classic-text Prometheus histogram."""
    buckets = []
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
    if not buckets or buckets[-1][1] == 0:
        return [float("nan")] * len(quantiles)
    total = buckets[-1][1]
    return [next(le for le, count in buckets if count >= q * total) for q in quantiles]


def bench_throttle(connections=500, size_mb=200):
    res = Results("throttle")
    with Lab("th") as lab:
        lab.nginx({"big.bin": size_mb * 1000 * 1000, "small.txt": 1024})
        # (e) Figs. 6/7: path 1 throttled to 20 Mbit/s once the second subflow joins.
        proxy = lab.proxy(3128, extra='[throttle]\n[[throttle.classes]]\nname = "path1"\ninterface = "p1"\n'
                                       'rate = "20mbit"\n[[throttle.rules]]\nclass = "path1"\n'
                                       'match = { interface = "p1" }\n')
        series = lab.work / "series.csv"
        curl = subprocess.Popen(["ip", "netns", "exec", lab.ns["cli"], *MPTCP, "curl", "-sS", "-o", "/dev/null",
                                 *via_proxy(3128), "http://10.0.3.2/big.bin"])
        start = time.time()
        last = (interface_tx(lab, "p1"), interface_tx(lab, "p2"), start)
        with open(series, "w") as f:
            while curl.poll() is None:
                time.sleep(0.1)
                now = time.time()
                p1, p2 = interface_tx(lab, "p1"), interface_tx(lab, "p2")
                dt = now - last[2]
                r1, r2 = (p1 - last[0]) * 8 / dt / 1e6, (p2 - last[1]) * 8 / dt / 1e6
                f.write(f"{now - start:.2f} {r1:.2f} {r2:.2f}\n")
                res.add("time-series", "path1", round((now - start) * 10), "throughput", r1 * 1e6, "bit/s")
                res.add("time-series", "path2", round((now - start) * 10), "throughput", r2 * 1e6, "bit/s")
                last = (p1, p2, now)
        png = RESULTS / f"throttle-timeseries-{STAMP}.png"
        shutil.copy(series, RESULTS / f"throttle-timeseries-{STAMP}.dat")
        gnuplot(f"set terminal png size 900,450\nset output '{png}'\nset xlabel 'time (s)'\n"
                f"set ylabel 'Mbit/s (100 ms samples)'\nset key top right\n"
                f"plot '{series}' using 1:2 with lines title 'path 1 (throttled to 20 Mbit/s)', "
                f"'' using 1:3 with lines title 'path 2'\n")
        proxy.terminate()
        proxy.wait()
        # Rule-install latency over many subflows: the proxy's own histogram (kernel event → nft ack).
        conf = lab.work / "latency.toml"
        conf.write_text('[[listener]]\naddress = "0.0.0.0:3131"\n[access_log]\npath = "off"\n'
                        '[throttle]\n[[throttle.classes]]\nname = "path2"\ninterface = "p2"\nrate = "10gbit"\n'
                        '[[throttle.rules]]\nclass = "path2"\nmatch = { interface = "p2" }\n')
        lab.spawn("prx", str(PROXY_BIN), "--config", str(conf))
        lab.wait_port("prx", "10.0.1.1", 3131)
        urls = lab.work / "small-urls.txt"
        urls.write_text("".join('url = "http://10.0.3.2/small.txt"\noutput = "/dev/null"\n' for _ in range(connections)))
        lab.exec("cli", *MPTCP, "curl", "-sS", "--parallel", "--parallel-max", "50", *via_proxy(3131), "-K", str(urls),
                 "-H", "Connection: close", check=False)
        time.sleep(1.0)
        text = lab.exec("prx", "curl", "-s", "http://127.0.0.1:9464/metrics").stdout
        count = re.search(r"mptcp_proxy_throttle_rule_install_duration_seconds_count (\S+)", text)
        p50, p99 = histogram_quantiles(text, "mptcp_proxy_throttle_rule_install_duration_seconds", [0.5, 0.99])
        res.add("rule-install", "mptcp-proxy", 1, "installs", float(count.group(1)) if count else 0, "1")
        res.add("rule-install", "mptcp-proxy", 1, "latency_p50_bound", p50, "s")
        res.add("rule-install", "mptcp-proxy", 1, "latency_p99_bound", p99, "s")
        # Throughput cost of the nftables rules: the same download with rules (a class far above the
        # link rate) and without throttling.
        for subject, extra in (("no-throttle", ""),
                               ("nft-rules", '[throttle]\n[[throttle.classes]]\nname = "fast"\ninterface = "p1"\n'
                                             'rate = "40gbit"\n[[throttle.classes]]\nname = "fast2"\n'
                                             'interface = "p2"\nrate = "40gbit"\n[[throttle.rules]]\n'
                                             'class = "fast"\nmatch = { interface = "p1" }\n[[throttle.rules]]\n'
                                             'class = "fast2"\nmatch = { interface = "p2" }\n')):
            port = 3132 if subject == "no-throttle" else 3133
            p = lab.proxy(port, extra=extra)
            for n in range(1, 4):
                size, sec = curl_fetch(lab, MPTCP, via_proxy(port), "http://10.0.3.2/big.bin")
                res.add("nft-cost", subject, n, "throughput", size * 8 / sec, "bit/s")
            p.terminate()
            p.wait()
    res.save()
    print("\n(e) per-path time series: bench/results/throttle-timeseries-*.png")
    p1 = [r["value"] for r in res.rows if r["scenario"] == "time-series" and r["subject"] == "path1"]
    p2 = [r["value"] for r in res.rows if r["scenario"] == "time-series" and r["subject"] == "path2"]
    if p1:
        tail = lambda v: v[len(v) // 5:]
        print(f"path 1 median {statistics.median(tail(p1)) / 1e6:.1f} Mbit/s, path 2 median "
              f"{statistics.median(tail(p2)) / 1e6:.1f} Mbit/s (after the first fifth)")
    print(f"rule install, {res.median('rule-install', 'mptcp-proxy', 'installs'):.0f} rules: p50 <= "
          f"{res.median('rule-install', 'mptcp-proxy', 'latency_p50_bound') * 1e3:.3f} ms, p99 <= "
          f"{res.median('rule-install', 'mptcp-proxy', 'latency_p99_bound') * 1e3:.3f} ms (histogram bucket bounds)")
    a, b = res.median("nft-cost", "no-throttle", "throughput"), res.median("nft-cost", "nft-rules", "throughput")
    print(f"nft rules cost: {a / 1e9:.2f} Gbit/s without, {b / 1e9:.2f} Gbit/s with ({b / a:.2f}x)")
    return res


# Holds N MPTCP connections to the proxy (CONNECT tunnels to nginx) from one client namespace; prints
# "ready" once every tunnel is up, closes them all when stdin closes.
HOLDING_CLIENT = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.connect((host, port))
    s.sendall(b"CONNECT 10.0.3.2:80 HTTP/1.1\r\nHost: 10.0.3.2:80\r\n\r\n")
    socks.append(s)
for s in socks:
    if not s.recv(64).startswith(b"HTTP/1.1 200"):
        sys.exit("tunnel refused")
print("ready", flush=True)
sys.stdin.read()
for s in socks:
    s.close()
"""


def scrape(lab, port=9464):
    """The proxy's /metrics (classic text) as {name{labels}: value}."""
    text = lab.exec("prx", "curl", "-s", f"http://127.0.0.1:{port}/metrics").stdout
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values


def slab_bytes():
    """Kernel slab memory (SUnreclaim) of the whole machine, bytes: shared with other sessions, noisy."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"SUnreclaim:\s+(\d+) kB", text).group(1)) * 1024


def wait_metric(lab, name, at_least, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = scrape(lab).get(name, 0.0)
        if value >= at_least:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"{name} stayed below {at_least} for {timeout} s")


def live_subflows(lab, port):
    """TCP subflows of client connections to the proxy's `port` in the proxy namespace."""
    out = lab.exec("prx", "ss", "-tnH", "state", "established", f"( sport = :{port} )").stdout
    return len(out.splitlines())


def wait_steered(lab, port, target, timeout):
    """Waits until the throttle steers `target` subflows, or every subflow the kernel has when a few
    joins failed under the burst (the in-kernel PM does not retry them); returns (steered, live)."""
    deadline, stable_since, last = time.time() + timeout, None, None
    while time.time() < deadline:
        steered = scrape(lab).get("mptcp_proxy_throttle_steered_subflows", 0.0)
        live = live_subflows(lab, port)
        if steered >= target:
            return steered, live
        if steered >= live >= 0.95 * target:
            if (steered, live) == last and stable_since and time.time() - stable_since > 3:
                return steered, live
            if (steered, live) != last:
                stable_since, last = time.time(), (steered, live)
        time.sleep(0.5)
    raise RuntimeError(f"steered {steered} of {target} subflows ({live} live) after {timeout} s")


def bench_throttle_scale(subflows=10000, runs=3, size_mib=256):
    """(e') issue 15 at ISP scale: SUBFLOWS steered subflows (SUBFLOWS/2 two-subflow MPTCP connections held
    open from two client namespaces) against none, on one proxy whose policy steers every subflow; and a
    second proxy without a throttle for the memory baseline. Interleaved runs, medians."""
    res = Results("throttle-scale")
    per_client = subflows // 4  # connections per client namespace, two subflows each
    with Lab("ts", second_client=True) as lab:
        # The second client: MPTCP limits, a subflow endpoint on its path 2 and source routing.
        lab.exec("cl2", "ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
        lab.exec("cl2", "ip", "mptcp", "endpoint", "add", "10.0.5.2", "dev", "d2", "id", "2", "subflow")
        lab.exec("cl2", "ip", "rule", "add", "from", "10.0.5.2", "table", "105")
        lab.exec("cl2", "ip", "route", "add", "default", "via", "10.0.5.1", "dev", "d2", "table", "105")
        lab.nginx({"big.bin": size_mib << 20})
        classes = "".join(
            f'[[throttle.classes]]\nname = "{name}"\ninterface = "{dev}"\nrate = "40gbit"\ndirection = "both"\n{scope}'
            f'[[throttle.rules]]\nclass = "{name}"\nmatch = {{ interface = "{dev}" }}\n'
            for name, dev, scope in (("path1", "p1", 'scope = "client"\n'), ("path2", "p2", ""),
                                     ("c2path1", "p4", 'scope = "client"\n'), ("c2path2", "p5", "")))
        common = (f'[access_log]\npath = "off"\n[limits]\nmax_connections = {min(subflows + 2000, 9800)}\n'
                  f'max_connections_per_client = {subflows}\n[acl]\nconnect_ports = [80, 443]\n')
        throttled = lab.work / "throttled.toml"
        throttled.write_text(f'[[listener]]\naddress = "0.0.0.0:3128"\n[metrics]\naddress = "127.0.0.1:9464"\n{common}'
                             f'[throttle]\nresync_interval = "15s"\n{classes}')
        plain = lab.work / "plain.toml"
        plain.write_text(f'[[listener]]\naddress = "0.0.0.0:3129"\n[metrics]\naddress = "127.0.0.1:9465"\n{common}')
        proxies = {}
        logs = {subject: Path(tempfile.gettempdir()) / f"bench-{STAMP}-{subject}.log" for subject in ("throttled", "plain")}
        for subject, conf, port in (("throttled", throttled, 3128), ("plain", plain, 3129)):
            wrapper = lab.spawn("prx", "prlimit", "--nofile=20000", str(PROXY_BIN), "--config", str(conf),
                                stderr=open(logs[subject], "w"))
            lab.wait_port("prx", "10.0.1.1", port)
            proxies[subject] = (child_pid(wrapper.pid, "mptcp-proxy"), port)
        url = "http://10.0.3.2/big.bin"

        def hold(port):
            clients = []
            for ns, host in (("cli", "10.0.1.1"), ("cl2", "10.0.4.1")):
                clients.append(lab.spawn(ns, sys.executable, "-c", HOLDING_CLIENT, str(per_client), host, str(port),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for client in clients:
                line = client.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"holding client failed ({line!r})")
            return clients

        def release(clients):
            for client in clients:
                client.stdin.close()
                client.wait()

        def download(label, n, port=3128):
            size, sec = curl_fetch(lab, MPTCP, via_proxy(port), url)
            if size != size_mib << 20:
                raise RuntimeError(f"download delivered {size} bytes")
            res.add("bulk-download", label, n, "throughput", size * 8 / sec, "bit/s")

        steered_key = "mptcp_proxy_throttle_steered_subflows"
        for n in range(1, runs + 1):
            # None steered (the throttle runs; only the download's own subflows are steered).
            download("none-steered", n)
            download("plain-idle-none", n, 3129)
            # SUBFLOWS steered: hold the connections, wait for every subflow's elements.
            before = scrape(lab)
            pid = proxies["throttled"][0]
            rss0, slab0 = rss_and_fds(lab, pid)[0], slab_bytes()
            started = time.time()
            clients = hold(3128)
            held = time.time() - started
            try:
                steered_count, live = wait_steered(lab, 3128, subflows, 180)
            except RuntimeError:
                print(f"proxy logs: {logs}; joins: " + " ".join(
                    l for l in lab.exec("cli", "nstat", "-az").stdout.splitlines() if "Join" in l))
                raise
            steered_after = time.time() - started
            res.add("hold", "throttled", n, "steered", steered_count, "1")
            res.add("hold", "throttled", n, "live_subflows", live, "1")
            time.sleep(2.0)
            rss1, slab1 = rss_and_fds(lab, pid)[0], slab_bytes()
            res.add("hold", "throttled", n, "connections_up", held, "s")
            res.add("hold", "throttled", n, "all_steered", steered_after, "s")
            res.add("memory", "throttled", n, "rss_delta", rss1 - rss0, "byte")
            res.add("memory", "throttled", n, "slab_delta", slab1 - slab0, "byte")
            download("steered", n)
            # Periodic resyncs with every subflow live.
            resync_sum, resync_count = ("mptcp_proxy_throttle_resync_duration_seconds_sum",
                                        "mptcp_proxy_throttle_resync_duration_seconds_count")
            at = scrape(lab)
            wait_metric(lab, resync_count, at.get(resync_count, 0) + 1, 30)
            after = scrape(lab)
            res.add("resync", "throttled", n, "duration",
                    (after[resync_sum] - at[resync_sum]) / (after[resync_count] - at[resync_count]), "s")
            installs = after.get("mptcp_proxy_throttle_rule_install_duration_seconds_count", 0) - \
                before.get("mptcp_proxy_throttle_rule_install_duration_seconds_count", 0)
            res.add("rule-install", "throttled", n, "installs", installs, "1")
            for p in ("50", "99"):
                res.add("rule-install", "throttled", n, f"p{p}",
                        after[f'mptcp_proxy_throttle_rule_install_recent_seconds{{percentile="{p}"}}'], "s")
            release(clients)
            wait_metric(lab, steered_key, 0, 60)
            deadline = time.time() + 60
            while scrape(lab).get(steered_key, 0) > 2 and time.time() < deadline:
                time.sleep(0.5)
            # The same connections to a proxy without a throttle: the memory baseline.
            pid = proxies["plain"][0]
            rss0, slab0 = rss_and_fds(lab, pid)[0], slab_bytes()
            clients = hold(3129)
            time.sleep(2.0 + max(0.0, steered_after - held))
            rss1, slab1 = rss_and_fds(lab, pid)[0], slab_bytes()
            res.add("memory", "plain", n, "rss_delta", rss1 - rss0, "byte")
            res.add("memory", "plain", n, "slab_delta", slab1 - slab0, "byte")
            download("plain-idle-held", n, 3129)
            release(clients)
            time.sleep(3.0)
    res.save()
    med = lambda scenario, subject, metric: res.median(scenario, subject, metric)
    none, steered = med("bulk-download", "none-steered", "throughput"), med("bulk-download", "steered", "throughput")
    print(f"\n(e') throttle at scale: {subflows} steered subflows ({per_client} two-subflow connections from each of "
          f"2 client namespaces), median of {runs}")
    print(f"rule install (event sent -> batch ack), exact, last {med('rule-install', 'throttled', 'installs'):.0f} installs: "
          f"p50 {med('rule-install', 'throttled', 'p50') * 1e3:.3f} ms, p99 {med('rule-install', 'throttled', 'p99') * 1e3:.3f} ms")
    print(f"connections up in {med('hold', 'throttled', 'connections_up'):.1f} s, "
          f"{med('hold', 'throttled', 'steered'):.0f} subflows steered (of {med('hold', 'throttled', 'live_subflows'):.0f} "
          f"live) after {med('hold', 'throttled', 'all_steered'):.1f} s")
    plain_none = med("bulk-download", "plain-idle-none", "throughput")
    plain_held = med("bulk-download", "plain-idle-held", "throughput")
    print(f"bulk download {size_mib} MiB: {none / 1e9:.2f} Gbit/s with none steered, {steered / 1e9:.2f} Gbit/s with "
          f"{subflows} steered ({steered / none:.3f}x)")
    print(f"  the same connections held by a proxy without throttle: {plain_none / 1e9:.2f} -> {plain_held / 1e9:.2f} Gbit/s "
          f"({plain_held / plain_none:.3f}x); steering's own share: {(steered / none) / (plain_held / plain_none):.3f}x")
    # Memory from run 1 only: both processes are fresh there; later runs reuse the heap the first freed
    # (their RSS deltas are near zero whatever the throttle holds).
    first = lambda subject, metric: next(r["value"] for r in res.rows if r["scenario"] == "memory"
                                         and r["subject"] == subject and r["run"] == 1 and r["metric"] == metric)
    rss = (first("throttled", "rss_delta") - first("plain", "rss_delta")) / subflows
    slab = (first("throttled", "slab_delta") - first("plain", "slab_delta")) / subflows
    print(f"memory per steered subflow (run 1, fresh processes): {rss:.0f} B proxy RSS, {slab:.0f} B kernel slab "
          f"(machine-wide, noisy)")
    print(f"resync with {subflows} live subflows (dump, diff, apply): {med('resync', 'throttled', 'duration') * 1e3:.1f} ms")
    return res


def proc_cpu(pid):
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def net_counter(lab, host, dev, counter):
    return int(lab.exec(host, "cat", f"/sys/class/net/{dev}/statistics/{counter}").stdout)


def quantile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


MPIP_ENDS = ("mpipd", "mpip-proxy")


def mpip_lab_up(lab):
    """Starts mpip-proxy (proxy namespace) and mpipd (client namespace) with the example configurations,
    gateway on and 10.0.3.0/24 routed through the tunnel; returns {end: pid} once both paths are active."""
    examples = ROOT / "deploy/examples"
    prx = (examples / "mpip-proxy.toml").read_text()
    prx = prx.replace('node_id = "auto"', 'node_id = "02:00:00:00:00:01"').replace("enabled = false", "enabled = true")
    cli = (examples / "mpipd.toml").read_text()
    cli = cli.replace('node_id = "auto"', 'node_id = "02:00:00:00:00:c1"').replace(
        "routes = []", 'routes = ["10.0.3.0/24"]')
    (lab.work / "mpip-proxy.toml").write_text(prx)
    (lab.work / "mpipd.toml").write_text(cli)
    log = lambda name: open(lab.work / f"{name}.log", "w")
    ends = {"mpip-proxy": lab.spawn("prx", str(MPIP_PROXY_BIN), "--config", str(lab.work / "mpip-proxy.toml"),
                                    stderr=log("mpip-proxy"), stdout=subprocess.DEVNULL)}
    lab.wait_port("prx", "127.0.0.1", 9464)
    ends["mpipd"] = lab.spawn("cli", str(MPIPD_BIN), "--config", str(lab.work / "mpipd.toml"),
                              stderr=log("mpipd"), stdout=subprocess.DEVNULL)
    lab.wait_port("cli", "10.200.0.1", 3128)
    end = time.time() + 10
    while time.time() < end:
        text = lab.exec("cli", "curl", "-s", "http://127.0.0.1:9465/metrics", check=False).stdout
        if sum(float(v) for v in re.findall(r"^mpip_path_active\{[^}]*\} (\S+)", text, re.M)) >= 2:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("mpipd: both paths did not become active")
    return {name: child_pid(p.pid, name) for name, p in ends.items()}, ends


def iperf3(lab, target, seconds, streams, reverse):
    args = ["iperf3", "-c", target, "-p", "5201", "-t", str(seconds), "-P", str(streams), "-J"]
    out = lab.exec("cli", *args, *(["-R"] if reverse else []), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stdout[-300:]} {out.stderr.strip()}")
    summary = json.loads(out.stdout)["end"]["sum_received"]
    return summary["bytes"], summary["bits_per_second"]


def echo(lab, size, count, interval=0.002):
    """RTT samples (seconds) to the tunnel and the direct address, measured interleaved."""
    out = lab.exec("cli", sys.executable, str(ECHO), "client", "7007", str(size), str(count), str(interval),
                   "10.200.0.1", "10.0.1.1")
    data = json.loads(out.stdout)
    return {("mpip" if t == "10.200.0.1" else "direct"): ([ns / 1e9 for ns in d["rtt_ns"]], d["lost"])
            for t, d in data.items()}


def mpip_clients_up(lab, n):
    """mpip-proxy on p1, p2 and the access bridges br1, br2 (gateway off), and one mpipd per extra client
    host c1..cN (paths a1, a2); returns ({name: pid}, [mpipd pids]) once every client has its tunnel."""
    examples = ROOT / "deploy/examples"
    prx = (examples / "mpip-proxy.toml").read_text()
    prx = prx.replace('node_id = "auto"', 'node_id = "02:00:00:00:00:01"').replace(
        'interfaces = ["p1", "p2"]', 'interfaces = ["p1", "p2", "br1", "br2"]')
    (lab.work / "mpip-proxy.toml").write_text(prx)
    proxy = lab.spawn("prx", str(MPIP_PROXY_BIN), "--config", str(lab.work / "mpip-proxy.toml"),
                      stderr=open(lab.work / "mpip-proxy.log", "w"), stdout=subprocess.DEVNULL)
    lab.wait_port("prx", "127.0.0.1", 9464)
    cli = (examples / "mpipd.toml").read_text()
    cli = cli.replace('interfaces = ["c1", "c2"]', 'interfaces = ["a1", "a2"]').replace(
        'endpoints = ["10.0.1.1:4789", "10.0.2.1:4789"]', 'endpoints = ["10.1.0.1:4789", "10.2.0.1:4789"]').replace(
        'address = "127.0.0.1:9465"', 'address = "off"')
    # The example's coordinated profile names c1/c2.
    cli = cli[:cli.index("[routing.profile.coordinated]")] + cli[cli.index("# Authentication"):]
    (lab.work / "mpipd-clients.toml").write_text(cli)
    daemons = []
    for k in range(1, n + 1):
        daemons.append(lab.spawn(f"c{k}", str(MPIPD_BIN), "--config", str(lab.work / "mpipd-clients.toml"),
                                 stderr=open(lab.work / f"mpipd-c{k}.log", "w"), stdout=subprocess.DEVNULL))
    end = time.time() + 60
    for k in range(1, n + 1):
        # Until the tunnel is up, the default route would reach 10.200.0.1 on the proxy host directly.
        while "mpip0" not in lab.exec(f"c{k}", "ip", "route", "get", "10.200.0.1", check=False).stdout:
            if time.time() > end:
                raise RuntimeError(f"mpipd in c{k}: no tunnel (see {lab.work}/mpipd-c{k}.log)")
            time.sleep(0.05)
    return {"mpip-proxy": child_pid(proxy.pid, "mpip-proxy")}, [child_pid(d.pid, "mpipd") for d in daemons]


def bench_mpip_clients(clients=32, seconds=10, runs=3):
    """(g, capacity) N real mpipd clients, two paths each, download with iperf3 -R from the proxy end at once,
    against one of them alone, interleaved: aggregate throughput and CPU s/GB of the proxy end and of the
    client ends together."""
    res = Results(f"mpip-clients{clients}")
    with Lab("mc", clients=clients) as lab:
        (pids, client_pids) = mpip_clients_up(lab, clients)
        for k in range(clients):
            lab.spawn("prx", "iperf3", "-s", "-p", str(5301 + k))
        for k in range(clients):
            lab.wait_port("prx", "10.0.1.1", 5301 + k)
        time.sleep(1.0)
        for n in range(1, runs + 1):
            for scenario, active in (("1 client", 1), (f"{clients} clients", clients)):
                cpu0 = proc_cpu(pids["mpip-proxy"])
                client0 = sum(proc_cpu(p) for p in client_pids)
                procs = [lab.spawn(f"c{k + 1}", "iperf3", "-c", "10.200.0.1", "-p", str(5301 + k), "-t",
                                   str(seconds), "-R", "-J", stdout=subprocess.PIPE)
                         for k in range(active)]
                total_bytes, total_bps, failed = 0, 0.0, 0
                for p in procs:
                    out, _ = p.communicate(timeout=seconds + 60)
                    try:
                        summary = json.loads(out)["end"]["sum_received"]
                        total_bytes += summary["bytes"]
                        total_bps += summary["bits_per_second"]
                    except (ValueError, KeyError):
                        failed += 1
                proxy_cpu = proc_cpu(pids["mpip-proxy"]) - cpu0
                client_cpu = sum(proc_cpu(p) for p in client_pids) - client0
                res.add(scenario, "mpip", n, "throughput", total_bps, "bit/s")
                res.add(scenario, "mpip", n, "bytes", total_bytes, "byte")
                res.add(scenario, "mpip", n, "failed", failed, "1")
                res.add(scenario, "mpip", n, "cpu_per_gb_mpip-proxy", proxy_cpu / max(total_bytes / 1e9, 1e-9), "s/GB")
                res.add(scenario, "mpip", n, "cpu_per_gb_mpipd", client_cpu / max(total_bytes / 1e9, 1e-9), "s/GB")
                time.sleep(1.0)
        handovers = re.findall(r"^mpip_shard_handovers_total (\S+)",
                               lab.exec("prx", "curl", "-s", "http://127.0.0.1:9464/metrics").stdout, re.M)
        res.add("all", "mpip", 1, "shard_handovers", float(handovers[0]) if handovers else float("nan"), "1")
    res.save()
    print(f"\n(g) MPIP capacity: {clients} mpipd clients (two unshaped veth paths each, bridged) against one,"
          f" iperf3 -R {seconds}s from the proxy end, median of {runs}; the machine runs both ends")
    print(f"{'scenario':<14}{'Gbit/s':>10}{'failed':>8}{'proxy s/GB':>12}{'mpipd s/GB':>12}")
    for scenario in ("1 client", f"{clients} clients"):
        print(f"{scenario:<14}{res.median(scenario, 'mpip', 'throughput') / 1e9:>10.3f}"
              f"{res.median(scenario, 'mpip', 'failed'):>8.0f}"
              f"{res.median(scenario, 'mpip', 'cpu_per_gb_mpip-proxy'):>12.2f}"
              f"{res.median(scenario, 'mpip', 'cpu_per_gb_mpipd'):>12.2f}")
    one, many = (res.median(s, "mpip", "throughput") for s in ("1 client", f"{clients} clients"))
    print(f"aggregate {many / one:.2f}x one client; shard hand-overs {res.median('all', 'mpip', 'shard_handovers'):.0f}")
    return res


FIG9_PLAYER = Path(__file__).resolve().parent / "fig9_player.py"


def system_python():
    """The system Python, which has selenium (python3-selenium); a virtualenv's may not."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


def bench_fig9(seconds=150, switch_at=60, stop_at=120):
    """(i) Fig. 9 of the MPIP paper with a real browser: headless Chromium behind mpipd plays a 720p video
    (1.2 Mbit/s H.264) through mpip-proxy's HTTP proxy over two 2 Mbit/s paths, +20 ms on path 2 (the testbed's
    user-space delay line), while a download from the proxy host competes; all-paths until switch_at, then
    coordinated routing (video on path 1, download on path 2) on both ends; the download stops at stop_at."""
    res = Results("fig9")
    video = run([str(ROOT / "bench/fig9_video.sh"), str(seconds + 60)]).stdout.strip()
    with Lab("f9", rates=(2, 2), extra=("--no-endpoint",)) as lab:
        www = lab.work / "www"
        www.mkdir()
        shutil.copy(ROOT / "bench/fig9.html", www / "fig9.html")
        shutil.copy(video, www / "video.mp4")
        downloads = lab.work / "downloads"
        downloads.mkdir()
        with open(downloads / "big.bin", "wb") as f:
            f.truncate(4 << 30)
        w = lab.work
        for name, root, listen, ns in (("srv", www, "10.0.3.2:80", "srv"), ("prx", downloads, "0.0.0.0:8081", "prx")):
            conf = w / f"nginx-{name}.conf"
            conf.write_text(
                f"daemon on; user root; worker_processes 1; pid {w}/nginx-{name}.pid; error_log {w}/nginx-{name}.log;\n"
                f"events {{ worker_connections 1024; }}\n"
                f"http {{ access_log off; sendfile on; types {{ text/html html; video/mp4 mp4; }}\n"
                f"  client_body_temp_path {w}/b{name}; proxy_temp_path {w}/p{name}; fastcgi_temp_path {w}/f{name};\n"
                f"  uwsgi_temp_path {w}/u{name}; scgi_temp_path {w}/s{name};\n"
                f"  server {{ listen {listen}; root {root}; }} }}\n")
            lab.exec(ns, "nginx", "-c", str(conf))
        lab.wait_port("srv", "10.0.3.2", 80)
        lab.wait_port("prx", "10.0.3.1", 8081)
        run([str(TESTBED), "delay", lab.prefix, "prx", "p2", "egress", "20ms"])
        examples = ROOT / "deploy/examples"
        (lab.work / "mpip-proxy.toml").write_text((examples / "mpip-proxy.toml").read_text())
        (lab.work / "mpipd.toml").write_text((examples / "mpipd.toml").read_text())
        proxy = lab.spawn("prx", str(MPIP_PROXY_BIN), "--config", str(lab.work / "mpip-proxy.toml"),
                          stderr=open(lab.work / "mpip-proxy.log", "w"))
        lab.wait_port("prx", "127.0.0.1", 9464)
        client = lab.spawn("cli", str(MPIPD_BIN), "--config", str(lab.work / "mpipd.toml"),
                           stderr=open(lab.work / "mpipd.log", "w"))
        end = time.time() + 20
        while "mpip0" not in lab.exec("cli", "ip", "route", "get", "10.200.0.1", check=False).stdout:
            if time.time() > end:
                raise RuntimeError(f"mpipd: no tunnel (see {lab.work}/mpipd.log)")
            time.sleep(0.05)
        lab.wait_port("cli", "10.200.0.1", 3128)
        switch = "curl -sS --fail -X POST http://127.0.0.1:{}/mpip/routing/profile/coordinated"
        out = lab.exec("cli", system_python(), str(FIG9_PLAYER), "--page", "http://10.0.3.2/fig9.html",
                       "--proxy", "http://10.200.0.1:3128", "--download", "http://10.200.0.1:8081/big.bin",
                       "--seconds", str(seconds), "--switch-at", str(switch_at), "--stop-download-at", str(stop_at),
                       "--switch", f"ip netns exec {lab.ns['prx']} " + switch.format(9464),
                       "--switch", switch.format(9465))
        report = json.loads(out.stdout)
        for p in (client, proxy):
            p.terminate()
            p.wait(timeout=20)
    samples = report["samples"]
    rows = []
    for prev, cur in zip(samples, samples[1:]):
        dt = cur["t"] - prev["t"]
        rate = lambda key: (cur.get(key, 0) - prev.get(key, 0)) * 8 / dt / 1000
        rows.append({"t": cur["t"], "video_kbit_s": rate("video_bytes"), "download_kbit_s": rate("download_bytes"),
                     "path1_kbit_s": rate("c1_rx_bytes"), "path2_kbit_s": rate("c2_rx_bytes"),
                     "buffered_s": cur.get("buffered_end", 0) - cur.get("time", 0), "played_s": cur.get("time", 0),
                     "waiting": cur.get("waiting", 0)})
    for i, row in enumerate(rows):
        for metric, unit in (("video_kbit_s", "kbit/s"), ("download_kbit_s", "kbit/s"), ("path1_kbit_s", "kbit/s"),
                             ("path2_kbit_s", "kbit/s"), ("buffered_s", "s"), ("played_s", "s"), ("waiting", "1")):
            res.add("timeline", "mpip", i + 1, metric, row[metric], unit)
    periods = (("all-paths", 10, switch_at), ("coordinated", switch_at + 10, stop_at),
               ("download stopped", stop_at + 5, seconds))
    summary = {}
    for name, start, stop in periods:
        picked = [r for r in rows if start <= r["t"] < stop]
        mean = lambda key: statistics.mean(r[key] for r in picked) if picked else float("nan")
        summary[name] = {k: mean(k) for k in ("video_kbit_s", "download_kbit_s", "buffered_s")}
        summary[name]["buffered_end"] = picked[-1]["buffered_s"] if picked else float("nan")
        summary[name]["waiting"] = (picked[-1]["waiting"] - picked[0]["waiting"]) if picked else 0
        for metric, value in summary[name].items():
            res.add(name, "mpip", 1, metric, value, "")
    res.add("all", "mpip", 1, "media_errors", len(report["media_errors"]), "1")
    res.save()
    dat = RESULTS / f"fig9-{STAMP}.dat"
    dat.write_text("".join(f"{r['t']:.1f} {r['video_kbit_s']:.0f} {r['download_kbit_s']:.0f} {r['buffered_s']:.2f}\n"
                           for r in rows))
    png = RESULTS / f"fig9-{STAMP}.png"
    gnuplot(f"set terminal png size 900,700\nset output '{png}'\nset multiplot layout 2,1\n"
            f"set xlabel 'time (s)'\nset ylabel 'kbit/s'\nset arrow from {switch_at},graph 0 to {switch_at},graph 1 nohead dt 2\n"
            f"set arrow from {stop_at},graph 0 to {stop_at},graph 1 nohead dt 3\n"
            f"plot '{dat}' using 1:2 with lines title 'video', '{dat}' using 1:3 with lines title 'download'\n"
            f"set ylabel 'buffered (s)'\nplot '{dat}' using 1:4 with lines title 'video buffer'\nunset multiplot\n")
    print(f"\n(h) Fig. 9 with headless Chromium: 720p video (1.2 Mbit/s) and a download over 2 x 2 Mbit/s, +20 ms on path 2;"
          f" coordinated routing at {switch_at} s, download stopped at {stop_at} s; media errors {len(report['media_errors'])}")
    print(f"{'period':<18}{'video kbit/s':>14}{'download kbit/s':>17}{'buffer mean s':>15}{'buffer end s':>14}{'waiting':>9}")
    for name, *_ in periods:
        v = summary[name]
        print(f"{name:<18}{v['video_kbit_s']:>14.0f}{v['download_kbit_s']:>17.0f}{v['buffered_s']:>15.1f}"
              f"{v['buffered_end']:>14.1f}{v['waiting']:>9.0f}")
    print("paper (Fig. 9, YouTube 720p): video 1500 -> 1900 kbit/s, download 2510 -> 1890 kbit/s, "
          "buffer grows to 10 s without freezing")
    return res


def bench_mpip(seconds=10, runs=3, perf=False, count=2000):
    res = Results("mpip")
    with Lab("mp") as lab:
        pids, ends = mpip_lab_up(lab)
        lab.spawn("prx", "iperf3", "-s", "-p", "5201")
        lab.wait_port("prx", "10.0.1.1", 5201)
        lab.spawn("prx", sys.executable, str(ECHO), "server", "7007")
        time.sleep(0.5)
        # (1, 2) Throughput and CPU per GB: direct (10.0.1.1, path 1 alone, no tunnel) against the tunnel
        # (10.200.0.1: inner TCP over both paths), download (-R: proxy -> client) and upload.
        for n in range(1, runs + 1):
            for direction, reverse in (("download", True), ("upload", False)):
                for streams in (1, 4):
                    scenario = f"{direction} P{streams}"
                    for subject, target in (("direct", "10.0.1.1"), ("mpip", "10.200.0.1")):
                        cpu0 = {e: proc_cpu(pids[e]) for e in MPIP_ENDS}
                        c2 = net_counter(lab, "cli", "c2", "rx_bytes" if reverse else "tx_bytes")
                        c1 = net_counter(lab, "cli", "c1", "rx_bytes" if reverse else "tx_bytes")
                        size, bps = iperf3(lab, target, seconds, streams, reverse)
                        c1 = net_counter(lab, "cli", "c1", "rx_bytes" if reverse else "tx_bytes") - c1
                        c2 = net_counter(lab, "cli", "c2", "rx_bytes" if reverse else "tx_bytes") - c2
                        res.add(scenario, subject, n, "throughput", bps, "bit/s")
                        res.add(scenario, subject, n, "bytes", size, "byte")
                        if subject == "mpip":
                            res.add(scenario, subject, n, "path2_share", c2 / max(1, c1 + c2), "1")
                            for e in MPIP_ENDS:
                                res.add(scenario, subject, n, f"cpu_per_gb_{e}",
                                        (proc_cpu(pids[e]) - cpu0[e]) / (size / 1e9), "s/GB")
                        time.sleep(1.0)
        # (3) Latency: UDP echo to the proxy namespace, through the tunnel and direct, interleaved;
        # idle, then while an iperf3 download runs through the tunnel.
        for load in ("idle", "loaded"):
            for size in (64, 1200):
                scenario = f"{load} {size}B"
                background = None
                if load == "loaded":
                    background = lab.spawn("cli", "iperf3", "-c", "10.200.0.1", "-p", "5201", "-R", "-t", "120")
                    time.sleep(2.0)
                rtts = echo(lab, size, count)
                if background:
                    background.terminate()
                    background.wait()
                    time.sleep(1.5)
                for subject, (v, lost) in rtts.items():
                    for i, x in enumerate(v, 1):
                        res.add(scenario, subject, i, "rtt", x, "s")
                    res.add(scenario, subject, 1, "lost", lost, "1")
                    res.add(scenario, subject, 1, "rtt_p50", quantile(v, 0.5), "s")
                    res.add(scenario, subject, 1, "rtt_p99", quantile(v, 0.99), "s")
                for q in ("p50", "p99"):
                    added = (res.median(scenario, "mpip", f"rtt_{q}") - res.median(scenario, "direct", f"rtt_{q}")) / 2
                    res.add(scenario, "mpip", 1, f"added_one_way_{q}", added, "s")
        if perf and shutil.which("perf"):
            data = lab.work / "perf.data"
            background = lab.spawn("cli", "iperf3", "-c", "10.200.0.1", "-p", "5201", "-R", "-t", "120")
            time.sleep(2.0)
            run(["perf", "record", "-g", "-o", str(data), "-p", ",".join(str(pids[e]) for e in MPIP_ENDS),
                 "--", "sleep", str(seconds)], check=False)
            background.terminate()
            background.wait()
            RESULTS.mkdir(parents=True, exist_ok=True)
            report = RESULTS / f"mpip-perf-{STAMP}.txt"
            with open(report, "w") as f:
                for sort in ("comm,dso", "comm,dso,sym"):
                    f.write(run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                                 "--percent-limit", "0.5", "-g", "none"], check=False).stdout)
            print(f"wrote {report.relative_to(ROOT)}")
        for p in ends.values():  # SIGTERM: both ends remove their TUN device, routes and nft table
            p.terminate()
        for p in ends.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    res.save()
    print(f"\n(g) MPIP tunnel (mpipd <-> mpip-proxy, 2 unshaped veth paths) against direct TCP on path 1,"
          f" iperf3 {seconds}s, median of {runs}")
    print(f"{'scenario':<14}{'direct Gbit/s':>14}{'mpip Gbit/s':>12}{'x direct':>9}{'path 2':>8}"
          f"{'mpipd s/GB':>11}{'proxy s/GB':>11}")
    for direction in ("download", "upload"):
        for streams in (1, 4):
            sc = f"{direction} P{streams}"
            d, m = res.median(sc, "direct", "throughput"), res.median(sc, "mpip", "throughput")
            print(f"{sc:<14}{d / 1e9:>14.2f}{m / 1e9:>12.3f}{m / d:>9.3f}"
                  f"{100 * res.median(sc, 'mpip', 'path2_share'):>7.0f}%"
                  f"{res.median(sc, 'mpip', 'cpu_per_gb_mpipd'):>11.2f}"
                  f"{res.median(sc, 'mpip', 'cpu_per_gb_mpip-proxy'):>11.2f}")
    print(f"\nUDP echo RTT, {count} interleaved requests per target; added one-way = (tunnel - direct quantile) / 2")
    print(f"{'scenario':<14}{'direct p50/p99 us':>20}{'mpip p50/p99 us':>20}{'added p50/p99 us':>20}{'lost':>7}")
    for load in ("idle", "loaded"):
        for size in (64, 1200):
            sc = f"{load} {size}B"
            f = lambda s, m: res.median(sc, s, m) * 1e6
            print(f"{sc:<14}{f('direct', 'rtt_p50'):>10.0f} /{f('direct', 'rtt_p99'):>7.0f}"
                  f"{f('mpip', 'rtt_p50'):>12.0f} /{f('mpip', 'rtt_p99'):>7.0f}"
                  f"{f('mpip', 'added_one_way_p50'):>12.0f} /{f('mpip', 'added_one_way_p99'):>7.0f}"
                  f"{res.median(sc, 'mpip', 'lost'):>5.0f}/{res.median(sc, 'direct', 'lost'):.0f}")
    plot_bars(res, "throughput", "Throughput (Gbit/s)", 1e-9)
    plot_cdf(res, "rtt")
    return res


DETOUR_LAB = ROOT / "deploy/testbed/detour.sh"
DETOURD_BIN = TARGET / "release/mptcp-detourd"
DETOUR_CLIENT_BIN = TARGET / "release/mptcp-detour"
DETOUR_KEY = "3f0c9a1e5b7d2468ace013579bdf2468ace0f1e2d3c4b5a6"
DETOUR_SUBJECTS = ["tcp", "tcp_nat", "tcp_vpn", "mptcp_1sf", "mptcp_nat", "mptcp_vpn"]
# Thesis Table 1 (means, Mbit/s; 60 trials) for the rows bench detour reproduces.
THESIS_TABLE1 = {
    "core-limited": dict(mptcp_1sf=9.41, mptcp_nat=18.81, mptcp_vpn=18.30, tcp=9.55, tcp_nat=9.55, tcp_vpn=9.11),
    "core-limited 1% loss": dict(mptcp_1sf=4.21, mptcp_nat=13.76, mptcp_vpn=13.05, tcp=6.16, tcp_nat=9.55,
                                 tcp_vpn=9.11),
    "core-limited 100ms delay": dict(mptcp_1sf=9.09, mptcp_nat=17.73, mptcp_vpn=15.41, tcp=9.22, tcp_nat=9.55,
                                     tcp_vpn=9.11),
    "symmetric": dict(mptcp_1sf=9.41, mptcp_nat=9.41, mptcp_vpn=9.14, tcp=9.54, tcp_nat=9.35, tcp_vpn=8.91),
    "symmetric 1% loss": dict(mptcp_1sf=4.36, mptcp_nat=9.39, mptcp_vpn=8.93, tcp=6.45, tcp_nat=9.35,
                              tcp_vpn=8.91),
    "symmetric 100ms delay": dict(mptcp_1sf=9.10, mptcp_nat=9.37, mptcp_vpn=9.03, tcp=9.22, tcp_nat=9.35,
                                  tcp_vpn=8.90),
}


DETOUR_CLIENT_CODE = f"""
import hashlib, hmac, os, socket, struct, sys, time
key = bytes.fromhex("{DETOUR_KEY}")
kid = hashlib.sha256(b"mptcp-detour key id\\0" + key).digest()[:4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect(("10.1.6.2", 45672))
def ask(op, rip, rpt, dpt):
    nonce = struct.unpack("!Q", os.urandom(8))[0]
    body = struct.pack("!BBBB4sQQ4sHHI", 2, op, 0, 0, kid, nonce, int(time.time() * 1000),
                       socket.inet_aton(rip), rpt, dpt, 0)
    s.send(body + hmac.new(key, body, hashlib.sha256).digest())
    a = s.recv(100)
    assert hmac.compare_digest(a[36:68], hmac.new(key, a[:36], hashlib.sha256).digest()), "bad MAC"
    assert a[2] == 0 and a[8:16] == body[8:16], a
    return struct.unpack("!H", a[30:32])[0]
"""


def detour_mappings(lab, op, first_port, count):
    """Requests (op 0) or releases (op 2) mappings to 10.1.3.2 ports first_port..first_port+count-1."""
    code = DETOUR_CLIENT_CODE + (f"for p in range({first_port}, {first_port + count}):\n"
                                 f"    ask({op}, '10.1.3.2', p, p)\n")
    lab.exec("cli", sys.executable, "-c", code)


def detour_request(lab, rip, rpt):
    """Asks the lab's mptcp-detourd for a mapping with an authenticated (version 2) request, written here
    independently of the Rust implementation; returns the detour port."""
    code = DETOUR_CLIENT_CODE + f"print(ask(0, '{rip}', {rpt}, {rpt}))\n"
    return int(lab.exec("cli", sys.executable, "-c", code).stdout)


class DetourLab(Lab):
    """The thesis's Fig. 5.1 (deploy/testbed/detour.sh) with mptcp-detourd, OpenVPN and an iperf3 server."""

    def __init__(self, mode, loss2=None, delay2=None, link_delay=5, detourd_config=""):
        self.prefix = f"b{os.getpid() % 100000}dt"
        # Every link 5 ms each way, as in the thesis (§5.1.3); link 2's 100 ms replaces its 5.
        args = [str(DETOUR_LAB), "up", self.prefix, "--mode", mode]
        if link_delay:
            args += ["--link-delay", str(link_delay)]
        if loss2:
            args += ["--loss2", str(loss2)]
        if delay2:
            args += ["--delay2", str(delay2)]
        run(args, env={**os.environ, "TESTBED_DELAY": str(TARGET / "release/testbed-delay")})
        self.ns = {h: f"{self.prefix}-{h}" for h in ("cli", "r1", "r2", "r3", "dtr", "srv")}
        self.work = Path(tempfile.mkdtemp(prefix="mpx-bench-detour-"))
        self.procs = []
        (self.work / "psk").write_text(DETOUR_KEY + "\n")
        run([str(DETOUR_LAB), "vpn", self.prefix, str(self.work / "vpn")])
        (self.work / "detourd.toml").write_text(detourd_config)
        self.spawn("dtr", str(DETOURD_BIN), "--listen", "10.1.6.2", "--psk-file", str(self.work / "psk"),
                   "--config", str(self.work / "detourd.toml"))
        self.spawn("srv", *MPTCP, "iperf3", "-s", "-J")
        self.wait_port("srv", "10.1.3.2", 5201)
        time.sleep(0.5)

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        run([str(DETOUR_LAB), "down", self.prefix], check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def client_daemon(self, *args):
        p = self.spawn("cli", str(DETOUR_CLIENT_BIN), "--psk-file", str(self.work / "psk"), *args)
        self.wait_port("cli", "127.0.0.1", 9467)
        return p

    def iperf(self, seconds, target="10.1.3.2", port=5201, mptcp=False, bind=None):
        """One upload (client to server, as the thesis measured): the receiver's bytes from second 1 to
        `seconds` over that time (the thesis's 9 s after the first second), in bit/s."""
        # CUBIC, as in the thesis (this host's default is BBR, and a namespace may not change its default to
        # a congestion control outside tcp_allowed_congestion_control); MPTCP passes it on to every subflow.
        cmd = [*(MPTCP if mptcp else []), "iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J",
               "--get-server-output", "-C", "cubic"]
        if bind:
            cmd += ["-B", bind]
        for attempt in range(10):
            r = self.exec("cli", *cmd, check=False)
            try:
                out = json.loads(r.stdout)
                intervals = out["server_output_json"]["intervals"]
                break
            except (ValueError, KeyError):
                # The one-test-at-a-time server may still be finishing the previous test (busy), or drop
                # the control connection of a test that starts as the last one ends (reset): try again.
                if ("busy" in r.stdout or "reset" in r.stdout) and attempt < 9:
                    print(f"  (iperf3 retry: {r.stdout.strip().splitlines()[-2][:80]})", flush=True)
                    time.sleep(2)
                    continue
                raise RuntimeError(f"iperf3 {' '.join(cmd)}: {r.stdout[-400:]} {r.stderr[-400:]}")
        # The receiver's one-second intervals from second 1 to `seconds` (its clock starts a little after
        # the sender's, so the last whole interval may end just past `seconds`): bytes over their time.
        kept = [i["sum"] for i in intervals if 0.999 <= i["sum"]["start"] < seconds - 0.5]
        if len(kept) < seconds - 3:
            raise RuntimeError(f"iperf3 gave {len(kept)} intervals after the first second, not {seconds - 1}")
        if len(kept) != seconds - 1:
            # A receiver that stalls under loss may report a second less; its rate is still its bytes over
            # its time.
            print(f"  (iperf3: {len(kept)} receiver intervals after the first second)", flush=True)
        return sum(i["bytes"] for i in kept) * 8 / sum(i["seconds"] for i in kept)


def bench_detour(seconds=10, runs=5, only=None):
    """(h) The thesis's Table 1 in its Fig. 5.1 lab; subjects interleaved within each run. `only`: run just
    the scenarios whose names contain one of these strings."""
    res = Results("detour")
    scenarios = {
        "symmetric": dict(mode="symmetric"),
        "symmetric 1% loss": dict(mode="symmetric", loss2=1),
        "symmetric 100ms delay": dict(mode="symmetric", delay2=100),
        "core-limited": dict(mode="core-limited"),
        "core-limited 1% loss": dict(mode="core-limited", loss2=1),
        "core-limited 100ms delay": dict(mode="core-limited", delay2=100),
    }
    if only:
        scenarios = {k: v for k, v in scenarios.items() if any(o in k for o in only)}
    for scenario, kw in scenarios.items():
        with DetourLab(**kw) as lab:
            for n in range(1, runs + 1):
                for subject in DETOUR_SUBJECTS:
                    daemon = None
                    if subject == "mptcp_nat":
                        daemon = lab.client_daemon("--nat-detour", "10.1.6.2")
                    elif subject == "mptcp_vpn":
                        daemon = lab.client_daemon("--tunnel-detour", "tun0")
                    try:
                        if subject == "tcp":
                            bps = lab.iperf(seconds)
                        elif subject == "tcp_nat":
                            bps = lab.iperf(seconds, "10.1.6.2", detour_request(lab, "10.1.3.2", 5201))
                        elif subject == "tcp_vpn":
                            bps = lab.iperf(seconds, bind="10.8.0.2")
                        else:
                            bps = lab.iperf(seconds, mptcp=True)
                    finally:
                        if daemon:
                            daemon.terminate()
                            daemon.wait(10)
                    res.add(scenario, subject, n, "throughput", bps, "bit/s")
                    print(f"  {scenario:<26}{subject:<11} run {n}: {bps / 1e6:6.2f} Mbit/s", flush=True)
        res.save()  # after every scenario, so an interrupted run keeps what it measured
    report_detour(res, seconds)
    return res


def report_detour(res, seconds=10):
    """Table 1 beside the thesis's, the targets, and the box plots, from measured rows."""
    scenarios = [sc for sc in THESIS_TABLE1 if res.values(sc, "tcp", "throughput")]
    runs = max((r["run"] for r in res.rows), default=0)
    med = lambda sc, su: res.median(sc, su, "throughput") / 1e6
    print(f"\n(h) thesis Table 1: {seconds - 1} s measured after the first second, median of {runs} "
          f"(thesis: mean of 60 in parentheses), Mbit/s")
    print(f"{'scenario':<26}" + "".join(f"{s:>16}" for s in DETOUR_SUBJECTS))
    for sc in scenarios:
        print(f"{sc:<26}" + "".join(f"{med(sc, su):>8.2f} ({THESIS_TABLE1[sc][su]:5.2f})" for su in DETOUR_SUBJECTS))
    cl, sy = "core-limited", "symmetric"
    if cl not in scenarios or sy not in scenarios:
        plot_boxes(res, scenarios, DETOUR_SUBJECTS)
        return
    agg = med(cl, "mptcp_nat") / (med(cl, "tcp") + med(cl, "tcp_nat"))
    print(f"core-limited MPTCP + NAT detour: {100 * agg:.1f}% of TCP + TCP (NAT)   (target >= 99%; thesis 98.5%)")
    vpn_agg = med(cl, "mptcp_vpn") / (med(cl, "tcp") + med(cl, "tcp_vpn"))
    print(f"core-limited MPTCP + tunnel detour: {100 * vpn_agg:.1f}% of TCP + TCP (VPN)   (thesis 98.1%)")
    sym = med(sy, "mptcp_nat") / med(sy, "mptcp_1sf") - 1
    print(f"symmetric MPTCP + NAT detour vs 1-subflow MPTCP: {100 * sym:+.2f}%   (target within 1.5%; thesis 0.0%)")
    for sc in (sy, cl):
        nat = 1 - med(sc, "tcp_nat") / med(sc, "tcp")
        vpn = 1 - med(sc, "tcp_vpn") / med(sc, "tcp")
        print(f"{sc}: NAT detour overhead {100 * nat:.2f}% (target <= 2%; thesis 2.0% symmetric), "
              f"tunnel overhead {100 * vpn:.2f}% (thesis 6.6%)")
    plot_boxes(res, scenarios, DETOUR_SUBJECTS)


def load_results(paths):
    """Rows of earlier runs (CSV files bench.py wrote), as one Results."""
    res = Results("detour")
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                res.add(row["scenario"], row["subject"], int(row["run"]), row["metric"], float(row["value"]),
                        row["unit"])
    return res


def bench_detour_scale(seconds=10, runs=3, many=10000):
    """The NAT detour's packet path with 10 and with `many` mappings: TCP through the detour on the
    unshaped lab (CPU-bound veth forwarding), the two interleaved. One map lookup per packet whatever the
    number of elements, so the rates should match."""
    res = Results("detour-scale")
    limits = (f"[limits]\nmappings_per_client = {many + 100}\nmax_mappings = {many + 100}\n"
              f"requests_per_second = 1000000\nrequest_burst = {many + 100}\n")
    with DetourLab("none", link_delay=None, detourd_config=limits) as lab:
        detour_mappings(lab, 0, 20000, 9)
        for n in range(1, runs + 1):
            for subject in ("10 mappings", f"{many} mappings"):
                if subject != "10 mappings":
                    detour_mappings(lab, 0, 30000, many - 10)
                bps = lab.iperf(seconds, "10.1.6.2", detour_request(lab, "10.1.3.2", 5201))
                rules = lab.exec("dtr", "nft", "-a", "list", "table", "ip", "mptcp_detour").stdout
                rule_count = sum(1 for line in rules.splitlines() if "# handle" in line and "{" not in line)
                res.add("unshaped", subject, n, "throughput", bps, "bit/s")
                res.add("unshaped", subject, n, "rules", rule_count, "rules")
                print(f"  {subject:<16} run {n}: {bps / 1e9:6.2f} Gbit/s, {rule_count} rules", flush=True)
                if subject != "10 mappings":
                    detour_mappings(lab, 2, 30000, many - 10)
    res.save()
    few, lots = (res.median("unshaped", s, "throughput") for s in ("10 mappings", f"{many} mappings"))
    print(f"\nTCP through the NAT detour, unshaped, median of {runs}: 10 mappings {few / 1e9:.2f} Gbit/s, "
          f"{many} mappings {lots / 1e9:.2f} Gbit/s ({lots / few:.3f}x)")
    return res


def plot_boxes(res, scenarios, subjects):
    """Box plots like the thesis's Figs. 5.2-5.7: one panel per scenario, one box per subject."""
    panels = []
    for k, sc in enumerate(scenarios):
        dat = RESULTS / f"{res.bench}-{STAMP}-{k}.box.dat"
        rows = []
        for i, su in enumerate(subjects, 1):
            rows += [f"{i} {v / 1e6:.4f}" for v in res.values(sc, su, "throughput")]
        dat.write_text("\n".join(rows) + "\n")
        panels.append((sc, dat))
    png = RESULTS / f"{res.bench}-{STAMP}.png"
    names = {"tcp": "TCP", "tcp_nat": "TCP (NAT)", "tcp_vpn": "TCP (VPN)", "mptcp_1sf": "1-Subflow",
             "mptcp_nat": "NAT", "mptcp_vpn": "VPN"}  # the thesis's labels
    labels = ", ".join(f'"{names.get(su, su)}" {i}' for i, su in enumerate(subjects, 1))
    script = [f"set terminal png size 1500,900 noenhanced\nset output '{png}'\nset multiplot layout 2,3",
              "set style data boxplot\nset style boxplot outliers pointtype 6\nset style fill empty",
              f"set xtics ({labels}) rotate by -30\nset ylabel 'Throughput (Mbit/s)'\nset yrange [0:*]",
              f"set boxwidth 0.5\nunset key\nset xrange [0.5:{len(subjects) + 0.5}]"]
    for sc, dat in panels:
        script.append(f"set title '{sc}'\nplot for [i=1:{len(subjects)}] '{dat}' "
                      f"using (i):(column(1) == i ? column(2) : NaN)")
    script.append("unset multiplot")
    gnuplot("\n".join(script) + "\n")


def gnuplot(script):
    if shutil.which("gnuplot"):
        subprocess.run(["gnuplot"], input=script, text=True, check=False)


def plot_bars(res, metric, label, scale):
    data = RESULTS / f"{res.bench}-{STAMP}.bars.dat"
    subjects = sorted({r["subject"] for r in res.rows if r["metric"] == metric})
    scenarios = sorted({r["scenario"] for r in res.rows if r["metric"] == metric})
    with open(data, "w") as f:
        f.write("subject " + " ".join(f'"{s}"' for s in scenarios) + "\n")
        for subject in subjects:
            vals = [res.median(s, subject, metric) * scale for s in scenarios]
            f.write(f'"{subject}" ' + " ".join("0" if v != v else f"{v:.4f}" for v in vals) + "\n")
    png = RESULTS / f"{res.bench}-{STAMP}.png"
    cols = " , ".join(f"'{data}' using {i + 2}:xtic(1) title columnheader" for i in range(len(scenarios)))
    gnuplot(f"set terminal png size 900,500\nset output '{png}'\nset style data histograms\n"
            f"set style fill solid 0.8\nset ylabel '{label}'\nset xtics rotate by -20\nplot {cols}\n")


def plot_cdf(res, metric):
    png = RESULTS / f"{res.bench}-{metric}-{STAMP}.png"
    plots = []
    for scenario in sorted({r["scenario"] for r in res.rows}):
        for subject in sorted({r["subject"] for r in res.rows}):
            v = sorted(res.values(scenario, subject, metric))
            if not v:
                continue
            dat = RESULTS / f"{res.bench}-{STAMP}-{subject}-{scenario}.cdf.dat"
            dat.write_text("".join(f"{x * 1e3} {(i + 1) / len(v)}\n" for i, x in enumerate(v)))
            plots.append(f"'{dat}' using 1:2 with lines title '{subject} {scenario}'")
    if plots:
        gnuplot(f"set terminal png size 900,500\nset output '{png}'\nset logscale x\n"
                f"set xlabel '{metric} (ms)'\nset ylabel 'CDF'\nset key bottom right\nplot {', '.join(plots)}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["throughput", "requests", "conversion", "aggregation", "concurrency",
                                          "throttle", "throttle-scale", "mpip", "fig9", "detour", "all"])
    parser.add_argument("--subflows", type=int, default=10000, help="throttle-scale: steered subflows")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, help="rounds (default 5 for throughput, 3 for the others)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30, help="conversion: time-to-first-byte rounds")
    parser.add_argument("--tunnels", type=int, default=9900)
    parser.add_argument("--downloads", type=int, default=1000)
    parser.add_argument("--perf", action="store_true",
                        help="mpip: also record a perf profile of both ends; requests: of mptcp-proxy and haproxy")
    parser.add_argument("--compare", metavar="BIN", action="append",
                        help="requests: also measure this mptcp-proxy binary (A/B of builds in one run; repeatable)")
    parser.add_argument("--skip", metavar="SUBJECT", action="append", choices=["squid", "direct_tcp"],
                        help="requests: leave out a peer (for quick A/B runs of builds)")
    parser.add_argument("--scenario", action="append",
                        help="detour: only scenarios whose name contains this (repeatable)")
    parser.add_argument("--report", nargs="+", metavar="CSV",
                        help="detour: print Table 1 and draw the plots from these results, measuring nothing")
    parser.add_argument("--clients", type=int, default=0,
                        help="mpip: N mpipd clients at once against one (capacity) instead of the tunnel bench")
    a = parser.parse_args()
    if a.bench == "detour" and a.report:
        report_detour(load_results(a.report), a.seconds)
        return
    if os.geteuid() != 0:
        sys.exit("bench.py needs root (network namespaces)")
    # Installs what is missing, then stops at once naming any program of deploy/requirements.txt still absent.
    if subprocess.run(["bash", str(ROOT / "deploy/prerequisites.sh"), "bench"]).returncode != 0:
        sys.exit("bench.py: prerequisites missing (see above)")
    todo = (["throughput", "requests", "conversion", "aggregation", "concurrency", "throttle", "mpip", "fig9",
             "detour"]
            if a.bench == "all" else [a.bench])
    mpip = "mpip" in todo or "fig9" in todo
    run(["cargo", "build", "--release", "-q", "-p", "mptcp-proxy", "--bin", "mptcp-proxy",
         *(["--bin", "mptcp-convert"] if "conversion" in todo else []),
         *(["-p", "testbed", "--bin", "testbed-delay"] if {"conversion", "fig9", "detour"} & set(todo) else []),
         *(["-p", "mpip-proxy", "--bin", "mpipd", "--bin", "mpip-proxy"] if mpip else []),
         *(["-p", "mptcp-detour", "--bins"] if "detour" in todo else [])],
        cwd=ROOT)
    if {"throughput", "requests", "conversion"} & set(todo):
        print(f"HAProxy: {haproxy_binary()}")  # builds it on the first run (about 2 minutes on 2 cores)
    for name in todo:
        if name == "throughput":
            bench_throughput(a.size_mib, a.runs or 5)
        elif name == "requests":
            bench_requests(a.seconds, runs=a.runs or 3, compare=a.compare, perf=a.perf, skip=a.skip or ())
        elif name == "conversion":
            bench_conversion(a.requests, a.rounds)
        elif name == "aggregation":
            bench_aggregation(a.seconds, a.runs or 3)
        elif name == "concurrency":
            bench_concurrency(a.tunnels, a.downloads)
        elif name == "throttle":
            bench_throttle(a.connections)
        elif name == "throttle-scale":
            bench_throttle_scale(a.subflows, a.runs or 3)
        elif name == "fig9":
            bench_fig9()
        elif name == "mpip" and a.clients:
            bench_mpip_clients(a.clients, a.seconds, a.runs or 3)
        elif name == "mpip":
            bench_mpip(a.seconds, a.runs or 3, a.perf)
        elif name == "detour":
            if not a.scenario or any("scale" in sc for sc in a.scenario):
                bench_detour_scale(a.seconds, a.runs or 3)
            if not a.scenario or any("scale" not in sc for sc in a.scenario):
                bench_detour(a.seconds, a.runs or 5, a.scenario)


if __name__ == "__main__":
    main()
