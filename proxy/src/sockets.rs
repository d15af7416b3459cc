//! Kernel sockets: MPTCP listeners with TCP fallback, upstream connections, `MPTCP_INFO`, and the original
//! destination of redirected connections.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// `SOL_MPTCP` from `linux/socket.h`.
const SOL_MPTCP: libc::c_int = 284;
/// `MPTCP_INFO` from `linux/mptcp.h`.
const MPTCP_INFO: libc::c_int = 1;
/// `MPTCP_FULL_INFO` from `linux/mptcp.h` (kernel ≥ 6.5).
const MPTCP_FULL_INFO: libc::c_int = 4;
/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` from netfilter.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// How a client connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A real MPTCP connection.
    Mptcp,
    /// An MPTCP socket whose peer did not speak MPTCP (the kernel fell back to TCP).
    FallbackTcp,
    /// A plain TCP socket (the listener or the kernel has no MPTCP).
    Tcp,
}

impl Transport {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mptcp => "mptcp",
            Transport::FallbackTcp => "fallback_tcp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The fields of `struct mptcp_info` (linux/mptcp.h) that the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MptcpInfo {
    /// Subflows in use, the initial one included.
    pub subflows: u8,
    /// The connection's local token.
    pub token: u32,
    /// Bytes sent at the MPTCP level (kernels ≥ 6.6 fill it; 0 before).
    pub bytes_sent: u64,
    /// Bytes received at the MPTCP level (kernels ≥ 6.6; 0 before).
    pub bytes_received: u64,
    /// Bytes the peer acknowledged at the MPTCP level (kernels ≥ 6.6; 0 before).
    pub bytes_acked: u64,
    /// `mptcpi_flags`: [`MPTCP_INFO_FLAG_FALLBACK`] and others.
    pub flags: u32,
}

/// `MPTCP_INFO_FLAG_FALLBACK`: the connection fell back to TCP after it started as MPTCP.
pub const MPTCP_INFO_FLAG_FALLBACK: u32 = 1;

/// The kernel's `struct mptcp_info` layout.
#[repr(C)]
#[derive(Default)]
struct RawMptcpInfo {
    subflows: u8,
    add_addr_signal: u8,
    add_addr_accepted: u8,
    subflows_max: u8,
    add_addr_signal_max: u8,
    add_addr_accepted_max: u8,
    flags: u32,
    token: u32,
    write_seq: u64,
    snd_una: u64,
    rcv_nxt: u64,
    local_addr_used: u8,
    local_addr_max: u8,
    csum_enabled: u8,
    retransmits: u32,
    bytes_retrans: u64,
    bytes_sent: u64,
    bytes_received: u64,
    bytes_acked: u64,
    subflows_total: u8,
    reserved: [u8; 3],
    last_data_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
}

/// Reads `MPTCP_INFO`. `Ok(None)` means the socket is not MPTCP or fell back to TCP (EOPNOTSUPP).
pub fn mptcp_info(fd: BorrowedFd<'_>) -> io::Result<Option<MptcpInfo>> {
    let mut raw = RawMptcpInfo::default();
    let mut len = size_of::<RawMptcpInfo>() as libc::socklen_t;
    // SAFETY: raw is a writable buffer of len bytes; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_MPTCP,
            MPTCP_INFO,
            (&mut raw as *mut RawMptcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(err),
        };
    }
    // `subflows_total` (kernel ≥ 6.10) counts the initial subflow; `subflows` counts only the extra ones.
    let subflows = if raw.subflows_total > 0 {
        raw.subflows_total
    } else {
        raw.subflows.saturating_add(1)
    };
    Ok(Some(MptcpInfo {
        subflows,
        token: raw.token,
        bytes_sent: raw.bytes_sent,
        bytes_received: raw.bytes_received,
        bytes_acked: raw.bytes_acked,
        flags: raw.flags,
    }))
}

/// The transport of a socket accepted from a listener that is (`listener_mptcp`) or is not MPTCP.
///
/// On fallback the kernel hands an MPTCP listener's caller a plain TCP socket, so fallback is "MPTCP
/// listener, no `MPTCP_INFO`".
pub fn transport_of(fd: BorrowedFd<'_>, listener_mptcp: bool) -> Transport {
    if !listener_mptcp {
        return Transport::Tcp;
    }
    match mptcp_info(fd) {
        Ok(Some(_)) => Transport::Mptcp,
        _ => Transport::FallbackTcp,
    }
}

static NO_MPTCP_WARNED: AtomicBool = AtomicBool::new(false);

/// One subflow of an MPTCP connection, or the one path of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubflowSample {
    /// The kernel's subflow id within its connection (1 is the initial subflow).
    pub id: u32,
    /// The proxy's end.
    pub local: SocketAddr,
    /// The client's end.
    pub remote: SocketAddr,
    /// Bytes the client acknowledged on this subflow (`tcpi_bytes_acked`): download.
    pub bytes_acked: u64,
    /// Bytes received on this subflow (`tcpi_bytes_received`): upload.
    pub bytes_received: u64,
    /// Smoothed round-trip time in microseconds (`tcpi_rtt`); 0 if unknown.
    pub rtt_us: u32,
}

/// `struct mptcp_subflow_info`: a u32 id, then two 128-byte sockaddr_storage unions aligned to 8.
const SUBFLOW_INFO_LEN: usize = 264;
/// How much of `struct tcp_info` we ask for: up to and including `tcpi_bytes_received`.
const TCP_INFO_LEN: usize = 136;
const TCPI_BYTES_ACKED: std::ops::Range<usize> = 120..128;
const TCPI_BYTES_RECEIVED: std::ops::Range<usize> = 128..136;
const TCPI_RTT: std::ops::Range<usize> = 68..72;

fn u32_at(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    bytes
        .get(range)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_ne_bytes)
}
/// Subflows read per sample; the kernel reports the real count, the rest is ignored.
const MAX_SUBFLOWS: usize = 8;

fn u64_at(bytes: &[u8], range: std::ops::Range<usize>) -> u64 {
    bytes
        .get(range)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Decodes a `sockaddr_in`/`sockaddr_in6` held in `bytes`.
fn sockaddr_at(bytes: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]));
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::from(ip).to_canonical(), port))
        }
        _ => None,
    }
}

/// Every subflow of an MPTCP connection with its byte counters (`MPTCP_FULL_INFO`). `Ok(None)` when
/// the socket is not MPTCP or the kernel predates `MPTCP_FULL_INFO`.
pub fn mptcp_subflows(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<SubflowSample>>> {
    let mut subflow_info = [0u64; SUBFLOW_INFO_LEN * MAX_SUBFLOWS / 8];
    let mut tcp_info = [0u64; TCP_INFO_LEN * MAX_SUBFLOWS / 8];
    // struct mptcp_full_info: six u32 sizes, two u64 user pointers, then struct mptcp_info.
    let mut full = [0u8; 40 + size_of::<RawMptcpInfo>()];
    full[4..8].copy_from_slice(&(TCP_INFO_LEN as u32).to_ne_bytes());
    full[12..16].copy_from_slice(&(SUBFLOW_INFO_LEN as u32).to_ne_bytes());
    full[20..24].copy_from_slice(&(MAX_SUBFLOWS as u32).to_ne_bytes());
    full[24..32].copy_from_slice(&(subflow_info.as_mut_ptr() as u64).to_ne_bytes());
    full[32..40].copy_from_slice(&(tcp_info.as_mut_ptr() as u64).to_ne_bytes());
    let mut len = full.len() as libc::socklen_t;
    // SAFETY: `full` is writable for len bytes, and the pointers in it address buffers of
    // MAX_SUBFLOWS elements of the sizes declared, which the kernel writes at most.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_MPTCP,
            MPTCP_FULL_INFO,
            full.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(None),
            _ => Err(err),
        };
    }
    let word = |at: usize| u32::from_ne_bytes([full[at], full[at + 1], full[at + 2], full[at + 3]]);
    let (tcp_info_kernel, subflow_info_kernel, count) =
        (word(0) as usize, word(8) as usize, word(16) as usize);
    // SAFETY: reinterpreting initialised u64 buffers as bytes.
    let subflow_bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(subflow_info.as_ptr().cast(), subflow_info.len() * 8) };
    // SAFETY: as above.
    let tcp_bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(tcp_info.as_ptr().cast(), tcp_info.len() * 8) };
    let mut samples = Vec::new();
    for i in 0..count.min(MAX_SUBFLOWS) {
        let info = &subflow_bytes[i * SUBFLOW_INFO_LEN..(i + 1) * SUBFLOW_INFO_LEN];
        let tcp = &tcp_bytes[i * TCP_INFO_LEN..(i + 1) * TCP_INFO_LEN];
        let (Some(local), Some(remote)) =
            (sockaddr_at(&info[8..136]), sockaddr_at(&info[136..264]))
        else {
            continue;
        };
        let counters_present = tcp_info_kernel >= TCPI_BYTES_RECEIVED.end;
        samples.push(SubflowSample {
            id: u32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
            local,
            remote,
            bytes_acked: if counters_present {
                u64_at(tcp, TCPI_BYTES_ACKED)
            } else {
                0
            },
            bytes_received: if counters_present {
                u64_at(tcp, TCPI_BYTES_RECEIVED)
            } else {
                0
            },
            rtt_us: if tcp_info_kernel >= TCPI_RTT.end {
                u32_at(tcp, TCPI_RTT)
            } else {
                0
            },
        });
    }
    let _ = subflow_info_kernel;
    Ok(Some(samples))
}

/// The one path of a plain TCP socket, with its byte counters from `TCP_INFO`.
pub fn tcp_path(fd: BorrowedFd<'_>) -> io::Result<SubflowSample> {
    let mut info = [0u8; TCP_INFO_LEN];
    let mut len = TCP_INFO_LEN as libc::socklen_t;
    // SAFETY: info is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let counters_present = len as usize >= TCPI_BYTES_RECEIVED.end;
    let socket = SockRef::from(&fd);
    let not_inet = || io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket");
    Ok(SubflowSample {
        id: 1,
        local: socket.local_addr()?.as_socket().ok_or_else(not_inet)?,
        remote: socket.peer_addr()?.as_socket().ok_or_else(not_inet)?,
        bytes_acked: if counters_present {
            u64_at(&info, TCPI_BYTES_ACKED)
        } else {
            0
        },
        bytes_received: if counters_present {
            u64_at(&info, TCPI_BYTES_RECEIVED)
        } else {
            0
        },
        rtt_us: if len as usize >= TCPI_RTT.end {
            u32_at(&info, TCPI_RTT)
        } else {
            0
        },
    })
}

/// `SOCK_DIAG_BY_FAMILY` from `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_INFO` and `INET_DIAG_ULP_INFO` from `linux/inet_diag.h`, and the nested
/// `INET_ULP_INFO_MPTCP`.
const INET_DIAG_INFO: u8 = 2;
const INET_DIAG_ULP_INFO: u16 = 19;
const INET_ULP_INFO_MPTCP: u16 = 3;
/// `MPTCP_SUBFLOW_ATTR_FLAGS` from `linux/mptcp.h`.
const MPTCP_SUBFLOW_ATTR_FLAGS: u16 = 8;
/// `MPTCP_SUBFLOW_FLAG_BKUP_REM` and `_LOC`: the peer or this host marked the subflow backup.
pub const MPTCP_SUBFLOW_FLAG_BKUP_REM: u32 = 1 << 4;
/// See [`MPTCP_SUBFLOW_FLAG_BKUP_REM`].
pub const MPTCP_SUBFLOW_FLAG_BKUP_LOC: u32 = 1 << 5;
/// `struct inet_diag_msg` size, before the attributes of a sock_diag reply.
const INET_DIAG_MSG_LEN: usize = 72;

/// The MPTCP subflow flags (`MPTCP_SUBFLOW_FLAG_*`) of the TCP subflow `local`↔`remote`, from the
/// kernel's sock_diag ULP information, as `ss -tiO` shows them. `Ok(None)` when the kernel does not
/// tell (the subflow is gone, or the process lacks `CAP_NET_ADMIN`, which the ULP information needs).
pub fn subflow_flags(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    use mptcp_netlink::{attr_u32, parse_attrs, MessageBuilder, NetlinkSocket};

    let (local, remote) = (
        SocketAddr::new(local.ip().to_canonical(), local.port()),
        SocketAddr::new(remote.ip().to_canonical(), remote.port()),
    );
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let address = |ip: IpAddr| {
        let mut words = [0u8; 16];
        let bytes = ip_bytes(ip);
        words[..bytes.len()].copy_from_slice(&bytes);
        words
    };
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct inet_diag_sockid.
    let mut request = Vec::with_capacity(56);
    // idiag_ext asks for INET_DIAG_INFO: the kernel adds the ULP information only along with it.
    request.extend_from_slice(&[
        family as u8,
        libc::IPPROTO_TCP as u8,
        1 << (INET_DIAG_INFO - 1),
        0,
    ]);
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    request.extend_from_slice(&local.port().to_be_bytes());
    request.extend_from_slice(&remote.port().to_be_bytes());
    request.extend_from_slice(&address(local.ip()));
    request.extend_from_slice(&address(remote.ip()));
    request.extend_from_slice(&0u32.to_ne_bytes());
    // INET_DIAG_NOCOOKIE.
    request.extend_from_slice(&[0xff; 8]);
    let mut socket = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG)?;
    socket.set_recv_timeout(std::time::Duration::from_millis(500))?;
    let builder = MessageBuilder::new(SOCK_DIAG_BY_FAMILY, 0).header(&request);
    let replies = match socket.request(builder, "sock_diag subflow lookup") {
        Ok(replies) => replies,
        Err(err) if err.errno() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(io::Error::other(err)),
    };
    for reply in &replies {
        let Some(attributes) = reply.payload.get(INET_DIAG_MSG_LEN..) else {
            continue;
        };
        for (kind, ulp) in parse_attrs(attributes) {
            if kind != INET_DIAG_ULP_INFO {
                continue;
            }
            for (kind, mptcp) in parse_attrs(ulp) {
                if kind != INET_ULP_INFO_MPTCP {
                    continue;
                }
                if let Some(flags) = parse_attrs(mptcp)
                    .into_iter()
                    .find(|(kind, _)| *kind == MPTCP_SUBFLOW_ATTR_FLAGS)
                    .and_then(|(_, value)| attr_u32(value))
                {
                    return Ok(Some(flags));
                }
            }
        }
    }
    Ok(None)
}

/// The host's interfaces and their addresses (in the current network namespace).
pub fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    Ok(interface_networks()?
        .into_iter()
        .map(|(name, net)| (name, net.addr()))
        .collect())
}

/// The length of the prefix a netmask sockaddr describes (its leading one bits).
fn prefix_len(netmask: *const libc::sockaddr, family: i32) -> u8 {
    if netmask.is_null() {
        return if family == libc::AF_INET { 32 } else { 128 };
    }
    let ones = |bytes: &[u8]| {
        let mut n = 0u8;
        for byte in bytes {
            n += byte.leading_ones() as u8;
            if *byte != 0xff {
                break;
            }
        }
        n
    };
    if family == libc::AF_INET {
        // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(netmask as *const libc::sockaddr_in) };
        ones(&sin.sin_addr.s_addr.to_ne_bytes())
    } else {
        // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
        let sin6 = unsafe { &*(netmask as *const libc::sockaddr_in6) };
        ones(&sin6.sin6_addr.s6_addr)
    }
}

/// The host's interfaces with each address and its prefix (`10.0.1.1/24` on `p1`), in the current
/// network namespace.
pub fn interface_networks() -> io::Result<Vec<(String, ipnet::IpNet)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut networks = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned, until its null terminator.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated interface name.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says how large it is.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let ip = if family == libc::AF_INET {
            // SAFETY: family AF_INET means a sockaddr_in.
            let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
        } else if family == libc::AF_INET6 {
            // SAFETY: family AF_INET6 means a sockaddr_in6.
            let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
            IpAddr::from(sin6.sin6_addr.s6_addr)
        } else {
            continue;
        };
        let prefix = prefix_len(entry.ifa_netmask, family);
        if let Ok(net) = ipnet::IpNet::new(ip, prefix) {
            networks.push((name, net));
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(networks)
}

/// Whether a socket() error means "this kernel has no (enabled) MPTCP".
fn is_mptcp_unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EPROTONOSUPPORT) | Some(libc::ENOPROTOOPT)
    )
}

/// Creates a stream socket, MPTCP when asked and available, else TCP with one warning per process.
/// Returns the socket and whether it is MPTCP.
pub fn stream_socket(domain: Domain, mptcp: bool) -> io::Result<(Socket, bool)> {
    if mptcp {
        match Socket::new(domain, Type::STREAM, Some(Protocol::MPTCP)) {
            Ok(socket) => return Ok((socket, true)),
            Err(err) if is_mptcp_unavailable(&err) => {
                if !NO_MPTCP_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %err,
                        "the kernel has no MPTCP (or net.mptcp.enabled=0): using plain TCP; \
                         clients will get one path only"
                    );
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok((
        Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?,
        false,
    ))
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct BoundListener {
    /// The listener, non-blocking, ready for tokio.
    pub listener: std::net::TcpListener,
    /// Whether it is an MPTCP socket.
    pub mptcp: bool,
}

/// Binds a listener. IPv6 listeners are v6-only, so `0.0.0.0` and `[::]` can both be configured.
pub fn bind_listener(address: SocketAddr, mptcp: bool, tproxy: bool) -> io::Result<BoundListener> {
    let (socket, mptcp) = stream_socket(Domain::for_address(address), mptcp)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if tproxy {
        if address.is_ipv6() {
            socket.set_ip_transparent_v6(true)?;
        } else {
            socket.set_ip_transparent_v4(true)?;
        }
    }
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(BoundListener {
        listener: socket.into(),
        mptcp,
    })
}

/// Prepares an unconnected upstream socket for tokio (MPTCP when asked, with fallback).
pub fn upstream_socket(destination: SocketAddr, mptcp: bool) -> io::Result<tokio::net::TcpSocket> {
    let (socket, _) = stream_socket(Domain::for_address(destination), mptcp)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

/// The destination a redirected (REDIRECT/DNAT) connection was originally sent to, or `None` when the
/// connection was not NATed (under TPROXY the local address is then the original destination).
///
/// Tries `SO_ORIGINAL_DST` first (plain and fallback sockets), then conntrack over ctnetlink: on a real
/// MPTCP socket `SO_ORIGINAL_DST` is EOPNOTSUPP.
pub fn original_destination(stream: &tokio::net::TcpStream) -> io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    match so_original_dst(SockRef::from(stream), local.is_ipv6()) {
        Ok(addr) if addr != local => return Ok(Some(addr)),
        Ok(_) => return Ok(None),
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOENT) | Some(libc::ENOPROTOOPT)
            ) => {}
        Err(err) => return Err(err),
    }
    conntrack_original_destination(local, peer)
}

fn so_original_dst(socket: SockRef<'_>, ipv6: bool) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_in6 is larger than sockaddr_in; zeroed is a valid value for both.
    let mut storage: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let level = if ipv6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: storage is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if ipv6 {
        Ok(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(storage.sin6_addr.s6_addr)),
            u16::from_be(storage.sin6_port),
        ))
    } else {
        // SAFETY: for SOL_IP the kernel wrote a sockaddr_in, which fits in storage.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&storage as *const libc::sockaddr_in6).cast()) };
        Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
            u16::from_be(sin.sin_port),
        ))
    }
}

// ctnetlink constants (linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Asks conntrack for the connection whose reply tuple is `local → peer`; returns its original
/// destination if it differs from `local` (the connection was NATed), `None` if it was not.
pub fn conntrack_original_destination(
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<Option<SocketAddr>> {
    use mptcp_netlink::{parse_attrs, MessageBuilder, NetlinkSocket};

    let (local, peer) = (
        SocketAddr::new(local.ip().to_canonical(), local.port()),
        SocketAddr::new(peer.ip().to_canonical(), peer.port()),
    );
    let (family, src_attr, dst_attr) = if local.is_ipv4() {
        (libc::AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST)
    } else {
        (libc::AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST)
    };
    let request = MessageBuilder::new((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, 0)
        // struct nfgenmsg: family, version 0, res_id 0.
        .header(&[family as u8, 0, 0, 0])
        .begin_nest(CTA_TUPLE_REPLY)
        .begin_nest(CTA_TUPLE_IP)
        .attr(src_attr, &ip_bytes(local.ip()))
        .attr(dst_attr, &ip_bytes(peer.ip()))
        .end_nest()
        .begin_nest(CTA_TUPLE_PROTO)
        .attr_u8(CTA_PROTO_NUM, libc::IPPROTO_TCP as u8)
        .attr(CTA_PROTO_SRC_PORT, &local.port().to_be_bytes())
        .attr(CTA_PROTO_DST_PORT, &peer.port().to_be_bytes())
        .end_nest()
        .end_nest();
    let mut socket = NetlinkSocket::open(libc::NETLINK_NETFILTER)?;
    socket.set_recv_timeout(std::time::Duration::from_millis(500))?;
    let replies = match socket.request(request, "conntrack lookup") {
        Ok(replies) => replies,
        Err(err) if err.errno() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(io::Error::other(err)),
    };
    let (mut ip, mut port) = (None, None);
    // Each reply is a struct nfgenmsg (4 bytes) followed by attributes.
    let entries = replies.iter().filter_map(|reply| reply.payload.get(4..));
    for (kind, tuple) in entries.flat_map(parse_attrs) {
        if kind != CTA_TUPLE_ORIG {
            continue;
        }
        for (kind, value) in parse_attrs(tuple) {
            for (field, bytes) in parse_attrs(value) {
                match (kind, field, bytes.len()) {
                    (CTA_TUPLE_IP, CTA_IP_V4_DST, 4) | (CTA_TUPLE_IP, CTA_IP_V6_DST, 16) => {
                        ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
                            _ => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
                        };
                    }
                    (CTA_TUPLE_PROTO, CTA_PROTO_DST_PORT, 2) => {
                        port = Some(u16::from_be_bytes([bytes[0], bytes[1]]));
                    }
                    _ => {}
                }
            }
        }
    }
    match (ip, port) {
        (Some(ip), Some(port)) => {
            let original = SocketAddr::new(ip, port);
            Ok((original != local).then_some(original))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "conntrack entry without an original tuple",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn raw_mptcp_info_matches_the_kernel_layout() {
        // struct mptcp_info in linux/mptcp.h is 96 bytes on all architectures.
        assert_eq!(size_of::<RawMptcpInfo>(), 96);
    }

    #[test]
    fn subflow_flags_of_an_mptcp_subflow() {
        let bound =
            bind_listener("127.0.0.1:0".parse().expect("literal"), true, false).expect("bind");
        if !bound.mptcp || !mptcp_throttle::kernel::has_net_admin() {
            return;
        }
        let addr = bound.listener.local_addr().expect("local addr");
        bound.listener.set_nonblocking(false).expect("blocking");
        let (client, _) = stream_socket(Domain::IPV4, true).expect("socket");
        client.connect(&addr.into()).expect("connect");
        let (accepted, peer) = bound.listener.accept().expect("accept");
        let local = accepted.local_addr().expect("local");
        let flags = subflow_flags(local, peer)
            .expect("sock_diag")
            .expect("ULP flags");
        assert_eq!(
            flags & (MPTCP_SUBFLOW_FLAG_BKUP_REM | MPTCP_SUBFLOW_FLAG_BKUP_LOC),
            0
        );
    }

    #[test]
    fn mptcp_listener_reports_mptcp_and_tcp_client_falls_back() {
        let bound =
            bind_listener("127.0.0.1:0".parse().expect("literal"), true, false).expect("bind");
        let addr = bound.listener.local_addr().expect("local addr");
        bound.listener.set_nonblocking(false).expect("blocking");
        // A plain TCP client: the accepted MPTCP socket falls back.
        let _tcp = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = bound.listener.accept().expect("accept");
        if bound.mptcp {
            assert_eq!(transport_of(accepted.as_fd(), true), Transport::FallbackTcp);
            assert_eq!(mptcp_info(accepted.as_fd()).expect("getsockopt"), None);
            // An MPTCP client: the accepted socket is MPTCP with one subflow.
            let (client, _) = stream_socket(Domain::IPV4, true).expect("socket");
            client.connect(&addr.into()).expect("connect");
            let (accepted, _) = bound.listener.accept().expect("accept");
            assert_eq!(transport_of(accepted.as_fd(), true), Transport::Mptcp);
            let info = mptcp_info(accepted.as_fd())
                .expect("getsockopt")
                .expect("mptcp");
            assert_eq!(info.subflows, 1);
            assert_ne!(info.token, 0);
        } else {
            assert_eq!(transport_of(accepted.as_fd(), false), Transport::Tcp);
        }
    }
}
