//! Sans-IO core: from policy and live subflows to a list of kernel changes.
//!
//! [`ThrottleState`] owns no sockets and reads no clock. Feed it events with
//! [`ThrottleState::handle_event`] (or a whole snapshot of the kernel's subflows with
//! [`ThrottleState::resync`]), then call [`ThrottleState::poll_changes`]: it computes what the touched
//! connections' subflows should have (one [`SubflowRule`] per matched subflow, per-subscriber classes
//! allocated as needed), diffs it against what it believes is installed, records the result as
//! installed and returns the [`Change`]s to apply. When applying a change fails, report it with
//! [`ThrottleState::change_failed`] so the next poll retries it.
//!
//! Limits: `max_steered_subflows` bounds the rules, each `scope = "client"` class its `max_clients`; a
//! subflow beyond a limit is not steered (counted in [`ThrottleStats`]) and is retried when a poll
//! frees room.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use crate::config::{
    ClassConfig, ClassScope, Direction, RuleConfig, SubflowMatch, SubflowRole, ThrottleConfig,
    FIRST_CLASS_MINOR,
};
use crate::event::{
    ConnectionSelector, ConnectionToken, Destination, FourTuple, SubflowEvent, SubflowInfo,
};
use crate::rate::{Rate, Size};
use crate::subscribers::{Exhausted, SubscriberKey, Subscribers};

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

/// The rate and ceil of the parent class of a `scope = "client"` template: HTB gives every leaf its own
/// rate whatever the parent's, so the parent only bounds what the subscribers' classes borrow above
/// their rate (up to their ceil): unbounded here, 10 Tbit/s.
pub const CLIENT_PARENT_RATE: Rate = Rate::from_bits_per_second(10_000_000_000_000);

/// One HTB class, as it should be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    /// Policy name of the class (for a subscriber's class: its template's).
    pub name: String,
    /// Client-facing interface.
    pub interface: String,
    /// Direction; uploads live on the interface's IFB device.
    pub direction: Direction,
    /// Class id.
    pub id: ClassId,
    /// Parent class; `None` under the qdisc root.
    pub parent: Option<ClassId>,
    /// The subscriber of a per-client class.
    pub client: Option<IpNet>,
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

    /// The class of a policy class (for `scope = "client"`, the parent of the subscribers' classes).
    fn template(class: &ClassConfig, direction: Direction, id: ClassId) -> Self {
        let (rate, ceil) = match class.scope {
            ClassScope::Shared => (class.rate, class.ceil.unwrap_or(class.rate)),
            ClassScope::Client => (CLIENT_PARENT_RATE, CLIENT_PARENT_RATE),
        };
        Self {
            name: class.name.clone(),
            interface: class.interface.clone(),
            direction,
            id,
            parent: None,
            client: None,
            rate,
            ceil,
            burst: class.burst.filter(|_| class.scope == ClassScope::Shared),
            priority: class.priority,
        }
    }

    /// A subscriber's class under its template `parent`.
    fn subscriber(class: &ClassConfig, key: &SubscriberKey, parent: ClassId, id: ClassId) -> Self {
        Self {
            name: class.name.clone(),
            interface: class.interface.clone(),
            direction: key.direction,
            id,
            parent: Some(parent),
            client: Some(key.client),
            rate: class.rate,
            ceil: class.ceil.unwrap_or(class.rate),
            burst: class.burst,
            priority: class.priority,
        }
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
    /// The subscriber, for a `scope = "client"` class.
    pub client: Option<IpNet>,
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

impl SubflowRule {
    fn placements(&self) -> impl Iterator<Item = (Direction, &ClassPlacement)> {
        [
            (Direction::Download, self.download.as_ref()),
            (Direction::Upload, self.upload.as_ref()),
        ]
        .into_iter()
        .filter_map(|(direction, placement)| placement.map(|p| (direction, p)))
    }

    fn is_empty(&self) -> bool {
        self.download.is_none()
            && self.upload.is_none()
            && self.fwmark.is_none()
            && self.ct_mark.is_none()
    }
}

fn subscriber_key(direction: Direction, placement: &ClassPlacement) -> Option<SubscriberKey> {
    placement.client.map(|client| SubscriberKey {
        template: placement.name.clone(),
        interface: placement.interface.clone(),
        direction,
        client,
    })
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
    /// Classes per interface and direction (policy classes and subscribers' classes).
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
    /// Remove a class (children before their parent).
    RemoveClass(ClassSpec),
    /// Remove an interface's HTB root (and IFB redirect for uploads).
    RemoveInterface(InterfaceSetup),
    /// Install an interface's HTB root (and IFB redirect for uploads).
    AddInterface(InterfaceSetup),
    /// Install a class (parents before their children).
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
    /// Subflow placements left unsteered because a `scope = "client"` class had `max_clients`
    /// subscribers, or its qdisc no free class id (counted per poll that refused them).
    pub refused_class_limit: u64,
    /// Subflows left unsteered because `max_steered_subflows` were steered (counted per poll).
    pub refused_subflow_limit: u64,
    /// Snapshots of the kernel's subflows applied ([`ThrottleState::resync`]).
    pub resyncs: u64,
}

/// One live subflow as the kernel lists it (see [`ThrottleState::resync`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSubflow {
    /// Its connection.
    pub token: ConnectionToken,
    /// The subflow.
    pub subflow: SubflowInfo,
    /// Initial (MP_CAPABLE) or joined (MP_JOIN).
    pub role: SubflowRole,
}

