//! Local interfaces: their state and addresses (`getifaddrs`), and MAC
//! addresses (the default MPIP node ID).
//!
//! Everything reflects the calling thread's network namespace.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::ifreq;

/// One interface as [`scan`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// Interface name (`eth0`; IPv4 alias labels such as `eth0:1` are folded
    /// into their interface).
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// `IFF_UP` and `IFF_LOWER_UP`: administratively up and has carrier.
    /// `IFF_LOWER_UP` follows the carrier at once; `IFF_RUNNING` follows the
    /// operational state, which the kernel's linkwatch updates up to a second
    /// later, too slow for putting a path back within 1 s of link up.
    pub up: bool,
    /// IPv4 addresses, in the kernel's order.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses other than link-local (`fe80::/10`), in the kernel's
    /// order.
    pub ipv6: Vec<Ipv6Addr>,
}

/// Whether an IPv6 address is link-local unicast (`fe80::/10`).
pub fn is_ipv6_link_local(addr: &Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// The interface an `ifa_name` belongs to: IPv4 labels are `name:label`, and
/// the kernel never allows `:` in an interface name.
fn base_name(ifa_name: &str) -> &str {
    ifa_name.split(':').next().unwrap_or(ifa_name)
}

/// Owns the list returned by `getifaddrs`.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(self.0) };
    }
}

/// Every interface with its state and addresses, sorted by index.
pub fn scan() -> io::Result<Vec<InterfaceStatus>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: head is a valid out pointer.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let list = IfAddrs(head);
    let mut by_name: BTreeMap<String, InterfaceStatus> = BTreeMap::new();
    let mut cursor = list.0;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list owned by `list`, alive until
        // it is dropped at the end of this function.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let full_name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy();
        let name = base_name(&full_name).to_owned();
        let status = by_name
            .entry(name.clone())
            .or_insert_with(|| InterfaceStatus {
                name,
                index: 0,
                up: false,
                ipv4: Vec::new(),
                ipv6: Vec::new(),
            });
        // The flags of a label entry are the interface's; every entry of
        // one interface agrees.
        let flags = entry.ifa_flags as libc::c_int;
        if full_name.len() == status.name.len() {
            status.up = flags & libc::IFF_UP != 0 && flags & libc::IFF_LOWER_UP != 0;
        }
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr at least as large as its
        // family's structure, owned by the list.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: the family says this is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                let addr = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                if !status.ipv4.contains(&addr) {
                    status.ipv4.push(addr);
                }
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this is a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                let addr = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !is_ipv6_link_local(&addr) && !status.ipv6.contains(&addr) {
                    status.ipv6.push(addr);
                }
            }
            _ => {}
        }
    }
    drop(list);
    let mut out: Vec<InterfaceStatus> = by_name.into_values().collect();
    for status in &mut out {
        // An interface deleted since the listing keeps index 0.
        status.index = super::tun::ifindex_of(&status.name).unwrap_or(0);
    }
    out.sort_by_key(|s| (s.index, s.name.clone()));
    Ok(out)
}

