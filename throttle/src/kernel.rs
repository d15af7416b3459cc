//! Applies [`Change`]s to the kernel: tc over rtnetlink, nftables over
//! nfnetlink, MP_PRIO over the `mptcp_pm` generic netlink family.
//!
//! Everything here is blocking (netlink requests answered within
//! microseconds); [`crate::driver::run`] calls it from its owner task.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Direction, ThrottleConfig};
use crate::core::{Change, ClassSpec, InterfaceSetup, SubflowRule};
use crate::event::FourTuple;
use crate::nft::{self, RuleChain};
use crate::tc::{self, PschedClock};
use mptcp_netlink::mptcp_pm;
use mptcp_netlink::{MessageBuilder, NetlinkError, NetlinkSocket};

/// Why a kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The process lacks `CAP_NET_ADMIN` in its network namespace.
    #[error("CAP_NET_ADMIN is required to install qdiscs and nftables rules (run as root, or set on_missing_privileges = \"run_unthrottled\")")]
    MissingPrivileges,
    /// An interface named by the policy does not exist.
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
    /// A netlink socket could not be opened.
    #[error("opening netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A tc, link or genl request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// An nftables batch failed.
    #[error("nftables batch ({operation}): {source}{}", message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Nftables {
        /// What the batch did.
        operation: String,
        /// The errno of the first failing message.
        source: std::io::Error,
        /// Extended ack message.
        message: Option<String>,
    },
    /// The operation is not possible here (e.g. mixed address families).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Whether the calling thread has `CAP_NET_ADMIN` (bit 12 of `CapEff`).
pub fn has_net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"))
        .unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Resolves an interface name in the calling thread's network namespace.
pub fn interface_index(name: &str) -> Result<u32, KernelError> {
    let c_name = CString::new(name).map_err(|_| KernelError::UnknownInterface(name.to_owned()))?;
    // SAFETY: c_name is a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(KernelError::UnknownInterface(name.to_owned()));
    }
    Ok(index)
}

