//! Property: applying the changes of every poll to a model of the kernel
//! always yields exactly the desired state, and no change refers to
//! something absent (remove) or already present (add).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use mptcp_throttle::core::{ClassKey, InterfaceSetup};
use mptcp_throttle::{
    Change, ConnectionToken, FourTuple, LiveSubflow, SubflowEvent, SubflowInfo, SubflowRole,
    ThrottleConfig, ThrottleState,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Created(u8, u8),
    Joined(u8, u8),
    SubflowClosed(u8, u8),
    Closed(u8),
    Poll,
    /// Poll, and let the kernel refuse the n-th change (modulo their number).
    PollFailing(u8),
    TogglePolicy,
    /// The kernel closes a connection, and its event is lost.
    LostClosed(u8),
    /// A subflow joins in the kernel, and its event is lost.
    LostJoined(u8, u8),
    /// A subflow closes in the kernel, and its event is lost.
    LostSubflowClosed(u8, u8),
    /// The live subflows are read back from the kernel.
    Resync,
}

/// What the kernel really has: connections and their subflows' roles.
#[derive(Debug, Default)]
struct Truth(BTreeMap<u8, BTreeMap<u8, SubflowRole>>);

impl Truth {
    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Created(c, s) => {
                self.0
                    .entry(c)
                    .or_default()
                    .entry(s)
                    .or_insert(SubflowRole::Initial);
            }
            Step::Joined(c, s) | Step::LostJoined(c, s) => {
                self.0.entry(c).or_default().insert(s, SubflowRole::Joined);
            }
            Step::SubflowClosed(c, s) | Step::LostSubflowClosed(c, s) => {
                if let Some(subflows) = self.0.get_mut(&c) {
                    subflows.remove(&s);
                }
            }
            Step::Closed(c) | Step::LostClosed(c) => {
                self.0.remove(&c);
            }
            _ => {}
        }
    }

    fn snapshot(&self) -> Vec<LiveSubflow> {
        self.0
            .iter()
            .flat_map(|(c, subflows)| {
                subflows.iter().map(|(s, role)| LiveSubflow {
                    token: ConnectionToken((*c).into()),
                    subflow: info(*c, *s),
                    role: *role,
                })
            })
            .collect()
    }

    fn tuples(&self) -> BTreeSet<FourTuple> {
        self.snapshot()
            .into_iter()
            .map(|l| l.subflow.tuple)
            .collect()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3u8, 0..4u8).prop_map(|(c, s)| Step::Created(c, s)),
        (0..3u8, 0..4u8).prop_map(|(c, s)| Step::Joined(c, s)),
        (0..3u8, 0..4u8).prop_map(|(c, s)| Step::SubflowClosed(c, s)),
        (0..3u8).prop_map(Step::Closed),
        Just(Step::Poll),
        (0..8u8).prop_map(Step::PollFailing),
        Just(Step::TogglePolicy),
        (0..3u8).prop_map(Step::LostClosed),
        (0..3u8, 0..4u8).prop_map(|(c, s)| Step::LostJoined(c, s)),
        (0..3u8, 0..4u8).prop_map(|(c, s)| Step::LostSubflowClosed(c, s)),
        Just(Step::Resync),
    ]
}

fn info(connection: u8, subflow: u8) -> SubflowInfo {
    // Subflows 0 and 1 arrive on eth1, 2 and 3 on eth2 (by interface name).
    let iface = if subflow < 2 { "eth1" } else { "eth2" };
    let mut info = SubflowInfo::new(
        format!("10.0.0.1:{}", 1000 + u16::from(connection))
            .parse()
            .unwrap(),
        format!("192.0.2.{}:{}", subflow + 1, 40000 + u16::from(connection))
            .parse()
            .unwrap(),
    );
    info.interface.name = Some(iface.into());
    info
}

