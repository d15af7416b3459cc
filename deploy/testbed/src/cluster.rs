//! The scale-out lab (issue 14): a router with bird2 and ECMP, mptcp-proxy instances with bird2 beside
//! them, a legacy server, and two two-path MPTCP clients. [`ClusterLab::new`] runs `cluster.sh up` (the
//! one description of the topology) and [`Drop`] runs `cluster.sh down`.
//!
//! ```text
//! client A  a1 10.1.1.2, a2 10.1.2.2 ─┐                ┌─ e1 10.2.k.2  instance k (k = 1..n), VIP on lo
//! client B  b1 10.1.3.2, b2 10.1.4.2 ─┴── router ──────┤
//!                                     (ECMP for VIP)   └─ s1 10.3.0.2  legacy server
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{command_in, run, unique_prefix, Result, TestbedError};

/// The shared service address every instance announces.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The legacy server.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 2);

/// Instance `k`'s own address (1-based), the one it announces with ADD_ADDR.
pub fn instance_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, k as u8, 2)
}

/// Which instance owns `addr`, if it is an instance's own address.
pub fn instance_of(addr: IpAddr, instances: usize) -> Option<usize> {
    (1..=instances).find(|k| addr == IpAddr::V4(instance_address(*k)))
}

/// Lab parameters.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Proxy instances (1 to 9).
    pub instances: usize,
    /// HTB rate of every client path towards the client, in Mbit/s.
    pub rate_mbit: Option<u32>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            instances: 3,
            rate_mbit: None,
        }
    }
}

/// A running cluster lab; dropping it kills everything in it and deletes the namespaces.
#[derive(Debug)]
pub struct ClusterLab {
    prefix: String,
    dir: PathBuf,
    instances: usize,
}

/// The topology script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.sh")
}

impl ClusterLab {
    /// Builds the lab; `dir` receives the bird configurations, sockets and logs. Returns once every
    /// instance's BGP session with the router is established.
    pub fn new(options: &ClusterOptions, dir: &Path) -> Result<Self> {
        let lab = Self {
            prefix: unique_prefix(),
            dir: dir.to_owned(),
            instances: options.instances,
        };
        let mut cmd = Command::new(script());
        cmd.arg("up")
            .arg(&lab.prefix)
            .arg(dir)
            .arg("--instances")
            .arg(options.instances.to_string());
        if let Some(rate) = options.rate_mbit {
            cmd.arg("--rate").arg(rate.to_string());
        }
        run(&mut cmd)?;
        Ok(lab)
    }

    /// The namespace of `host`: `rtr`, `cla`, `clb`, `srv` or `in<k>`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Instance `k`'s namespace.
    pub fn instance_ns(&self, k: usize) -> String {
        self.ns(&format!("in{k}"))
    }

    /// The number of instances.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.ns(host), program)
    }

    /// Runs a command inside `host`'s namespace and returns its stdout.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().expect("exec needs a program");
        let out = run(self.command(host, program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The instances the router's ECMP route for [`SERVICE`] leads to now.
    pub fn next_hops(&self) -> Result<Vec<usize>> {
        let routes = self.exec("rtr", &["ip", "route", "show", &SERVICE.to_string()])?;
        Ok(parse_next_hops(&routes, self.instances))
    }

    /// Waits until the router's next hops for [`SERVICE`] are exactly `wanted`; returns how long it
    /// took.
    pub fn wait_for_next_hops(&self, wanted: &[usize], timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let hops = self.next_hops()?;
            if hops == wanted {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(TestbedError::Timeout(format!(
                    "next hops {wanted:?} (have {hops:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The router's bird: `birdc show protocols` and friends.
    pub fn birdc(&self, host: &str, command: &[&str]) -> Result<String> {
        let socket = self.dir.join(format!("bird-{host}.ctl"));
        let mut argv = vec!["birdc", "-s", socket.to_str().unwrap_or_default()];
        argv.extend_from_slice(command);
        self.exec(host, &argv)
    }

    /// The service's socket address for a port.
    pub fn service(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(SERVICE), port)
    }
}

/// The instances (1-based, sorted) an `ip route show` of an ECMP route names as next hops.
pub fn parse_next_hops(routes: &str, instances: usize) -> Vec<usize> {
    let mut hops: Vec<usize> = routes
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .filter_map(|ip| instance_of(ip, instances))
        .collect();
    hops.sort_unstable();
    hops.dedup();
    hops
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        crate::tear_down(&script(), &self.prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_are_read_from_ip_route() {
        let multipath =
            "10.99.0.1 proto bird metric 32 \n\tnexthop via 10.2.1.2 dev i1 weight 1 \n\
                         \tnexthop via 10.2.3.2 dev i3 weight 1 \n";
        assert_eq!(parse_next_hops(multipath, 3), vec![1, 3]);
        assert_eq!(
            parse_next_hops("10.99.0.1 via 10.2.2.2 dev i2 proto bird metric 32\n", 3),
            vec![2]
        );
        assert!(parse_next_hops("", 3).is_empty());
    }
}
