//! Name resolution on the request path, before and after the async caching resolver (issue 12):
//!
//! - `getaddrinfo`: what the proxy did for every request to a name (tokio's `lookup_host`, on the
//!   blocking pool), for a name in /etc/hosts;
//! - `hickory_hosts`: the proxy's resolver for the same /etc/hosts name;
//! - `hickory_cached`: the proxy's resolver for a DNS name it has cached (the loopback name server of
//!   tests/common/dns.rs answered it once);
//! - `ip_literal`: a request to an IP address, which resolves nothing either way.
//!
//! `cargo bench -p mptcp-proxy --bench resolve`

#[path = "../tests/common/dns.rs"]
mod dns;

use criterion::{criterion_main, Criterion};
use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use mptcp_proxy::config::UpstreamConfig;
use mptcp_proxy::upstream::Connector;

/// A name every /etc/hosts has.
const HOSTS_NAME: &str = "localhost";

fn resolve(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (server, _) = dns::start();
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    let (system, cached) = runtime.block_on(async {
        let system = Connector::new(&UpstreamConfig::default());
        let cached = Connector::with_name_servers(&UpstreamConfig::default(), config);
        cached
            .resolve("www.example.test.", 80)
            .await
            .expect("warm the cache");
        (system, cached)
    });
    let mut group = c.benchmark_group("resolve");
    group.bench_function("getaddrinfo", |b| {
        b.iter(|| {
            runtime.block_on(async {
                tokio::net::lookup_host((HOSTS_NAME, 80))
                    .await
                    .expect("resolves")
                    .count()
            })
        })
    });
    group.bench_function("hickory_hosts", |b| {
        b.iter(|| {
            runtime.block_on(async {
                system
                    .resolve(HOSTS_NAME, 80)
                    .await
                    .expect("resolves")
                    .len()
            })
        })
    });
    group.bench_function("hickory_cached", |b| {
        b.iter(|| {
            runtime.block_on(async {
                cached
                    .resolve("www.example.test.", 80)
                    .await
                    .expect("resolves")
                    .len()
            })
        })
    });
    group.bench_function("ip_literal", |b| {
        b.iter(|| {
            runtime.block_on(async { system.resolve("10.0.3.2", 80).await.expect("literal").len() })
        })
    });
    group.finish();
}

mod group {
    #![allow(missing_docs)]
    criterion::criterion_group!(benches, super::resolve);
}

criterion_main!(group::benches);