fn policy(variant: bool) -> ThrottleConfig {
    let text = if variant {
        r#"
        [[classes]]
        name = "a"
        interface = "eth1"
        rate = "20mbit"
        [[classes]]
        name = "b"
        interface = "eth2"
        rate = "5mbit"
        direction = "both"
        [[rules]]
        class = "a"
        fwmark = 1
        match = { interface = "eth1" }
        [[rules]]
        class = "b"
        min_subflows = 3
        "#
    } else {
        r#"
        max_steered_subflows = 5
        [[classes]]
        name = "b"
        interface = "eth2"
        rate = "7mbit"
        scope = "client"
        max_clients = 2
        direction = "both"
        [[classes]]
        name = "c"
        interface = "eth1"
        rate = "3mbit"
        scope = "client"
        max_clients = 3
        [[rules]]
        class = "c"
        min_subflows = 1
        match = { interface = "eth1" }
        [[rules]]
        class = "b"
        match = { interface = "eth2" }
        "#
    };
    ThrottleConfig::from_toml_str(text).unwrap()
}

#[derive(Default, Debug)]
struct Model {
    interfaces: BTreeSet<InterfaceSetup>,
    classes: BTreeMap<ClassKey, mptcp_throttle::core::ClassSpec>,
    rules: BTreeMap<FourTuple, mptcp_throttle::core::SubflowRule>,
}

impl Model {
    /// Applies a change as the kernel would: `Ok(false)` if the kernel
    /// refuses it, `Err` if the change is inconsistent (a bug).
    fn apply(&mut self, change: &Change) -> Result<bool, String> {
        match change {
            Change::AddInterface(s) => {
                if !self.interfaces.insert(s.clone()) {
                    return Err(format!("interface added twice: {s:?}"));
                }
            }
            Change::RemoveInterface(s) => {
                if !self.interfaces.remove(s) {
                    return Err(format!("absent interface removed: {s:?}"));
                }
                // Deleting the root qdisc takes its classes with it.
                self.classes
                    .retain(|(iface, dir, _), _| !(iface == &s.interface && *dir == s.direction));
            }
            Change::AddClass(c) | Change::UpdateClass(c)
                if !self
                    .interfaces
                    .iter()
                    .any(|s| s.interface == c.interface && s.direction == c.direction) =>
            {
                // The kernel refuses a class without its qdisc.
                return Ok(false);
            }
            Change::AddClass(c) | Change::UpdateClass(c)
                if c.parent.is_some_and(|p| {
                    !self
                        .classes
                        .contains_key(&(c.interface.clone(), c.direction, p))
                }) =>
            {
                // The kernel refuses a class whose parent is not there.
                return Ok(false);
            }
            Change::AddClass(c) => {
                if self.classes.insert(c.key(), c.clone()).is_some() {
                    return Err(format!("class added twice: {c:?}"));
                }
            }
            Change::RemoveClass(c)
                if self.classes.values().any(|child| {
                    child.parent == Some(c.id)
                        && child.interface == c.interface
                        && child.direction == c.direction
                }) =>
            {
                // The kernel refuses to delete a class with children.
                return Ok(false);
            }
            Change::UpdateClass(c) => {
                if self.classes.insert(c.key(), c.clone()).is_none() {
                    return Err(format!("absent class updated: {c:?}"));
                }
            }
            Change::RemoveClass(c) => {
                if self.classes.remove(&c.key()).is_none() {
                    return Err(format!("absent class removed: {c:?}"));
                }
            }
            Change::AddRule { rule, .. } => {
                if self.rules.insert(rule.tuple, rule.clone()).is_some() {
                    return Err(format!("rule added twice: {rule:?}"));
                }
            }
            Change::RemoveRule(rule) => {
                if self.rules.remove(&rule.tuple).is_none() {
                    return Err(format!("absent rule removed: {rule:?}"));
                }
            }
            Change::SetBackup(_) | Change::ClearBackup(_) => {}
        }
        Ok(true)
    }
}

fn handle(state: &mut ThrottleState, truth: &mut Truth, step: &Step, variant: &mut bool) {
    let now = Instant::now();
    truth.apply(step);
    match *step {
        Step::LostClosed(_) | Step::LostJoined(..) | Step::LostSubflowClosed(..) => {}
        Step::Resync => {
            state.resync(now, truth.snapshot());
        }
        Step::Created(c, s) => state.handle_event(
            now,
            SubflowEvent::ConnectionCreated {
                token: ConnectionToken(c.into()),
                subflow: info(c, s),
            },
        ),
        Step::Joined(c, s) => state.handle_event(
            now,
            SubflowEvent::SubflowEstablished {
                token: ConnectionToken(c.into()),
                subflow: info(c, s),
            },
        ),
        Step::SubflowClosed(c, s) => state.handle_event(
            now,
            SubflowEvent::SubflowClosed {
                token: ConnectionToken(c.into()),
                subflow: info(c, s),
            },
        ),
        Step::Closed(c) => state.handle_event(
            now,
            SubflowEvent::ConnectionClosed {
                token: ConnectionToken(c.into()),
            },
        ),
        Step::TogglePolicy => {
            *variant = !*variant;
            state.set_config(policy(*variant));
        }
        Step::Poll | Step::PollFailing(_) => {}
    }
}

