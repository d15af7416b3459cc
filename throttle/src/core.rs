//! Sans-IO core: from policy and live subflows to a list of kernel changes.
//!
//! [`ThrottleState`] owns no sockets and reads no clock. Feed it events with
//! [`ThrottleState::handle_event`], then call [`ThrottleState::poll_changes`]:
//! it computes the desired state ([`DesiredState`]: classes per interface and
//! one rule per matched subflow), diffs it against what it believes is
//! installed, records the desired state as installed and returns the
//! [`Change`]s to apply. When applying a change fails, report it with
//! [`ThrottleState::change_failed`] so the next poll retries it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use crate::config::{
    Direction, RuleConfig, SubflowMatch, SubflowRole, ThrottleConfig, FIRST_CLASS_MINOR,
};
use crate::event::{
    ConnectionSelector, ConnectionToken, Destination, FourTuple, SubflowEvent, SubflowInfo,
};
use crate::rate::{Rate, Size};

/// A tc class id, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassId {
    /// The qdisc's major number.
    pub major: u16,
    /// The class number within the qdisc.
    pub minor: u16,
}

impl ClassId {
    /// The 32-bit handle the kernel uses (`major << 16 | minor`), also the
    /// value `meta priority set` writes into `skb->priority`.
    pub fn handle(self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{:x}", self.major, self.minor)
    }
}

/// An interface and direction that needs an HTB root (and, for uploads, an
/// ingress redirect to an IFB device).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceSetup {
    /// The client-facing interface.
    pub interface: String,
    /// Which direction is shaped.
    pub direction: Direction,
    /// Major number of the HTB qdisc handle.
    pub qdisc_major: u16,
}

/// One HTB class, as it should be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    /// Policy name of the class.
    pub name: String,
    /// Client-facing interface.
    pub interface: String,
    /// Direction; uploads live on the interface's IFB device.
    pub direction: Direction,
    /// Class id.
    pub id: ClassId,
    /// Guaranteed rate.
    pub rate: Rate,
    /// Upper bound.
    pub ceil: Rate,
    /// Burst, if set by policy.
    pub burst: Option<Size>,
    /// HTB priority.
    pub priority: u8,
}

/// Key of a class in [`DesiredState::classes`].
pub type ClassKey = (String, Direction, ClassId);

impl ClassSpec {
    /// Its key in [`DesiredState::classes`].
    pub fn key(&self) -> ClassKey {
        (self.interface.clone(), self.direction, self.id)
    }
}

/// Where a subflow's packets go in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPlacement {
    /// Class policy name.
    pub name: String,
    /// Client-facing interface the class lives on.
    pub interface: String,
    /// Class id.
    pub id: ClassId,
}

/// The classification rule of one matched subflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubflowRule {
    /// The subflow.
    pub tuple: FourTuple,
    /// Its connection.
    pub token: ConnectionToken,
    /// Index of the policy rule that matched.
    pub rule_index: usize,
    /// Name of the policy rule, if it has one.
    pub rule_name: Option<String>,
    /// Class for packets to the client.
    pub download: Option<ClassPlacement>,
    /// Class for packets from the client.
    pub upload: Option<ClassPlacement>,
    /// `meta mark` to set on packets of the subflow.
    pub fwmark: Option<u32>,
    /// `ct mark` to set on the subflow's conntrack entry.
    pub ct_mark: Option<u32>,
}

/// A request to flip a subflow's backup flag through the path manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRequest {
    /// The connection.
    pub token: ConnectionToken,
    /// The subflow.
    pub tuple: FourTuple,
    /// MPTCP id of the local address, if known.
    pub local_id: Option<u8>,
}

/// Everything the throttle wants installed, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Interfaces (and directions) with an HTB root.
    pub interfaces: BTreeSet<InterfaceSetup>,
    /// Classes per interface and direction.
    pub classes: BTreeMap<ClassKey, ClassSpec>,
    /// One rule per matched subflow.
    pub rules: BTreeMap<FourTuple, SubflowRule>,
    /// Subflows to be marked backup.
    pub backups: BTreeMap<FourTuple, BackupRequest>,
}

