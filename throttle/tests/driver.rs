//! The owner task with a recording backend (no kernel needed), and the
//! missing-privilege paths (need root to be able to drop the capability).

mod common;

use std::sync::{Arc, Mutex};

use mptcp_throttle::driver::{
    run_with_backend, run_with_backend_and_policies, NoHooks, ThrottleBackend,
};
use mptcp_throttle::kernel::{InterfaceTable, KernelError, StaleReport};
use mptcp_throttle::{
    event_channel, policy_channel, run, Change, ConnectionToken, MissingPrivileges, QuickThrottle,
    SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleError,
};

#[derive(Clone, Default)]
struct Recording {
    log: Arc<Mutex<Vec<String>>>,
}

impl ThrottleBackend for Recording {
    fn start(&mut self) -> Result<StaleReport, KernelError> {
        self.log.lock().unwrap().push("start".into());
        Ok(StaleReport::default())
    }
    fn interfaces(&mut self) -> Result<InterfaceTable, KernelError> {
        Ok(InterfaceTable {
            links: vec![(3, "eth1".into())],
            addresses: vec![("10.1.0.1".parse().unwrap(), "eth1".into())],
        })
    }
    fn apply(&mut self, changes: &[Change]) -> Vec<(Change, KernelError)> {
        let mut log = self.log.lock().unwrap();
        for change in changes {
            log.push(match change {
                Change::AddInterface(s) => format!("add-interface {}", s.interface),
                Change::AddClass(c) => format!("add-class {} {}", c.id, c.rate),
                Change::UpdateClass(c) => format!("update-class {} {}", c.id, c.rate),
                Change::AddRule { rule, .. } => format!("add-rule {}", rule.tuple.remote),
                Change::RemoveRule(rule) => format!("remove-rule {}", rule.tuple.remote),
                other => format!("{other:?}"),
            });
        }
        Vec::new()
    }
    fn shutdown(&mut self) -> Result<StaleReport, KernelError> {
        self.log.lock().unwrap().push("shutdown".into());
        Ok(StaleReport::default())
    }
}

async fn wait_for_log(log: &Arc<Mutex<Vec<String>>>, prefix: &str) {
    for _ in 0..100_000 {
        if log.lock().unwrap().iter().any(|l| l.starts_with(prefix)) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("no {prefix} in {:?}", log.lock().unwrap());
}

fn quick(flag: &str) -> ThrottleConfig {
    let mut config = ThrottleConfig::default();
    config
        .add_quick_throttles(&[flag.parse::<QuickThrottle>().unwrap()])
        .unwrap();
    config
}

#[tokio::test]
async fn driver_applies_events_and_cleans_up() {
    let backend = Recording::default();
    let log = backend.log.clone();
    let (events, rx) = event_channel(8);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with_backend(
        quick("eth1=20mbit"),
        rx,
        async move {
            let _ = stop_rx.await;
        },
        backend,
        NoHooks,
    ));
    let token = ConnectionToken(9);
    let info = |local: &str, remote: &str| {
        SubflowInfo::new(local.parse().unwrap(), remote.parse().unwrap())
    };
    events
        .send(SubflowEvent::ConnectionCreated {
            token,
            subflow: info("10.0.0.1:443", "192.0.2.1:1"),
        })
        .await
        .unwrap();
    // Arrives on eth1: resolved through the local address 10.1.0.1.
    events
        .send(SubflowEvent::SubflowEstablished {
            token,
            subflow: info("10.1.0.1:443", "192.0.2.1:2"),
        })
        .await
        .unwrap();
    // Events that arrive together are handled as one batch; wait for the
    // rule before closing, or the close would cancel it out unseen.
    wait_for_log(&log, "add-rule").await;
    events
        .send(SubflowEvent::ConnectionClosed { token })
        .await
        .unwrap();
    wait_for_log(&log, "remove-rule").await;
    stop_tx.send(()).unwrap();
    let summary = task.await.unwrap().unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "start",
            "add-interface eth1",
            "add-class 4d50:10 20mbit",
            "add-rule 192.0.2.1:2",
            "remove-rule 192.0.2.1:2",
            "shutdown"
        ]
    );
    assert_eq!(summary.events, 3);
    assert_eq!(summary.rules_installed, 1);
}

