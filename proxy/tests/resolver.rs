//! The upstream resolver answers from its cache: one query per name and family, whatever the number
//! of requests. The name server is on loopback (tests/common/dns.rs); nothing leaves the host.

mod common;

use std::sync::atomic::Ordering;

use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use mptcp_proxy::config::UpstreamConfig;
use mptcp_proxy::upstream::Connector;

#[tokio::test]
async fn names_are_resolved_once_then_served_from_the_cache() {
    let (server, queries) = common::dns::start();
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    let connector = Connector::with_name_servers(&UpstreamConfig::default(), config);
    for _ in 0..100 {
        let mut addresses = connector
            .resolve("www.example.test.", 80)
            .await
            .expect("resolves");
        addresses.sort();
        assert_eq!(
            addresses,
            [
                "10.0.3.2:80".parse().expect("literal"),
                "[fd00:3::2]:80".parse().expect("literal")
            ]
        );
    }
    // A and AAAA once each.
    assert_eq!(queries.load(Ordering::Relaxed), 2);
}
