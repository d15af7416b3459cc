//! The system calls of cluster mode: the C-flag sysctl, the `signal` endpoint and service addresses
//! (through `mptcp-netlink`), the state file, the announcement device (a TUN device that lives
//! exactly as long as its descriptor), and the drain's SYN gate (an nftables table).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use mptcp_netlink::mptcp_pm::{flags, PathManager, PmAddress};
use mptcp_netlink::rtnl;

use super::state::{Observed, SavedState, StartPlan, Teardown};
use super::ClusterError;

/// The sysctl behind the MP_CAPABLE C flag ("do not join my initial address and port").
pub const C_FLAG_SYSCTL: &str = "/proc/sys/net/mptcp/allow_join_initial_addr_port";
const MPTCP_ENABLED: &str = "/proc/sys/net/mptcp/enabled";
const PM_TYPE: &str = "/proc/sys/net/mptcp/pm_type";

fn sysctl_error(path: &str) -> impl FnOnce(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Sysctl {
        path: path.to_owned(),
        source,
    }
}

fn read_sysctl(path: &str) -> Result<String, ClusterError> {
    std::fs::read_to_string(path)
        .map(|v| v.trim().to_owned())
        .map_err(sysctl_error(path))
}

fn write_sysctl(path: &str, value: &str) -> Result<(), ClusterError> {
    std::fs::write(path, value).map_err(sysctl_error(path))
}

/// Checks that MPTCP is on and the in-kernel path manager (which announces `signal` endpoints) runs.
pub fn check_mptcp() -> Result<(), ClusterError> {
    if read_sysctl(MPTCP_ENABLED)? != "1" {
        return Err(ClusterError::Unsupported(
            "net.mptcp.enabled is 0 in this network namespace".into(),
        ));
    }
    // Kernels before 5.19 have no pm_type and only the in-kernel path manager.
    if let Ok(pm) = read_sysctl(PM_TYPE) {
        if pm != "0" {
            return Err(ClusterError::Unsupported(format!(
                "net.mptcp.pm_type is {pm} (userspace): the in-kernel path manager announces the \
                 instance's address; set it to 0 in the proxy's namespace"
            )));
        }
    }
    Ok(())
}

fn pm() -> Result<PathManager, ClusterError> {
    PathManager::open().map_err(|e| ClusterError::PathManager(e.to_string()))
}

/// Reads what the plan needs from the kernel.
pub fn observe() -> Result<Observed, ClusterError> {
    let endpoints = pm()?
        .endpoints()
        .map_err(|e| ClusterError::PathManager(e.to_string()))?;
    Ok(Observed {
        allow_join_initial_addr_port: read_sysctl(C_FLAG_SYSCTL)?,
        endpoints,
        local_addresses: crate::acl::local_addresses().map_err(ClusterError::Addresses)?,
    })
}

/// The in-kernel path manager's subflow limit (joins it accepts per connection), if it can be read.
pub fn subflow_limit() -> Option<u32> {
    pm().ok()?.limits().ok().map(|(subflows, _)| subflows)
}

fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn loopback() -> Result<u32, ClusterError> {
    rtnl::link_index("lo").map_err(ClusterError::Addresses)
}

/// Applies a start plan whose state has been recorded.
pub fn apply_start(plan: &StartPlan) -> Result<(), ClusterError> {
    let netlink = |e: mptcp_netlink::NetlinkError| ClusterError::PathManager(e.to_string());
    if plan.set_c_flag {
        write_sysctl(C_FLAG_SYSCTL, "0")?;
    }
    if !plan.delete_endpoints.is_empty() || plan.add_endpoint {
        let mut pm = pm()?;
        for (id, addr) in &plan.delete_endpoints {
            pm.del_endpoint(*id, *addr).map_err(netlink)?;
        }
        if plan.add_endpoint {
            if let Some(addr) = plan.state.endpoint {
                let mut endpoint = PmAddress::new(addr, 0);
                endpoint.flags = flags::SIGNAL;
                pm.add_endpoint(&endpoint).map_err(netlink)?;
            }
        }
    }
    for addr in &plan.delete_addresses {
        delete_address(*addr)?;
    }
    let lo = loopback()?;
    for addr in &plan.add_addresses {
        rtnl::add_address(lo, *addr, host_prefix(*addr))
            .map_err(|e| ClusterError::PathManager(e.to_string()))?;
    }
    Ok(())
}

fn delete_address(addr: IpAddr) -> Result<(), ClusterError> {
    match rtnl::delete_address(loopback()?, addr, host_prefix(addr)) {
        Err(e) if e.errno() != Some(libc::EADDRNOTAVAIL) => {
            Err(ClusterError::PathManager(e.to_string()))
        }
        _ => Ok(()),
    }
}

