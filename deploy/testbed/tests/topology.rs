//! The testbed builds, routes both paths and both address families, and tears down.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use testbed::{Options, Testbed};

fn echo_once(tb: &Testbed, server: SocketAddr, source: SocketAddr) {
    echo_between(tb, (tb.server_ns(), server), (tb.client_ns(), source));
}

/// A TCP exchange from `source` in one namespace to `server` in another.
fn echo_between(
    tb: &Testbed,
    (server_ns, server): (&str, SocketAddr),
    (client_ns, source): (&str, SocketAddr),
) {
    let listener = tb
        .in_ns(server_ns, || TcpListener::bind(server))
        .unwrap()
        .unwrap();
    let accept = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        peer
    });
    let mut got = String::new();
    tb.in_ns(client_ns, || {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        sock.bind(&source.into()).unwrap();
        sock.connect(&server.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.read_to_string(&mut got).unwrap();
    })
    .unwrap();
    assert_eq!(got, "hi");
    assert_eq!(accept.join().unwrap().ip(), source.ip());
}

/// What `ip netns list` prints.
fn netns_list() -> String {
    let output = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn both_paths_and_families_reach_the_server_and_teardown_removes_namespaces() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = Testbed::new(Options::default()).unwrap();
    let names: Vec<String> = [tb.client_ns(), tb.proxy_ns(), tb.server_ns()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    echo_once(
        &tb,
        "10.0.3.2:7001".parse().unwrap(),
        "10.0.1.2:0".parse().unwrap(),
    );
    echo_once(
        &tb,
        "10.0.3.2:7002".parse().unwrap(),
        "10.0.2.2:0".parse().unwrap(),
    );
    echo_once(
        &tb,
        "[fd00:3::2]:7003".parse().unwrap(),
        "[fd00:2::2]:0".parse().unwrap(),
    );
    let (_, tx_before) = tb.interface_bytes(tb.client_ns(), "c2").unwrap();
    assert!(tx_before > 0, "path 2 carried nothing");
    drop(tb);
    let list = netns_list();
    for n in names {
        assert!(!list.contains(&n), "namespace {n} survived teardown");
    }
}

#[test]
fn the_second_client_reaches_the_proxy_on_both_its_paths_and_is_torn_down() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = Testbed::new(Options {
        second_client: true,
        ..Options::default()
    })
    .unwrap();
    let second = tb.ns(testbed::Host::SecondClient).to_owned();
    for (proxy, source) in [
        ("10.0.4.1:7004", "10.0.4.2:0"),
        ("10.0.5.1:7005", "10.0.5.2:0"),
    ] {
        echo_between(
            &tb,
            (tb.proxy_ns(), proxy.parse().unwrap()),
            (&second, source.parse().unwrap()),
        );
    }
    drop(tb);
    let list = netns_list();
    assert!(!list.contains(&second), "{second} survived teardown");
}

#[test]
fn extra_clients_reach_the_proxy_over_both_bridges_and_are_torn_down() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = Testbed::new(Options {
        extra_clients: 3,
        ..Options::default()
    })
    .unwrap();
    for k in [1usize, 3] {
        let ns = tb.extra_client_ns(k);
        for (i, port) in [(1, 7101u16), (2, 7102)] {
            echo_between(
                &tb,
                (tb.proxy_ns(), format!("10.{i}.0.1:{port}").parse().unwrap()),
                (&ns, format!("10.{i}.{k}.2:0").parse().unwrap()),
            );
        }
    }
    let third = tb.extra_client_ns(3);
    drop(tb);
    let list = netns_list();
    assert!(!list.contains(&third), "{third} survived teardown");
}
