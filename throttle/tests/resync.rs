//! Resync from the kernel with real MPTCP connections, dropping events on purpose: connections opened
//! before the throttle get their map elements at start; connections closed while the event socket
//! overflowed (`ENOBUFS`) lose theirs; and with no event listener at all, a requested resync removes
//! those of a connection closed meanwhile. Needs root; skipped without it unless CI is set.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;

use common::{connect, enter_netns, listener, require_root, two_paths, wait_for, Netns};
use mptcp_netlink::sock_diag::{dump_mptcp_subflows, tcp_states};
use mptcp_netlink::NetlinkSocket;
use mptcp_throttle::{
    event_channel, run, spawn_kernel_events_with_buffer, EventSender, KernelEventListener,
    ThrottleConfig,
};

const POLICY: &str = r#"
    resync_interval = "off"
    [[classes]]
    name = "all"
    interface = "a0"
    rate = "1gbit"
    [[rules]]
    class = "all"
"#;

/// Subflows of established MPTCP connections in the proxy namespace (what a resync sees).
fn live_subflows(proxy: &Netns) -> usize {
    proxy.enter(|| {
        let mut socket = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG).unwrap();
        dump_mptcp_subflows(&mut socket, tcp_states::ESTABLISHED)
            .unwrap()
            .len()
    })
}

fn steered(proxy: &Netns) -> usize {
    proxy.nft_map("mptcp_proxy", "download4").len()
}

/// A client connection that holds its MPTCP connection until dropped. It sends a byte: the server
/// announces its second address (and the client joins) once the connection is fully established.
fn open(client: &Netns) -> TcpStream {
    let name = client.name.clone();
    std::thread::spawn(move || {
        enter_netns(&name);
        let mut stream = connect("10.80.0.1:7400", true);
        stream.write_all(b"x").unwrap();
        stream
    })
    .join()
    .unwrap()
}

/// An MPTCP server on port 7400 of `proxy` that holds every connection until the client closes it.
fn holding_server(proxy: &Netns) {
    let server = proxy.enter(|| listener("0.0.0.0:7400", true));
    std::thread::spawn(move || {
        for stream in server.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

#[test]
fn resync_repairs_what_lost_events_left() {
    if !require_root("resync_repairs_what_lost_events_left") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (proxy, client) = two_paths();
    holding_server(&proxy);

    // Three connections of two subflows each, before the throttle runs.
    let mut connections: Vec<TcpStream> = (0..3).map(|_| open(&client)).collect();
    wait_for("six subflows", || live_subflows(&proxy) == 6);

    let config = ThrottleConfig::from_toml_str(POLICY).unwrap();
    let (started_tx, started_rx) = mpsc::channel::<(EventSender, KernelEventListener)>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let proxy_name = proxy.name.clone();
    let owner = std::thread::spawn(move || {
        enter_netns(&proxy_name);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (events, receiver) = event_channel(1024);
            // A receive buffer of a few events: pausing the reader overflows it quickly.
            let listener = spawn_kernel_events_with_buffer(events.clone(), Some(1)).unwrap();
            let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(run(config, receiver, async move {
                let _ = shutdown_rx.await;
            }));
            started_tx.send((events, listener)).unwrap();
            tokio::task::spawn_blocking(move || stop_rx.recv())
                .await
                .unwrap()
                .unwrap();
            let _ = shutdown_tx.send(());
            task.await.unwrap().unwrap()
        })
    });
    let (events, listener) = started_rx.recv().unwrap();

    // At start the kernel's snapshot steers what the events never announced.
    wait_for("the start resync to steer six subflows", || {
        steered(&proxy) == 6
    });

    // The event socket overflows while its reader is paused: first churn fills it, then two
    // connections close and their events are dropped.
    listener.pause();
    for _ in 0..30 {
        drop(open(&client));
    }
    connections.drain(..2);
    wait_for("two connections to close", || live_subflows(&proxy) == 2);
    listener.resume();
    wait_for(
        "ENOBUFS to resync away the closed connections' subflows",
        || {
            let n = steered(&proxy);
            eprintln!("steered {n} live {}", live_subflows(&proxy));
            n == 2
        },
    );

    // No listener at all: the last connection's close is never announced; a requested resync
    // repairs it.
    listener.stop();
    connections.clear();
    wait_for("the last connection to close", || {
        live_subflows(&proxy) == 0
    });
    assert_eq!(steered(&proxy), 2, "no event can have removed them");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(events.request_resync()).unwrap();
    wait_for("the requested resync", || steered(&proxy) == 0);

    stop_tx.send(()).unwrap();
    let summary = owner.join().unwrap();
    eprintln!("resync test: {summary:?}");
    assert!(summary.resyncs >= 3, "{summary:?}");
    assert_eq!(summary.changes_failed, 0, "{summary:?}");
    assert!(!proxy.has_table("mptcp_proxy"));
}

/// The periodic resync alone keeps the maps true: no event listener runs, connections open and
/// close, and every `resync_interval` the kernel's snapshot adds and removes their elements.
#[test]
fn periodic_resync_steers_and_releases_without_events() {
    if !require_root("periodic_resync_steers_and_releases_without_events") {
        return;
    }
    let (proxy, client) = two_paths();
    holding_server(&proxy);
    let config = ThrottleConfig::from_toml_str(
        &POLICY.replace(r#"resync_interval = "off""#, r#"resync_interval = "300ms""#),
    )
    .unwrap();
    assert_eq!(
        config.resync_interval,
        Some(std::time::Duration::from_millis(300))
    );
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let proxy_name = proxy.name.clone();
    let owner = std::thread::spawn(move || {
        enter_netns(&proxy_name);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // The sender stays open (and silent): the owner runs until shut down.
            let (_events, receiver) = event_channel(16);
            let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(run(config, receiver, async move {
                let _ = shutdown_rx.await;
            }));
            tokio::task::spawn_blocking(move || stop_rx.recv())
                .await
                .unwrap()
                .unwrap();
            let _ = shutdown_tx.send(());
            task.await.unwrap().unwrap()
        })
    });

    wait_for("the throttle's table", || proxy.has_table("mptcp_proxy"));
    let connections: Vec<TcpStream> = (0..2).map(|_| open(&client)).collect();
    wait_for("four subflows", || live_subflows(&proxy) == 4);
    wait_for("a periodic resync to steer them", || steered(&proxy) == 4);
    drop(connections);
    wait_for("the connections to close", || live_subflows(&proxy) == 0);
    wait_for("a periodic resync to release them", || steered(&proxy) == 0);

    stop_tx.send(()).unwrap();
    let summary = owner.join().unwrap();
    assert_eq!(summary.events, 0, "no event reached the owner: {summary:?}");
    assert!(summary.resyncs >= 3, "start and two periodic: {summary:?}");
    assert_eq!(summary.changes_failed, 0, "{summary:?}");
    assert!(!proxy.has_table("mptcp_proxy"));
}