/// A reload: the running task takes a new policy, changes the class in place and keeps the subflow's
/// rule; a policy that needs a restart (another nft table) is refused and changes nothing.
#[tokio::test]
async fn policy_change_updates_classes_in_place_and_keeps_rules() {
    let backend = Recording::default();
    let log = backend.log.clone();
    let (events, rx) = event_channel(8);
    let initial = quick("eth1=20mbit");
    let (policies, policy_rx) = policy_channel(&initial);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with_backend_and_policies(
        initial,
        rx,
        policy_rx,
        async move {
            let _ = stop_rx.await;
        },
        backend,
        NoHooks,
    ));
    let token = ConnectionToken(9);
    let info = |local: &str, remote: &str| {
        SubflowInfo::new(local.parse().unwrap(), remote.parse().unwrap())
    };
    events
        .send(SubflowEvent::ConnectionCreated {
            token,
            subflow: info("10.0.0.1:443", "192.0.2.1:1"),
        })
        .await
        .unwrap();
    events
        .send(SubflowEvent::SubflowEstablished {
            token,
            subflow: info("10.1.0.1:443", "192.0.2.1:2"),
        })
        .await
        .unwrap();
    wait_for_log(&log, "add-rule").await;

    let mut moved = quick("eth1=20mbit");
    moved.nft_table = "elsewhere".into();
    policies.send(moved).unwrap();
    policies.send(quick("eth1=5mbit")).unwrap();
    wait_for_log(&log, "update-class").await;
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "start",
            "add-interface eth1",
            "add-class 4d50:10 20mbit",
            "add-rule 192.0.2.1:2",
            "update-class 4d50:10 5mbit",
            "shutdown"
        ]
    );

    // Sent one after the other, the refused policy may never be seen; alone, it is refused.
    let backend = Recording::default();
    let log = backend.log.clone();
    let (_events, rx) = event_channel(8);
    let initial = quick("eth1=20mbit");
    let (policies, policy_rx) = policy_channel(&initial);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with_backend_and_policies(
        initial,
        rx,
        policy_rx,
        async move {
            let _ = stop_rx.await;
        },
        backend,
        NoHooks,
    ));
    wait_for_log(&log, "add-class").await;
    let mut moved = quick("eth1=1mbit");
    moved.nft_table = "elsewhere".into();
    assert_eq!(
        quick("eth1=20mbit").needs_restart(&moved),
        Some("nft_table")
    );
    policies.send(moved).unwrap();
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        log.lock().unwrap().clone(),
        vec![
            "start",
            "add-interface eth1",
            "add-class 4d50:10 20mbit",
            "shutdown"
        ]
    );
}

#[tokio::test]
async fn empty_policy_needs_nothing_and_just_drains() {
    let (events, rx) = event_channel(8);
    events
        .send(SubflowEvent::ConnectionClosed {
            token: ConnectionToken(1),
        })
        .await
        .unwrap();
    drop(events);
    let summary = run(ThrottleConfig::default(), rx, async {}).await.unwrap();
    assert!(!summary.throttled);
}

#[tokio::test]
async fn invalid_policy_is_rejected_by_run() {
    let mut config = quick("eth1=20mbit");
    config.rules[0].class = Some("lte".into());
    let (_events, rx) = event_channel(1);
    let err = run(config, rx, async {}).await.unwrap_err();
    assert_eq!(err.to_string(), r#"throttle.rules[0]: unknown class "lte""#);
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set.
fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data match the kernel's v3 capability structs.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << 12);
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
    }
}

#[test]
fn missing_privileges_is_a_typed_error_or_unthrottled_run() {
    if !common::require_root("missing_privileges_is_a_typed_error_or_unthrottled_run") {
        return;
    }
    let (fail, unthrottled) = std::thread::spawn(|| {
        drop_net_admin();
        assert!(!mptcp_throttle::kernel::has_net_admin());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_events, rx) = event_channel(1);
            let fail = run(quick("eth1=20mbit"), rx, async {}).await;
            let mut config = quick("eth1=20mbit");
            config.on_missing_privileges = MissingPrivileges::RunUnthrottled;
            let (_events, rx) = event_channel(1);
            let unthrottled = run(config, rx, async {}).await;
            (fail, unthrottled)
        })
    })
    .join()
    .unwrap();
    assert!(
        matches!(
            fail,
            Err(ThrottleError::Kernel(KernelError::MissingPrivileges))
        ),
        "{fail:?}"
    );
    assert!(!unthrottled.unwrap().throttled);
}

/// The control threads run as `SCHED_RR` at `realtime_priority` where the kernel allows it (root), and
/// at nice -10 with 0.
#[test]
fn control_threads_get_their_scheduling() {
    let observe = |realtime_priority: u8| {
        std::thread::spawn(move || {
            mptcp_throttle::driver::set_control_thread_scheduling(realtime_priority);
            // SAFETY: both query the calling thread only.
            unsafe {
                let mut param = libc::sched_param { sched_priority: 0 };
                libc::sched_getparam(0, &mut param);
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                (
                    libc::sched_getscheduler(0),
                    param.sched_priority,
                    libc::getpriority(libc::PRIO_PROCESS, tid),
                )
            }
        })
        .join()
        .unwrap()
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Root may still be refused real-time scheduling (a container or cgroup without a real-time
    // budget): ask the kernel on a scratch thread what this host allows.
    let realtime_allowed = std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: changes the scratch thread only, with a valid parameter.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) == 0 }
    })
    .join()
    .unwrap();
    let (policy, priority, nice) = observe(2);
    if realtime_allowed {
        assert_eq!((policy, priority), (libc::SCHED_RR, 2));
    } else {
        assert_eq!(policy, libc::SCHED_OTHER, "refused: the nice fallback");
        if root {
            assert_eq!(nice, -10, "the fallback when real-time is refused");
        }
    }
    let (policy, _, nice) = observe(0);
    assert_eq!(policy, libc::SCHED_OTHER);
    if root {
        assert_eq!(nice, -10);
    }
}
