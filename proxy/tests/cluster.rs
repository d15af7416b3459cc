//! Scale-out (issue 14): three mptcp-proxy instances in cluster mode behind a router's ECMP route that
//! bird2 learns over BGP from bird2 beside each instance; a legacy server (nginx); two two-path MPTCP
//! clients with `fullmesh` endpoints (`deploy/testbed/cluster.sh`).
//!
//! The clients are this test's own: MPTCP sockets in the client namespaces that download through the
//! shared service address and read `MPTCP_FULL_INFO` on their end, so every connection knows which
//! instances its subflows reached (a join goes to the owning instance's own address).
//!
//! Phases, one lab: (1) 300 downloads: spread, join placement, integrity, the dashboard's spread
//! panel over a real Prometheus; (2) drain one instance (`POST /drain`) during long downloads:
//! they finish intact, new connections avoid it within 3 s, its kernel state is restored; (3) SIGKILL
//! one instance during long downloads: only its connections fail, the route goes, and restarted it
//! takes over the dead run's state and new connections; (4) SIGTERM: every instance restores the
//! original kernel state.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use testbed::cluster::{
    instance_address, instance_of, ClusterLab, ClusterOptions, SERVER, SERVICE,
};
use testbed::{pseudo_random, Background};

const PORT: u16 = 3128;
const INSTANCES: usize = 3;
const SMALL: usize = 1 << 20;
const LARGE: usize = 16 << 20;
const CLIENTS: [&str; 2] = ["cla", "clb"];

/// What one download saw.
#[derive(Debug, Clone)]
struct Outcome {
    started_at: Instant,
    result: Result<(), String>,
    /// Instances whose own address appeared among the connection's subflows.
    instances: Vec<usize>,
    /// Remote addresses that are neither the service nor an instance (must never happen).
    strangers: Vec<IpAddr>,
    max_subflows: usize,
}

impl Outcome {
    fn instance(&self) -> Option<usize> {
        match self.instances[..] {
            [k] => Some(k),
            _ => None,
        }
    }

    fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

fn io<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Downloads `path` through the service address from the calling thread's namespace and compares
/// the body with `expected`; samples the subflows a quarter in and at the end.
fn download(path: &str, expected: &[u8]) -> Outcome {
    let mut outcome = Outcome {
        started_at: Instant::now(),
        result: Ok(()),
        instances: Vec::new(),
        strangers: Vec::new(),
        max_subflows: 0,
    };
    let result = (|| -> Result<(), String> {
        let socket =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP)).map_err(io("socket"))?;
        socket
            .connect_timeout(
                &SocketAddr::from((SERVICE, PORT)).into(),
                Duration::from_secs(5),
            )
            .map_err(io("connect"))?;
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("timeout"))?;
        let mut stream = std::net::TcpStream::from(socket);
        write!(
            stream,
            "GET http://{SERVER}/{path} HTTP/1.1\r\nHost: {SERVER}\r\n\r\n"
        )
        .map_err(io("send"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        let body_start = loop {
            let n = stream.read(&mut buf).map_err(io("read head"))?;
            if n == 0 {
                return Err(format!(
                    "closed in the head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
        if !text.starts_with("http/1.1 200") {
            return Err(format!("status: {}", text.lines().next().unwrap_or("")));
        }
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        if length != expected.len() {
            return Err(format!("content-length {length}"));
        }
        let mut got = head[body_start..].len();
        if head[body_start..] != expected[..got] {
            return Err("corrupt body".into());
        }
        let mut sampled = false;
        while got < length {
            let n = stream
                .read(&mut buf)
                .map_err(|e| format!("read at {got}: {e}"))?;
            if n == 0 {
                return Err(format!("closed at {got} of {length}"));
            }
            if got + n > length || buf[..n] != expected[got..got + n] {
                return Err(format!("corrupt body at {got}"));
            }
            got += n;
            // Joins complete within milliseconds; 256 KiB in, the connection has its subflows.
            if !sampled && got >= 256 * 1024 {
                sampled = true;
                sample(&stream, &mut outcome);
            }
        }
        sample(&stream, &mut outcome);
        Ok(())
    })();
    outcome.result = result;
    outcome
}

fn sample(stream: &std::net::TcpStream, outcome: &mut Outcome) {
    let Ok(Some(subflows)) = mptcp_proxy::sockets::mptcp_subflows(stream.as_fd()) else {
        return;
    };
    outcome.max_subflows = outcome.max_subflows.max(subflows.len());
    for subflow in subflows {
        let remote = subflow.remote.ip();
        match instance_of(remote, INSTANCES) {
            Some(k) if !outcome.instances.contains(&k) => outcome.instances.push(k),
            Some(_) => {}
            None if remote == IpAddr::V4(SERVICE) => {}
            None if !outcome.strangers.contains(&remote) => outcome.strangers.push(remote),
            None => {}
        }
    }
}

/// Runs `total` downloads of `path` from both clients, `workers` at a time per client.
fn downloads(
    lab: &ClusterLab,
    total: usize,
    workers: usize,
    path: &str,
    expected: &Arc<Vec<u8>>,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for client in CLIENTS {
            for _ in 0..workers {
                let (ns, next, outcomes, expected) = (
                    lab.ns(client),
                    next.clone(),
                    outcomes.clone(),
                    expected.clone(),
                );
                scope.spawn(move || {
                    testbed::in_namespace(&ns, || {
                        while next.fetch_add(1, Ordering::Relaxed) < total {
                            let outcome = download(path, &expected);
                            outcomes.lock().unwrap().push(outcome);
                        }
                    })
                    .expect("client namespace");
                });
            }
        }
    });
    Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap()
}

/// Downloads running in the background until stopped.
struct Downloads {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Downloads {
    /// `per_client` threads per client, each downloading `path` again and again.
    fn start(
        lab: &ClusterLab,
        per_client: usize,
        path: &'static str,
        expected: &Arc<Vec<u8>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for client in CLIENTS {
            for _ in 0..per_client {
                let (ns, stop, expected) = (lab.ns(client), stop.clone(), expected.clone());
                threads.push(std::thread::spawn(move || {
                    testbed::in_namespace(&ns, || {
                        let mut outcomes = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            outcomes.push(download(path, &expected));
                        }
                        outcomes
                    })
                    .expect("client namespace")
                }));
            }
        }
        Self { stop, threads }
    }

    /// One download per thread, `count` threads alternating between the clients.
    fn once(lab: &ClusterLab, count: usize, path: &'static str, expected: &Arc<Vec<u8>>) -> Self {
        let stop = Arc::new(AtomicBool::new(true));
        let threads = (0..count)
            .map(|i| {
                let (ns, expected) = (lab.ns(CLIENTS[i % 2]), expected.clone());
                std::thread::spawn(move || {
                    testbed::in_namespace(&ns, || vec![download(path, &expected)])
                        .expect("client namespace")
                })
            })
            .collect();
        Self { stop, threads }
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("download thread"))
            .collect()
    }
}

/// One proxy instance in its namespace.
struct Instance {
    k: usize,
    ns: String,
    config: PathBuf,
    log: PathBuf,
    access_log: PathBuf,
    process: Option<Background>,
}

impl Instance {
    fn new(lab: &ClusterLab, dir: &Path, k: usize) -> Self {
        let config = dir.join(format!("proxy-{k}.toml"));
        let access_log = dir.join(format!("access-{k}.log"));
        std::fs::write(
            &config,
            format!(
                "[[listener]]\naddress = \"{SERVICE}:{PORT}\"\n\
                 [cluster]\nannounce = \"{announce}\"\nwithdraw_delay = \"1s\"\nstate_dir = \"{state}\"\n\
                 [limits]\ndrain_timeout = \"30s\"\n\
                 [access_log]\npath = \"{access}\"\nformat = \"json\"\n\
                 [metrics]\naddress = \"{announce}:9464\"\n",
                announce = instance_address(k),
                state = dir.join("state").display(),
                access = access_log.display(),
            ),
        )
        .expect("config");
        Self {
            k,
            ns: lab.instance_ns(k),
            config,
            log: dir.join(format!("proxy-{k}.log")),
            access_log,
            process: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = testbed::command_in(&self.ns, env!("CARGO_BIN_EXE_mptcp-proxy"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(log);
        self.process = Some(Background::start(cmd).expect("start proxy"));
    }

    fn process(&self) -> &Background {
        self.process.as_ref().expect("running")
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut process = self.process.take().expect("running");
        process.wait_timeout(timeout).expect("proxy exits")
    }

    fn sh(&self, command: &str) -> String {
        let out = testbed::command_in(&self.ns, "sh")
            .args(["-c", command])
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// C flag sysctl, endpoints, the service address on lo, the announcement device.
    /// C flag, endpoints, service address on lo, announcement device, drain SYN gate.
    fn kernel_state(&self) -> (String, String, bool, bool, bool) {
        (
            self.sh("sysctl -n net.mptcp.allow_join_initial_addr_port")
                .trim()
                .to_owned(),
            self.sh("ip mptcp endpoint show").trim().to_owned(),
            self.sh("ip -4 addr show dev lo")
                .contains(&format!("{SERVICE}/32")),
            self.sh("ip link show mptcp-anycast 2>/dev/null")
                .contains("mptcp-anycast"),
            self.sh("nft list tables").contains("mptcp_proxy_drain"),
        )
    }

    fn nstat(&self, counter: &str) -> u64 {
        let json: serde_json::Value =
            serde_json::from_str(&self.sh("nstat -a -z -j")).expect("nstat JSON");
        json["kernel"][counter].as_u64().unwrap_or(0)
    }

    fn metric(&self, series: &str) -> f64 {
        let text = self.sh(&format!(
            "curl -sf http://{}:9464/metrics",
            instance_address(self.k)
        ));
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing in instance {}", self.k))
    }

    fn access_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON access log"))
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn count_by_instance(outcomes: &[Outcome]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for k in outcomes.iter().filter_map(Outcome::instance) {
        *counts.entry(k).or_insert(0) += 1;
    }
    counts
}

fn prometheus_values(lab: &ClusterLab, expr: &str) -> Vec<(String, f64)> {
    let out = lab
        .command("rtr", "curl")
        .args(["-sS", "-G", "--data-urlencode"])
        .arg(format!("query={expr}"))
        .arg("http://127.0.0.1:9090/api/v1/query")
        .output()
        .expect("curl");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    Some((
                        s["metric"]["instance"].as_str()?.to_owned(),
                        s["value"][1].as_str()?.parse().ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn spread_panel_expr() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards/mptcp-proxy.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let panel = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == "Spread over instances")
        .expect("a spread panel");
    panel["targets"][0]["expr"]
        .as_str()
        .expect("expr")
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
}

#[test]
fn instances_share_the_load_keep_every_subflow_and_drain_and_fail_alone() {
    if testbed::skip_unless_root() {
        return;
    }
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = ClusterLab::new(
        &ClusterOptions {
            instances: INSTANCES,
            rate_mbit: Some(100),
        },
        dir.path(),
    )
    .expect("cluster lab");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).expect("www");
    let small = Arc::new(pseudo_random(SMALL, 11));
    let large = Arc::new(pseudo_random(LARGE, 12));
    std::fs::write(www.join("small.bin"), &*small).expect("small");
    std::fs::write(www.join("large.bin"), &*large).expect("large");
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir(&nginx_dir).expect("nginx dir");
    let _nginx = testbed::start_nginx_in(
        &lab.ns("srv"),
        &[SocketAddr::from((SERVER, 80))],
        &www,
        &nginx_dir,
    )
    .expect("nginx");

    let mut instances: Vec<Instance> = (1..=INSTANCES)
        .map(|k| Instance::new(&lab, dir.path(), k))
        .collect();
    let before: Vec<_> = instances.iter().map(Instance::kernel_state).collect();
    for instance in &mut instances {
        assert_eq!(instance.kernel_state().0, "1", "the C flag starts off");
        instance.start();
    }
    let all: Vec<usize> = (1..=INSTANCES).collect();
    lab.wait_for_next_hops(&all, Duration::from_secs(20))
        .expect("every instance announced");
    for instance in &instances {
        let (c_flag, endpoints, service_on_lo, device, gate) = instance.kernel_state();
        assert_eq!(c_flag, "0");
        assert!(
            endpoints.contains(&format!("{} id", instance_address(instance.k)))
                && endpoints.contains("signal"),
            "{endpoints}"
        );
        assert!(
            service_on_lo && device && !gate,
            "a running instance has no SYN gate"
        );
    }

    // Prometheus on the router scrapes the three admin listeners, each target labelled `instance`.
    let mut scrape = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mptcp-proxy\n    static_configs:\n");
    for k in 1..=INSTANCES {
        scrape.push_str(&format!(
            "      - targets: ['{}:9464']\n        labels: {{instance: 'proxy-{k}'}}\n",
            instance_address(k)
        ));
    }
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(&prometheus_config, scrape).expect("prometheus.yml");
    let mut prometheus_cmd = lab.command("rtr", "prometheus");
    prometheus_cmd
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
        .stdin(std::process::Stdio::null());
    let _prometheus = Background::start(prometheus_cmd).expect("prometheus");
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus_values(&lab, "up == 1").len() < INSTANCES {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped all instances"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // POST /drain is refused from another host (the router), and GET is no drain.
    let refused = lab
        .command("rtr", "curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://{}:9464/drain", instance_address(1)))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "403");
    let get = instances[0].sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://{}:9464/drain",
        instance_address(1)
    ));
    assert_eq!(get, "404");

    // (1) 300 connections.
    let phase1 = Instant::now();
    let outcomes = downloads(&lab, 300, 8, "small.bin", &small);
    let phase1_time = phase1.elapsed();
    assert_eq!(outcomes.len(), 300);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok()).collect();
    assert!(failed.is_empty(), "failed downloads: {failed:#?}");
    assert!(outcomes.iter().all(|o| o.strangers.is_empty()));
    let split: Vec<_> = outcomes.iter().filter(|o| o.instances.len() > 1).collect();
    assert!(split.is_empty(), "subflows on two instances: {split:#?}");
    let two_subflows = outcomes.iter().filter(|o| o.max_subflows >= 2).count();
    let counts = count_by_instance(&outcomes);
    assert!(
        two_subflows >= 285,
        "only {two_subflows} of 300 connections reached two subflows"
    );
    for k in 1..=INSTANCES {
        let n = counts.get(&k).copied().unwrap_or(0);
        assert!(n >= 60, "instance {k} served {n} of 300: {counts:?}");
    }
    let mut logged = BTreeMap::new();
    for instance in &instances {
        let lines = instance.access_lines();
        let multipath = lines
            .iter()
            .filter(|l| l["subflows"].as_u64().unwrap_or(0) >= 2)
            .count();
        assert!(
            lines
                .iter()
                .all(|l| l["status"] == 200 && l["transport"] == "mptcp"),
            "instance {}: {lines:?}",
            instance.k
        );
        // Every connection the clients saw on this instance is in its log.
        assert!(lines.len() >= counts.get(&instance.k).copied().unwrap_or(0));
        assert!(
            multipath * 100 >= lines.len() * 95,
            "instance {}: {multipath} of {} requests had two subflows",
            instance.k,
            lines.len()
        );
        assert_eq!(instance.nstat("MPTcpExtMPJoinNoTokenFound"), 0);
        assert_eq!(
            instance.metric("mptcp_proxy_cluster_joins_total{address=\"service\"}"),
            0.0
        );
        assert!(
            instance.metric("mptcp_proxy_cluster_joins_total{address=\"announced\"}")
                >= 2.0 * multipath as f64 - 1.0
        );
        logged.insert(instance.k, (lines.len(), multipath));
    }
    assert_eq!(logged.values().map(|(n, _)| n).sum::<usize>(), 300);
    // The dashboard's spread panel shows every instance by its target label.
    let deadline = Instant::now() + Duration::from_secs(15);
    let spread = loop {
        let values = prometheus_values(&lab, &spread_panel_expr());
        if values.len() == INSTANCES && values.iter().all(|(_, v)| *v > 0.0) {
            break values;
        }
        assert!(Instant::now() < deadline, "spread panel: {values:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let labels: Vec<&str> = spread.iter().map(|(i, _)| i.as_str()).collect();
    for k in 1..=INSTANCES {
        assert!(
            labels.contains(&format!("proxy-{k}").as_str()),
            "{spread:?}"
        );
    }
    eprintln!(
        "phase 1: 300 downloads of 1 MiB in {phase1_time:.1?}; by instance (client view) {counts:?}; \
         access logs (requests, with >= 2 subflows) {logged:?}; {two_subflows}/300 with >= 2 subflows; \
         spread panel {spread:?}"
    );

    // (2) Drain instance 2 during long downloads, with new connections arriving all along.
    let long = Downloads::once(&lab, 18, "large.bin", &large);
    // Four threads a client open new connections all along, so some race the withdrawal.
    let stream = Downloads::start(&lab, 4, "small.bin", &small);
    std::thread::sleep(Duration::from_secs(1));
    let drain_wall = SystemTime::now();
    let drain_at = Instant::now();
    let answer = instances[1].sh(&format!(
        "curl -s -X POST http://{}:9464/drain",
        instance_address(2)
    ));
    assert_eq!(answer.trim(), "draining");
    let withdrawn = lab
        .wait_for_next_hops(&[1, 3], Duration::from_secs(3))
        .expect("route withdrawn within 3 s");
    let status = instances[1].wait_exit(Duration::from_secs(60));
    let drained = drain_at.elapsed();
    assert!(status.success(), "drained instance exit: {status}");
    std::thread::sleep(Duration::from_secs(4).saturating_sub(drain_at.elapsed()));
    let long_outcomes = long.finish();
    let stream_outcomes = stream.finish();
    let broken: Vec<_> = long_outcomes
        .iter()
        .chain(&stream_outcomes)
        .filter(|o| !o.ok())
        .collect();
    assert!(broken.is_empty(), "failed during the drain: {broken:#?}");
    let on_drained = long_outcomes
        .iter()
        .filter(|o| o.instance() == Some(2))
        .count();
    assert!(
        on_drained >= 1,
        "no long download reached instance 2: {long_outcomes:#?}"
    );
    let late: Vec<_> = stream_outcomes
        .iter()
        .filter(|o| o.started_at >= drain_at + Duration::from_secs(3))
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|o| o.instance() != Some(2)),
        "new connections reached the drained instance: {late:#?}"
    );
    let limit = unix(drain_wall) + 3.0;
    let late_logged: Vec<_> = instances[1]
        .access_lines()
        .into_iter()
        .filter(|l| l["time"].as_f64().unwrap_or(0.0) >= limit)
        .collect();
    assert!(late_logged.is_empty(), "{late_logged:?}");
    assert_eq!(
        instances[1].kernel_state(),
        before[1],
        "drained instance restored the kernel"
    );
    assert!(
        !instances[1].log_text().contains("drain timeout"),
        "{}",
        instances[1].log_text()
    );
    let last_on_drained = stream_outcomes
        .iter()
        .filter(|o| o.instance() == Some(2) && o.started_at >= drain_at)
        .map(|o| o.started_at - drain_at)
        .max();
    eprintln!(
        "phase 2: drain of instance 2: route withdrawn at the router {withdrawn:.2?} after POST /drain; \
         {on_drained} of 18 long downloads (16 MiB) were on it and finished intact; process exit after \
         {drained:.1?}; {} new connections during the drain, the last on instance 2 started {last_on_drained:?} \
         after the request (None: none after it); {} started >= 3 s after, none on it",
        stream_outcomes.len(),
        late.len()
    );

    // (3) SIGKILL instance 3 during long downloads; instance 2 is back first.
    instances[1].start();
    lab.wait_for_next_hops(&all, Duration::from_secs(20))
        .expect("instance 2 announced again");
    let long = Downloads::once(&lab, 18, "large.bin", &large);
    let stream = Downloads::start(&lab, 1, "small.bin", &small);
    std::thread::sleep(Duration::from_secs(1));
    let kill_at = Instant::now();
    instances[2]
        .process()
        .signal(libc::SIGKILL)
        .expect("SIGKILL");
    let withdrawn_after_kill = lab
        .wait_for_next_hops(&[1, 2], Duration::from_secs(5))
        .expect("route withdrawn after SIGKILL");
    let withdrawn_at = Instant::now();
    let _ = instances[2].wait_exit(Duration::from_secs(5));
    let (c_flag, endpoints, _, device, _) = instances[2].kernel_state();
    assert_eq!(c_flag, "0", "a killed instance leaves the C flag");
    assert!(endpoints.contains("signal") && !device, "{endpoints}");
    let long_outcomes = long.finish();
    let killed: Vec<_> = long_outcomes
        .iter()
        .filter(|o| o.instance() == Some(3))
        .collect();
    assert!(!killed.is_empty(), "no long download reached instance 3");
    assert!(killed.iter().all(|o| !o.ok()), "{killed:#?}");
    let survivors: Vec<_> = long_outcomes
        .iter()
        .filter(|o| o.instance() != Some(3))
        .collect();
    let broken: Vec<_> = survivors.iter().filter(|o| !o.ok()).collect();
    assert!(
        broken.is_empty(),
        "other instances' downloads failed: {broken:#?}"
    );
    // Restarted, it takes over the dead run's state and new connections.
    instances[2].start();
    let back = lab
        .wait_for_next_hops(&all, Duration::from_secs(20))
        .expect("instance 3 announced again");
    let back_at = Instant::now();
    let deadline = back_at + Duration::from_secs(20);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if instances[2].access_lines().len() >= 5 {
            break;
        }
    }
    let stream_outcomes = stream.finish();
    // New connections fail only while the dead instance is still announced (the kernel deletes its
    // device at once; bird withdraws in milliseconds).
    let lost: Vec<_> = stream_outcomes.iter().filter(|o| !o.ok()).collect();
    assert!(
        lost.iter().all(|o| o.instance().is_none_or(|k| k == 3)
            && o.started_at >= kill_at - Duration::from_secs(1)
            && o.started_at <= withdrawn_at + Duration::from_millis(500)),
        "new connections failed outside the kill window (SIGKILL at 0, route withdrawn at {:?}, instance 3 \
         back at {:?}; the failures started at {:?} from the SIGKILL): {lost:#?}",
        withdrawn_at - kill_at,
        back_at - kill_at,
        lost.iter()
            .map(|o| o.started_at.checked_duration_since(kill_at).map_or_else(
                || format!("-{:?}", kill_at - o.started_at),
                |after| format!("{after:?}")
            ))
            .collect::<Vec<_>>()
    );
    let after_back: Vec<_> = stream_outcomes
        .iter()
        .filter(|o| o.started_at >= back_at)
        .collect();
    let on_restarted = after_back
        .iter()
        .filter(|o| o.instance() == Some(3))
        .count();
    assert!(
        on_restarted >= 1 && instances[2].access_lines().len() >= 5,
        "the restarted instance took no new connections: {after_back:#?}"
    );
    assert!(instances[2]
        .log_text()
        .contains("a previous run did not exit cleanly"));
    eprintln!(
        "phase 3: SIGKILL of instance 3: route withdrawn {withdrawn_after_kill:.2?} after the kill; {} long \
         downloads on it failed, {} on the others finished intact; {} of {} new connections failed in the \
         kill window; restarted, announced again {back:.2?} after the restart and took {on_restarted} of {} new \
         connections",
        killed.len(),
        survivors.len(),
        lost.len(),
        stream_outcomes.len(),
        after_back.len()
    );