fn ignore_missing(
    result: Result<Vec<mptcp_netlink::Message>, NetlinkError>,
) -> Result<(), NetlinkError> {
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.errno(),
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Interface names by index, and the interface of each local address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceTable {
    /// `(index, name)` of every link.
    pub links: Vec<(u32, String)>,
    /// `(address, interface name)` of every local address.
    pub addresses: Vec<(IpAddr, String)>,
}

/// `RTM_GETROUTE` and the attributes used (linux/rtnetlink.h).
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Route lookup over an open `NETLINK_ROUTE` socket; see [`KernelBackend::route_interface`].
pub fn route_interface_with(
    route: &mut NetlinkSocket,
    local: IpAddr,
    remote: IpAddr,
) -> Result<Option<u32>, mptcp_netlink::NetlinkError> {
    let (local, remote) = (local.to_canonical(), remote.to_canonical());
    let (family, bits) = match remote {
        IpAddr::V4(_) => (libc::AF_INET as u8, 32u8),
        IpAddr::V6(_) => (libc::AF_INET6 as u8, 128u8),
    };
    let same_family = local.is_ipv4() == remote.is_ipv4();
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    let header = [
        family,
        bits,
        if same_family { bits } else { 0 },
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let mut request = MessageBuilder::new(RTM_GETROUTE, 0)
        .header(&header)
        .attr(RTA_DST, &ip_octets(remote));
    if same_family {
        request = request.attr(RTA_SRC, &ip_octets(local));
    }
    let replies = route.request(request, "route lookup")?;
    Ok(replies.iter().find_map(|reply| {
        mptcp_netlink::parse_attrs(reply.payload.get(12..)?)
            .into_iter()
            .find(|(kind, _)| *kind == RTA_OIF)
            .and_then(|(_, value)| mptcp_netlink::attr_u32(value))
    }))
}

/// The interface the kernel routes `remote` through from `local`, by name (opens its own socket).
pub fn route_interface_name(local: IpAddr, remote: IpAddr) -> Option<String> {
    let mut route = NetlinkSocket::open(libc::NETLINK_ROUTE).ok()?;
    let index = route_interface_with(&mut route, local, remote).ok()??;
    let links = route.dump(tc::dump_links(), "dump links").ok()?;
    links
        .iter()
        .filter_map(|m| tc::parse_link(&m.payload))
        .find(|(i, _)| *i == index)
        .map(|(_, name)| name)
}

/// What a start-up sweep found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleReport {
    /// Root HTB qdiscs with our major, by interface index.
    pub root_qdiscs: Vec<u32>,
    /// IFB devices named with our prefix.
    pub ifb_devices: Vec<String>,
    /// Ingress redirect filters to those devices, by interface index.
    pub ingress_redirects: Vec<u32>,
}

#[derive(Debug, Clone)]
struct UploadPath {
    interface_index: u32,
    ifb_index: u32,
    created_ingress: bool,
}

#[derive(Debug, Clone, Copy)]
struct UploadFilter {
    ifb_index: u32,
    prio: u16,
    protocol: u16,
    major: u16,
}

/// The kernel side of the throttle in the current network namespace.
#[derive(Debug)]
pub struct KernelBackend {
    route: NetlinkSocket,
    nft: NetlinkSocket,
    genl: Option<(NetlinkSocket, u16)>,
    clock: PschedClock,
    table: String,
    qdisc_major: u16,
    ifb_prefix: String,
    uploads: BTreeMap<String, UploadPath>,
    nft_handles: BTreeMap<FourTuple, Vec<(RuleChain, u64)>>,
    upload_filters: BTreeMap<FourTuple, UploadFilter>,
    used_prios: BTreeMap<u32, BTreeSet<u16>>,
}

/// Filter priority of the ingress redirect; also marks it as ours.
fn redirect_prio(major: u16) -> u16 {
    major
}

impl KernelBackend {
    /// Opens the netlink sockets. Fails with [`KernelError::MissingPrivileges`]
    /// without `CAP_NET_ADMIN`.
    pub fn open(config: &ThrottleConfig) -> Result<Self, KernelError> {
        if !has_net_admin() {
            return Err(KernelError::MissingPrivileges);
        }
        let route = NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(KernelError::Socket)?;
        let nft = NetlinkSocket::open(libc::NETLINK_NETFILTER).map_err(KernelError::Socket)?;
        // A failing batch must not hang the owner task.
        nft.set_recv_timeout(Duration::from_secs(5))
            .map_err(KernelError::Socket)?;
        route
            .set_recv_timeout(Duration::from_secs(5))
            .map_err(KernelError::Socket)?;
        Ok(Self {
            route,
            nft,
            genl: None,
            clock: PschedClock::read(),
            table: config.nft_table.clone(),
            qdisc_major: config.qdisc_major,
            ifb_prefix: config.ifb_prefix.clone(),
            uploads: BTreeMap::new(),
            nft_handles: BTreeMap::new(),
            upload_filters: BTreeMap::new(),
            used_prios: BTreeMap::new(),
        })
    }

    /// Removes what an earlier run may have left (see [`StaleReport`]) and
    /// creates the nftables table empty. Safe to call repeatedly.
    pub fn start(&mut self) -> Result<StaleReport, KernelError> {
        let report = self.sweep()?;
        self.send_nft(nft::reset_table_batch(&self.table), "reset table")?;
        self.uploads.clear();
        self.nft_handles.clear();
        self.upload_filters.clear();
        self.used_prios.clear();
        Ok(report)
    }

    /// Removes everything this backend (or an earlier run with the same
    /// policy names) installed: the nftables table, root HTB qdiscs with our
    /// major, IFB devices with our prefix and the ingress redirects to them.
    pub fn shutdown(&mut self) -> Result<StaleReport, KernelError> {
        let report = self.sweep()?;
        self.send_nft(nft::delete_table_batch(&self.table), "delete table")?;
        self.uploads.clear();
        self.nft_handles.clear();
        self.upload_filters.clear();
        self.used_prios.clear();
        Ok(report)
    }

    fn links(&mut self) -> Result<Vec<(u32, String)>, KernelError> {
        let replies = self.route.dump(tc::dump_links(), "dump links")?;
        Ok(replies
            .iter()
            .filter_map(|m| tc::parse_link(&m.payload))
            .collect())
    }

    /// Interface names by index and by local address, for
    /// [`crate::ThrottleState::set_interface_name`] / `set_interface_address`.
    /// The index of the interface the kernel routes `remote` through from `local`, like
    /// `ip route get REMOTE from LOCAL`: the path a subflow's download leaves by. A joined subflow
    /// usually targets the address the client first connected to, so its local address names the
    /// wrong interface; the route names the right one.
    pub fn route_interface(
        &mut self,
        local: IpAddr,
        remote: IpAddr,
    ) -> Result<Option<u32>, KernelError> {
        Ok(route_interface_with(&mut self.route, local, remote)?)
    }

    /// Every link and local address.
    pub fn interfaces(&mut self) -> Result<InterfaceTable, KernelError> {
        let links = self.links()?;
        let replies = self.route.dump(tc::dump_addresses(), "dump addresses")?;
        let by_index: BTreeMap<u32, String> = links.iter().cloned().collect();
        let addresses = replies
            .iter()
            .filter_map(|m| tc::parse_address(&m.payload))
            .filter_map(|(index, addr)| by_index.get(&index).map(|name| (addr, name.clone())))
            .collect();
        Ok(InterfaceTable { links, addresses })
    }

    fn sweep(&mut self) -> Result<StaleReport, KernelError> {
        let mut report = StaleReport::default();
        for (index, name) in self.links()? {
            let Some(rest) = name.strip_prefix(&self.ifb_prefix) else {
                continue;
            };
            let Ok(parent_index) = rest.parse::<u32>() else {
                continue;
            };
            // Our redirect filter first, so no packet is sent to a device
            // about to disappear.
            let prio = redirect_prio(self.qdisc_major);
            let removed = ignore_missing(self.route.request(
                tc::delete_filters(parent_index, tc::INGRESS_HANDLE, prio, tc::ETH_P_ALL),
                "delete ingress redirect",
            ));
            if removed.is_ok() {
                report.ingress_redirects.push(parent_index);
            }
            let remaining = self
                .route
                .dump(
                    tc::dump_filters(parent_index, tc::INGRESS_HANDLE),
                    "dump ingress filters",
                )
                .map(|v| v.len())
                .unwrap_or(0);
            if remaining == 0 {
                ignore_missing(
                    self.route
                        .request(tc::delete_ingress(parent_index), "delete ingress qdisc"),
                )?;
            }
            ignore_missing(self.route.request(tc::delete_link(index), "delete ifb"))?;
            report.ifb_devices.push(name);
        }
        let qdiscs = self.route.dump(tc::dump_qdiscs(), "dump qdiscs")?;
        for qdisc in qdiscs
            .iter()
            .filter_map(|m| tc::parse_tc_object(&m.payload))
        {
            if qdisc.parent == tc::TC_H_ROOT
                && qdisc.kind == "htb"
                && qdisc.handle >> 16 == u32::from(self.qdisc_major)
            {
                ignore_missing(
                    self.route
                        .request(tc::delete_root(qdisc.ifindex), "delete root qdisc"),
                )?;
                report.root_qdiscs.push(qdisc.ifindex);
            }
        }
        Ok(report)
    }

    fn send_nft(
        &mut self,
        batch: nftnl::Batch,
        operation: &str,
    ) -> Result<Vec<(String, u64, u32)>, KernelError> {
        let (bytes, acked, _) = nft::finalize(batch);
        self.nft.send(&bytes).map_err(KernelError::Socket)?;
        let (others, errors) = self
            .nft
            .collect_batch_replies(&acked)
            .map_err(KernelError::Socket)?;
        if let Some((_, errno, message)) = errors.into_iter().next() {
            return Err(KernelError::Nftables {
                operation: operation.to_owned(),
                source: std::io::Error::from_raw_os_error(-errno),
                message,
            });
        }
        Ok(others
            .iter()
            .filter(|m| m.msg_type == nft::NFT_NEWRULE_MSG_TYPE)
            .filter_map(|m| nft::parse_rule_echo(&m.payload).map(|(c, h)| (c, h, m.seq)))
            .collect())
    }

    fn add_interface(&mut self, setup: &InterfaceSetup) -> Result<(), KernelError> {
        let index = interface_index(&setup.interface)?;
        match setup.direction {
            Direction::Download => {
                self.route
                    .request(tc::htb_root(index, setup.qdisc_major), "add htb root")?;
            }
            Direction::Upload => {
                let ifb_name = format!("{}{}", self.ifb_prefix, index);
                if let Ok(stale) = interface_index(&ifb_name) {
                    ignore_missing(
                        self.route
                            .request(tc::delete_link(stale), "delete stale ifb"),
                    )?;
                }
                self.route
                    .request(tc::create_ifb(&ifb_name), "create ifb")?;
                let ifb_index = interface_index(&ifb_name)?;
                self.route.request(tc::link_up(ifb_index), "set ifb up")?;
                self.route.request(
                    tc::htb_root(ifb_index, setup.qdisc_major),
                    "add ifb htb root",
                )?;
                let created_ingress = match self
                    .route
                    .request(tc::ingress_qdisc(index), "add ingress qdisc")
                {
                    Ok(_) => true,
                    Err(e) if e.errno() == Some(libc::EEXIST) => false,
                    Err(e) => return Err(e.into()),
                };
                self.route.request(
                    tc::redirect_to_ifb(index, redirect_prio(setup.qdisc_major), ifb_index),
                    "add ingress redirect",
                )?;
                self.uploads.insert(
                    setup.interface.clone(),
                    UploadPath {
                        interface_index: index,
                        ifb_index,
                        created_ingress,
                    },
                );
            }
        }
        Ok(())
    }

    fn remove_interface(&mut self, setup: &InterfaceSetup) -> Result<(), KernelError> {
        match setup.direction {
            Direction::Download => {
                let index = interface_index(&setup.interface)?;
                ignore_missing(
                    self.route
                        .request(tc::delete_root(index), "delete htb root"),
                )?;
            }
            Direction::Upload => {
                if let Some(path) = self.uploads.remove(&setup.interface) {
                    ignore_missing(self.route.request(
                        tc::delete_filters(
                            path.interface_index,
                            tc::INGRESS_HANDLE,
                            redirect_prio(setup.qdisc_major),
                            tc::ETH_P_ALL,
                        ),
                        "delete ingress redirect",
                    ))?;
                    if path.created_ingress {
                        ignore_missing(self.route.request(
                            tc::delete_ingress(path.interface_index),
                            "delete ingress qdisc",
                        ))?;
                    }
                    ignore_missing(
                        self.route
                            .request(tc::delete_link(path.ifb_index), "delete ifb"),
                    )?;
                    self.used_prios.remove(&path.ifb_index);
                    self.upload_filters
                        .retain(|_, f| f.ifb_index != path.ifb_index);
                }
            }
        }
        Ok(())
    }

    fn class_device(&self, spec: &ClassSpec) -> Result<u32, KernelError> {
        match spec.direction {
            Direction::Download => interface_index(&spec.interface),
            Direction::Upload => self
                .uploads
                .get(&spec.interface)
                .map(|p| p.ifb_index)
                .ok_or_else(|| {
                    KernelError::UnknownInterface(format!("{} (upload ifb)", spec.interface))
                }),
        }
    }

    fn add_upload_filter(&mut self, rule: &SubflowRule) -> Result<(), KernelError> {
        let Some(class) = &rule.upload else {
            return Ok(());
        };
        let ifb_index = self
            .uploads
            .get(&class.interface)
            .map(|p| p.ifb_index)
            .ok_or_else(|| {
                KernelError::UnknownInterface(format!("{} (upload ifb)", class.interface))
            })?;
        let (protocol, keys) = tc::upload_keys(&rule.tuple).ok_or_else(|| {
            KernelError::Unsupported(format!("mixed address families in {}", rule.tuple))
        })?;
        let used = self.used_prios.entry(ifb_index).or_default();
        let prio = (1..=u16::MAX)
            .find(|p| !used.contains(p))
            .ok_or_else(|| KernelError::Unsupported("no free filter priority on ifb".into()))?;
        self.route.request(
            tc::upload_filter(ifb_index, prio, protocol, &keys, class.id),
            "add upload filter",
        )?;
        used.insert(prio);
        self.upload_filters.insert(
            rule.tuple,
            UploadFilter {
                ifb_index,
                prio,
                protocol,
                major: class.id.major,
            },
        );
        Ok(())
    }

    fn remove_upload_filter(&mut self, tuple: &FourTuple) -> Result<(), KernelError> {
        if let Some(filter) = self.upload_filters.remove(tuple) {
            if let Some(used) = self.used_prios.get_mut(&filter.ifb_index) {
                used.remove(&filter.prio);
            }
            ignore_missing(self.route.request(
                tc::delete_filters(
                    filter.ifb_index,
                    u32::from(filter.major) << 16,
                    filter.prio,
                    filter.protocol,
                ),
                "delete upload filter",
            ))?;
        }
        Ok(())
    }

    fn set_backup(
        &mut self,
        request: &crate::core::BackupRequest,
        backup: bool,
    ) -> Result<(), KernelError> {
        if self.genl.is_none() {
            let mut socket =
                NetlinkSocket::open(libc::NETLINK_GENERIC).map_err(KernelError::Socket)?;
            socket
                .set_recv_timeout(Duration::from_secs(5))
                .map_err(KernelError::Socket)?;
            let family = mptcp_netlink::genl::resolve_family(&mut socket, mptcp_pm::MPTCP_PM_NAME)?;
            self.genl = Some((socket, family.id));
        }
        let (socket, family_id) = self.genl.as_mut().expect("set above");
        socket.request(
            mptcp_pm::set_backup_request(
                *family_id,
                request.token.0,
                request.tuple.local,
                request.local_id,
                request.tuple.remote,
                backup,
            ),
            "mptcp_pm set_flags",
        )?;
        Ok(())
    }

    /// Applies changes in order. tc and path-manager changes are sent one by
    /// one; nftables rule changes go into a single batch sent last (one
    /// transaction: all apply or none). Returns the changes that failed.
    pub fn apply(&mut self, changes: &[Change]) -> Vec<(Change, KernelError)> {
        let mut failed = Vec::new();
        let mut batch = nftnl::Batch::new();
        let mut batch_changes: Vec<Change> = Vec::new();
        let mut pending_adds: Vec<(FourTuple, Vec<RuleChain>)> = Vec::new();
        let mut pending_removes: Vec<(FourTuple, Vec<(RuleChain, u64)>)> = Vec::new();
        for change in changes {
            let result = match change {
                Change::RemoveRule(rule) => {
                    if let Some(handles) = self.nft_handles.remove(&rule.tuple) {
                        for (chain, handle) in &handles {
                            nft::delete_rule(&mut batch, &self.table, *chain, *handle);
                        }
                        pending_removes.push((rule.tuple, handles));
                        batch_changes.push(change.clone());
                    }
                    self.remove_upload_filter(&rule.tuple)
                }
                Change::ClearBackup(request) => self.set_backup(request, false),
                Change::SetBackup(request) => self.set_backup(request, true),
                Change::RemoveClass(spec) => self.class_device(spec).and_then(|dev| {
                    ignore_missing(
                        self.route
                            .request(tc::delete_class(dev, spec.id), "delete class"),
                    )
                    .map_err(KernelError::from)
                }),
                Change::RemoveInterface(setup) => self.remove_interface(setup),
                Change::AddInterface(setup) => self.add_interface(setup),
                Change::AddClass(spec) | Change::UpdateClass(spec) => {
                    self.class_device(spec).and_then(|dev| {
                        self.route
                            .request(tc::htb_class(dev, spec, self.clock), "add class")
                            .map(|_| ())
                            .map_err(KernelError::from)
                    })
                }
                Change::AddRule { rule, .. } => {
                    let chains = nft::add_subflow_rules(&mut batch, &self.table, rule);
                    if !chains.is_empty() {
                        pending_adds.push((rule.tuple, chains));
                        batch_changes.push(change.clone());
                    }
                    self.add_upload_filter(rule)
                }
            };
            if let Err(e) = result {
                failed.push((change.clone(), e));
            }
        }
        if batch_changes.is_empty() {
            return failed;
        }
        match self.send_nft(batch, "subflow rules") {
            Ok(echoes) => {
                // Echoes come in message order; hand them out in the order
                // the rules were added.
                let mut echoes = echoes.into_iter();
                for (tuple, chains) in pending_adds {
                    let mut handles = Vec::new();
                    for chain in chains {
                        if let Some((name, handle, _)) = echoes.next() {
                            debug_assert_eq!(name, chain.name());
                            handles.push((chain, handle));
                        }
                    }
                    self.nft_handles.insert(tuple, handles);
                }
            }
            Err(e) => {
                // The batch is one transaction: nothing was removed either.
                self.nft_handles.extend(pending_removes);
                let message = e.to_string();
                for change in batch_changes {
                    if let Change::AddRule { rule, .. } = &change {
                        let _ = self.remove_upload_filter(&rule.tuple);
                    }
                    failed.push((
                        change,
                        KernelError::Nftables {
                            operation: message.clone(),
                            source: std::io::Error::other("batch aborted"),
                            message: None,
                        },
                    ));
                }
            }
        }
        failed
    }
}
