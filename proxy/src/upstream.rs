//! Connecting to servers: resolve (async, cached), check every address against the destination ACL,
//! then race the allowed addresses with Happy Eyeballs (RFC 8305).
//!
//! [`Connector::connect`] is the one way the proxy reaches a server: the forward proxy, CONNECT
//! tunnels and transparent listeners all use it, and so can any other listener mode. It returns a
//! connected stream or a typed [`ConnectError`] whose text is safe to show a client (it names the host
//! as asked, never a resolved address).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;

use crate::acl::{Acl, Denied};
use crate::config::UpstreamConfig;
use crate::http::{ProxyError, Shared};
use crate::sockets::upstream_socket;

/// Why the proxy could not connect to a server. The text is what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every address of the host is denied by the destination ACL (403).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The name does not resolve (502).
    #[error("cannot resolve {host}")]
    Resolve {
        /// The host as asked.
        host: String,
    },
    /// Resolving or connecting took longer than `upstream.connect_timeout` (504).
    #[error("connecting to {host}:{port} timed out")]
    Timeout {
        /// The host as asked.
        host: String,
        /// The port.
        port: u16,
    },
    /// Every address refused, was unreachable, or timed out on its own (502).
    #[error("cannot connect to {host}:{port}: {reason}")]
    Failed {
        /// The host as asked.
        host: String,
        /// The port.
        port: u16,
        /// What the last attempt saw (an OS error text, no address).
        reason: String,
        /// Whether that was a refusal (for the metrics).
        refused: bool,
    },
}

impl ConnectError {
    /// The `kind` label of `mptcp_proxy_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Denied(_) => "denied",
            ConnectError::Resolve { .. } => "resolve",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Failed { refused: true, .. } => "refused",
            ConnectError::Failed { .. } => "unreachable",
        }
    }
}

impl From<ConnectError> for ProxyError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Denied(denied) => ProxyError::Denied(denied),
            ConnectError::Timeout { .. } => ProxyError::GatewayTimeout(error.to_string()),
            other => ProxyError::BadGateway(other.to_string()),
        }
    }
}

/// A connected server.
#[derive(Debug)]
pub struct Connected {
    /// The connection.
    pub stream: TcpStream,
    /// The address that answered.
    pub peer: SocketAddr,
}

/// The resolver: hickory with the system's `/etc/resolv.conf` and `/etc/hosts`, caching by TTL.
#[derive(Clone)]
enum Resolver {
    Hickory(Box<TokioResolver>),
    /// getaddrinfo on the blocking pool, when the system resolver configuration cannot be read.
    System,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resolver::Hickory(_) => "Resolver::Hickory",
            Resolver::System => "Resolver::System",
        })
    }
}

/// Resolves and connects to servers as `[upstream]` says.
#[derive(Debug, Clone)]
pub struct Connector {
    resolver: Resolver,
    mptcp: bool,
    connect_timeout: Duration,
    attempt_delay: Duration,
    attempt_timeout: Duration,
}

/// Resolver options: both address families (Happy Eyeballs needs both), a cache of `entries`.
fn resolver_options(mut options: ResolverOpts, entries: usize) -> ResolverOpts {
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.cache_size = entries;
    options
}

impl Connector {
    /// A connector with the system's resolver configuration. Must run inside tokio.
    pub fn new(config: &UpstreamConfig) -> Self {
        let resolver = match hickory_resolver::system_conf::read_system_conf() {
            Ok((resolver_config, options)) => Resolver::Hickory(Box::new(
                TokioResolver::builder_with_config(
                    resolver_config,
                    TokioConnectionProvider::default(),
                )
                .with_options(resolver_options(options, config.dns_cache_entries))
                .build(),
            )),
            Err(error) => {
                tracing::warn!(%error, "cannot read /etc/resolv.conf; resolving with getaddrinfo, uncached");
                Resolver::System
            }
        };
        Self::with_resolver(config, resolver)
    }

    /// A connector that asks the given name servers only (tests, and hosts without resolv.conf).
    pub fn with_name_servers(config: &UpstreamConfig, resolver_config: ResolverConfig) -> Self {
        let resolver = Resolver::Hickory(Box::new(
            TokioResolver::builder_with_config(resolver_config, TokioConnectionProvider::default())
                .with_options(resolver_options(
                    ResolverOpts::default(),
                    config.dns_cache_entries,
                ))
                .build(),
        ));
        Self::with_resolver(config, resolver)
    }

    fn with_resolver(config: &UpstreamConfig, resolver: Resolver) -> Self {
        Self {
            resolver,
            mptcp: config.mptcp,
            connect_timeout: config.connect_timeout,
            attempt_delay: config.attempt_delay,
            attempt_timeout: config.attempt_timeout,
        }
    }