/// One step towards the desired state. [`ThrottleState::poll_changes`] orders
/// them so removals come first and nothing refers to something not yet there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Remove a subflow's classification rule.
    RemoveRule(SubflowRule),
    /// Clear the backup flag set earlier.
    ClearBackup(BackupRequest),
    /// Remove a class.
    RemoveClass(ClassSpec),
    /// Remove an interface's HTB root (and IFB redirect for uploads).
    RemoveInterface(InterfaceSetup),
    /// Install an interface's HTB root (and IFB redirect for uploads).
    AddInterface(InterfaceSetup),
    /// Install a class.
    AddClass(ClassSpec),
    /// Change an installed class's parameters in place.
    UpdateClass(ClassSpec),
    /// Install a subflow's classification rule.
    AddRule {
        /// The rule.
        rule: SubflowRule,
        /// When the event that made the rule match was handled (for
        /// event-to-install latency); `None` after a policy change.
        triggered_at: Option<Instant>,
    },
    /// Mark a subflow backup.
    SetBackup(BackupRequest),
}

#[derive(Debug, Clone)]
struct Subflow {
    info: SubflowInfo,
    role: SubflowRole,
}

#[derive(Debug, Clone, Default)]
struct Connection {
    subflows: BTreeMap<FourTuple, Subflow>,
    destination: Option<Destination>,
    announced: BTreeMap<u8, IpAddr>,
}

/// Counters of what the state has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Events handled.
    pub events: u64,
    /// Events about unknown connections that were dropped.
    pub unknown_connection_events: u64,
}

/// The sans-IO throttle: policy, live connections, installed state.
#[derive(Debug)]
pub struct ThrottleState {
    config: ThrottleConfig,
    class_ids: BTreeMap<String, ClassId>,
    connections: BTreeMap<ConnectionToken, Connection>,
    interface_by_index: BTreeMap<u32, String>,
    interface_by_address: BTreeMap<IpAddr, String>,
    installed: DesiredState,
    /// Installed rule and backup tuples per connection.
    installed_by_token: BTreeMap<ConnectionToken, BTreeSet<FourTuple>>,
    /// Connections touched since the last poll.
    dirty: BTreeSet<ConnectionToken>,
    /// Everything must be recomputed (policy or interface table changed, or
    /// an infrastructure change failed).
    all_dirty: bool,
    last_change: BTreeMap<FourTuple, Instant>,
    stats: ThrottleStats,
}

impl ThrottleState {
    /// A state for a validated policy (see [`ThrottleConfig::validate`]);
    /// nothing is installed yet.
    pub fn new(config: ThrottleConfig) -> Self {
        let class_ids = config
            .classes
            .iter()
            .enumerate()
            .map(|(i, class)| {
                let id = ClassId {
                    major: config.qdisc_major,
                    minor: FIRST_CLASS_MINOR + i as u16,
                };
                (class.name.clone(), id)
            })
            .collect();
        Self {
            config,
            class_ids,
            connections: BTreeMap::new(),
            interface_by_index: BTreeMap::new(),
            interface_by_address: BTreeMap::new(),
            installed: DesiredState::default(),
            installed_by_token: BTreeMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            last_change: BTreeMap::new(),
            stats: ThrottleStats::default(),
        }
    }

    /// The policy in force.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Replaces the policy; the next poll moves the kernel to the new one.
    pub fn set_config(&mut self, config: ThrottleConfig) {
        let installed = std::mem::take(&mut self.installed);
        let installed_by_token = std::mem::take(&mut self.installed_by_token);
        let connections = std::mem::take(&mut self.connections);
        let by_index = std::mem::take(&mut self.interface_by_index);
        let by_address = std::mem::take(&mut self.interface_by_address);
        *self = Self::new(config);
        self.installed = installed;
        self.installed_by_token = installed_by_token;
        self.connections = connections;
        self.interface_by_index = by_index;
        self.interface_by_address = by_address;
    }

    /// Tells the state which name an interface index has (events from the
    /// kernel carry only `if_idx`).
    pub fn set_interface_name(&mut self, index: u32, name: &str) {
        if self
            .interface_by_index
            .insert(index, name.to_owned())
            .as_deref()
            != Some(name)
        {
            self.all_dirty = true;
        }
    }

    /// Tells the state which interface a local address belongs to: a subflow
    /// without interface information is taken to have arrived on the
    /// interface of its local address.
    pub fn set_interface_address(&mut self, addr: IpAddr, name: &str) {
        if self
            .interface_by_address
            .insert(addr, name.to_owned())
            .as_deref()
            != Some(name)
        {
            self.all_dirty = true;
        }
    }