/// After a clean poll the kernel holds what a full recomputation wants: exactly that while no limit
/// leaves a subflow waiting (who wins a contended class or place may differ, not how many), and a second
/// poll has nothing to do.
fn check_converged(state: &mut ThrottleState, model: &Model) -> Result<(), TestCaseError> {
    let desired = state.desired_state();
    prop_assert_eq!(&model.interfaces, &desired.interfaces);
    if state.waiting_connections() == 0 {
        prop_assert_eq!(&model.classes, &desired.classes);
        prop_assert_eq!(&model.rules, &desired.rules);
    } else {
        prop_assert_eq!(model.classes.len(), desired.classes.len());
        prop_assert_eq!(model.rules.len(), desired.rules.len());
        let placements = |rules: &BTreeMap<FourTuple, mptcp_throttle::core::SubflowRule>| {
            rules
                .values()
                .map(|r| usize::from(r.download.is_some()) + usize::from(r.upload.is_some()))
                .sum::<usize>()
        };
        prop_assert_eq!(placements(&model.rules), placements(&desired.rules));
    }
    prop_assert!(state.poll_changes().is_empty());
    Ok(())
}

proptest! {
    #[test]
    fn polls_take_the_kernel_to_the_desired_state(steps in proptest::collection::vec(step(), 1..80)) {
        let mut variant = true;
        let mut state = ThrottleState::new(policy(variant));
        let mut model = Model::default();
        let mut truth = Truth::default();
        for step in steps {
            handle(&mut state, &mut truth, &step, &mut variant);
            let failing = match step {
                Step::PollFailing(n) => Some(usize::from(n)),
                Step::Poll | Step::TogglePolicy | Step::Resync => None,
                _ => continue,
            };
            let changes = state.poll_changes();
            let failing = failing.filter(|_| !changes.is_empty()).map(|n| n % changes.len());
            // A subflow's rule changes go in one nft batch: removing the old and adding the new fail
            // together.
            let failed_tuple = failing.and_then(|i| match &changes[i] {
                Change::AddRule { rule, .. } | Change::RemoveRule(rule) => Some(rule.tuple),
                _ => None,
            });
            let mut refused = false;
            for (i, change) in changes.iter().enumerate() {
                let injected = Some(i) == failing
                    || matches!(change, Change::AddRule { rule, .. } | Change::RemoveRule(rule)
                        if Some(rule.tuple) == failed_tuple);
                let applied = !injected && model.apply(change).map_err(TestCaseError::fail)?;
                refused |= !injected && !applied;
                if !applied {
                    state.change_failed(change);
                }
            }
            if failing.is_none() {
                prop_assert!(!refused, "the kernel refused a change of a clean poll: {changes:?}");
            }
            // What the state believes is installed is what is.
            prop_assert_eq!(&model.interfaces, &state.installed().interfaces);
            prop_assert_eq!(&model.classes, &state.installed().classes);
            prop_assert_eq!(&model.rules, &state.installed().rules);
            if failing.is_none() {
                check_converged(&mut state, &model)?;
            }
            if matches!(step, Step::Resync) {
                // After a resync only subflows the kernel has keep rules, and the table is the kernel's.
                let live = truth.tuples();
                prop_assert!(model.rules.keys().all(|t| live.contains(t)), "{:?} vs {:?}", model.rules.keys(), live);
                prop_assert_eq!(state.live_subflow_count(), live.len());
                prop_assert_eq!(
                    state.connection_count(),
                    truth.0.values().filter(|s| !s.is_empty()).count()
                );
            }
        }
        // A final clean poll converges whatever was refused.
        for change in state.poll_changes() {
            prop_assert!(model.apply(&change).map_err(TestCaseError::fail)?);
        }
        check_converged(&mut state, &model)?;
    }
}
