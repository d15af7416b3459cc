//! Applies [`Change`]s to the kernel: tc over rtnetlink, nftables over
//! nfnetlink, MP_PRIO over the `mptcp_pm` generic netlink family.
//!
//! Everything here is blocking (netlink requests answered within
//! microseconds); [`crate::driver::run`] calls it from its owner task.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Direction, ThrottleConfig};
use crate::core::{Change, ClassSpec, InterfaceSetup, LiveSubflow, SubflowRule};
use crate::event::FourTuple;
use crate::nft::{self, Family, MapKind};
use crate::restore::{self, SavedRoot};
use crate::tc::{self, PschedClock};
use crate::upload::{self, UploadClassifier};
use mptcp_netlink::bpf::BpfError;
use mptcp_netlink::mptcp_pm;
use mptcp_netlink::nft_set::SetSpec;
use mptcp_netlink::sock_diag::{self, tcp_states};
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
    /// The upload classifier (a BPF map and program) could not be set up or changed; uploads need
    /// `CAP_BPF` (or `CAP_SYS_ADMIN`) and cls_bpf.
    #[error("upload classifier: {0}")]
    Bpf(#[from] BpfError),
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
    /// Root qdiscs put back as they were before the throttle (interface and what was rebuilt).
    pub restored_roots: Vec<String>,
}

#[derive(Debug, Clone)]
struct UploadPath {
    interface_index: u32,
    ifb_index: u32,
    created_ingress: bool,
}

/// What the maps hold for one steered subflow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Elements {
    download: Option<u32>,
    fwmark: Option<u32>,
    ct_mark: Option<u32>,
}

impl Elements {
    fn of(rule: &SubflowRule) -> Self {
        Self {
            download: rule.download.as_ref().map(|p| p.id.handle()),
            fwmark: rule.fwmark,
            ct_mark: rule.ct_mark,
        }
    }

    fn get(self, kind: MapKind) -> Option<u32> {
        match kind {
            MapKind::Download => self.download,
            MapKind::Fwmark => self.fwmark,
            MapKind::CtMark => self.ct_mark,
        }
    }

    fn is_empty(self) -> bool {
        self == Self::default()
    }
}

/// Element changes of one apply, per map: deletions go into the batch before additions (a changed
/// subflow is deleted and added again), many elements per message.
#[derive(Debug, Default)]
struct Staged {
    deletes: BTreeMap<(MapKind, Family), Vec<Vec<u8>>>,
    adds: BTreeMap<(MapKind, Family), Vec<Entry>>,
}

/// A map element: key and value.
type Entry = (Vec<u8>, [u8; 4]);

impl Staged {
    fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.adds.is_empty()
    }
}

