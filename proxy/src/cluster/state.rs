//! What cluster mode changes in the kernel, and how it is undone: a sans-IO plan over what the kernel
//! shows now and what an earlier run recorded.
//!
//! Before it changes anything, an instance records in a state file (one per network namespace) the
//! values it found and the objects it is about to create. A clean exit undoes them and deletes the
//! file. After a crash (even SIGKILL) the file stays: the next start in the same namespace reads the
//! original C-flag value from it rather than the 0 the dead run left, adopts the endpoint and service
//! addresses it recorded, and so restores the right values when it exits; `mptcp-proxy --cluster-cleanup`
//! undoes a dead run's changes without starting.

use std::net::IpAddr;

use mptcp_netlink::mptcp_pm::{flags, PmAddress};
use serde::{Deserialize, Serialize};

use super::ClusterError;

/// The state file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// The process that recorded it.
    pub pid: u32,
    /// `net.mptcp.allow_join_initial_addr_port` as found before the first run changed it.
    pub allow_join_initial_addr_port: String,
    /// The address of the `signal` endpoint the proxy added (and must delete), if it added one.
    pub endpoint: Option<IpAddr>,
    /// Service addresses the proxy added to `lo` (and must delete).
    pub addresses: Vec<IpAddr>,
}

/// What the kernel shows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `net.mptcp.allow_join_initial_addr_port`, trimmed.
    pub allow_join_initial_addr_port: String,
    /// The in-kernel path manager's endpoints.
    pub endpoints: Vec<PmAddress>,
    /// The namespace's local addresses.
    pub local_addresses: Vec<IpAddr>,
}

/// What this run wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The instance's own address, announced with ADD_ADDR.
    pub announce: IpAddr,
    /// The shared service addresses (the listeners' addresses).
    pub services: Vec<IpAddr>,
    /// Whether a service address that is not local may be added to `lo`.
    pub add_services: bool,
}

/// What to do at start, in order: record `state`, write the C flag, delete stale objects, add new ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPlan {
    /// The state to record before anything changes (and to undo at exit).
    pub state: SavedState,
    /// Whether `allow_join_initial_addr_port` must be written to 0.
    pub set_c_flag: bool,
    /// Endpoints an earlier run added for an address this run does not announce: `(id, address)`.
    pub delete_endpoints: Vec<(u8, IpAddr)>,
    /// Whether the `signal` endpoint must be added.
    pub add_endpoint: bool,
    /// Service addresses an earlier run added that this run does not serve.
    pub delete_addresses: Vec<IpAddr>,
    /// Service addresses to add to `lo`.
    pub add_addresses: Vec<IpAddr>,
}

/// Plans a start from what the kernel shows and what an earlier run (of pid `saved.pid`, now gone)
/// recorded.
pub fn plan_start(
    wanted: &Wanted,
    observed: &Observed,
    saved: Option<&SavedState>,
    pid: u32,
) -> Result<StartPlan, ClusterError> {
    let original = saved.map_or_else(
        || observed.allow_join_initial_addr_port.clone(),
        |s| s.allow_join_initial_addr_port.clone(),
    );
    let ours_before = saved.and_then(|s| s.endpoint);
    let mut delete_endpoints = Vec::new();
    if let Some(old) = ours_before.filter(|old| *old != wanted.announce) {
        delete_endpoints.extend(endpoint_ids(observed, old).into_iter().map(|id| (id, old)));
    }
    let existing = observed
        .endpoints
        .iter()
        .find(|e| e.addr == wanted.announce);
    let (endpoint, add_endpoint) = match existing {
        // Ours, left by a run that did not exit cleanly.
        Some(_) if ours_before == Some(wanted.announce) => (Some(wanted.announce), false),
        // The operator's own signal endpoint: use it, leave it.
        Some(e) if e.flags & flags::SIGNAL != 0 => (None, false),
        Some(e) => {
            return Err(ClusterError::EndpointConflict {
                address: wanted.announce,
                id: e.id.unwrap_or(0),
                flags: e.flags,
            })
        }
        None => (Some(wanted.announce), true),
    };
    let added_before: &[IpAddr] = saved.map_or(&[], |s| &s.addresses);
    let mut addresses = Vec::new();
    let mut add_addresses = Vec::new();
    for service in &wanted.services {
        let local = observed.local_addresses.contains(service);
        if local && added_before.contains(service) {
            addresses.push(*service);
        } else if !local {
            if !wanted.add_services {
                return Err(ClusterError::ServiceNotLocal(*service));
            }
            addresses.push(*service);
            add_addresses.push(*service);
        }
    }
    let delete_addresses = added_before
        .iter()
        .filter(|a| !wanted.services.contains(a) && observed.local_addresses.contains(a))
        .copied()
        .collect();
    Ok(StartPlan {
        state: SavedState {
            pid,
            allow_join_initial_addr_port: original,
            endpoint,
            addresses,
        },
        set_c_flag: observed.allow_join_initial_addr_port != "0",
        delete_endpoints,
        add_endpoint,
        delete_addresses,
        add_addresses,
    })
}

