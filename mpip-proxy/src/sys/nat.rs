//! Gateway mode: masquerade the MPIP clients' address pool out of every
//! interface but the TUN, with an nftables table of our own, and IPv4
//! forwarding on.
//!
//! The table (family `ip`, name chosen by the caller):
//!
//! ```text
//! table ip NAME {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr POOL oifname != "TUN" counter masquerade
//!     }
//!     chain forward {
//!         type filter hook forward priority filter; policy accept;
//!         iifname "TUN" counter
//!         oifname "TUN" counter
//!     }
//! }
//! ```
//!
//! The forward chain only counts: an `accept` here does not override a drop
//! in another table's forward chain (every base chain sees the packet).
//!
//! Batches are built with libnftnl and sent over `NETLINK_NETFILTER` with the
//! helpers of [`mptcp_netlink::nft`]; they
//! act on the calling thread's network namespace, as does the
//! `/proc/sys/net/ipv4/ip_forward` switch.

use std::ffi::CString;
use std::io;

use ipnet::Ipv4Net;
use nftnl::expr::{Bitwise, Cmp, CmpOp, Counter, Masquerade as MasqExpr, Meta};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

/// The sysctl switched on by [`Masquerade::install`].
pub const IP_FORWARD_PATH: &str = "/proc/sys/net/ipv4/ip_forward";
/// Name of the nat chain.
pub const CHAIN_POSTROUTING: &str = "postrouting";
/// Name of the counting forward chain.
pub const CHAIN_FORWARD: &str = "forward";

/// `NFT_NAME_MAXLEN`, including the NUL.
const NFT_NAME_MAXLEN: usize = 256;

/// A masquerade operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// A table or interface name nftables would refuse.
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        /// `table` or `interface`.
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The kernel refused the batch (nothing in it was applied), or the netfilter netlink socket failed.
    #[error("nftables: {0}")]
    Netlink(#[from] mptcp_netlink::NetlinkError),
    /// Reading or writing `net.ipv4.ip_forward` failed.
    #[error("{IP_FORWARD_PATH}: {0}")]
    IpForward(#[source] io::Error),
}

fn table_cname(name: &str) -> Result<CString, NatError> {
    let invalid = |why| NatError::InvalidName {
        what: "table",
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= NFT_NAME_MAXLEN {
        return Err(invalid("longer than 255 bytes"));
    }
    CString::new(name).map_err(|_| invalid("contains NUL"))
}

/// `name` NUL-padded to `IFNAMSIZ`, as `meta oifname` loads it.
fn interface_name_bytes(name: &str) -> Result<[u8; libc::IFNAMSIZ], NatError> {
    super::ifreq::validate_name(name, false).map_err(|_| NatError::InvalidName {
        what: "interface",
        name: name.to_owned(),
        why: "empty, longer than 15 bytes, or containing NUL, '/', ':', '%' or whitespace",
    })?;
    let mut bytes = [0u8; libc::IFNAMSIZ];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    Ok(bytes)
}

/// The network address and netmask of a prefix (host bits cleared).
fn prefix_match(pool: Ipv4Net) -> ([u8; 4], [u8; 4]) {
    (pool.network().octets(), pool.netmask().octets())
}

fn postrouting_chain(table: &Table) -> Chain<'_> {
    let mut chain = Chain::new(c"postrouting", table);
    chain.set_hook(Hook::PostRouting, 100);
    chain.set_type(ChainType::Nat);
    chain.set_policy(Policy::Accept);
    chain
}

fn forward_chain(table: &Table) -> Chain<'_> {
    let mut chain = Chain::new(c"forward", table);
    chain.set_hook(Hook::Forward, 0);
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    chain
}