/// What a resync changed in the connection table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Connections the kernel has that the events had not announced.
    pub connections_added: usize,
    /// Connections the events left open that the kernel no longer has.
    pub connections_removed: usize,
    /// Subflows added to known connections.
    pub subflows_added: usize,
    /// Subflows removed from connections that stay.
    pub subflows_removed: usize,
}

impl ResyncReport {
    /// Whether the snapshot matched what the events had built.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The limit that left a subflow unsteered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Wait {
    /// `max_steered_subflows`.
    Subflows,
    /// A `scope = "client"` class's `max_clients`, or its qdisc's class ids.
    Class(SubscriberKey),
}

/// The change list of one poll, in buckets emitted in a safe order.
#[derive(Debug, Default)]
struct Changes {
    remove_rules: Vec<Change>,
    clear_backups: Vec<Change>,
    remove_classes: Vec<ClassSpec>,
    remove_interfaces: Vec<Change>,
    add_interfaces: Vec<Change>,
    add_classes: Vec<ClassSpec>,
    update_classes: Vec<Change>,
    add_rules: Vec<Change>,
    set_backups: Vec<Change>,
}

impl Changes {
    fn into_vec(mut self) -> Vec<Change> {
        // Children go before their parents, parents come before their children.
        self.remove_classes.sort_by_key(|c| c.parent.is_none());
        self.add_classes.sort_by_key(|c| c.parent.is_some());
        let mut out = self.remove_rules;
        out.extend(self.clear_backups);
        out.extend(self.remove_classes.into_iter().map(Change::RemoveClass));
        out.extend(self.remove_interfaces);
        out.extend(self.add_interfaces);
        out.extend(self.add_classes.into_iter().map(Change::AddClass));
        out.extend(self.update_classes);
        out.extend(self.add_rules);
        out.extend(self.set_backups);
        out
    }
}