/// What to undo at exit (or for `--cluster-cleanup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Teardown {
    /// Endpoints to delete: `(id, address)`.
    pub delete_endpoints: Vec<(u8, IpAddr)>,
    /// The value to write back to `allow_join_initial_addr_port`, if it differs from the current one.
    pub restore_c_flag: Option<String>,
    /// Addresses to delete from `lo`.
    pub delete_addresses: Vec<IpAddr>,
}

/// Plans the undoing of `saved` against what the kernel shows now.
pub fn plan_teardown(saved: &SavedState, observed: &Observed) -> Teardown {
    Teardown {
        delete_endpoints: saved
            .endpoint
            .map(|addr| {
                endpoint_ids(observed, addr)
                    .into_iter()
                    .map(|id| (id, addr))
                    .collect()
            })
            .unwrap_or_default(),
        restore_c_flag: (observed.allow_join_initial_addr_port
            != saved.allow_join_initial_addr_port)
            .then(|| saved.allow_join_initial_addr_port.clone()),
        delete_addresses: saved
            .addresses
            .iter()
            .filter(|a| observed.local_addresses.contains(a))
            .copied()
            .collect(),
    }
}

fn endpoint_ids(observed: &Observed, addr: IpAddr) -> Vec<u8> {
    observed
        .endpoints
        .iter()
        .filter(|e| e.addr == addr && e.flags & flags::SIGNAL != 0)
        .filter_map(|e| e.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    fn endpoint(addr: &str, id: u8, flags: u32) -> PmAddress {
        let mut e = PmAddress::new(ip(addr), 0);
        e.id = Some(id);
        e.flags = flags;
        e
    }

    fn wanted() -> Wanted {
        Wanted {
            announce: ip("10.2.1.2"),
            services: vec![ip("10.99.0.1")],
            add_services: true,
        }
    }

    fn fresh() -> Observed {
        Observed {
            allow_join_initial_addr_port: "1".into(),
            endpoints: vec![],
            local_addresses: vec![ip("127.0.0.1"), ip("10.2.1.2")],
        }
    }

    #[test]
    fn a_fresh_start_records_then_sets_everything_and_undoes_it() {
        let plan = plan_start(&wanted(), &fresh(), None, 7).unwrap();
        assert_eq!(
            plan,
            StartPlan {
                state: SavedState {
                    pid: 7,
                    allow_join_initial_addr_port: "1".into(),
                    endpoint: Some(ip("10.2.1.2")),
                    addresses: vec![ip("10.99.0.1")],
                },
                set_c_flag: true,
                delete_endpoints: vec![],
                add_endpoint: true,
                delete_addresses: vec![],
                add_addresses: vec![ip("10.99.0.1")],
            }
        );
        // Running: the kernel shows what the plan made.
        let running = Observed {
            allow_join_initial_addr_port: "0".into(),
            endpoints: vec![endpoint("10.2.1.2", 3, flags::SIGNAL)],
            local_addresses: vec![ip("127.0.0.1"), ip("10.2.1.2"), ip("10.99.0.1")],
        };
        assert_eq!(
            plan_teardown(&plan.state, &running),
            Teardown {
                delete_endpoints: vec![(3, ip("10.2.1.2"))],
                restore_c_flag: Some("1".into()),
                delete_addresses: vec![ip("10.99.0.1")],
            }
        );
    }

    #[test]
    fn after_a_crash_the_original_value_and_the_objects_are_adopted() {
        let saved = SavedState {
            pid: 7,
            allow_join_initial_addr_port: "1".into(),
            endpoint: Some(ip("10.2.1.2")),
            addresses: vec![ip("10.99.0.1")],
        };
        let left = Observed {
            allow_join_initial_addr_port: "0".into(),
            endpoints: vec![endpoint("10.2.1.2", 3, flags::SIGNAL)],
            local_addresses: vec![ip("10.2.1.2"), ip("10.99.0.1")],
        };
        let plan = plan_start(&wanted(), &left, Some(&saved), 9).unwrap();
        assert_eq!(
            plan.state,
            SavedState {
                pid: 9,
                ..saved.clone()
            }
        );
        assert!(!plan.set_c_flag && !plan.add_endpoint);
        assert!(plan.add_addresses.is_empty() && plan.delete_addresses.is_empty());
        // Its exit restores 1, not the 0 the crashed run left.
        assert_eq!(
            plan_teardown(&plan.state, &left).restore_c_flag,
            Some("1".into())
        );
    }

    #[test]
    fn a_crashed_runs_objects_for_another_configuration_are_removed() {
        let saved = SavedState {
            pid: 7,
            allow_join_initial_addr_port: "1".into(),
            endpoint: Some(ip("10.2.9.9")),
            addresses: vec![ip("10.99.0.9")],
        };
        let left = Observed {
            allow_join_initial_addr_port: "0".into(),
            endpoints: vec![endpoint("10.2.9.9", 4, flags::SIGNAL)],
            local_addresses: vec![ip("10.2.1.2"), ip("10.99.0.9")],
        };
        let plan = plan_start(&wanted(), &left, Some(&saved), 9).unwrap();
        assert_eq!(plan.delete_endpoints, vec![(4, ip("10.2.9.9"))]);
        assert_eq!(plan.delete_addresses, vec![ip("10.99.0.9")]);
        assert!(plan.add_endpoint);
        assert_eq!(plan.add_addresses, vec![ip("10.99.0.1")]);
        assert_eq!(plan.state.allow_join_initial_addr_port, "1");
    }

    #[test]
    fn the_operators_objects_are_used_and_left_alone() {
        let mut observed = fresh();
        observed.endpoints = vec![endpoint("10.2.1.2", 1, flags::SIGNAL | flags::SUBFLOW)];
        observed.local_addresses.push(ip("10.99.0.1"));
        observed.allow_join_initial_addr_port = "0".into();
        let plan = plan_start(&wanted(), &observed, None, 7).unwrap();
        assert!(!plan.add_endpoint && !plan.set_c_flag);
        assert_eq!(plan.state.endpoint, None);
        assert!(plan.state.addresses.is_empty() && plan.add_addresses.is_empty());
        assert_eq!(
            plan_teardown(&plan.state, &observed),
            Teardown {
                delete_endpoints: vec![],
                restore_c_flag: None,
                delete_addresses: vec![],
            }
        );
    }

    #[test]
    fn conflicts_are_refused_with_their_reason() {
        let mut observed = fresh();
        observed.endpoints = vec![endpoint("10.2.1.2", 5, flags::SUBFLOW)];
        let err = plan_start(&wanted(), &observed, None, 7).unwrap_err();
        assert!(err.to_string().contains("id 5"), "{err}");
        let mut no_add = wanted();
        no_add.add_services = false;
        let err = plan_start(&no_add, &fresh(), None, 7).unwrap_err();
        assert!(err.to_string().contains("10.99.0.1"), "{err}");
    }

    #[test]
    fn the_state_file_round_trips_and_refuses_unknown_fields() {
        let state = SavedState {
            pid: 1,
            allow_join_initial_addr_port: "1".into(),
            endpoint: Some(ip("fd00::2")),
            addresses: vec![ip("10.99.0.1")],
        };
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<SavedState>(&text).unwrap(), state);
        assert!(serde_json::from_str::<SavedState>(r#"{"pid":1}"#).is_err());
    }
}