/// The Ethernet MAC address of `name`, `None` when the interface has none
/// (not Ethernet-like, such as loopback or TUN, or all zeros). Fails when
/// the interface does not exist.
pub fn mac_address(name: &str) -> io::Result<Option<[u8; 6]>> {
    let mut req = ifreq::ifreq(name)?;
    let socket = ifreq::control_socket()?;
    ifreq::ioctl(&socket, libc::SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Ok(None);
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok((mac != [0; 6]).then_some(mac))
}

/// The MAC address of the non-loopback interface with the lowest index that
/// has a non-zero Ethernet MAC (the default MPIP node ID).
pub fn first_mac_address() -> Option<[u8; 6]> {
    let interfaces = scan().ok()?;
    interfaces
        .iter()
        .filter(|i| i.index != 0)
        .find_map(|i| mac_address(&i.name).ok().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};

    #[test]
    fn link_local_and_labels() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"2001:db8::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"::1".parse().unwrap()));
        assert_eq!(base_name("eth0:1"), "eth0");
        assert_eq!(base_name("eth0"), "eth0");
    }

    #[test]
    fn mac_of_a_missing_interface_is_an_error() {
        in_netns("mac_of_a_missing_interface_is_an_error", |_| {
            assert!(mac_address("mpxnope0").is_err());
            assert!(mac_address("").is_err());
            assert_eq!(mac_address("lo").unwrap(), None);
            // Only loopback here.
            assert_eq!(first_mac_address(), None);
        });
    }

    #[test]
    fn scan_sees_veth_state_addresses_and_macs() {
        in_netns("scan_sees_veth_state_addresses_and_macs", |ns| {
            run(
                "ip",
                &[
                    "-n", ns, "link", "add", "mpxva", "type", "veth", "peer", "name", "mpxvb",
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "link",
                    "set",
                    "mpxva",
                    "address",
                    "02:00:00:00:00:0a",
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "link",
                    "set",
                    "mpxvb",
                    "address",
                    "02:00:00:00:00:0b",
                ],
            );
            run(
                "ip",
                &["-n", ns, "addr", "add", "10.55.0.1/24", "dev", "mpxva"],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    "10.56.0.1/24",
                    "dev",
                    "mpxva",
                    "label",
                    "mpxva:x",
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    "2001:db8:55::1/64",
                    "dev",
                    "mpxva",
                    "nodad",
                ],
            );
            let find = |name: &str| {
                scan()
                    .unwrap()
                    .into_iter()
                    .find(|i| i.name == name)
                    .unwrap_or_else(|| panic!("{name} not in scan"))
            };
            let a = find("mpxva");
            assert!(!a.up, "down before `ip link set up`");
            assert_eq!(
                a.ipv4,
                vec![Ipv4Addr::new(10, 55, 0, 1), Ipv4Addr::new(10, 56, 0, 1)]
            );
            run("ip", &["-n", ns, "link", "set", "mpxva", "up"]);
            // Up but no carrier until the peer is up.
            assert!(!find("mpxva").up);
            run("ip", &["-n", ns, "link", "set", "mpxvb", "up"]);
            let mut a = find("mpxva");
            for _ in 0..100 {
                if a.up && !a.ipv6.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                a = find("mpxva");
            }
            assert!(a.up, "{a:?}");
            assert_eq!(a.ipv6, vec!["2001:db8:55::1".parse::<Ipv6Addr>().unwrap()]);
            assert_eq!(a.index, crate::sys::tun::ifindex_of("mpxva").unwrap());
            let all = scan().unwrap();
            assert_eq!(all.iter().filter(|i| i.name == "mpxva").count(), 1);
            assert!(all.windows(2).all(|w| w[0].index <= w[1].index));
            let lo = all.iter().find(|i| i.name == "lo").unwrap();
            assert!(lo.up);
            assert_eq!(lo.ipv4, vec![Ipv4Addr::LOCALHOST]);

            run("ip", &["-n", ns, "link", "set", "mpxva", "down"]);
            assert!(!find("mpxva").up);
            // The peer's carrier follows at once; poll anyway, it is a
            // different device.
            let mut b = find("mpxvb");
            for _ in 0..150 {
                if !b.up {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                b = find("mpxvb");
            }
            assert!(!b.up, "peer lost its carrier");

            assert_eq!(mac_address("mpxva").unwrap(), Some([2, 0, 0, 0, 0, 0x0a]));
            // mpxvb was created first (peer) or second: the lowest index wins.
            let first = if find("mpxva").index < find("mpxvb").index {
                [2, 0, 0, 0, 0, 0x0a]
            } else {
                [2, 0, 0, 0, 0, 0x0b]
            };
            assert_eq!(first_mac_address(), Some(first));
        });
    }

    #[test]
    fn scan_sees_a_tun() {
        in_netns("scan_sees_a_tun", |ns| {
            let rt = crate::sys::testns::runtime();
            let _enter = rt.enter();
            let tun = crate::sys::tun::TunDevice::create("mpxscan%d").unwrap();
            tun.set_ipv4(Ipv4Addr::new(10, 44, 0, 1), 30).unwrap();
            let status = |name: &str| scan().unwrap().into_iter().find(|i| i.name == name);
            let s = status(tun.name()).unwrap();
            assert!(!s.up);
            assert_eq!(s.index, tun.ifindex());
            assert_eq!(s.ipv4, vec![Ipv4Addr::new(10, 44, 0, 1)]);
            tun.set_up().unwrap();
            assert!(status(tun.name()).unwrap().up);
            assert_eq!(mac_address(tun.name()).unwrap(), None);
            run("ip", &["-n", ns, "link", "set", tun.name(), "down"]);
            assert!(!status(tun.name()).unwrap().up);
            let name = tun.name().to_owned();
            drop(tun);
            // The kernel unregisters the device after the descriptor closes,
            // not during close(2): poll, as the TUN test does.
            let mut gone = false;
            for _ in 0..100 {
                if status(&name).is_none() {
                    gone = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(gone, "{name} still listed 2 s after its descriptor closed");
        });
    }
}