    // (4) SIGTERM: every instance withdraws, exits 0 and leaves the kernel as it found it (instance 3
    // restores the value from before the crashed run, not the 0 it found).
    for instance in &instances {
        instance.process().signal(libc::SIGTERM).expect("SIGTERM");
    }
    lab.wait_for_next_hops(&[], Duration::from_secs(3))
        .expect("every route withdrawn");
    for (instance, before) in instances.iter_mut().zip(&before) {
        let status = instance.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "instance {}: {status}", instance.k);
        assert_eq!(&instance.kernel_state(), before, "instance {}", instance.k);
        assert_eq!(
            instance.nstat("MPTcpExtMPJoinNoTokenFound"),
            0,
            "instance {}",
            instance.k
        );
    }
    assert!(
        std::fs::read_dir(dir.path().join("state"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "state files left"
    );
    eprintln!("cluster test took {:.1?}", began.elapsed());
}

#[test]
fn cluster_cleanup_undoes_what_a_killed_instance_left() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = testbed::Testbed::new(testbed::Options::default()).expect("testbed");
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = tb.proxy_ns().to_owned();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\naddress = \"10.99.0.1:3128\"\n[metrics]\naddress = \"off\"\n\
             [access_log]\npath = \"off\"\n[cluster]\nannounce = \"10.0.2.1\"\nstate_dir = \"{}\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let sh = |command: &str| tb.exec(&ns, &["sh", "-c", command]).unwrap_or_default();
    let state = || {
        (
            sh("sysctl -n net.mptcp.allow_join_initial_addr_port")
                .trim()
                .to_owned(),
            sh("ip mptcp endpoint show | grep -c '10.0.2.1 .*signal' || true")
                .trim()
                .to_owned(),
            sh("ip -4 addr show dev lo").contains("10.99.0.1/32"),
            sh("ip link show mptcp-anycast 2>/dev/null").contains("mptcp-anycast"),
        )
    };
    let clean = state();
    assert_eq!(clean, ("1".into(), "0".into(), false, false));
    let proxy = env!("CARGO_BIN_EXE_mptcp-proxy");
    let config = config.display().to_string();
    let mut first = tb.spawn(&ns, &[proxy, "--config", &config]).expect("proxy");
    tb.wait_for_tcp(
        &ns,
        "10.0.2.1:3128".parse().unwrap(),
        Duration::from_secs(20),
    )
    .expect("listening on the announced address");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !state().3 {
        assert!(Instant::now() < deadline, "no announcement device");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state(), ("0".into(), "1".into(), true, true));
    // A second instance in the same namespace is refused.
    let second = tb
        .command(&ns, proxy)
        .args(["--config", &config, "--listen", "10.99.0.1:3129"])
        .output()
        .expect("second");
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already runs in cluster mode"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    first.signal(libc::SIGKILL).expect("SIGKILL");
    let _ = first.wait_timeout(Duration::from_secs(5));
    // The device died with the process; the rest stays until someone undoes it.
    assert_eq!(state(), ("0".into(), "1".into(), true, false));
    let cleanup = |expected: &str| {
        let out = tb
            .command(&ns, proxy)
            .args(["--cluster-cleanup", "--config", &config])
            .output()
            .expect("cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    };
    cleanup("cluster state restored");
    assert_eq!(state(), clean);
    cleanup("no cluster state to restore");
}
