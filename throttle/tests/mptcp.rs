//! End to end in two namespaces: real MPTCP connections, kernel `mptcp_pm`
//! events, the tokio driver, and a shaping measurement.
//! Needs root; skipped without it unless CI is set.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{connect, enter_netns, listener, require_root, two_paths, wait_for, Netns};
use mptcp_throttle::{
    event_channel, run, spawn_kernel_events, ConnectionToken, QuickThrottle, SubflowEvent,
    SubflowInfo, ThrottleConfig,
};

fn quick_config(flag: &str) -> ThrottleConfig {
    let mut config = ThrottleConfig::default();
    let flag: QuickThrottle = flag.parse().unwrap();
    config.add_quick_throttles(&[flag]).unwrap();
    config
}

/// The download classes of steered IPv4 subflows: `nft`'s JSON of the `download4` map's elements.
fn download_elements(ns: &Netns) -> String {
    serde_json::to_string(&ns.nft_map("mptcp_proxy", "download4")).unwrap()
}

#[test]
fn kernel_events_drive_subflow_rules() {
    if !require_root("kernel_events_drive_subflow_rules") {
        return;
    }
    let (proxy, client) = two_paths();
    let config = quick_config("a1=20mbit");
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (listening_tx, listening_rx) = std::sync::mpsc::channel::<()>();
    let proxy_name = proxy.name.clone();
    // The proxy side: kernel events -> driver; an MPTCP echo server.
    let proxy_thread = std::thread::spawn(move || {
        let path = format!("/var/run/netns/{proxy_name}");
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: valid netns descriptor; affects this thread and its children.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (sender, receiver) = event_channel(1024);
            let listener_guard = spawn_kernel_events(sender).unwrap();
            let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
            let driver = tokio::spawn(run(config, receiver, async move {
                let _ = shutdown_rx.await;
            }));
            let server = listener("0.0.0.0:7000", true);
            listening_tx.send(()).unwrap();
            let echo = std::thread::spawn(move || {
                let (mut stream, _) = server.accept().unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            tokio::task::spawn_blocking(move || stop_rx.recv())
                .await
                .unwrap()
                .unwrap();
            echo.join().unwrap();
            let _ = shutdown_tx.send(());
            let summary = driver.await.unwrap().unwrap();
            listener_guard.stop();
            summary
        })
    });

    listening_rx.recv().unwrap();
    // The client: one MPTCP connection that keeps talking while we look.
    let client_name = client.name.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client_thread = std::thread::spawn(move || {
        let path = format!("/var/run/netns/{client_name}");
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: valid netns descriptor; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let mut stream = connect("10.80.0.1:7000", true);
        let mut buf = [0u8; 64];
        while done_rx.try_recv().is_err() {
            stream.write_all(b"ping").unwrap();
            stream.read_exact(&mut buf[..4]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // The joined subflow (client 10.81.0.2 -> proxy 10.81.0.1, arriving on
    // a1) gets a rule; the initial one on a0 does not.
    wait_for("a rule for the joined subflow", || {
        download_elements(&proxy).contains("10.81.0.2")
    });
    let rules = download_elements(&proxy);
    assert!(
        !rules.contains("10.80.0.2"),
        "initial subflow must not be throttled: {rules}"
    );
    assert!(rules.contains("4d50:10"), "{rules}");
    let classes = proxy.classes("a1");
    assert_eq!(classes.len(), 1);
    assert_eq!(classes[0].rate, "20Mbit");

    // Closing the connection removes the rule (sub_closed / closed events).
    done_tx.send(()).unwrap();
    client_thread.join().unwrap();
    wait_for("the rule to go", || {
        !download_elements(&proxy).contains("10.81.0.2")
    });

    stop_tx.send(()).unwrap();
    let summary = proxy_thread.join().unwrap();
    assert!(summary.throttled);
    assert!(summary.rules_installed >= 1, "{summary:?}");
    assert!(summary.events >= 3, "{summary:?}");
    assert_eq!(summary.changes_failed, 0, "{summary:?}");
    eprintln!(
        "kernel events: {} events, {} rules, max event-to-ack latency {:?}",
        summary.events, summary.rules_installed, summary.max_install_latency
    );
    assert!(!proxy.has_table("mptcp_proxy"));
    assert!(proxy.classes("a1").is_empty());
}

/// Measurement: a TCP flow put into a 20 Mbit/s class through an injected
/// subflow event (the `sniffer` event source path). Prints the rate; asserts
/// only that the class carried the flow and that it did not exceed
/// 20 Mbit/s + 10% (a busy host can only make it slower).
#[test]
fn shaping_limits_a_subflow_to_its_class_rate() {
    if !require_root("shaping_limits_a_subflow_to_its_class_rate") {
        return;
    }
    let (proxy, client) = two_paths();
    let mut config = quick_config("a1=20mbit");
    config.event_source = mptcp_throttle::EventSource::Sniffer;
    let proxy_name = proxy.name.clone();
    let client_name = client.name.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();

    let receiver = std::thread::spawn(move || {
        let path = format!("/var/run/netns/{client_name}");
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: valid netns descriptor; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        ready_rx.recv().unwrap();
        let mut stream = connect("10.81.0.1:7001", false);
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut started = None;
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    started.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, started.map(|s| s.elapsed()).unwrap_or_default())
    });

    let sender = std::thread::spawn(move || {
        let path = format!("/var/run/netns/{proxy_name}");
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: valid netns descriptor; affects this thread and its children.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (events, rx) = event_channel(16);
            let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
            let driver = tokio::spawn(run(config, rx, async move {
                let _ = shutdown_rx.await;
            }));
            let server = listener("10.81.0.1:7001", false);
            ready_tx.send(()).unwrap();
            let (stream, peer) = server.accept().unwrap();
            let local = stream.local_addr().unwrap();
            addr_tx.send((local, peer)).unwrap();
            // Pretend this TCP flow is the second subflow of a connection.
            let token = ConnectionToken(1);
            events
                .send(SubflowEvent::ConnectionCreated {
                    token,
                    subflow: SubflowInfo::new(
                        "10.80.0.1:7000".parse().unwrap(),
                        "10.80.0.2:1".parse().unwrap(),
                    ),
                })
                .await
                .unwrap();
            events
                .send(SubflowEvent::SubflowEstablished {
                    token,
                    subflow: SubflowInfo::new(local, peer),
                })
                .await
                .unwrap();
            tokio::task::spawn_blocking(move || {
                go_rx.recv().unwrap();
                let mut stream = stream;
                let chunk = vec![0x5au8; 1 << 16];
                let until = Instant::now() + Duration::from_secs(3);
                while Instant::now() < until {
                    if stream.write_all(&chunk).is_err() {
                        break;
                    }
                }
                drop(stream);
                // Keep the class until the receiver has drained the flow.
                finish_rx.recv().unwrap();
            })
            .await
            .unwrap();
            let _ = shutdown_tx.send(());
            driver.await.unwrap().unwrap()
        })
    });

    let (local, peer) = addr_rx.recv().unwrap();
    wait_for("the subflow rule", || {
        download_elements(&proxy).contains(&format!(",{}]}}", peer.port()))
    });
    let before = proxy.classes("a1")[0].sent_bytes;
    go_tx.send(()).unwrap();
    let (received, elapsed) = receiver.join().unwrap();
    let class_after = proxy.classes("a1")[0].sent_bytes;
    finish_tx.send(()).unwrap();
    let summary = sender.join().unwrap();
    let mbit = received as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
    let class_bytes = class_after - before;
    eprintln!(
        "shaping: {local} -> {peer}: received {received} bytes in {elapsed:?} = {mbit:.2} Mbit/s; class 4d50:10 sent {class_bytes} bytes; rule install latency {:?}",
        summary.max_install_latency
    );
    assert_eq!(summary.rules_installed, 1);
    assert!(received > 1_000_000, "the flow moved data");
    assert!(
        class_bytes as f64 >= received as f64 * 0.95,
        "the class carried the flow: class {class_bytes} bytes, received {received}"
    );
    assert!(
        mbit <= 22.0,
        "shaped to 20 Mbit/s + 10%, measured {mbit:.2}"
    );
}

/// Reads `mptcp_pm` events in the calling thread's namespace until `want`
/// accepts one or the deadline passes.
fn await_event(
    socket: &mptcp_netlink::NetlinkSocket,
    family: u16,
    mut want: impl FnMut(&SubflowEvent) -> bool,
) -> Option<SubflowEvent> {
    socket.set_recv_timeout(Duration::from_millis(200)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(messages) = socket.recv() else {
            continue;
        };
        for message in messages.into_iter().filter(|m| m.msg_type == family) {
            if let Some(event) = mptcp_throttle::pm_events::decode_event(&message.payload) {
                if want(&event) {
                    return Some(event);
                }
            }
        }
    }
    None
}

/// `set_backup = true`: the proxy asks its (userspace) path manager to mark
/// the subflow backup; the client receives MP_PRIO and reports the change.
#[test]
fn set_backup_sends_mp_prio_with_userspace_pm() {
    if !require_root("set_backup_sends_mp_prio_with_userspace_pm") {
        return;
    }
    let (proxy, client) = two_paths();
    proxy.exec("sysctl", &["-q", "-w", "net.mptcp.pm_type=1"]);
    let config =
        ThrottleConfig::from_toml_str("[[rules]]\nset_backup = true\nmin_subflows = 1\n").unwrap();
    let (proxy_name, client_name) = (proxy.name.clone(), client.name.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (client_ready_tx, client_ready_rx) = std::sync::mpsc::channel::<()>();

    let client_thread = std::thread::spawn(move || {
        enter_netns(&client_name);
        let (socket, family) = mptcp_netlink::mptcp_pm::open_event_socket().unwrap();
        let family = family.id;
        client_ready_tx.send(()).unwrap();
        ready_rx.recv().unwrap();
        let _stream = connect("10.80.0.1:7002", true);
        let event = await_event(&socket, family, |e| {
            matches!(e, SubflowEvent::PriorityChanged { .. })
        });
        done_tx.send(()).unwrap();
        event
    });

    let proxy_thread = std::thread::spawn(move || {
        enter_netns(&proxy_name);
        let (socket, family) = mptcp_netlink::mptcp_pm::open_event_socket().unwrap();
        let family = family.id;
        let server = listener("0.0.0.0:7002", true);
        client_ready_rx.recv().unwrap();
        ready_tx.send(()).unwrap();
        let (_stream, _) = server.accept().unwrap();
        let established = await_event(&socket, family, |e| {
            matches!(e, SubflowEvent::ConnectionEstablished { .. })
        })
        .expect("no established event on the proxy");
        let mut backend = mptcp_throttle::kernel::KernelBackend::open(&config).unwrap();
        let mut state = mptcp_throttle::ThrottleState::new(config);
        state.handle_event(Instant::now(), established);
        let changes = state.poll_changes();
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, mptcp_throttle::Change::SetBackup(_))),
            "{changes:?}"
        );
        let failures: Vec<String> = backend
            .apply(&changes)
            .into_iter()
            .map(|(_, e)| e.to_string())
            .collect();
        done_rx.recv().unwrap();
        failures
    });

    let failures = proxy_thread.join().unwrap();
    let event = client_thread.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let Some(SubflowEvent::PriorityChanged { subflow, .. }) = event else {
        panic!("client saw no MP_PRIO: {event:?}");
    };
    assert!(subflow.backup, "{subflow:?}");
}