    /// The addresses of `host` (an IP literal is its own address), in the resolver's order.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let failed = |error: &dyn std::fmt::Display| {
            tracing::debug!(host, %error, "resolving failed");
            ConnectError::Resolve {
                host: host.to_owned(),
            }
        };
        match &self.resolver {
            Resolver::Hickory(resolver) => match resolver.lookup_ip(host).await {
                Ok(lookup) => Ok(lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
                Err(error) => Err(failed(&error)),
            },
            Resolver::System => match tokio::net::lookup_host((host, port)).await {
                Ok(addresses) => Ok(addresses.collect()),
                Err(error) => Err(failed(&error)),
            },
        }
    }

    /// Resolves `host`, drops the addresses `acl` denies (all denied: [`ConnectError::Denied`]), and
    /// connects with Happy Eyeballs within `upstream.connect_timeout`.
    pub async fn connect(
        &self,
        acl: &Acl,
        host: &str,
        port: u16,
    ) -> Result<Connected, ConnectError> {
        let timeout = || ConnectError::Timeout {
            host: host.to_owned(),
            port,
        };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let addresses = tokio::time::timeout_at(deadline, self.resolve(host, port))
            .await
            .map_err(|_| timeout())??;
        let mut denied = None;
        let allowed: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|a| match acl.check_destination(a.ip()) {
                Ok(()) => true,
                Err(d) => {
                    tracing::info!(host, address = %a.ip(), "destination denied: {d}");
                    denied.get_or_insert(d);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(match denied {
                Some(d) => ConnectError::Denied(d),
                None => ConnectError::Resolve {
                    host: host.to_owned(),
                },
            });
        }
        let mptcp = self.mptcp;
        let race = happy_eyeballs(
            &allowed,
            self.attempt_delay,
            self.attempt_timeout,
            |address| async move { upstream_socket(address, mptcp)?.connect(address).await },
        );
        match tokio::time::timeout_at(deadline, race).await {
            Err(_) => Err(timeout()),
            Ok(Ok((stream, peer))) => Ok(Connected { stream, peer }),
            Ok(Err(failures)) => {
                for (address, error) in &failures {
                    tracing::debug!(host, %address, %error, "connect attempt failed");
                }
                let (_, last) = failures.last().expect("at least one address was tried");
                let all_timed_out = failures
                    .iter()
                    .all(|(_, e)| e.kind() == io::ErrorKind::TimedOut);
                if all_timed_out {
                    return Err(timeout());
                }
                Err(ConnectError::Failed {
                    host: host.to_owned(),
                    port,
                    reason: describe(last),
                    refused: last.kind() == io::ErrorKind::ConnectionRefused,
                })
            }
        }
    }
}

/// An OS error as a client may read it: its kind's text, without the errno number.
fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => error.kind().to_string(),
    }
}

/// RFC 8305 §4: alternate address families, starting with the family of the first address (the
/// resolver's preference), keeping the order within each family.
pub fn interleave(addresses: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addresses.first() else {
        return Vec::new();
    };
    let (preferred, other): (Vec<SocketAddr>, Vec<SocketAddr>) = addresses
        .iter()
        .partition(|a| a.is_ipv6() == first.is_ipv6());
    let mut out = Vec::with_capacity(addresses.len());
    let (mut p, mut o) = (preferred.into_iter(), other.into_iter());
    loop {
        match (p.next(), o.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Happy Eyeballs (RFC 8305 §5): starts an attempt on the first address, and on the next one each
/// time `delay` passes without a connection or as soon as an attempt fails; each attempt gives up
/// after `attempt_timeout`. The first to connect wins and the others are dropped. A failing
/// `attempt` (socket() included) only ends that attempt. Returns every failure if none connects.
pub async fn happy_eyeballs<T, F, Fut>(
    addresses: &[SocketAddr],
    delay: Duration,
    attempt_timeout: Duration,
    mut attempt: F,
) -> Result<(T, SocketAddr), Vec<(SocketAddr, io::Error)>>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let order = interleave(addresses);
    let mut failures = Vec::new();
    let mut running = FuturesUnordered::new();
    let mut start = |address: SocketAddr| {
        let connecting = attempt(address);
        async move {
            let result = match tokio::time::timeout(attempt_timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
            };
            (address, result)
        }
    };
    let mut next = order.iter().copied();
    match next.next() {
        Some(first) => running.push(start(first)),
        None => return Err(failures),
    }
    let mut remaining = order.len() - 1;
    let timer = tokio::time::sleep(delay);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            finished = running.next() => match finished {
                Some((address, Ok(stream))) => return Ok((stream, address)),
                Some((address, Err(error))) => {
                    failures.push((address, error));
                    // A failure starts the next attempt at once.
                    if let Some(address) = next.next() {
                        remaining -= 1;
                        running.push(start(address));
                        timer.as_mut().reset(tokio::time::Instant::now() + delay);
                    } else if running.is_empty() {
                        return Err(failures);
                    }
                }
                None => return Err(failures),
            },
            () = &mut timer, if remaining > 0 => {
                if let Some(address) = next.next() {
                    remaining -= 1;
                    running.push(start(address));
                }
                timer.as_mut().reset(tokio::time::Instant::now() + delay);
            }
        }
    }
}