/// A batch that deletes the `ip` table `name` if it exists: adding an
/// existing table is not an error, so add-then-delete works either way.
fn delete_batch(name: &CString) -> Batch {
    let table = Table::new(name, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch
}

/// One transaction: drop any stale table of that name, then create the
/// table, both chains and the rules.
fn install_batch(name: &CString, pool: Ipv4Net, tun: &[u8; libc::IFNAMSIZ]) -> Batch {
    let table = Table::new(name, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let postrouting = postrouting_chain(&table);
    batch.add(&postrouting, MsgType::Add);
    let forward = forward_chain(&table);
    batch.add(&forward, MsgType::Add);

    // ip saddr POOL oifname != "TUN" counter masquerade
    let mut rule = Rule::new(&postrouting);
    if pool.prefix_len() > 0 {
        let (network, mask) = prefix_match(pool);
        rule.add_expr(&nftnl::nft_expr!(payload ipv4 saddr));
        if pool.prefix_len() < 32 {
            rule.add_expr(&Bitwise::new(&mask[..], &[0u8; 4][..]));
        }
        rule.add_expr(&Cmp::new(CmpOp::Eq, &network[..]));
    }
    rule.add_expr(&Meta::OifName);
    rule.add_expr(&Cmp::new(CmpOp::Neq, &tun[..]));
    rule.add_expr(&Counter);
    rule.add_expr(&MasqExpr);
    batch.add(&rule, MsgType::Add);

    // iifname "TUN" counter; oifname "TUN" counter
    for meta in [Meta::IifName, Meta::OifName] {
        let mut rule = Rule::new(&forward);
        rule.add_expr(&meta);
        rule.add_expr(&Cmp::new(CmpOp::Eq, &tun[..]));
        rule.add_expr(&Counter);
        batch.add(&rule, MsgType::Add);
    }
    batch
}

/// Sends a batch and waits for every ack; the first error, if any.
fn send_batch(batch: Batch, operation: &str) -> Result<(), NatError> {
    mptcp_netlink::nft::send_batch(batch, operation)?;
    Ok(())
}

fn read_ip_forward() -> Result<String, NatError> {
    std::fs::read_to_string(IP_FORWARD_PATH)
        .map(|s| s.trim().to_owned())
        .map_err(NatError::IpForward)
}

fn write_ip_forward(value: &str) -> Result<(), NatError> {
    std::fs::write(IP_FORWARD_PATH, value).map_err(NatError::IpForward)
}

/// Deletes the `ip` table `table_name` if it exists (a table left by a
/// killed run). `ip_forward` is not touched.
pub fn remove_stale(table_name: &str) -> Result<(), NatError> {
    let name = table_cname(table_name)?;
    send_batch(delete_batch(&name), "delete stale table")
}

/// The installed masquerade. [`Masquerade::remove`] or dropping it deletes
/// the table and puts `ip_forward` back to its previous value.
///
/// Two instances in one namespace (different tables) share `ip_forward`:
/// the first one removed restores the value it found.
#[derive(Debug)]
pub struct Masquerade {
    table: String,
    previous_ip_forward: String,
    installed: bool,
}

impl Masquerade {
    /// Installs the table described in the [module docs](self) for the
    /// client `pool` (host bits ignored) behind the TUN `tun_name`,
    /// replacing any table of that name, and enables `net.ipv4.ip_forward`.
    pub fn install(table_name: &str, pool: Ipv4Net, tun_name: &str) -> Result<Self, NatError> {
        let name = table_cname(table_name)?;
        let tun = interface_name_bytes(tun_name)?;
        let previous_ip_forward = read_ip_forward()?;
        send_batch(
            install_batch(&name, pool.trunc(), &tun),
            "install masquerade",
        )?;
        if let Err(e) = write_ip_forward("1") {
            let _ = send_batch(delete_batch(&name), "delete table");
            return Err(e);
        }
        tracing::debug!(table = table_name, %pool, tun = tun_name, previous_ip_forward, "masquerade installed");
        Ok(Self {
            table: table_name.to_owned(),
            previous_ip_forward,
            installed: true,
        })
    }

    /// The nftables table name (family `ip`).
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The `ip_forward` value found at install time, restored on removal.
    pub fn previous_ip_forward(&self) -> &str {
        &self.previous_ip_forward
    }

    /// Deletes the table and restores `ip_forward`; reports the first
    /// failure (both are attempted).
    pub fn remove(mut self) -> Result<(), NatError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), NatError> {
        if !std::mem::replace(&mut self.installed, false) {
            return Ok(());
        }
        let table = table_cname(&self.table)
            .and_then(|name| send_batch(delete_batch(&name), "delete table"));
        let forward = write_ip_forward(&self.previous_ip_forward);
        table.and(forward)
    }
}

impl Drop for Masquerade {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(table = %self.table, error = %e, "could not remove the masquerade");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};

    #[test]
    fn names_and_prefixes() {
        assert!(table_cname("mpip_gw").is_ok());
        assert!(table_cname("").is_err());
        assert!(table_cname("a\0b").is_err());
        assert!(table_cname(&"x".repeat(255)).is_ok());
        assert!(table_cname(&"x".repeat(256)).is_err());
        let tun = interface_name_bytes("tun0").unwrap();
        assert_eq!(&tun[..5], b"tun0\0");
        assert!(tun[4..].iter().all(|b| *b == 0));
        assert!(interface_name_bytes("").is_err());
        assert!(interface_name_bytes("0123456789abcdef").is_err());
        assert!(interface_name_bytes("tun%d").is_err());
        let pool: Ipv4Net = "10.66.1.7/20".parse().unwrap();
        assert_eq!(
            prefix_match(pool.trunc()),
            ([10, 66, 0, 0], [255, 255, 240, 0])
        );
        assert!(matches!(
            Masquerade::install("", pool, "tun0"),
            Err(NatError::InvalidName { what: "table", .. })
        ));
        assert!(matches!(
            Masquerade::install("t", pool, "bad/name"),
            Err(NatError::InvalidName {
                what: "interface",
                ..
            })
        ));
    }

    #[test]
    fn batches_finalize() {
        let name = table_cname("mpxsys_unit").unwrap();
        let tun = interface_name_bytes("tun0").unwrap();
        for pool in ["10.0.0.0/24", "10.0.0.1/32", "0.0.0.0/0"] {
            let (bytes, acked, rule_adds) =
                mptcp_netlink::nft::finalize(install_batch(&name, pool.parse().unwrap(), &tun));
            assert!(!bytes.is_empty());
            // 3 table, 2 chain, 3 rule messages, plus batch begin and end
            // when the kernel acks those (nftnl probes it).
            assert!(acked.len() == 8 || acked.len() == 10, "{pool}: {acked:?}");
            assert_eq!(rule_adds.len(), 3, "{pool}");
        }
        let (_, acked, _) = mptcp_netlink::nft::finalize(delete_batch(&name));
        assert!(acked.len() == 2 || acked.len() == 4, "{acked:?}");
    }

    fn tables(ns: &str) -> String {
        run("ip", &["netns", "exec", ns, "nft", "list", "tables"])
    }

    fn list_table(ns: &str, name: &str) -> String {
        run(
            "ip",
            &["netns", "exec", ns, "nft", "list", "table", "ip", name],
        )
    }

    fn ip_forward() -> String {
        std::fs::read_to_string(IP_FORWARD_PATH)
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn install_remove_and_restore() {
        in_netns("install_remove_and_restore", |ns| {
            assert_eq!(
                ip_forward(),
                "0",
                "a new namespace starts without forwarding"
            );
            let masq =
                Masquerade::install("mpxsys_nat", "10.66.0.9/24".parse().unwrap(), "mpxtun0")
                    .expect("install");
            assert_eq!(masq.table_name(), "mpxsys_nat");
            assert_eq!(masq.previous_ip_forward(), "0");
            assert_eq!(ip_forward(), "1");
            assert!(tables(ns).contains("table ip mpxsys_nat"), "{}", tables(ns));
            let listing = list_table(ns, "mpxsys_nat");
            assert!(listing.contains("masquerade"), "{listing}");
            assert!(listing.contains("ip saddr 10.66.0.0/24"), "{listing}");
            assert!(listing.contains("oifname != \"mpxtun0\""), "{listing}");
            assert!(
                listing.contains("hook postrouting priority srcnat"),
                "{listing}"
            );
            assert!(
                listing.contains("hook forward priority filter; policy accept"),
                "{listing}"
            );
            assert!(listing.contains("iifname \"mpxtun0\" counter"), "{listing}");
            masq.remove().expect("remove");
            assert!(!tables(ns).contains("mpxsys_nat"), "{}", tables(ns));
            assert_eq!(ip_forward(), "0");

            // Drop does the same.
            {
                let _masq =
                    Masquerade::install("mpxsys_nat", "10.66.0.0/24".parse().unwrap(), "mpxtun0")
                        .unwrap();
                assert_eq!(ip_forward(), "1");
            }
            assert!(!tables(ns).contains("mpxsys_nat"));
            assert_eq!(ip_forward(), "0");

            // remove_stale with nothing to remove is fine.
            remove_stale("mpxsys_nat").unwrap();
        });
    }

    #[test]
    fn install_over_a_stale_table() {
        in_netns("install_over_a_stale_table", |ns| {
            let pool: Ipv4Net = "10.67.0.0/16".parse().unwrap();
            // A run killed without cleanup.
            std::mem::forget(Masquerade::install("mpxsys_stale", pool, "mpxtun0").unwrap());
            assert!(tables(ns).contains("mpxsys_stale"));
            let masq = Masquerade::install("mpxsys_stale", pool, "mpxtun1").unwrap();
            let listing = list_table(ns, "mpxsys_stale");
            assert_eq!(listing.matches("masquerade").count(), 1, "{listing}");
            assert!(listing.contains("\"mpxtun1\""), "{listing}");
            assert!(!listing.contains("\"mpxtun0\""), "{listing}");
            drop(masq);
            assert!(!tables(ns).contains("mpxsys_stale"));

            std::mem::forget(Masquerade::install("mpxsys_stale", pool, "mpxtun0").unwrap());
            remove_stale("mpxsys_stale").unwrap();
            assert!(!tables(ns).contains("mpxsys_stale"));
            // An inet table of the same name is a different table.
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "add",
                    "table",
                    "inet",
                    "mpxsys_stale",
                ],
            );
            remove_stale("mpxsys_stale").unwrap();
            assert!(tables(ns).contains("table inet mpxsys_stale"));
        });
    }

    #[test]
    fn forwarded_pool_traffic_is_masqueraded() {
        in_netns("forwarded_pool_traffic_is_masqueraded", |ns| {
            use crate::sys::testns::{extra_netns, on_thread_in, runtime, udp_packet};
            use std::net::{Ipv4Addr, UdpSocket};
            let peer = extra_netns();
            run(
                "ip",
                &[
                    "-n", ns, "link", "add", "mpxga", "type", "veth", "peer", "name", "mpxgb",
                ],
            );
            run(
                "ip",
                &["-n", ns, "link", "set", "mpxgb", "netns", &peer.name],
            );
            run(
                "ip",
                &["-n", ns, "addr", "add", "10.200.0.1/24", "dev", "mpxga"],
            );
            run("ip", &["-n", ns, "link", "set", "mpxga", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &peer.name,
                    "addr",
                    "add",
                    "10.200.0.2/24",
                    "dev",
                    "mpxgb",
                ],
            );
            run("ip", &["-n", &peer.name, "link", "set", "mpxgb", "up"]);
            let server = on_thread_in(&peer.name, || {
                let socket = UdpSocket::bind("10.200.0.2:7777").unwrap();
                socket
                    .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = socket.recv_from(&mut buf).expect("forwarded datagram");
                (buf[..n].to_vec(), from)
            });

            let rt = runtime();
            let _enter = rt.enter();
            let tun = crate::sys::tun::TunDevice::create("mpxgw%d").unwrap();
            tun.set_ipv4(Ipv4Addr::new(10, 66, 0, 1), 24).unwrap();
            tun.set_up().unwrap();
            let masq =
                Masquerade::install("mpxsys_gw", "10.66.0.0/24".parse().unwrap(), tun.name())
                    .unwrap();
            // A client packet from the pool, out of the TUN into the stack.
            let packet = udp_packet(
                Ipv4Addr::new(10, 66, 0, 5),
                Ipv4Addr::new(10, 200, 0, 2),
                40000,
                7777,
                b"via gw",
            );
            // Retry until the server thread has bound its socket.
            let mut received = None;
            for _ in 0..50 {
                tun.try_send(&packet).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(20));
                if server.is_finished() {
                    received = Some(server.join().unwrap());
                    break;
                }
            }
            let Some((data, from)) = received else {
                let listing = run("ip", &["netns", "exec", ns, "nft", "list", "ruleset"]);
                let links = run("ip", &["-n", ns, "-s", "link"]);
                let peer_links = run("ip", &["-n", &peer.name, "-s", "link"]);
                let stats = run("ip", &["netns", "exec", ns, "nstat", "-az"]);
                panic!("not received\n{listing}\n{links}\n{peer_links}\n{stats}");
            };
            assert_eq!(data, b"via gw");
            assert_eq!(
                from.ip(),
                Ipv4Addr::new(10, 200, 0, 1),
                "source masqueraded"
            );
            let listing = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "list",
                    "table",
                    "ip",
                    "mpxsys_gw",
                ],
            );
            assert!(
                !listing.contains("masquerade counter packets 0"),
                "{listing}"
            );
            assert!(listing.contains(&format!("iifname \"{}\" counter packets", tun.name())));
            drop(masq);
        });
    }
}