/// The sans-IO throttle: policy, live connections, installed state.
#[derive(Debug, Clone)]
pub struct ThrottleState {
    config: ThrottleConfig,
    class_ids: BTreeMap<String, ClassId>,
    connections: BTreeMap<ConnectionToken, Connection>,
    /// Which connection each subflow belongs to (attaching a destination by tuple is O(1)).
    tuple_tokens: HashMap<FourTuple, ConnectionToken>,
    interface_by_index: BTreeMap<u32, String>,
    interface_by_address: BTreeMap<IpAddr, String>,
    installed: DesiredState,
    /// Installed rule and backup tuples per connection.
    installed_by_token: BTreeMap<ConnectionToken, BTreeSet<FourTuple>>,
    subscribers: Subscribers,
    /// Connections with a subflow left unsteered by a limit, and which limits; recomputed when a poll
    /// finds room under one of them.
    waiting: BTreeMap<ConnectionToken, BTreeSet<Wait>>,
    /// Connections touched since the last poll.
    dirty: BTreeSet<ConnectionToken>,
    /// Everything must be recomputed (policy or interface table changed, or
    /// an infrastructure change failed).
    all_dirty: bool,
    last_change: HashMap<FourTuple, Instant>,
    /// The parameters classes had before the last poll's updates (restored if an update fails).
    replaced_classes: BTreeMap<ClassKey, ClassSpec>,
    refusals_by_class: BTreeMap<String, u64>,
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
            tuple_tokens: HashMap::new(),
            interface_by_index: BTreeMap::new(),
            interface_by_address: BTreeMap::new(),
            installed: DesiredState::default(),
            installed_by_token: BTreeMap::new(),
            subscribers: Subscribers::default(),
            waiting: BTreeMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            last_change: HashMap::new(),
            replaced_classes: BTreeMap::new(),
            refusals_by_class: BTreeMap::new(),
            stats: ThrottleStats::default(),
        }
    }

    /// The policy in force.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Replaces the policy (a reload): the next poll moves the kernel to the new one, changing classes
    /// in place and keeping the rules the new policy keeps. The one entry point for "replace the
    /// policy"; the caller checks first that the new policy is valid and keeps what only a restart can
    /// change (table, qdisc major, IFB prefix, event source).
    pub fn set_config(&mut self, config: ThrottleConfig) {
        let mut fresh = Self::new(config);
        fresh.connections = std::mem::take(&mut self.connections);
        fresh.tuple_tokens = std::mem::take(&mut self.tuple_tokens);
        fresh.interface_by_index = std::mem::take(&mut self.interface_by_index);
        fresh.interface_by_address = std::mem::take(&mut self.interface_by_address);
        fresh.installed = std::mem::take(&mut self.installed);
        fresh.installed_by_token = std::mem::take(&mut self.installed_by_token);
        fresh.subscribers = std::mem::take(&mut self.subscribers);
        fresh.last_change = std::mem::take(&mut self.last_change);
        fresh.replaced_classes = std::mem::take(&mut self.replaced_classes);
        fresh.refusals_by_class = std::mem::take(&mut self.refusals_by_class);
        fresh.stats = self.stats;
        *self = fresh;
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

    /// The class id assigned to a policy class (for `scope = "client"`, its parent class).
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.class_ids.get(name).copied()
    }

    /// Event counters.
    pub fn stats(&self) -> ThrottleStats {
        self.stats
    }

    /// Subscribers' classes allocated now, per `scope = "client"` policy class (both directions).
    pub fn client_class_counts(&self) -> BTreeMap<String, usize> {
        self.subscribers.counts()
    }

    /// Subflow placements refused per policy class because its `max_clients` (or the qdisc's class
    /// ids) ran out, since start.
    pub fn refusals_by_class(&self) -> &BTreeMap<String, u64> {
        &self.refusals_by_class
    }

    /// Connections with a subflow a limit left unsteered now.
    pub fn waiting_connections(&self) -> usize {
        self.waiting.len()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Number of live subflows.
    pub fn live_subflow_count(&self) -> usize {
        self.tuple_tokens.len()
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

    fn insert_subflow(&mut self, token: ConnectionToken, subflow: Subflow) {
        let tuple = subflow.info.tuple;
        if let Some(old) = self.tuple_tokens.insert(tuple, token) {
            if old != token {
                // The kernel reused the addresses for a new connection: the old one lost its subflow.
                if let Some(connection) = self.connections.get_mut(&old) {
                    connection.subflows.remove(&tuple);
                    self.dirty.insert(old);
                }
            }
        }
        self.connections
            .entry(token)
            .or_default()
            .subflows
            .insert(tuple, subflow);
    }

    fn remove_subflow(&mut self, token: ConnectionToken, tuple: &FourTuple) -> bool {
        let removed = self
            .connections
            .get_mut(&token)
            .and_then(|c| c.subflows.remove(tuple))
            .is_some();
        if removed && self.tuple_tokens.get(tuple) == Some(&token) {
            self.tuple_tokens.remove(tuple);
        }
        self.last_change.remove(tuple);
        removed
    }

    fn remove_connection(&mut self, token: ConnectionToken) -> Option<Connection> {
        let connection = self.connections.remove(&token)?;
        for tuple in connection.subflows.keys() {
            if self.tuple_tokens.get(tuple) == Some(&token) {
                self.tuple_tokens.remove(tuple);
            }
            self.last_change.remove(tuple);
        }
        Some(connection)
    }

    fn touch_all(&mut self, token: ConnectionToken, now: Instant) {
        if let Some(connection) = self.connections.get(&token) {
            for tuple in connection.subflows.keys() {
                self.last_change.insert(*tuple, now);
            }
        }
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
            SubflowEvent::DestinationAttached { .. } | SubflowEvent::EventsLost => {}
        }
        match event {
            SubflowEvent::ConnectionCreated { token, subflow }
            | SubflowEvent::ConnectionEstablished { token, subflow } => {
                let tuple = subflow.tuple;
                let known = self
                    .connections
                    .get_mut(&token)
                    .and_then(|c| c.subflows.get_mut(&tuple));
                match known {
                    Some(known) => merge_info(&mut known.info, subflow),
                    None => self.insert_subflow(
                        token,
                        Subflow {
                            info: subflow,
                            role: SubflowRole::Initial,
                        },
                    ),
                }
                self.last_change.insert(tuple, now);
            }
            SubflowEvent::ConnectionClosed { token } => {
                if self.remove_connection(token).is_none() {
                    self.stats.unknown_connection_events += 1;
                }
            }
            SubflowEvent::SubflowEstablished { token, subflow } => {
                // A join can be reported before the creation event was seen
                // (listener started late): track the connection anyway.
                self.insert_subflow(
                    token,
                    Subflow {
                        info: subflow,
                        role: SubflowRole::Joined,
                    },
                );
                self.touch_all(token, now);
            }
            SubflowEvent::SubflowClosed { token, subflow } => {
                if self.connections.contains_key(&token) {
                    self.remove_subflow(token, &subflow.tuple);
                    self.touch_all(token, now);
                } else {
                    self.stats.unknown_connection_events += 1;
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
                    ConnectionSelector::Tuple(tuple) => self.tuple_tokens.get(&tuple).copied(),
                };
                match token.and_then(|t| self.connections.get_mut(&t).map(|c| (t, c))) {
                    Some((token, connection)) => {
                        connection.destination = Some(destination);
                        self.dirty.insert(token);
                        self.touch_all(token, now);
                    }
                    None => self.stats.unknown_connection_events += 1,
                }
            }
            // The driver answers with a resync; nothing to change here.
            SubflowEvent::EventsLost => {}
        }
    }

    /// Replaces the live connection table with a snapshot of the kernel's subflows (after lost events,
    /// at start, and periodically): connections the kernel no longer has are closed, those it has are
    /// opened or corrected. Destinations and announced addresses of connections that stay are kept, and
    /// so is what was known of a subflow's interface. The next poll installs and removes accordingly.
    pub fn resync(
        &mut self,
        // Kept for the sans-IO signature: a repair is not timed from an event (see below).
        _now: Instant,
        live: impl IntoIterator<Item = LiveSubflow>,
    ) -> ResyncReport {
        self.stats.resyncs += 1;
        let mut snapshot: BTreeMap<ConnectionToken, BTreeMap<FourTuple, Subflow>> = BTreeMap::new();
        for entry in live {
            snapshot.entry(entry.token).or_default().insert(
                entry.subflow.tuple,
                Subflow {
                    info: entry.subflow,
                    role: entry.role,
                },
            );
        }
        let mut report = ResyncReport::default();
        let gone: Vec<ConnectionToken> = self
            .connections
            .keys()
            .filter(|token| !snapshot.contains_key(token))
            .copied()
            .collect();
        for token in gone {
            self.remove_connection(token);
            self.dirty.insert(token);
            report.connections_removed += 1;
        }
        for (token, subflows) in snapshot {
            let known: BTreeSet<FourTuple> = match self.connections.get(&token) {
                Some(connection) => connection.subflows.keys().copied().collect(),
                None => {
                    report.connections_added += 1;
                    BTreeSet::new()
                }
            };
            let existed = !known.is_empty() || self.connections.contains_key(&token);
            let mut changed = !existed;
            for tuple in known.iter().filter(|t| !subflows.contains_key(t)) {
                self.remove_subflow(token, tuple);
                report.subflows_removed += 1;
                changed = true;
            }
            for (tuple, subflow) in subflows {
                match self
                    .connections
                    .get_mut(&token)
                    .and_then(|c| c.subflows.get_mut(&tuple))
                {
                    Some(current) => {
                        if current.role != subflow.role
                            || current.info.backup != subflow.info.backup
                        {
                            changed = true;
                        }
                        current.role = subflow.role;
                        // Keeps what was known of the interface unless the snapshot names one.
                        merge_info(&mut current.info, subflow.info);
                    }
                    None => {
                        if existed {
                            report.subflows_added += 1;
                        }
                        self.insert_subflow(token, subflow);
                        changed = true;
                    }
                }
            }
            if changed {
                self.dirty.insert(token);
                // Rules a repair installs answer no event: they stay out of the event-to-install
                // latency (the resync's own duration is measured instead).
                if let Some(connection) = self.connections.get(&token) {
                    for tuple in connection.subflows.keys() {
                        self.last_change.remove(tuple);
                    }
                }
            }
        }
        report
    }

    /// The live subflows whose event or snapshot named no interface (neither name nor index), for the
    /// driver to look their route up before a poll (a subflow's local address may name the wrong one).
    pub fn subflows_without_interface(&self) -> Vec<FourTuple> {
        self.connections
            .values()
            .flat_map(|c| c.subflows.values())
            .filter(|s| {
                s.info.interface.name.is_none() && s.info.interface.index.is_none_or(|i| i == 0)
            })
            .map(|s| s.info.tuple)
            .collect()
    }

    /// Records the interface index a live subflow leaves by (from a route lookup).
    pub fn set_subflow_interface(&mut self, tuple: &FourTuple, index: u32) {
        let Some(token) = self.tuple_tokens.get(tuple).copied() else {
            return;
        };
        if let Some(subflow) = self
            .connections
            .get_mut(&token)
            .and_then(|c| c.subflows.get_mut(tuple))
        {
            if subflow.info.interface.index != Some(index) {
                subflow.info.interface.index = Some(index);
                self.dirty.insert(token);
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

    fn class_config(&self, name: &str) -> Option<&ClassConfig> {
        self.config.classes.iter().find(|c| c.name == name)
    }

    /// What a full poll would leave installed now, given the subscribers' classes allocated so far.
    pub fn desired_state(&self) -> DesiredState {
        let mut probe = self.clone();
        probe.all_dirty = true;
        let _ = probe.poll_changes();
        probe.installed
    }

    fn desired_infrastructure(&self) -> (BTreeSet<InterfaceSetup>, BTreeMap<ClassKey, ClassSpec>) {
        let mut interfaces = BTreeSet::new();
        let mut classes = BTreeMap::new();
        if !self.config.enabled {
            return (interfaces, classes);
        }
        for class in &self.config.classes {
            let id = self.class_ids[&class.name];
            for &direction in class.direction.directions() {
                interfaces.insert(InterfaceSetup {
                    interface: class.interface.clone(),
                    direction,
                    qdisc_major: self.config.qdisc_major,
                });
                let spec = ClassSpec::template(class, direction, id);
                classes.insert(spec.key(), spec);
            }
        }
        (interfaces, classes)
    }

    /// The rules a connection's subflows want; placements of `scope = "client"` classes name their
    /// subscriber and still carry the template's id.
    fn wanted_for_connection(
        &self,
        token: ConnectionToken,
        connection: &Connection,
        rules: &mut BTreeMap<FourTuple, SubflowRule>,
        backups: &mut BTreeMap<FourTuple, BackupRequest>,
    ) {
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
            let (download, upload) = match rule.class.as_deref().and_then(|n| self.class_config(n))
            {
                Some(class) => {
                    let client = (class.scope == ClassScope::Client).then(|| {
                        let ip = tuple.remote.ip().to_canonical();
                        let prefix = match ip {
                            IpAddr::V4(_) => class.client_prefix4,
                            IpAddr::V6(_) => class.client_prefix6,
                        };
                        IpNet::new(ip, prefix)
                            .expect("validated prefix length")
                            .trunc()
                    });
                    let placement = ClassPlacement {
                        name: class.name.clone(),
                        interface: class.interface.clone(),
                        id: self.class_ids[&class.name],
                        client,
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
            let wanted = SubflowRule {
                tuple: *tuple,
                token,
                rule_index,
                rule_name: rule.name.clone(),
                download,
                upload,
                fwmark: rule.fwmark,
                ct_mark: rule.ct_mark,
            };
            if !wanted.is_empty() {
                rules.insert(*tuple, wanted);
            }
            if rule.set_backup {
                backups.insert(
                    *tuple,
                    BackupRequest {
                        token,
                        tuple: *tuple,
                        local_id: subflow.info.local_id,
                    },
                );
            }
        }
    }

    fn acquire(&mut self, rule: &SubflowRule) {
        for (direction, placement) in rule.placements() {
            if let Some(key) = subscriber_key(direction, placement) {
                self.subscribers.acquire(&key, placement.id);
            }
        }
    }

    fn release(&mut self, rule: &SubflowRule) {
        for (direction, placement) in rule.placements() {
            if let Some(key) = subscriber_key(direction, placement) {
                self.subscribers.release(&key, placement.id);
            }
        }
    }

    /// Diffs desired against installed state for the connections touched since the last poll (all of
    /// them after a policy or interface change, or a failed class or interface change), records the
    /// result as installed, and returns the changes to apply, in order.
    pub fn poll_changes(&mut self) -> Vec<Change> {
        let mut out = Changes::default();
        self.replaced_classes.clear();
        let full = std::mem::take(&mut self.all_dirty);
        let mut tokens = std::mem::take(&mut self.dirty);
        let infrastructure = full.then(|| {
            tokens.extend(self.connections.keys().copied());
            tokens.extend(self.installed_by_token.keys().copied());
            tokens.extend(std::mem::take(&mut self.waiting).into_keys());
            self.desired_infrastructure()
        });
        // Subflows a limit left unsteered try again as soon as there is room under that limit, and
        // again after a round that freed some.
        for _ in 0..8 {
            tokens.extend(self.waiting_with_room());
            if tokens.is_empty() {
                break;
            }
            self.recompute(&tokens, &mut out, !full);
            tokens.clear();
        }
        // Classes are freed once no round wants them, so a subscriber between two subflows keeps its
        // class.
        self.free_idle_classes(&mut out, !full);
        if let Some((interfaces, classes)) = infrastructure {
            self.diff_infrastructure(interfaces, classes, &mut out);
        }
        out.into_vec()
    }

    /// Takes the waiting connections that one of their limits now has room for.
    fn waiting_with_room(&mut self) -> Vec<ConnectionToken> {
        let subflow_room = self.installed.rules.len() < self.config.max_steered_subflows as usize;
        let ready: Vec<ConnectionToken> = self
            .waiting
            .iter()
            .filter(|(_, waits)| {
                waits.iter().any(|wait| match wait {
                    Wait::Subflows => subflow_room,
                    Wait::Class(key) => self
                        .class_config(&key.template)
                        .is_some_and(|class| self.subscribers.has_room(key, class.max_clients)),
                })
            })
            .map(|(token, _)| *token)
            .collect();
        for token in &ready {
            self.waiting.remove(token);
        }
        ready
    }

    fn free_idle_classes(&mut self, out: &mut Changes, emit_classes: bool) {
        for (key, id) in self.subscribers.free_idle() {
            if emit_classes {
                if let Some(spec) =
                    self.installed
                        .classes
                        .remove(&(key.interface.clone(), key.direction, id))
                {
                    out.remove_classes.push(spec);
                }
            }
        }
    }

    fn wait(&mut self, token: ConnectionToken, wait: Wait) {
        self.waiting.entry(token).or_default().insert(wait);
    }

    /// Recomputes the rules of `tokens`' connections. With `emit_classes`, subscriber classes allocated
    /// or freed are changes of their own; otherwise the caller diffs every class afterwards.
    fn recompute(
        &mut self,
        tokens: &BTreeSet<ConnectionToken>,
        out: &mut Changes,
        emit_classes: bool,
    ) {
        let mut before_rules = BTreeMap::new();
        let mut before_backups = BTreeMap::new();
        for token in tokens {
            self.waiting.remove(token);
            for tuple in self.installed_by_token.remove(token).unwrap_or_default() {
                if let Some(rule) = self.installed.rules.remove(&tuple) {
                    self.release(&rule);
                    before_rules.insert(tuple, rule);
                }
                if let Some(request) = self.installed.backups.remove(&tuple) {
                    before_backups.insert(tuple, request);
                }
            }
        }
        let mut wanted = BTreeMap::new();
        let mut after_backups = BTreeMap::new();
        if self.config.enabled {
            for token in tokens {
                if let Some(connection) = self.connections.get(token) {
                    self.wanted_for_connection(*token, connection, &mut wanted, &mut after_backups);
                }
            }
        }

        // max_steered_subflows: subflows steered already keep their place, new ones take what is left.
        let mut room =
            (self.config.max_steered_subflows as usize).saturating_sub(self.installed.rules.len());
        let (old, new): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .partition(|(tuple, _)| before_rules.contains_key(tuple));
        let mut after_rules = BTreeMap::new();
        for (tuple, rule) in old.into_iter().chain(new) {
            if room == 0 {
                self.stats.refused_subflow_limit += 1;
                self.wait(rule.token, Wait::Subflows);
                continue;
            }
            room -= 1;
            after_rules.insert(tuple, rule);
        }

        // Subscribers' classes: those in use are kept, idle ones freed, missing ones allocated.
        let mut pending = Vec::new();
        for (tuple, rule) in after_rules.iter_mut() {
            for (direction, slot) in [
                (Direction::Download, &mut rule.download),
                (Direction::Upload, &mut rule.upload),
            ] {
                let Some(placement) = slot.as_mut() else {
                    continue;
                };
                let Some(key) = subscriber_key(direction, placement) else {
                    continue;
                };
                match self.subscribers.get(&key) {
                    Some(id) => {
                        placement.id = id;
                        self.subscribers.acquire(&key, id);
                    }
                    None => pending.push((*tuple, direction, key)),
                }
            }
        }
        for (tuple, direction, key) in pending {
            let Some(class) = self.class_config(&key.template).cloned() else {
                continue;
            };
            let parent = self.class_ids[&key.template];
            let existed = self.subscribers.get(&key).is_some();
            let rule = after_rules.get_mut(&tuple).expect("pending rules are kept");
            let slot = match direction {
                Direction::Download => &mut rule.download,
                Direction::Upload => &mut rule.upload,
            };
            let mut allocated =
                self.subscribers
                    .allocate(&key, self.config.qdisc_major, class.max_clients);
            if allocated.is_err() && self.subscribers.has_idle() {
                // Classes nobody uses any more make room.
                self.free_idle_classes(out, emit_classes);
                allocated =
                    self.subscribers
                        .allocate(&key, self.config.qdisc_major, class.max_clients);
            }
            match allocated {
                Ok(id) => {
                    if !existed && emit_classes {
                        let spec = ClassSpec::subscriber(&class, &key, parent, id);
                        self.installed.classes.insert(spec.key(), spec.clone());
                        out.add_classes.push(spec);
                    }
                    if let Some(placement) = slot.as_mut() {
                        placement.id = id;
                    }
                    self.subscribers.acquire(&key, id);
                }
                Err(Exhausted::Template(_) | Exhausted::Qdisc) => {
                    *slot = None;
                    let token = rule.token;
                    self.stats.refused_class_limit += 1;
                    *self
                        .refusals_by_class
                        .entry(key.template.clone())
                        .or_default() += 1;
                    self.wait(token, Wait::Class(key));
                }
            }
        }
        after_rules.retain(|_, rule| !rule.is_empty());

        for (tuple, rule) in &before_rules {
            if after_rules.get(tuple) != Some(rule) {
                out.remove_rules.push(Change::RemoveRule(rule.clone()));
            }
        }
        for (tuple, request) in &before_backups {
            if !after_backups.contains_key(tuple) {
                out.clear_backups.push(Change::ClearBackup(request.clone()));
            }
        }
        for (tuple, rule) in &after_rules {
            if before_rules.get(tuple) != Some(rule) {
                out.add_rules.push(Change::AddRule {
                    rule: rule.clone(),
                    triggered_at: self.last_change.get(tuple).copied(),
                });
            }
        }
        for (tuple, request) in &after_backups {
            if !before_backups.contains_key(tuple) {
                out.set_backups.push(Change::SetBackup(request.clone()));
            }
        }
        for (tuple, rule) in after_rules {
            self.index_installed(rule.token, tuple);
            self.installed.rules.insert(tuple, rule);
        }
        for (tuple, request) in after_backups {
            self.index_installed(request.token, tuple);
            self.installed.backups.insert(tuple, request);
        }
    }

    /// Diffs interfaces and every class (policy classes and subscribers') against what is installed.
    fn diff_infrastructure(
        &mut self,
        interfaces: BTreeSet<InterfaceSetup>,
        mut classes: BTreeMap<ClassKey, ClassSpec>,
        out: &mut Changes,
    ) {
        for (key, id) in self.subscribers.iter() {
            let Some(class) = self.class_config(&key.template) else {
                continue;
            };
            let spec = ClassSpec::subscriber(class, key, self.class_ids[&key.template], id);
            classes.insert(spec.key(), spec);
        }
        let setup = |spec: &ClassSpec| InterfaceSetup {
            interface: spec.interface.clone(),
            direction: spec.direction,
            qdisc_major: spec.id.major,
        };
        let installed = &mut self.installed;
        for (key, spec) in std::mem::take(&mut installed.classes) {
            let interface_goes = !interfaces.contains(&setup(&spec));
            let keep = match classes.get(&key) {
                Some(wanted) => wanted.parent == spec.parent,
                None => false,
            };
            if keep {
                installed.classes.insert(key, spec);
            } else if !interface_goes {
                out.remove_classes.push(spec);
            }
        }
        for setup in std::mem::take(&mut installed.interfaces) {
            if interfaces.contains(&setup) {
                installed.interfaces.insert(setup);
            } else {
                out.remove_interfaces.push(Change::RemoveInterface(setup));
            }
        }
        for setup in interfaces {
            if !installed.interfaces.contains(&setup) {
                out.add_interfaces.push(Change::AddInterface(setup.clone()));
                // A new qdisc has no classes, whatever was believed.
                installed.classes.retain(|_, spec| {
                    !(spec.interface == setup.interface && spec.direction == setup.direction)
                });
                installed.interfaces.insert(setup);
            }
        }
        for (key, spec) in classes {
            match installed.classes.get(&key) {
                Some(old) if *old == spec => {}
                Some(_) => {
                    out.update_classes.push(Change::UpdateClass(spec.clone()));
                    if let Some(old) = installed.classes.insert(key.clone(), spec) {
                        self.replaced_classes.insert(key, old);
                    }
                }
                None => {
                    out.add_classes.push(spec.clone());
                    installed.classes.insert(key, spec);
                }
            }
        }
    }

    fn index_installed(&mut self, token: ConnectionToken, tuple: FourTuple) {
        self.installed_by_token
            .entry(token)
            .or_default()
            .insert(tuple);
    }

    fn unindex_installed(&mut self, token: ConnectionToken, tuple: &FourTuple) {
        let keep =
            self.installed.rules.contains_key(tuple) || self.installed.backups.contains_key(tuple);
        if !keep {
            if let Some(set) = self.installed_by_token.get_mut(&token) {
                set.remove(tuple);
                if set.is_empty() {
                    self.installed_by_token.remove(&token);
                }
            }
        }
    }

    /// Records that `change` could not be applied, so that the installed
    /// state matches the kernel again and the next poll retries.
    pub fn change_failed(&mut self, change: &Change) {
        match change {
            Change::AddRule { rule, .. } => {
                if self.installed.rules.get(&rule.tuple) == Some(rule) {
                    self.installed.rules.remove(&rule.tuple);
                    self.release(rule);
                }
                self.unindex_installed(rule.token, &rule.tuple);
                self.dirty.insert(rule.token);
            }
            Change::RemoveRule(rule) => {
                // The kernel still has it. A replacement recorded as installed did not go in either
                // (both are one nft batch): report its AddRule failure too, which then leaves this one.
                if let Some(replaced) = self.installed.rules.insert(rule.tuple, rule.clone()) {
                    self.release(&replaced);
                }
                self.acquire(rule);
                self.index_installed(rule.token, rule.tuple);
                self.dirty.insert(rule.token);
            }
            Change::SetBackup(request) => {
                self.installed.backups.remove(&request.tuple);
                self.unindex_installed(request.token, &request.tuple);
                self.dirty.insert(request.token);
            }
            Change::ClearBackup(request) => {
                self.dirty.insert(request.token);
            }
            Change::AddClass(spec) => {
                self.installed.classes.remove(&spec.key());
                self.all_dirty = true;
            }
            Change::UpdateClass(spec) => {
                // Still there, with its old parameters: updated again by the next poll.
                match self.replaced_classes.remove(&spec.key()) {
                    Some(old) => self.installed.classes.insert(spec.key(), old),
                    None => self.installed.classes.remove(&spec.key()),
                };
                self.all_dirty = true;
            }
            Change::RemoveClass(spec) => {
                self.installed.classes.insert(spec.key(), spec.clone());
                self.all_dirty = true;
            }
            Change::AddInterface(setup) => {
                self.installed.interfaces.remove(setup);
                self.installed.classes.retain(|(iface, dir, _), _| {
                    !(iface == &setup.interface && *dir == setup.direction)
                });
                self.all_dirty = true;
            }
            Change::RemoveInterface(setup) => {
                self.installed.interfaces.insert(setup.clone());
                self.all_dirty = true;
            }
        }
    }

    /// Forgets everything installed (after the kernel state was torn down).
    pub fn forget_installed(&mut self) {
        self.installed = DesiredState::default();
        self.installed_by_token.clear();
        self.subscribers.clear();
        self.replaced_classes.clear();
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