/// [`Connector::connect`] for a request being served: counts failures in
/// `mptcp_proxy_upstream_errors_total` and turns them into the proxy's answers.
pub async fn connect_upstream(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    match shared.connector.connect(&shared.acl, host, port).await {
        Ok(Connected { stream, peer }) => Ok((stream, peer)),
        Err(error) => {
            shared.upstream_error(error.kind());
            Err(error.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    #[derive(Clone, Copy)]
    enum Behaviour {
        /// A black hole: the SYN is never answered.
        Hang,
        Refuse,
        /// socket() itself fails (EMFILE, an address family the host lacks...).
        SocketError,
        ConnectAfter(Duration),
    }

    /// Runs the race over fake attempts; returns the winner (or None) and when each attempt started.
    async fn race(
        plan: &[(&str, Behaviour)],
        attempt_timeout: Duration,
    ) -> (Option<SocketAddr>, Vec<(SocketAddr, Duration)>) {
        let behaviour: HashMap<SocketAddr, Behaviour> =
            plan.iter().map(|(a, b)| (addr(a), *b)).collect();
        let addresses: Vec<SocketAddr> = plan.iter().map(|(a, _)| addr(a)).collect();
        let started = Arc::new(Mutex::new(Vec::new()));
        let t0 = tokio::time::Instant::now();
        let log = started.clone();
        let result = happy_eyeballs(
            &addresses,
            Duration::from_millis(250),
            attempt_timeout,
            |address| {
                log.lock().expect("lock").push((address, t0.elapsed()));
                let b = behaviour[&address];
                async move {
                    match b {
                        Behaviour::Hang => std::future::pending().await,
                        Behaviour::Refuse => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
                        Behaviour::SocketError => Err(io::Error::from_raw_os_error(libc::EMFILE)),
                        Behaviour::ConnectAfter(d) => {
                            tokio::time::sleep(d).await;
                            Ok(())
                        }
                    }
                }
            },
        )
        .await;
        let started = started.lock().expect("lock").clone();
        (result.ok().map(|(_, a)| a), started)
    }

    #[tokio::test(start_paused = true)]
    async fn a_black_holed_first_address_does_not_stop_the_next() {
        let t0 = tokio::time::Instant::now();
        let (winner, started) = race(
            &[
                ("[fd00:3::99]:80", Behaviour::Hang),
                (
                    "10.0.3.2:80",
                    Behaviour::ConnectAfter(Duration::from_millis(1)),
                ),
            ],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(winner, Some(addr("10.0.3.2:80")));
        assert_eq!(
            started[1].1,
            Duration::from_millis(250),
            "RFC 8305 attempt delay"
        );
        assert!(t0.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn socket_errors_and_refusals_move_on_at_once() {
        let (winner, started) = race(
            &[
                ("[fd00::1]:80", Behaviour::SocketError),
                ("10.0.0.1:80", Behaviour::Refuse),
                (
                    "[fd00::2]:80",
                    Behaviour::ConnectAfter(Duration::from_millis(5)),
                ),
            ],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(winner, Some(addr("[fd00::2]:80")));
        assert!(started.iter().all(|(_, at)| at.is_zero()), "{started:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_has_its_own_timeout() {
        let t0 = tokio::time::Instant::now();
        let (winner, started) = race(
            &[
                ("10.0.0.1:80", Behaviour::Hang),
                ("10.0.0.2:80", Behaviour::Hang),
            ],
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(winner, None);
        assert_eq!(started.len(), 2);
        // The second started at 250 ms and gave up 2 s later.
        assert_eq!(t0.elapsed(), Duration::from_millis(2250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_faster_of_two_running_attempts_wins() {
        let (winner, _) = race(
            &[
                (
                    "10.0.0.1:80",
                    Behaviour::ConnectAfter(Duration::from_secs(3)),
                ),
                (
                    "[fd00::1]:80",
                    Behaviour::ConnectAfter(Duration::from_millis(10)),
                ),
            ],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(winner, Some(addr("[fd00::1]:80")));
    }

    #[test]
    fn families_alternate_from_the_first() {
        let order = interleave(&[
            addr("[fd00::1]:80"),
            addr("[fd00::2]:80"),
            addr("[fd00::3]:80"),
            addr("10.0.0.1:80"),
        ]);
        assert_eq!(
            order,
            [
                addr("[fd00::1]:80"),
                addr("10.0.0.1:80"),
                addr("[fd00::2]:80"),
                addr("[fd00::3]:80")
            ]
        );
    }

    #[test]
    fn errors_name_the_host_not_the_address() {
        let error = ConnectError::Failed {
            host: "www.example".into(),
            port: 81,
            reason: describe(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            refused: true,
        };
        assert_eq!(
            ProxyError::from(error).public_message(),
            "cannot connect to www.example:81: connection refused"
        );
    }
}