/// Priority of the cls_bpf upload classifier on an IFB's HTB.
const UPLOAD_FILTER_PRIO: u16 = 1;

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
    max_steered_subflows: u32,
    uploads: BTreeMap<String, UploadPath>,
    /// The nft map elements installed, per subflow.
    elements: BTreeMap<FourTuple, Elements>,
    /// The upload classifier, loaded with the first upload interface.
    classifier: Option<UploadClassifier>,
    /// The upload class of each subflow in the classifier's map.
    upload_classes: BTreeMap<FourTuple, u32>,
    /// `NETLINK_SOCK_DIAG`, opened with the first resync.
    diag: Option<NetlinkSocket>,
    /// The six maps, built once.
    maps: BTreeMap<(MapKind, Family), SetSpec>,
    /// The root qdisc trees replaced, by interface index (see [`crate::restore`]).
    saved_roots: BTreeMap<u32, SavedRoot>,
    /// Where they are kept across a crash.
    state_path: PathBuf,
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
            max_steered_subflows: config.max_steered_subflows,
            uploads: BTreeMap::new(),
            elements: BTreeMap::new(),
            classifier: None,
            upload_classes: BTreeMap::new(),
            diag: None,
            maps: MapKind::ALL
                .into_iter()
                .flat_map(|kind| Family::ALL.map(|family| (kind, family)))
                .map(|(kind, family)| ((kind, family), nft::map(&config.nft_table, kind, family)))
                .collect(),
            saved_roots: BTreeMap::new(),
            state_path: restore::state_file(&config.state_dir, &config.nft_table),
        })
    }

    /// Removes what an earlier run may have left (see [`StaleReport`]) and
    /// creates the nftables table empty. Safe to call repeatedly.
    pub fn start(&mut self) -> Result<StaleReport, KernelError> {
        let report = self.sweep()?;
        self.send_nft(nft::reset_table_batch(&self.table), "reset table")?;
        self.forget();
        Ok(report)
    }

    /// Removes everything this backend (or an earlier run with the same
    /// policy names) installed: the nftables table, root HTB qdiscs with our
    /// major, IFB devices with our prefix and the ingress redirects to them.
    pub fn shutdown(&mut self) -> Result<StaleReport, KernelError> {
        let report = self.sweep()?;
        self.send_nft(nft::delete_table_batch(&self.table), "delete table")?;
        self.forget();
        Ok(report)
    }

    fn forget(&mut self) {
        self.uploads.clear();
        self.elements.clear();
        self.upload_classes.clear();
        // The IFB devices (and their filters) are gone: dropping the classifier frees its map.
        self.classifier = None;
    }

    /// Every MPTCP subflow of the namespace that carries data (TCP `ESTABLISHED` or `CLOSE_WAIT`), from
    /// `sock_diag`: the snapshot a resync gives the core.
    pub fn live_subflows(&mut self) -> Result<Vec<LiveSubflow>, KernelError> {
        if self.diag.is_none() {
            let socket =
                NetlinkSocket::open(libc::NETLINK_SOCK_DIAG).map_err(KernelError::Socket)?;
            socket
                .set_recv_timeout(Duration::from_secs(5))
                .map_err(KernelError::Socket)?;
            self.diag = Some(socket);
        }
        let socket = self.diag.as_mut().expect("opened above");
        let subflows = sock_diag::dump_mptcp_subflows(
            socket,
            tcp_states::ESTABLISHED | tcp_states::CLOSE_WAIT,
        )?;
        Ok(subflows
            .iter()
            .filter_map(crate::pm_events::live_subflow)
            .collect())
    }

    /// How many subflows the nft maps classify now.
    pub fn steered_subflows(&self) -> usize {
        self.elements.len()
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

    /// Writes the saved roots to the state file; a failure only costs the restore after a crash.
    fn persist_saved_roots(&self) {
        let saved: Vec<SavedRoot> = self.saved_roots.values().cloned().collect();
        if let Err(error) = restore::write_state(&self.state_path, &saved) {
            tracing::warn!(%error, path = %self.state_path.display(), "could not write the saved root qdiscs: a restart after a crash cannot restore them");
        }
    }

    fn is_ours(&self, kind: &str, handle: u32) -> bool {
        kind == "htb" && handle >> 16 == u32::from(self.qdisc_major)
    }

    /// Deletes the throttle's root on `ifindex`, rebuilding the tree saved for it if there is one.
    fn remove_root(&mut self, ifindex: u32) -> Result<Option<String>, KernelError> {
        match self.saved_roots.remove(&ifindex) {
            Some(saved) => {
                let problems = restore::restore(&mut self.route, &saved);
                self.persist_saved_roots();
                if !problems.is_empty() {
                    tracing::warn!(interface = %saved.ifname, ?problems, "root qdisc not fully restored; the kernel default is there instead");
                }
                Ok(Some(format!("{} {}", saved.ifname, saved.describe())))
            }
            None => {
                ignore_missing(
                    self.route
                        .request(tc::delete_root(ifindex), "delete htb root"),
                )?;
                Ok(None)
            }
        }
    }

    fn sweep(&mut self) -> Result<StaleReport, KernelError> {
        let mut report = StaleReport::default();
        // What an earlier run saved (after a crash) and what this run saved: this run's are current.
        let links: BTreeMap<u32, String> = self.links()?.into_iter().collect();
        for saved in restore::read_state(&self.state_path) {
            if links.get(&saved.ifindex) == Some(&saved.ifname) {
                self.saved_roots.entry(saved.ifindex).or_insert(saved);
            }
        }
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
            if qdisc.parent == tc::TC_H_ROOT && self.is_ours(&qdisc.kind, qdisc.handle) {
                if let Some(restored) = self.remove_root(qdisc.ifindex)? {
                    report.restored_roots.push(restored);
                }
                report.root_qdiscs.push(qdisc.ifindex);
            }
        }
        // Saved trees whose interface no longer carries our root are stale (someone replaced it).
        self.saved_roots.clear();
        self.persist_saved_roots();
        Ok(report)
    }

    fn send_nft(&mut self, batch: nftnl::Batch, operation: &str) -> Result<(), KernelError> {
        mptcp_netlink::nft::send_batch_on(&self.nft, batch, operation).map_err(|e| match e {
            NetlinkError::Kernel {
                source, message, ..
            } => KernelError::Nftables {
                operation: operation.to_owned(),
                source,
                message,
            },
            NetlinkError::Socket { source, .. } => KernelError::Socket(source),
        })?;
        Ok(())
    }

    /// Stages `tuple`'s change from `before`'s map values to `after`'s.
    fn stage_elements(
        &self,
        staged: &mut Staged,
        tuple: &FourTuple,
        before: Option<Elements>,
        after: Option<Elements>,
    ) -> Result<(), KernelError> {
        let family = Family::of(tuple).ok_or_else(|| {
            KernelError::Unsupported(format!("mixed address families in {tuple}"))
        })?;
        for kind in MapKind::ALL {
            let (old, new) = (
                before.and_then(|e| e.get(kind)),
                after.and_then(|e| e.get(kind)),
            );
            if old.is_none() && new.is_none() {
                continue;
            }
            let key = nft::key(&self.maps[&(kind, family)], tuple);
            if old.is_some() {
                staged
                    .deletes
                    .entry((kind, family))
                    .or_default()
                    .push(key.clone());
            }
            if let Some(value) = new {
                staged
                    .adds
                    .entry((kind, family))
                    .or_default()
                    .push((key, value.to_ne_bytes()));
            }
        }
        Ok(())
    }

    /// The batch of `staged`: every deletion, then every addition.
    fn staged_batch(&self, staged: &Staged) -> nftnl::Batch {
        let mut batch = nftnl::Batch::new();
        for (map, keys) in &staged.deletes {
            self.maps[map].delete_elements(&mut batch, keys.iter().map(Vec::as_slice));
        }
        for (map, entries) in &staged.adds {
            self.maps[map].add_elements(
                &mut batch,
                entries
                    .iter()
                    .map(|(key, data)| (key.as_slice(), Some(&data[..]))),
            );
        }
        batch
    }

    /// Replaces every map's elements with what `self.elements` holds, in one transaction: the repair
    /// after a batch the kernel refused (the maps were changed by someone else, or a state slipped).
    fn rebuild_maps(&mut self) -> Result<(), KernelError> {
        let mut staged = Staged::default();
        for (tuple, elements) in &self.elements {
            let _ = self.stage_elements(&mut staged, tuple, None, Some(*elements));
        }
        let mut batch = nftnl::Batch::new();
        for spec in self.maps.values() {
            spec.flush(&mut batch);
        }
        for (map, entries) in &staged.adds {
            self.maps[map].add_elements(
                &mut batch,
                entries
                    .iter()
                    .map(|(key, data)| (key.as_slice(), Some(&data[..]))),
            );
        }
        self.send_nft(batch, "rebuild subflow maps")
    }

    fn add_interface(&mut self, setup: &InterfaceSetup) -> Result<(), KernelError> {
        let index = interface_index(&setup.interface)?;
        match setup.direction {
            Direction::Download => {
                if !self.saved_roots.contains_key(&index) {
                    let major = u32::from(self.qdisc_major);
                    let saved = restore::capture(
                        &mut self.route,
                        index,
                        &setup.interface,
                        |kind, handle| kind == "htb" && handle >> 16 == major,
                    )?;
                    if let Some(saved) = saved {
                        if saved.classes > 0 {
                            tracing::warn!(interface = %setup.interface, root = %saved.describe(), classes = saved.classes, "the root qdisc being replaced has classes (and maybe filters): only its qdiscs are restored at exit");
                        }
                        tracing::info!(interface = %setup.interface, root = %saved.describe(), "saved the root qdisc; it is restored when the throttle exits");
                        self.saved_roots.insert(index, saved);
                        self.persist_saved_roots();
                    }
                }
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
                if self.classifier.is_none() {
                    self.classifier = Some(UploadClassifier::new(self.max_steered_subflows)?);
                }
                let program = self.classifier.as_ref().expect("loaded above").program_fd();
                self.route.request(
                    tc::bpf_filter(
                        ifb_index,
                        u32::from(setup.qdisc_major) << 16,
                        UPLOAD_FILTER_PRIO,
                        program,
                        upload::BPF_NAME,
                    ),
                    "add upload classifier",
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
                self.remove_root(index)?;
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

    /// Points `tuple`'s upload packets at `classid` (or, with `None`, at no class) in the classifier's
    /// map.
    fn set_upload_class(
        &mut self,
        tuple: &FourTuple,
        classid: Option<u32>,
    ) -> Result<(), KernelError> {
        let current = self.upload_classes.get(tuple).copied();
        if current == classid {
            return Ok(());
        }
        let key = upload::key(tuple).ok_or_else(|| {
            KernelError::Unsupported(format!("mixed address families in {tuple}"))
        })?;
        match classid {
            Some(classid) => {
                let classifier = self.classifier.as_ref().ok_or_else(|| {
                    KernelError::Unsupported("no upload interface for an upload class".into())
                })?;
                classifier.set(&key, classid)?;
                self.upload_classes.insert(*tuple, classid);
            }
            None => {
                if let Some(classifier) = &self.classifier {
                    classifier.remove(&key)?;
                }
                self.upload_classes.remove(tuple);
            }
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

    /// Applies changes in order. tc and path-manager changes are sent one by one; the subflows' map
    /// elements go into a single nftables batch sent last (one transaction: all apply or none; if the
    /// kernel refuses it, the maps are rebuilt from what this backend holds, in one more transaction),
    /// then their upload classes go into the BPF map. Returns the changes that failed.
    pub fn apply(&mut self, changes: &[Change]) -> Vec<(Change, KernelError)> {
        let mut failed = Vec::new();
        let mut batch = Staged::default();
        // Element changes staged in the batch: (change, tuple, before, after), already recorded in
        // `self.elements`, undone if the batch fails for good.
        let mut staged: Vec<(Change, FourTuple, Option<Elements>, Option<Elements>)> = Vec::new();
        // Upload classes to set once the batch is in, for the changes of the batch or without one.
        let mut uploads: Vec<(Change, FourTuple, Option<u32>)> = Vec::new();
        for change in changes {
            let result = match change {
                Change::RemoveRule(rule) => {
                    let before = self.elements.get(&rule.tuple).copied();
                    match self.stage_elements(&mut batch, &rule.tuple, before, None) {
                        Ok(()) => {
                            if before.is_some() {
                                self.elements.remove(&rule.tuple);
                                staged.push((change.clone(), rule.tuple, before, None));
                            }
                            uploads.push((change.clone(), rule.tuple, None));
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Change::AddRule { rule, .. } => {
                    let after = Some(Elements::of(rule)).filter(|e| !e.is_empty());
                    let before = self.elements.get(&rule.tuple).copied();
                    match self.stage_elements(&mut batch, &rule.tuple, before, after) {
                        Ok(()) => {
                            if let Some(after) = after {
                                self.elements.insert(rule.tuple, after);
                                staged.push((change.clone(), rule.tuple, before, Some(after)));
                            }
                            let upload = rule.upload.as_ref().map(|p| p.id.handle());
                            uploads.push((change.clone(), rule.tuple, upload));
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
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
            };
            if let Err(e) = result {
                failed.push((change.clone(), e));
            }
        }
        if !batch.is_empty() {
            let batch = self.staged_batch(&batch);
            if let Err(error) = self.send_nft(batch, "subflow map elements") {
                tracing::warn!(%error, subflows = self.elements.len(), "nftables refused a batch; rebuilding the maps");
                if let Err(rebuild) = self.rebuild_maps() {
                    // Nothing of the batch applied: undo it here too, and report each change.
                    for (_, tuple, before, _) in staged.iter().rev() {
                        match before {
                            Some(before) => self.elements.insert(*tuple, *before),
                            None => self.elements.remove(tuple),
                        };
                    }
                    let message = format!("{error}; rebuilding the maps: {rebuild}");
                    for (change, ..) in &staged {
                        failed.push((
                            change.clone(),
                            KernelError::Nftables {
                                operation: message.clone(),
                                source: std::io::Error::other("batch aborted"),
                                message: None,
                            },
                        ));
                    }
                    uploads.retain(|(change, ..)| !staged.iter().any(|(c, ..)| c == change));
                }
            }
        }
        for (change, tuple, classid) in uploads {
            if let Err(e) = self.set_upload_class(&tuple, classid) {
                failed.push((change, e));
            }
        }
        failed
    }
}