    /// The class id assigned to a policy class.
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.class_ids.get(name).copied()
    }

    /// Event counters.
    pub fn stats(&self) -> ThrottleStats {
        self.stats
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Active subflows of a connection (0 if unknown).
    pub fn subflow_count(&self, token: ConnectionToken) -> usize {
        self.connections.get(&token).map_or(0, |c| c.subflows.len())
    }

    /// Addresses the client announced on a connection, by address id.
    pub fn announced_addresses(&self, token: ConnectionToken) -> Vec<(u8, IpAddr)> {
        self.connections
            .get(&token)
            .map(|c| c.announced.iter().map(|(id, a)| (*id, *a)).collect())
            .unwrap_or_default()
    }

    /// What the state believes is installed.
    pub fn installed(&self) -> &DesiredState {
        &self.installed
    }

    /// Applies one event to the live connection table.
    pub fn handle_event(&mut self, now: Instant, event: SubflowEvent) {
        self.stats.events += 1;
        match &event {
            SubflowEvent::ConnectionCreated { token, .. }
            | SubflowEvent::ConnectionEstablished { token, .. }
            | SubflowEvent::ConnectionClosed { token }
            | SubflowEvent::SubflowEstablished { token, .. }
            | SubflowEvent::SubflowClosed { token, .. }
            | SubflowEvent::AddressAnnounced { token, .. }
            | SubflowEvent::AddressRemoved { token, .. }
            | SubflowEvent::PriorityChanged { token, .. } => {
                self.dirty.insert(*token);
            }
            SubflowEvent::DestinationAttached { .. } => {}
        }
        match event {
            SubflowEvent::ConnectionCreated { token, subflow }
            | SubflowEvent::ConnectionEstablished { token, subflow } => {
                let connection = self.connections.entry(token).or_default();
                let tuple = subflow.tuple;
                let entry = connection.subflows.entry(tuple).or_insert(Subflow {
                    info: subflow.clone(),
                    role: SubflowRole::Initial,
                });
                merge_info(&mut entry.info, subflow);
                self.last_change.insert(tuple, now);
            }
            SubflowEvent::ConnectionClosed { token } => {
                if let Some(connection) = self.connections.remove(&token) {
                    for tuple in connection.subflows.keys() {
                        self.last_change.remove(tuple);
                    }
                } else {
                    self.stats.unknown_connection_events += 1;
                }
            }
            SubflowEvent::SubflowEstablished { token, subflow } => {
                // A join can be reported before the creation event was seen
                // (listener started late): track the connection anyway.
                let connection = self.connections.entry(token).or_default();
                let tuple = subflow.tuple;
                connection.subflows.insert(
                    tuple,
                    Subflow {
                        info: subflow,
                        role: SubflowRole::Joined,
                    },
                );
                for other in connection.subflows.keys() {
                    self.last_change.insert(*other, now);
                }
            }
            SubflowEvent::SubflowClosed { token, subflow } => {
                match self.connections.get_mut(&token) {
                    Some(connection) => {
                        connection.subflows.remove(&subflow.tuple);
                        self.last_change.remove(&subflow.tuple);
                        for other in connection.subflows.keys() {
                            self.last_change.insert(*other, now);
                        }
                    }
                    None => self.stats.unknown_connection_events += 1,
                }
            }
            SubflowEvent::PriorityChanged { token, subflow } => {
                match self
                    .connections
                    .get_mut(&token)
                    .and_then(|c| c.subflows.get_mut(&subflow.tuple))
                {
                    Some(known) => {
                        known.info.backup = subflow.backup;
                        self.last_change.insert(subflow.tuple, now);
                    }
                    None => self.stats.unknown_connection_events += 1,
                }
            }
            SubflowEvent::AddressAnnounced {
                token,
                remote_id,
                addr,
                ..
            } => match self.connections.get_mut(&token) {
                Some(connection) => {
                    connection.announced.insert(remote_id, addr);
                }
                None => self.stats.unknown_connection_events += 1,
            },
            SubflowEvent::AddressRemoved { token, remote_id } => {
                match self.connections.get_mut(&token) {
                    Some(connection) => {
                        connection.announced.remove(&remote_id);
                    }
                    None => self.stats.unknown_connection_events += 1,
                }
            }
            SubflowEvent::DestinationAttached {
                connection,
                destination,
            } => {
                let token = match connection {
                    ConnectionSelector::Token(token) => Some(token),
                    ConnectionSelector::Tuple(tuple) => self
                        .connections
                        .iter()
                        .find(|(_, c)| c.subflows.contains_key(&tuple))
                        .map(|(token, _)| *token),
                };
                if let Some(token) = token {
                    self.dirty.insert(token);
                }
                match token.and_then(|t| self.connections.get_mut(&t)) {
                    Some(connection) => {
                        connection.destination = Some(destination);
                        for tuple in connection.subflows.keys() {
                            self.last_change.insert(*tuple, now);
                        }
                    }
                    None => self.stats.unknown_connection_events += 1,
                }
            }
        }
    }

    /// Whether the interface a subflow arrived on is known (by name, index or
    /// local address).
    pub fn resolves_interface(&self, info: &SubflowInfo) -> bool {
        self.interface_of(info).is_some()
    }

    fn interface_of<'a>(&'a self, info: &'a SubflowInfo) -> Option<&'a str> {
        if let Some(name) = &info.interface.name {
            return Some(name);
        }
        if let Some(name) = info
            .interface
            .index
            .and_then(|i| self.interface_by_index.get(&i))
        {
            return Some(name);
        }
        self.interface_by_address
            .get(&info.tuple.local.ip())
            .map(String::as_str)
    }

    fn matches(&self, rule: &RuleConfig, connection: &Connection, subflow: &Subflow) -> bool {
        if (connection.subflows.len() as u64) < u64::from(rule.min_subflows) {
            return false;
        }
        subflow_matches(
            &rule.matches,
            self.interface_of(&subflow.info),
            connection.destination.as_ref(),
            subflow,
        )
    }

    /// The desired state for the current policy and live subflows.
    pub fn desired_state(&self) -> DesiredState {
        let mut desired = DesiredState::default();
        if !self.config.enabled {
            return desired;
        }
        self.desired_infrastructure(&mut desired);
        for (token, connection) in &self.connections {
            self.desired_for_connection(*token, connection, &mut desired);
        }
        desired
    }

    fn desired_infrastructure(&self, desired: &mut DesiredState) {
        for class in &self.config.classes {
            let id = self.class_ids[&class.name];
            for &direction in class.direction.directions() {
                desired.interfaces.insert(InterfaceSetup {
                    interface: class.interface.clone(),
                    direction,
                    qdisc_major: self.config.qdisc_major,
                });
                let spec = ClassSpec {
                    name: class.name.clone(),
                    interface: class.interface.clone(),
                    direction,
                    id,
                    rate: class.rate,
                    ceil: class.ceil.unwrap_or(class.rate),
                    burst: class.burst,
                    priority: class.priority,
                };
                desired.classes.insert(spec.key(), spec);
            }
        }
    }

    fn desired_for_connection(
        &self,
        token: ConnectionToken,
        connection: &Connection,
        desired: &mut DesiredState,
    ) {
        let token = &token;
        {
            for (tuple, subflow) in &connection.subflows {
                let Some((rule_index, rule)) = self
                    .config
                    .rules
                    .iter()
                    .enumerate()
                    .find(|(_, rule)| self.matches(rule, connection, subflow))
                else {
                    continue;
                };
                let (download, upload) = match &rule.class {
                    Some(name) => {
                        let class = self
                            .config
                            .classes
                            .iter()
                            .find(|c| &c.name == name)
                            .expect("validated policy: rule classes exist");
                        let placement = ClassPlacement {
                            name: class.name.clone(),
                            interface: class.interface.clone(),
                            id: self.class_ids[name],
                        };
                        let dirs = class.direction.directions();
                        (
                            dirs.contains(&Direction::Download)
                                .then(|| placement.clone()),
                            dirs.contains(&Direction::Upload).then_some(placement),
                        )
                    }
                    None => (None, None),
                };
                if download.is_some()
                    || upload.is_some()
                    || rule.fwmark.is_some()
                    || rule.ct_mark.is_some()
                {
                    desired.rules.insert(
                        *tuple,
                        SubflowRule {
                            tuple: *tuple,
                            token: *token,
                            rule_index,
                            rule_name: rule.name.clone(),
                            download,
                            upload,
                            fwmark: rule.fwmark,
                            ct_mark: rule.ct_mark,
                        },
                    );
                }
                if rule.set_backup {
                    desired.backups.insert(
                        *tuple,
                        BackupRequest {
                            token: *token,
                            tuple: *tuple,
                            local_id: subflow.info.local_id,
                        },
                    );
                }
            }
        }
    }

    /// Diffs desired against installed state, records the desired state as
    /// installed, and returns the changes to apply, in order. Only
    /// connections touched since the last poll are recomputed, unless the
    /// policy or interface table changed.
    pub fn poll_changes(&mut self) -> Vec<Change> {
        if self.all_dirty {
            self.all_dirty = false;
            self.dirty.clear();
            let desired = self.desired_state();
            let changes = diff(&self.installed, &desired, &self.last_change);
            self.installed = desired;
            self.rebuild_token_index();
            return changes;
        }
        let mut before = DesiredState::default();
        let mut after = DesiredState::default();
        for token in std::mem::take(&mut self.dirty) {
            for tuple in self.installed_by_token.remove(&token).unwrap_or_default() {
                if let Some(rule) = self.installed.rules.remove(&tuple) {
                    before.rules.insert(tuple, rule);
                }
                if let Some(request) = self.installed.backups.remove(&tuple) {
                    before.backups.insert(tuple, request);
                }
            }
            if self.config.enabled {
                if let Some(connection) = self.connections.get(&token) {
                    self.desired_for_connection(token, connection, &mut after);
                }
            }
        }
        let changes = diff(&before, &after, &self.last_change);
        for (tuple, rule) in after.rules {
            self.index_installed(rule.token, tuple);
            self.installed.rules.insert(tuple, rule);
        }
        for (tuple, request) in after.backups {
            self.index_installed(request.token, tuple);
            self.installed.backups.insert(tuple, request);
        }
        changes
    }

    fn index_installed(&mut self, token: ConnectionToken, tuple: FourTuple) {
        self.installed_by_token
            .entry(token)
            .or_default()
            .insert(tuple);
    }

    fn rebuild_token_index(&mut self) {
        self.installed_by_token.clear();
        let entries: Vec<(ConnectionToken, FourTuple)> = self
            .installed
            .rules
            .values()
            .map(|r| (r.token, r.tuple))
            .chain(self.installed.backups.values().map(|b| (b.token, b.tuple)))
            .collect();
        for (token, tuple) in entries {
            self.index_installed(token, tuple);
        }
    }

    /// Records that `change` could not be applied, so that the installed
    /// state matches the kernel again and the next poll retries.
    pub fn change_failed(&mut self, change: &Change) {
        match change {
            Change::AddRule { rule, .. } | Change::RemoveRule(rule) => {
                self.dirty.insert(rule.token);
            }
            Change::SetBackup(request) | Change::ClearBackup(request) => {
                self.dirty.insert(request.token);
            }
            _ => self.all_dirty = true,
        }
        match change {
            Change::RemoveRule(rule) => self.index_installed(rule.token, rule.tuple),
            Change::AddRule { rule, .. } => {
                let backup_kept = self.installed.backups.contains_key(&rule.tuple);
                if let Some(set) = self.installed_by_token.get_mut(&rule.token) {
                    if !backup_kept {
                        set.remove(&rule.tuple);
                    }
                }
            }
            Change::SetBackup(request) => {
                let rule_kept = self.installed.rules.contains_key(&request.tuple);
                if let Some(set) = self.installed_by_token.get_mut(&request.token) {
                    if !rule_kept {
                        set.remove(&request.tuple);
                    }
                }
            }
            _ => {}
        }
        let installed = &mut self.installed;
        match change {
            Change::AddRule { rule, .. } => {
                installed.rules.remove(&rule.tuple);
            }
            Change::RemoveRule(rule) => {
                installed.rules.insert(rule.tuple, rule.clone());
            }
            Change::SetBackup(request) => {
                installed.backups.remove(&request.tuple);
            }
            Change::ClearBackup(_) => {}
            Change::AddClass(spec) | Change::UpdateClass(spec) => {
                installed.classes.remove(&spec.key());
            }
            Change::RemoveClass(spec) => {
                installed.classes.insert(spec.key(), spec.clone());
            }
            Change::AddInterface(setup) => {
                installed.interfaces.remove(setup);
                installed.classes.retain(|(iface, dir, _), _| {
                    !(iface == &setup.interface && *dir == setup.direction)
                });
            }
            Change::RemoveInterface(setup) => {
                installed.interfaces.insert(setup.clone());
            }
        }
    }

    /// Forgets everything installed (after the kernel state was torn down).
    pub fn forget_installed(&mut self) {
        self.installed = DesiredState::default();
        self.installed_by_token.clear();
        self.all_dirty = true;
    }
}

