//! Shared end-to-end fixtures: the testbed with nginx, `mpip-proxy` and
//! `mpipd` started from the example configurations, and helpers to drive
//! downloads and read `/metrics`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use testbed::{pseudo_random, Background, Options, Testbed};

pub const PROXY_HTTP: &str = "http://10.200.0.1:3128";
pub const SERVER: &str = "10.0.3.2";

/// A testbed with nginx, mpip-proxy in the proxy namespace and mpipd in the
/// client namespace.
pub struct MpipLab {
    // Field order is drop order: processes stop before the namespaces go.
    pub client: Option<Background>,
    pub proxy: Option<Background>,
    pub _nginx: Background,
    pub tb: Testbed,
    pub dir: tempfile::TempDir,
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// An example configuration with `edit` applied, written to `dir`.
pub fn config_from_example(dir: &Path, name: &str, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    let mut table: toml::Table = std::fs::read_to_string(&example)
        .expect("example config")
        .parse()
        .expect("example is TOML");
    edit(&mut table);
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(&table).expect("serialise")).expect("write config");
    path
}

pub fn section<'a>(table: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    table
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("a table")
}

/// `[paths] interfaces`; the example's routing profiles name its own
/// interfaces, so they go.
pub fn set_interfaces(table: &mut toml::Table, names: &[&str]) {
    let names: Vec<toml::Value> = names.iter().map(|n| toml::Value::from(*n)).collect();
    section(table, "paths").insert("interfaces".into(), names.into());
    section(table, "routing").remove("profile");
}

/// `[routing]` with `default` and `rules` as (port, interface) pins.
pub fn routing(table: &mut toml::Table, default: &str, pins: &[(u16, &str)]) {
    let routing = section(table, "routing");
    routing.insert("default".into(), default.into());
    let rules: Vec<toml::Value> = pins
        .iter()
        .map(|(port, path)| {
            let mut rule = toml::Table::new();
            rule.insert("port".into(), i64::from(*port).into());
            rule.insert("protocol".into(), "tcp".into());
            rule.insert("path".into(), (*path).into());
            toml::Value::Table(rule)
        })
        .collect();
    routing.insert("rule".into(), toml::Value::Array(rules));
}

/// `[routing.profile.NAME]` with `default` and `rules` as (port, interface) pins.
pub fn profile(table: &mut toml::Table, name: &str, default: &str, pins: &[(u16, &str)]) {
    let profiles = section(section(table, "routing"), "profile");
    let mut profile = toml::Table::new();
    profile.insert("default".into(), default.into());
    let rules: Vec<toml::Value> = pins
        .iter()
        .map(|(port, path)| {
            let mut rule = toml::Table::new();
            rule.insert("port".into(), i64::from(*port).into());
            rule.insert("protocol".into(), "tcp".into());
            rule.insert("path".into(), (*path).into());
            toml::Value::Table(rule)
        })
        .collect();
    profile.insert("rule".into(), toml::Value::Array(rules));
    profiles.insert(name.into(), toml::Value::Table(profile));
}

impl MpipLab {
    /// Builds the lab with `files` served by nginx, or returns None when the
    /// test must skip (not root and CI unset).
    pub fn new(
        options: Options,
        files: &[(&str, &[u8])],
        edit_proxy: impl FnOnce(&mut toml::Table),
        edit_client: impl FnOnce(&mut toml::Table),
    ) -> Option<MpipLab> {
        Self::with_hook(options, files, edit_proxy, edit_client, |_, _| {})
    }