/// Undoes what a teardown plan lists; every step is tried, the first failure is returned.
pub fn apply_teardown(teardown: &Teardown) -> Result<(), ClusterError> {
    let mut first = None;
    if !teardown.delete_endpoints.is_empty() {
        match pm() {
            Ok(mut pm) => {
                for (id, addr) in &teardown.delete_endpoints {
                    if let Err(e) = pm.del_endpoint(*id, *addr) {
                        first.get_or_insert(ClusterError::PathManager(e.to_string()));
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    if let Some(value) = &teardown.restore_c_flag {
        if let Err(e) = write_sysctl(C_FLAG_SYSCTL, value) {
            first.get_or_insert(e);
        }
    }
    for addr in &teardown.delete_addresses {
        if let Err(e) = delete_address(*addr) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// TCP states in `/proc/net/tcp` that still carry data or wait for the peer's acknowledgement:
/// ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING. (FIN_WAIT2, TIME_WAIT,
/// CLOSE and LISTEN are done.)
const BUSY_STATES: [u8; 7] = [0x01, 0x02, 0x03, 0x04, 0x08, 0x09, 0x0b];

/// Counts the TCP sockets in a `/proc/net/tcp` or `/proc/net/tcp6` table whose local end is one of
/// `addresses` and `ports` and that still deliver data. MPTCP subflows are TCP sockets and are
/// listed there, also after the proxy closed its end (the kernel sends what remains on its own).
pub fn busy_subflows(table: &str, addresses: &[IpAddr], ports: &[u16]) -> usize {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = fields.next()?;
            let state = u8::from_str_radix(fields.nth(1)?, 16).ok()?;
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((proc_net_address(ip)?, port, state))
        })
        .filter(|(ip, port, state)| {
            BUSY_STATES.contains(state) && ports.contains(port) && addresses.contains(ip)
        })
        .count()
}

/// Decodes an address as `/proc/net/tcp{,6}` prints it: 32-bit words in host byte order, in hex.
fn proc_net_address(hex: &str) -> Option<IpAddr> {
    let mut bytes = Vec::with_capacity(16);
    for word in 0..hex.len() / 8 {
        let value = u32::from_str_radix(hex.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&value.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?).to_canonical()),
        _ => None,
    }
}

/// [`busy_subflows`] over this namespace's IPv4 and IPv6 tables.
pub fn busy_subflows_now(addresses: &[IpAddr], ports: &[u16]) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| busy_subflows(&table, addresses, ports))
        .sum()
}

/// The state file of this network namespace under `dir`: one per namespace, since the C flag and the
/// endpoints are per namespace.
pub fn state_path(dir: &Path) -> Result<PathBuf, ClusterError> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map_err(|source| ClusterError::State {
            path: "/proc/self/ns/net".into(),
            source,
        })?
        .ino();
    Ok(dir.join(format!("cluster-netns-{netns}.json")))
}

/// Reads a state file; `None` when there is none.
pub fn read_state(path: &Path) -> Result<Option<SavedState>, ClusterError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ClusterError::State {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ClusterError::State {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
}

/// Writes a state file atomically (a temporary file renamed over it).
pub fn write_state(path: &Path, state: &SavedState) -> Result<(), ClusterError> {
    let error = |source| ClusterError::State {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text + "\n").map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

/// Deletes a state file (absent is fine).
pub fn remove_state(path: &Path) -> Result<(), ClusterError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ClusterError::State {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether `pid` is another live mptcp-proxy in this network namespace (pids are reused, so the
/// command name and the namespace are compared too).
pub fn is_running_here(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let ours = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .ok();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    theirs.is_some() && theirs == ours && comm.trim() == "mptcp-proxy"
}

/// The announcement device: a TUN device whose only job is to exist. bird announces the service
/// address while it is up; the kernel deletes it when its last descriptor closes, so a proxy killed
/// by SIGKILL withdraws its route as surely as one that drains.
#[derive(Debug)]
pub struct AnnounceDevice {
    // Held, never read: closing it deletes the device.
    _fd: OwnedFd,
    name: String,
}

impl AnnounceDevice {
    /// Creates (or takes over) the TUN device `name` and sets it up.
    pub fn create(name: &str) -> Result<Self, ClusterError> {
        let error = |source: io::Error| ClusterError::Device {
            name: name.to_owned(),
            source,
        };
        // SAFETY: the path is a valid C string; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.is_empty() || name.len() >= req.ifr_name.len() {
            return Err(error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the name must be 1 to 15 bytes",
            )));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a `struct ifreq *`; req is valid for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // A persistent device of that name (made with `ip tuntap add`) would outlive the proxy, and
        // with it the route: make it die with this descriptor.
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST as _, 0 as libc::c_ulong) } < 0
        {
            return Err(error(io::Error::last_os_error()));
        }
        // It carries no traffic; without IPv6 it gets no link-local address and sends nothing.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let index = rtnl::link_index(name).map_err(error)?;
        rtnl::set_link_up(index).map_err(|e| error(io::Error::other(e.to_string())))?;
        Ok(Self {
            _fd: fd,
            name: name.to_owned(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The nftables table (family `inet`) that closes the SYN gate on drain.
pub const SYN_GATE_TABLE: &str = "mptcp_proxy_drain";

/// Closes the SYN gate: new connections (a SYN without ACK) to the service sockets are dropped, so
/// their clients retransmit the SYN (after 1 s) once the routers send the service address to another
/// instance. Everything else passes: packets of accepted connections, and joins (they go to the
/// announced address). Replaces a gate a crashed run left.
///
/// ```text
/// table inet mptcp_proxy_drain {
///     chain input {
///         type filter hook input priority filter - 10; policy accept;
///         meta nfproto ipv4 meta l4proto tcp ip daddr VIP tcp dport PORT tcp flags & (syn|ack) == syn counter drop
///     }
/// }
/// ```
pub fn close_syn_gate(services: &[SocketAddr]) -> Result<(), ClusterError> {
    use mptcp_netlink::nft::{cstring, PayloadLoad, RegisterExpr};
    use nftnl::expr::{Bitwise, Cmp, CmpOp, Counter, Verdict};
    use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;
    let table = Table::new(cstring(SYN_GATE_TABLE), ProtoFamily::Inet);
    let mut chain = Chain::new(c"input", &table);
    chain.set_hook(Hook::In, -10);
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    let mut batch = Batch::new();
    // Adding then deleting the table first replaces a stale gate whether or not there is one.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    batch.add(&chain, MsgType::Add);
    for service in services {
        let (nfproto, daddr_offset, daddr) = match service.ip() {
            IpAddr::V4(v4) => (libc::NFPROTO_IPV4 as u8, 16, v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc::NFPROTO_IPV6 as u8, 24, v6.octets().to_vec()),
        };
        let mut rule = Rule::new(&chain);
        rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_NFPROTO as u32));
        rule.add_expr(&Cmp::new(CmpOp::Eq, nfproto));
        rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_L4PROTO as u32));
        rule.add_expr(&Cmp::new(CmpOp::Eq, libc::IPPROTO_TCP as u8));
        rule.add_expr(&PayloadLoad::network(daddr_offset, daddr.len() as u32));
        rule.add_expr(&Cmp::new(CmpOp::Eq, &daddr[..]));
        rule.add_expr(&PayloadLoad::transport(2, 2));
        rule.add_expr(&Cmp::new(CmpOp::Eq, &service.port().to_be_bytes()[..]));
        rule.add_expr(&PayloadLoad::transport(13, 1));
        rule.add_expr(&Bitwise::new(&[TCP_SYN | TCP_ACK][..], &[0u8][..]));
        rule.add_expr(&Cmp::new(CmpOp::Eq, &[TCP_SYN][..]));
        rule.add_expr(&Counter);
        rule.add_expr(&Verdict::Drop);
        batch.add(&rule, MsgType::Add);
    }
    mptcp_netlink::nft::send_batch(batch, "close the drain's SYN gate")
        .map(|_| ())
        .map_err(|e| ClusterError::SynGate(e.to_string()))
}

/// Opens the SYN gate (deletes its table; nothing to do if there is none).
pub fn open_syn_gate() -> Result<(), ClusterError> {
    let batch = mptcp_netlink::nft::delete_table_batch(SYN_GATE_TABLE, nftnl::ProtoFamily::Inet);
    mptcp_netlink::nft::send_batch(batch, "open the drain's SYN gate")
        .map(|_| ())
        .map_err(|e| ClusterError::SynGate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_subflows_are_counted_by_local_address_port_and_state() {
        // Lines as /proc/net/tcp prints them on x86_64 (little endian), trailing fields cut.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0201020A:0C38 00000000:0000 0A 00000000:00000000\n\
   1: 0100630A:0C38 0201010A:9014 01 00000000:00000000\n\
   2: 0201020A:0C38 0202010A:C9E5 01 00000000:00000000\n\
   3: 0201020A:0C38 0201010A:BDE5 04 00000000:00000000\n\
   4: 0201020A:0C38 0201010A:BDE6 06 00000000:00000000\n\
   5: 0201020A:0C38 0201010A:BDE7 05 00000000:00000000\n\
   6: 0201020A:8E0B 0101020A:00B3 01 00000000:00000000\n";
        let announce: IpAddr = "10.2.1.2".parse().unwrap();
        let service: IpAddr = "10.99.0.1".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(busy_subflows(table, &[announce], &[3128]), 2);
            assert_eq!(busy_subflows(table, &[announce, service], &[3128]), 3);
            assert_eq!(busy_subflows(table, &[announce], &[179]), 0);
        }
        let v6 = "header\n   0: 0000000000000000FFFF00000201020A:0C38 00000000000000000000000000000000:0000 01 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(busy_subflows(v6, &[announce], &[3128]), 1);
        }
    }
}