fn merge_info(known: &mut SubflowInfo, update: SubflowInfo) {
    if update.interface.index.is_some() {
        known.interface.index = update.interface.index;
    }
    if update.interface.name.is_some() {
        known.interface.name = update.interface.name;
    }
    known.local_id = update.local_id.or(known.local_id);
    known.remote_id = update.remote_id.or(known.remote_id);
    known.backup = update.backup;
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&format!(".{suffix}")),
        None => host == pattern,
    }
}

fn subflow_matches(
    criteria: &SubflowMatch,
    interface: Option<&str>,
    destination: Option<&Destination>,
    subflow: &Subflow,
) -> bool {
    let info = &subflow.info;
    let local = info.tuple.local;
    let remote = info.tuple.remote;
    let checks = [
        criteria
            .interface
            .as_ref()
            .is_none_or(|want| interface == Some(want.as_str())),
        criteria.client.is_none_or(|net| net.contains(&remote.ip())),
        criteria.remote_port.is_none_or(|p| p == remote.port()),
        criteria
            .local_addr
            .is_none_or(|net| net.contains(&local.ip())),
        criteria.local_port.is_none_or(|p| p == local.port()),
        criteria.role.is_none_or(|r| r == subflow.role),
        criteria
            .local_address_id
            .is_none_or(|id| info.local_id == Some(id)),
        criteria
            .remote_address_id
            .is_none_or(|id| info.remote_id == Some(id)),
        criteria.backup.is_none_or(|b| b == info.backup),
        criteria.destination_host.as_ref().is_none_or(|pattern| {
            destination
                .and_then(|d| d.host.as_deref())
                .is_some_and(|host| host_matches(pattern, host))
        }),
        criteria.destination.is_none_or(|net| {
            destination
                .and_then(|d| d.addr)
                .is_some_and(|addr| net.contains(&addr))
        }),
        criteria
            .destination_port
            .is_none_or(|port| destination.and_then(|d| d.port) == Some(port)),
    ];
    checks.iter().all(|ok| *ok)
}