    /// Like [`MpipLab::new`]; `before_client` runs once the proxy end is up
    /// and before mpipd starts (with the testbed and the work folder).
    pub fn with_hook(
        options: Options,
        files: &[(&str, &[u8])],
        edit_proxy: impl FnOnce(&mut toml::Table),
        edit_client: impl FnOnce(&mut toml::Table),
        before_client: impl FnOnce(&Testbed, &Path),
    ) -> Option<MpipLab> {
        if testbed::skip_unless_root() {
            return None;
        }
        let tb = Testbed::new(options).expect("testbed");
        let dir = tempfile::tempdir().expect("tempdir");
        let www = dir.path().join("www");
        std::fs::create_dir(&www).expect("www");
        for (name, bytes) in files {
            std::fs::write(www.join(name), bytes).expect("write file");
        }
        let nginx = tb.start_nginx(&www, dir.path()).expect("nginx");
        let proxy_config = config_from_example(dir.path(), "mpip-proxy.toml", edit_proxy);
        let client_config = config_from_example(dir.path(), "mpipd.toml", edit_client);
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let mut proxy_cmd = tb.command(tb.proxy_ns(), env!("CARGO_BIN_EXE_mpip-proxy"));
        proxy_cmd
            .arg("--config")
            .arg(&proxy_config)
            .stderr(log("mpip-proxy.log"));
        let proxy = Background::start(proxy_cmd).expect("mpip-proxy");
        tb.wait_for_tcp(
            tb.proxy_ns(),
            "127.0.0.1:9464".parse().unwrap(),
            Duration::from_secs(10),
        )
        .expect("mpip-proxy metrics listener");
        before_client(&tb, dir.path());
        let mut client_cmd = tb.command(tb.client_ns(), env!("CARGO_BIN_EXE_mpipd"));
        client_cmd
            .arg("--config")
            .arg(&client_config)
            .stderr(log("mpipd.log"));
        let client = Background::start(client_cmd).expect("mpipd");
        let lab = MpipLab {
            client: Some(client),
            proxy: Some(proxy),
            _nginx: nginx,
            tb,
            dir,
        };
        // The tunnel is up when the client has its tunnel address and reaches
        // the HTTP proxy through it. (Without the tunnel route the proxy
        // namespace would also answer on 10.200.0.1 over c1: weak host model.)
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let route = lab
                .tb
                .exec(lab.tb.client_ns(), &["ip", "route", "get", "10.200.0.1"])
                .unwrap_or_default();
            if route.contains("dev mpip0") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tunnel not up: {route}\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(error) = lab.tb.wait_for_tcp(
            lab.tb.client_ns(),
            "10.200.0.1:3128".parse().unwrap(),
            Duration::from_secs(10),
        ) {
            panic!(
                "HTTP proxy not reachable through the tunnel: {error}\n{}",
                lab.logs()
            );
        }
        Some(lab)
    }

