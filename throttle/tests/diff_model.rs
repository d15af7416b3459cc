//! Property: applying the changes of every poll to a model of the kernel
//! always yields exactly the desired state, and no change refers to
//! something absent (remove) or already present (add).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use mptcp_throttle::core::{ClassKey, InterfaceSetup};
use mptcp_throttle::{
    Change, ConnectionToken, FourTuple, SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleState,
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
        [[classes]]
        name = "b"
        interface = "eth2"
        rate = "7mbit"
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
            Change::AddClass(c) => {
                if self.classes.insert(c.key(), c.clone()).is_some() {
                    return Err(format!("class added twice: {c:?}"));
                }
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

fn handle(state: &mut ThrottleState, step: &Step, variant: &mut bool) {
    let now = Instant::now();
    match *step {
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

proptest! {
    #[test]
    fn polls_take_the_kernel_to_the_desired_state(steps in proptest::collection::vec(step(), 1..80)) {
        let mut variant = true;
        let mut state = ThrottleState::new(policy(variant));
        let mut model = Model::default();
        for step in steps {
            handle(&mut state, &step, &mut variant);
            let failing = match step {
                Step::PollFailing(n) => Some(usize::from(n)),
                Step::Poll | Step::TogglePolicy => None,
                _ => continue,
            };
            let changes = state.poll_changes();
            let failing = failing.filter(|_| !changes.is_empty()).map(|n| n % changes.len());
            for (i, change) in changes.iter().enumerate() {
                let applied = Some(i) != failing && model.apply(change).map_err(TestCaseError::fail)?;
                if !applied {
                    state.change_failed(change);
                }
            }
            // What the state believes is installed is what is.
            prop_assert_eq!(&model.interfaces, &state.installed().interfaces);
            prop_assert_eq!(&model.classes, &state.installed().classes);
            prop_assert_eq!(&model.rules, &state.installed().rules);
            if failing.is_none() {
                // Without refusals the kernel now holds exactly the desired state.
                let desired = state.desired_state();
                prop_assert_eq!(&model.interfaces, &desired.interfaces);
                prop_assert_eq!(&model.classes, &desired.classes);
                prop_assert_eq!(&model.rules, &desired.rules);
                prop_assert!(state.poll_changes().is_empty());
            }
        }
        // A final clean poll converges whatever was refused.
        for change in state.poll_changes() {
            prop_assert!(model.apply(&change).map_err(TestCaseError::fail)?);
        }
        let desired = state.desired_state();
        prop_assert_eq!(&model.interfaces, &desired.interfaces);
        prop_assert_eq!(&model.classes, &desired.classes);
        prop_assert_eq!(&model.rules, &desired.rules);
    }
}