/// The changes that take `installed` to `desired`, removals first.
/// `changed_at` gives each subflow's last relevant event time, used as the
/// `triggered_at` of [`Change::AddRule`].
pub fn diff(
    installed: &DesiredState,
    desired: &DesiredState,
    changed_at: &BTreeMap<FourTuple, Instant>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut re_add = Vec::new();
    for (tuple, rule) in &installed.rules {
        match desired.rules.get(tuple) {
            Some(wanted) if wanted == rule => {}
            Some(wanted) => {
                changes.push(Change::RemoveRule(rule.clone()));
                re_add.push(wanted.clone());
            }
            None => changes.push(Change::RemoveRule(rule.clone())),
        }
    }
    for (tuple, request) in &installed.backups {
        if !desired.backups.contains_key(tuple) {
            changes.push(Change::ClearBackup(request.clone()));
        }
    }
    for (key, spec) in &installed.classes {
        let interface_goes = !desired.interfaces.contains(&InterfaceSetup {
            interface: spec.interface.clone(),
            direction: spec.direction,
            qdisc_major: spec.id.major,
        });
        if !desired.classes.contains_key(key) && !interface_goes {
            changes.push(Change::RemoveClass(spec.clone()));
        }
    }
    for setup in &installed.interfaces {
        if !desired.interfaces.contains(setup) {
            changes.push(Change::RemoveInterface(setup.clone()));
        }
    }
    for setup in &desired.interfaces {
        if !installed.interfaces.contains(setup) {
            changes.push(Change::AddInterface(setup.clone()));
        }
    }
    for (key, spec) in &desired.classes {
        let interface_new = !installed.interfaces.contains(&InterfaceSetup {
            interface: spec.interface.clone(),
            direction: spec.direction,
            qdisc_major: spec.id.major,
        });
        match installed.classes.get(key) {
            Some(old) if old == spec && !interface_new => {}
            Some(_) if !interface_new => changes.push(Change::UpdateClass(spec.clone())),
            _ => changes.push(Change::AddClass(spec.clone())),
        }
    }
    for rule in re_add {
        let triggered_at = changed_at.get(&rule.tuple).copied();
        changes.push(Change::AddRule { rule, triggered_at });
    }
    for (tuple, rule) in &desired.rules {
        if !installed.rules.contains_key(tuple) {
            let triggered_at = changed_at.get(tuple).copied();
            changes.push(Change::AddRule {
                rule: rule.clone(),
                triggered_at,
            });
        }
    }
    for (tuple, request) in &desired.backups {
        if !installed.backups.contains_key(tuple) {
            changes.push(Change::SetBackup(request.clone()));
        }
    }
    changes
}