    pub fn logs(&self) -> String {
        ["mpip-proxy.log", "mpipd.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!(
                    "--- {name} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn out_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs curl in the client namespace; panics with the logs on failure.
    pub fn curl(&self, args: &[&str]) -> String {
        let mut argv = vec!["curl", "-sS", "--fail", "--max-time", "60"];
        argv.extend_from_slice(args);
        let output: Output = self
            .tb
            .command(self.tb.client_ns(), argv[0])
            .args(&argv[1..])
            .output()
            .expect("run curl");
        assert!(
            output.status.success(),
            "curl {args:?}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `curl -o OUT ...` in the background.
    pub fn curl_background(&self, out: &Path, args: &[&str]) -> Background {
        let mut cmd = self.tb.command(self.tb.client_ns(), "curl");
        cmd.args(["-sS", "--fail", "--max-time", "90", "-o"])
            .arg(out)
            .args(args);
        Background::start(cmd).expect("curl")
    }

    /// An admin request (`curl -X METHOD`) to the proxy end (port 9464) or
    /// the client (9465); returns the body.
    pub fn admin(&self, proxy_end: bool, method: &str, path: &str) -> String {
        let (ns, port) = if proxy_end {
            (self.tb.proxy_ns(), 9464)
        } else {
            (self.tb.client_ns(), 9465)
        };
        self.tb
            .exec(
                ns,
                &[
                    "curl",
                    "-sS",
                    "--fail",
                    "-X",
                    method,
                    &format!("http://127.0.0.1:{port}{path}"),
                ],
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// The paths of the configurations the lab started with.
    pub fn config_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SIGHUP to the proxy end or the client.
    pub fn hangup(&self, proxy_end: bool) {
        let process = if proxy_end { &self.proxy } else { &self.client };
        process
            .as_ref()
            .expect("running")
            .signal(libc::SIGHUP)
            .expect("SIGHUP");
    }

    /// mpipd's `/metrics`.
    pub fn client_metrics(&self) -> String {
        self.tb
            .exec(
                self.tb.client_ns(),
                &["curl", "-sS", "http://127.0.0.1:9465/metrics"],
            )
            .expect("scrape")
    }

    /// The proxy end's `/metrics`.
    pub fn metrics(&self) -> String {
        self.tb
            .exec(
                self.tb.proxy_ns(),
                &["curl", "-sS", "http://127.0.0.1:9464/metrics"],
            )
            .expect("scrape")
    }

    /// Bytes the proxy end sent on the paths leaving `interface`.
    pub fn proxy_path_tx_bytes(&self, interface: &str) -> u64 {
        sum_metric(
            &self.metrics(),
            "mpip_path_bytes_total",
            &[("interface", interface), ("direction", "tx")],
        )
    }

    /// Every TCP counter of the proxy namespace (for diagnostics).
    pub fn proxy_tcp_counters(&self) -> std::collections::BTreeMap<String, u64> {
        let text = self
            .tb
            .exec(self.tb.proxy_ns(), &["nstat", "-a", "-z", "-j"])
            .expect("nstat");
        let json: serde_json::Value = serde_json::from_str(&text).expect("nstat json");
        json["kernel"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("Tcp"))
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }

    /// SIGTERM to both ends; they must exit 0 and leave no TUN device, route
    /// or nftables table behind.
    pub fn stop_and_assert_clean(&mut self) {
        for (process, name) in [
            (self.client.take(), "mpipd"),
            (self.proxy.take(), "mpip-proxy"),
        ] {
            let mut process = process.expect("running");
            process.signal(libc::SIGTERM).expect("SIGTERM");
            let status = process
                .wait_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{name} did not exit: {e}\n{}", self.logs()));
            assert!(
                status.success(),
                "{name} exited with {status}\n{}",
                self.logs()
            );
        }
        for ns in [self.tb.client_ns(), self.tb.proxy_ns()] {
            let links = self
                .tb
                .exec(ns, &["ip", "-o", "link", "show"])
                .expect("ip link");
            assert!(!links.contains("mpip"), "TUN device left in {ns}:\n{links}");
            let routes = self
                .tb
                .exec(ns, &["ip", "route", "show"])
                .expect("ip route");
            assert!(
                !routes.contains("10.200.0."),
                "tunnel route left in {ns}:\n{routes}"
            );
            let tables = self.tb.exec(ns, &["nft", "list", "tables"]).expect("nft");
            assert!(
                !tables.contains("mpip"),
                "nftables table left in {ns}:\n{tables}"
            );
        }
    }
}

/// Sums every sample of `name` whose labels include all of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Watches a file grow while a download runs; returns (seconds since start, bytes).
pub fn watch_download(path: &Path, curl: &mut Background, timeout: Duration) -> Vec<(f64, u64)> {
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        samples.push((start.elapsed().as_secs_f64(), size));
        if let Ok(Some(status)) = curl.child_mut().try_wait() {
            assert!(status.success(), "curl failed: {status}");
            return samples;
        }
        assert!(
            start.elapsed() < timeout,
            "download did not finish in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lab with both paths shaped (Mbit/s) and a download of a `size`-byte
/// file through the HTTP proxy started in the background: the file, where
/// curl writes it, and curl.
pub fn shaped_download(
    rate1: u32,
    rate2: u32,
    size: usize,
    seed: u64,
) -> Option<(MpipLab, Vec<u8>, PathBuf, Background)> {
    let file = pseudo_random(size, seed);
    let lab = MpipLab::new(
        Options {
            path_rate_mbit: [Some(rate1), Some(rate2)],
            subflow_endpoint: false,
            ..Options::default()
        },
        &[("big.bin", &file)],
        |_| {},
        |_| {},
    )?;
    let out = lab.out_path("big.out");
    let url = format!("http://{SERVER}/big.bin");
    let curl = lab.curl_background(&out, &["-x", PROXY_HTTP, &url]);
    Some((lab, file, out, curl))
}

/// A key file with one fresh key (readable by its owner only), in `dir`;
/// returns its path.
pub fn write_key_file(dir: &Path, name: &str, id: u8, seed: u64) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let secret: String = pseudo_random(32, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("[[key]]\nid = {id}\nsecret = \"{secret}\"\n"),
    )
    .expect("key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// `[auth] key_file = PATH` (and `data`).
pub fn with_keys(table: &mut toml::Table, keys: &Path, data: bool) {
    let auth = section(table, "auth");
    auth.insert("key_file".into(), keys.display().to_string().into());
    auth.insert("data".into(), data.into());
}

/// The IPv4 address of `mpip0` in `ns`, once the proxy end assigned one.
pub fn tunnel_address(lab: &MpipLab, ns: &str) -> Option<String> {
    let text = lab
        .tb
        .exec(ns, &["ip", "-o", "-4", "addr", "show", "dev", "mpip0"])
        .ok()?;
    let mut words = text.split_whitespace();
    words.find(|w| *w == "inet")?;
    Some(words.next()?.split('/').next()?.to_owned())
}
