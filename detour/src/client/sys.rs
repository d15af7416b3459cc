//! What the client daemon changes in its network namespace, each undone on drop: the path manager
//! sysctl and the MSS clamp table. Also interface lookups for tunnel detours.

use std::net::{IpAddr, Ipv4Addr};

use mptcp_netlink::nft::{cstring, PayloadLoad};
use mptcp_netlink::nft_expr::TcpMaxsegSet;
use nftnl::expr::{Bitwise, Cmp, CmpOp, Immediate, Meta, Register};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

/// Newer kernels (6.15+): `kernel` or `userspace`.
const PATH_MANAGER: &str = "/proc/sys/net/mptcp/path_manager";
/// Older kernels: 0 (in-kernel) or 1 (userspace).
const PM_TYPE: &str = "/proc/sys/net/mptcp/pm_type";

/// `net.mptcp.path_manager = userspace` while held; the previous value is restored on drop. New MPTCP
/// connections of the namespace then get the userspace path manager (existing ones keep theirs).
#[derive(Debug)]
pub struct UserspacePm {
    file: &'static str,
    previous: String,
}

impl UserspacePm {
    /// Switches the namespace to the userspace path manager.
    pub fn enable() -> std::io::Result<Self> {
        let (file, value) = if std::path::Path::new(PATH_MANAGER).exists() {
            (PATH_MANAGER, "userspace")
        } else {
            (PM_TYPE, "1")
        };
        let previous = std::fs::read_to_string(file)?.trim().to_owned();
        std::fs::write(file, value)?;
        tracing::info!("{} = {value} (was {previous})", sysctl_name(file));
        Ok(Self { file, previous })
    }
}

fn sysctl_name(file: &str) -> String {
    file.trim_start_matches("/proc/sys/").replace('/', ".")
}

impl Drop for UserspacePm {
    fn drop(&mut self) {
        match std::fs::write(self.file, &self.previous) {
            Ok(()) => tracing::info!("{} = {} (restored)", sysctl_name(self.file), self.previous),
            Err(error) => tracing::error!(%error, "restoring {}", sysctl_name(self.file)),
        }
    }
}

/// A tunnel interface's index and IPv4 address, if it is there.
pub fn tunnel_address(interface: &str) -> Option<(u32, Ipv4Addr)> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: name is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return None;
    }
    let networks = mptcp_proxy::sockets::interface_networks().ok()?;
    networks.into_iter().find_map(|(n, net)| match net.addr() {
        IpAddr::V4(v4) if n == interface => Some((index, v4)),
        _ => None,
    })
}

/// The MSS clamp for tunnel detours: SYNs leaving through and arriving from each listed interface get
/// their MSS option set to at most the configured value.
///
/// ```text
/// table ip NAME {
///     chain out { type filter hook postrouting priority mangle;
///         oifname "tun0" tcp flags & (syn | rst) == syn tcp option maxseg size set 1300 }
///     chain in { type filter hook prerouting priority mangle;
///         iifname "tun0" tcp flags & (syn | rst) == syn tcp option maxseg size set 1300 }
/// }
/// ```
///
/// (`set`, not `set rt mtu`: the point is a path MTU below the tunnel device's.)
#[derive(Debug)]
pub struct MssClamp {
    table: String,
}

fn ifname_bytes(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut bytes = [0u8; libc::IFNAMSIZ];
    let len = name.len().min(libc::IFNAMSIZ - 1);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    bytes
}

impl MssClamp {
    /// Installs the table (replacing one of that name); `clamps` are `(interface, mss)`.
    pub fn install(
        table: &str,
        clamps: &[(String, u16)],
    ) -> Result<Self, mptcp_netlink::NetlinkError> {
        let t = Table::new(cstring(table), ProtoFamily::Ipv4);
        let mut batch = Batch::new();
        batch.add(&t, MsgType::Add);
        batch.add(&t, MsgType::Del);
        batch.add(&t, MsgType::Add);
        let mut out = Chain::new(c"out", &t);
        out.set_hook(Hook::PostRouting, -150);
        out.set_type(ChainType::Filter);
        out.set_policy(Policy::Accept);
        batch.add(&out, MsgType::Add);
        let mut inbound = Chain::new(c"in", &t);
        inbound.set_hook(Hook::PreRouting, -150);
        inbound.set_type(ChainType::Filter);
        inbound.set_policy(Policy::Accept);
        batch.add(&inbound, MsgType::Add);
        for (interface, mss) in clamps {
            for (chain, meta) in [(&out, Meta::OifName), (&inbound, Meta::IifName)] {
                let mut rule = Rule::new(chain);
                rule.add_expr(&meta);
                rule.add_expr(&Cmp::new(CmpOp::Eq, &ifname_bytes(interface)[..]));
                rule.add_expr(&Meta::L4Proto);
                rule.add_expr(&Cmp::new(CmpOp::Eq, &[libc::IPPROTO_TCP as u8][..]));
                rule.add_expr(&PayloadLoad::transport(13, 1));
                rule.add_expr(&Bitwise::new(&[0x06u8][..], &[0u8][..]));
                rule.add_expr(&Cmp::new(CmpOp::Eq, &[0x02u8][..]));
                rule.add_expr(&Immediate::new(mss.to_be_bytes(), Register::Reg1));
                rule.add_expr(&TcpMaxsegSet);
                batch.add(&rule, MsgType::Add);
            }
        }
        mptcp_netlink::nft::send_batch(batch, &format!("install table ip {table}"))?;
        Ok(Self {
            table: table.to_owned(),
        })
    }
}

impl Drop for MssClamp {
    fn drop(&mut self) {
        if let Err(error) = mptcp_netlink::nft::send_batch(
            mptcp_netlink::nft::delete_table_batch(&self.table, ProtoFamily::Ipv4),
            "delete the MSS clamp table",
        ) {
            tracing::error!(%error, "removing the MSS clamp table failed");
        }
    }
}
