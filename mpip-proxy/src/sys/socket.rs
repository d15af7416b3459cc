//! Path sockets: one UDP socket per local interface, bound to the device so
//! that its datagrams leave through that interface whatever the routing
//! table prefers.
//!
//! The module also wraps the kernel's UDP segmentation offloads for those
//! sockets: [`try_send_segments`] hands the kernel one buffer holding many
//! equal-sized datagrams (UDP GSO, `UDP_SEGMENT`, Linux 4.18+), and
//! [`recv_segments`] reads what a socket with [`enable_gro`] set may receive
//! as one coalesced batch (UDP GRO, Linux 5.0+), which [`split_segments`]
//! cuts back into datagrams.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;

/// Send and receive buffer size asked for path sockets.
pub const PATH_SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `address` (port 0 picks one) and to the device
/// `interface` (`SO_BINDTODEVICE`), with `SO_REUSEADDR`, 4 MiB buffers
/// (`SO_*BUFFORCE` when privileged, else capped by `net.core.*mem_max`),
/// `IPV6_V6ONLY` for IPv6, non-blocking, registered with the current tokio
/// runtime (an error outside one).
pub fn bind_path_socket(interface: &str, address: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "bind_path_socket must be called within a tokio runtime",
        ));
    }
    tokio::net::UdpSocket::from_std(bind_std(interface, address, false)?)
}

/// `count` path sockets on `interface` bound to the same `address` with
/// `SO_REUSEPORT`, in order, and (for more than one) the reuseport program
/// that gives each datagram to the socket of its sender's shard
/// ([`crate::sys::bpf::attach_reuseport_steering`]). Port 0 picks one port
/// for all. Non-blocking std sockets, to be registered with the runtime of
/// the thread that reads each.
pub fn bind_path_socket_group(
    interface: &str,
    address: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    if count <= 1 {
        return Ok(vec![bind_std(interface, address, false)?]);
    }
    let first = bind_std(interface, address, true)?;
    let address = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_std(interface, address, true)?);
    }
    super::bpf::attach_reuseport_steering(sockets[0].as_raw_fd(), count as u32).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("path sockets {address} on {interface}: SO_ATTACH_REUSEPORT_CBPF: {e}"),
        )
    })?;
    Ok(sockets)
}

fn bind_std(
    interface: &str,
    address: SocketAddr,
    reuse_port: bool,
) -> io::Result<std::net::UdpSocket> {
    super::ifreq::validate_name(interface, false)?;
    let context = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("path socket {address} on {interface}: {what}: {e}"),
        )
    };
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )
    .map_err(|e| context("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| context("SO_REUSEADDR", e))?;
    if reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(|e| context("SO_REUSEPORT", e))?;
    }
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(|e| context("SO_BINDTODEVICE", e))?;
    set_buffer(&socket, libc::SO_RCVBUFFORCE, PATH_SOCKET_BUFFER)
        .or_else(|_| socket.set_recv_buffer_size(PATH_SOCKET_BUFFER))
        .map_err(|e| context("SO_RCVBUF", e))?;
    set_buffer(&socket, libc::SO_SNDBUFFORCE, PATH_SOCKET_BUFFER)
        .or_else(|_| socket.set_send_buffer_size(PATH_SOCKET_BUFFER))
        .map_err(|e| context("SO_SNDBUF", e))?;
    if address.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| context("IPV6_V6ONLY", e))?;
    }
    socket
        .bind(&address.into())
        .map_err(|e| context("bind", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| context("O_NONBLOCK", e))?;
    Ok(socket.into())
}

/// `setsockopt(SOL_SOCKET, option, size)` for the `*BUFFORCE` options,
/// which socket2 does not wrap.
fn set_buffer(socket: &Socket, option: libc::c_int, size: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: value is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `UDP_SEGMENT` from `<linux/udp.h>`: the segment size of a GSO send
/// (a `u16` control message at level `SOL_UDP`).
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` from `<linux/udp.h>`: the socket option enabling GRO, and the
/// control message (an `int` holding the segment size) of a GRO batch.
const UDP_GRO: libc::c_int = 104;

/// Most segments the kernel accepts in one GSO send (`UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload of one IPv4 send: 65535 minus the 20-byte IPv4 and
/// 8-byte UDP headers. A GSO send's whole buffer is bound by it too.
pub const MAX_GSO_PAYLOAD_V4: usize = 65_507;
/// Largest UDP payload of one IPv6 send: 65535 (the IPv6 payload length)
/// minus the 8-byte UDP header.
pub const MAX_GSO_PAYLOAD_V6: usize = 65_527;

/// Room for the control messages of one receive or send: one `cmsghdr`
/// with an `int`, and slack. `u64` words keep it aligned for `cmsghdr`.
const CONTROL_WORDS: usize = 8;

/// Turns UDP GRO on for `socket` (`setsockopt(SOL_UDP, UDP_GRO, 1)`): the
/// kernel may then deliver several datagrams from one sender as one batch of
/// equal-sized segments, so the socket must from then on be read with
/// [`recv_segments`] or [`try_recv_segments`] and [`split_segments`], never
/// with `recv_from`, which would return the batch as one datagram.
///
/// Kernels before 5.0 answer `ENOPROTOOPT`; see [`try_enable_gro`].
pub fn enable_gro(socket: &tokio::net::UdpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the duration of the call, and its
    // size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            &one as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`enable_gro`], with `ENOPROTOOPT` and `EINVAL` (kernels without UDP
/// GRO) logged at debug level and answered `Ok(false)`; `Ok(true)` when GRO
/// is on.
pub fn try_enable_gro(socket: &tokio::net::UdpSocket) -> io::Result<bool> {
    match enable_gro(socket) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
            tracing::debug!(error = %e, "UDP GRO unavailable on this kernel");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// One receive from [`recv_segments`] or [`try_recv_segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written at the start of the buffer.
    pub len: usize,
    /// The sender.
    pub source: SocketAddr,
    /// `Some(n)` when the kernel returned a GRO batch: the bytes are then
    /// consecutive datagrams of `n` bytes each, the last possibly shorter.
    /// `None` for a single datagram.
    pub segment_size: Option<u16>,
}

/// Receives one datagram or one GRO batch into `buf` (one `recvmsg`),
/// waiting until the socket is readable. Meant for sockets with
/// [`enable_gro`] set, but works on any UDP socket (then `segment_size` is
/// always `None`).
///
/// A datagram or batch larger than `buf` is an error of kind
/// [`io::ErrorKind::InvalidData`] (`MSG_TRUNC`), and it is consumed; a GRO
/// batch can reach 64 KiB, so use a buffer of [`u16::MAX`] bytes or more.
pub async fn recv_segments(socket: &tokio::net::UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || recvmsg_segments(fd, buf))
        .await
}

/// [`recv_segments`] without waiting: [`io::ErrorKind::WouldBlock`] when
/// nothing is queued (tokio's readiness is cleared then, as for
/// `try_recv_from`).
pub fn try_recv_segments(socket: &tokio::net::UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let fd = socket.as_raw_fd();
    socket.try_io(Interest::READABLE, || recvmsg_segments(fd, buf))
}

/// Cuts what [`recv_segments`] returned (`&buf[..len]`) into its datagrams:
/// chunks of `segment_size` bytes, the last possibly shorter; all of `data`
/// as one datagram when `segment_size` is `None` (or `Some(0)`, which the
/// kernel never reports). Empty `data` is one empty datagram.
pub fn split_segments(data: &[u8], segment_size: Option<u16>) -> impl Iterator<Item = &[u8]> {
    let size = match segment_size {
        Some(n) if n > 0 => usize::from(n),
        _ => data.len().max(1),
    };
    data.chunks(size).chain(data.is_empty().then_some(data))
}

/// Sends `payload` to `remote` as datagrams of `segment_size` bytes, the last
/// possibly shorter, with one `sendmsg` carrying a `UDP_SEGMENT` control
/// message: the kernel (or the device) does the splitting (UDP GSO). Returns
/// `payload.len()`. Does not wait: [`io::ErrorKind::WouldBlock`] when the
/// socket buffer is full (tokio's readiness is cleared then, so
/// `socket.writable()` waits for room; as with tokio's `try_send_to`, that
/// includes a new socket whose writability tokio has not seen yet).
///
/// Refused with [`io::ErrorKind::InvalidInput`], before any system call:
/// a zero `segment_size`, more than [`MAX_GSO_SEGMENTS`] segments, or a
/// `payload` over [`MAX_GSO_PAYLOAD_V4`] (IPv4) or [`MAX_GSO_PAYLOAD_V6`]
/// (IPv6). The kernel also wants each segment plus headers to fit the
/// path's MTU (`EINVAL` otherwise).
///
/// Where the kernel cannot do GSO ([`gso_unsupported`] is true of the
/// error: no checksum offload on the device, an IPsec route, an old
/// kernel), send the datagrams one by one instead.
pub fn try_send_segments(
    socket: &tokio::net::UdpSocket,
    remote: SocketAddr,
    payload: &[u8],
    segment_size: u16,
) -> io::Result<usize> {
    check_segments(remote, payload, segment_size)?;
    let fd = socket.as_raw_fd();
    let remote = SockAddr::from(remote);
    socket.try_io(Interest::WRITABLE, || {
        sendmsg_segments(fd, &remote, payload, segment_size)
    })
}

/// [`try_send_segments`], waiting for room in the socket buffer instead of
/// answering [`io::ErrorKind::WouldBlock`].
pub async fn send_segments(
    socket: &tokio::net::UdpSocket,
    remote: SocketAddr,
    payload: &[u8],
    segment_size: u16,
) -> io::Result<usize> {
    check_segments(remote, payload, segment_size)?;
    let fd = socket.as_raw_fd();
    let remote = SockAddr::from(remote);
    socket
        .async_io(Interest::WRITABLE, || {
            sendmsg_segments(fd, &remote, payload, segment_size)
        })
        .await
}

/// Whether `err`, from [`try_send_segments`] or [`send_segments`], means
/// the kernel cannot do UDP GSO on this socket or route, so the caller
/// should fall back to one datagram per send: `EIO` (device without
/// checksum offload, or an IPsec route), `EINVAL` (also a segment too
/// large for the MTU), `ENOPROTOOPT` and `EOPNOTSUPP` (kernels without GSO).
pub fn gso_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// The checks of [`try_send_segments`] done before the system call.
fn check_segments(remote: SocketAddr, payload: &[u8], segment_size: u16) -> io::Result<()> {
    let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    if segment_size == 0 {
        return invalid("UDP GSO segment size 0".to_owned());
    }
    let limit = if remote.is_ipv4() {
        MAX_GSO_PAYLOAD_V4
    } else {
        MAX_GSO_PAYLOAD_V6
    };
    if payload.len() > limit {
        return invalid(format!(
            "UDP GSO payload of {} bytes exceeds {limit}",
            payload.len()
        ));
    }
    let segments = payload.len().div_ceil(usize::from(segment_size));
    if segments > MAX_GSO_SEGMENTS {
        return invalid(format!(
            "UDP GSO send of {segments} segments exceeds {MAX_GSO_SEGMENTS}"
        ));
    }
    Ok(())
}

/// One `recvmsg` on the non-blocking `fd`, decoding a `UDP_GRO` control
/// message.
fn recvmsg_segments(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: try_init hands a zeroed sockaddr_storage and its length; the
    // closure passes both to recvmsg as msg_name/msg_namelen and writes back
    // the length the kernel set, which never exceeds the storage.
    let ((len, flags, segment_size), address) = unsafe {
        SockAddr::try_init(|storage, storage_len| {
            // SAFETY: an all-zero msghdr is valid (null pointers, zero
            // lengths).
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *storage_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = mem::size_of_val(&control) as _;
            // SAFETY: every pointer in msg refers to live buffers of the
            // lengths given: buf (through iov), storage and control.
            let n = libc::recvmsg(fd, &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            *storage_len = msg.msg_namelen;
            // SAFETY: msg describes the control buffer the kernel just
            // filled; CMSG_FIRSTHDR/CMSG_NXTHDR stay within msg_controllen
            // and the data of a UDP_GRO message is at least an int long
            // (checked against cmsg_len); read_unaligned needs no alignment.
            let mut segment_size = None;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let header = &*cmsg;
                let want = libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as usize;
                if header.cmsg_level == libc::SOL_UDP
                    && header.cmsg_type == UDP_GRO
                    && header.cmsg_len as usize >= want
                {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                    segment_size = u16::try_from(size).ok().filter(|&s| s > 0);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            Ok((n as usize, msg.msg_flags, segment_size))
        })?
    };
    if flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "UDP datagram or GRO batch larger than the {}-byte buffer, dropped",
                buf.len()
            ),
        ));
    }
    if flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "UDP control messages truncated, GRO segment size unknown; dropped",
        ));
    }
    let source = address.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "UDP datagram from a non-IP address",
        )
    })?;
    Ok(Received {
        len,
        source,
        segment_size,
    })
}

/// One `sendmsg` on the non-blocking `fd` of `payload` to `remote` with a
/// `UDP_SEGMENT` control message of `segment_size`.
fn sendmsg_segments(
    fd: RawFd,
    remote: &SockAddr,
    payload: &[u8],
    segment_size: u16,
) -> io::Result<usize> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = remote.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = remote.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= mem::size_of_val(&control));
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `control`, which is aligned for cmsghdr
    // and at least CMSG_SPACE(2) bytes long, so the first header and its
    // two data bytes lie inside it; write_unaligned needs no alignment.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment_size);
    }
    // SAFETY: every pointer in msg refers to live buffers of the lengths
    // given; the kernel only reads through them (iov_base is cast to *mut
    // only because iovec is shared with recvmsg).
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{extra_netns, in_netns, on_thread_in, run, runtime, NetnsGuard};
    use socket2::SockRef;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Inner packet size of the MPIP path: 1500-byte MTU minus IPv4 and UDP.
    const SEGMENT: u16 = 1472;

    /// A veth pair between the test's namespace `ns` (`mpxga`, 10.34.0.1/24)
    /// and a new namespace (`mpxgb`, 10.34.0.2/24), returned with the guard
    /// deleting it.
    fn veth_to_extra_netns(ns: &str) -> NetnsGuard {
        let peer = extra_netns();
        let p = peer.name.as_str();
        run(
            "ip",
            &[
                "-n", ns, "link", "add", "mpxga", "type", "veth", "peer", "name", "mpxgb", "netns",
                p,
            ],
        );
        run(
            "ip",
            &["-n", ns, "addr", "add", "10.34.0.1/24", "dev", "mpxga"],
        );
        run(
            "ip",
            &["-n", p, "addr", "add", "10.34.0.2/24", "dev", "mpxgb"],
        );
        run("ip", &["-n", ns, "link", "set", "mpxga", "up"]);
        run("ip", &["-n", p, "link", "set", "mpxgb", "up"]);
        peer
    }

    /// 20 full, distinct datagrams and a shorter last one.
    fn test_payloads() -> Vec<Vec<u8>> {
        let mut payloads: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                (0..usize::from(SEGMENT))
                    .map(|j| i.wrapping_mul(31).wrapping_add(j as u8))
                    .collect()
            })
            .collect();
        payloads.push(b"the shorter last one".to_vec());
        payloads
    }

    /// How the receiver saw the datagrams: each datagram, and for each
    /// receive call its length and segment size.
    struct Arrival {
        datagrams: Vec<Vec<u8>>,
        receives: Vec<(usize, Option<u16>)>,
        gro: bool,
    }

    /// Binds a path socket on `mpxgb` in namespace `peer` (GRO on when
    /// `gro`), reports its address on the channel, and collects `count`
    /// datagrams with `recv_segments`.
    fn receiver(
        peer: &str,
        gro: bool,
        count: usize,
        ready: mpsc::Sender<SocketAddr>,
    ) -> std::thread::JoinHandle<Arrival> {
        on_thread_in(peer, move || {
            let rt = runtime();
            rt.block_on(async move {
                let socket = bind_path_socket("mpxgb", "10.34.0.2:0".parse().unwrap()).unwrap();
                let gro = gro && try_enable_gro(&socket).unwrap();
                ready.send(socket.local_addr().unwrap()).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut arrival = Arrival {
                    datagrams: Vec::new(),
                    receives: Vec::new(),
                    gro,
                };
                while arrival.datagrams.len() < count {
                    let got = tokio::time::timeout(
                        Duration::from_secs(5),
                        recv_segments(&socket, &mut buf),
                    )
                    .await
                    .expect("datagrams within 5 s")
                    .unwrap();
                    assert_eq!(got.source.ip().to_string(), "10.34.0.1");
                    arrival.receives.push((got.len, got.segment_size));
                    arrival.datagrams.extend(
                        split_segments(&buf[..got.len], got.segment_size).map(<[u8]>::to_vec),
                    );
                }
                arrival
            })
        })
    }

    /// Sends the test payloads as one GSO send across the veth to a receiver
    /// with or without GRO, and checks that all 21 arrive intact, in order.
    fn gso_across_veth(ns: &str, gro: bool) {
        let peer = veth_to_extra_netns(ns);
        let payloads = test_payloads();
        let (ready_tx, ready_rx) = mpsc::channel();
        let rx = receiver(&peer.name, gro, payloads.len(), ready_tx);
        let remote = ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let rt = runtime();
        rt.block_on(async {
            let socket = bind_path_socket("mpxga", "10.34.0.1:0".parse().unwrap()).unwrap();
            let batch = payloads.concat();
            let sent = send_segments(&socket, remote, &batch, SEGMENT)
                .await
                .unwrap();
            assert_eq!(sent, batch.len());
        });
        let arrival = rx.join().unwrap();
        eprintln!(
            "GSO of {} datagrams ({} bytes) to a receiver with GRO {}: {} receive(s) {:?}",
            payloads.len(),
            payloads.iter().map(Vec::len).sum::<usize>(),
            if arrival.gro { "on" } else { "off" },
            arrival.receives.len(),
            arrival.receives
        );
        assert_eq!(arrival.datagrams.len(), payloads.len());
        for (i, (got, want)) in arrival.datagrams.iter().zip(&payloads).enumerate() {
            assert!(got == want, "datagram {i} differs");
        }
        if !arrival.gro {
            assert_eq!(arrival.receives.len(), payloads.len());
            assert!(arrival.receives.iter().all(|(_, s)| s.is_none()));
        }
    }

    #[test]
    fn gso_send_reaches_a_gro_receiver_across_veth() {
        in_netns("gso_send_reaches_a_gro_receiver_across_veth", |ns| {
            gso_across_veth(ns, true);
        });
    }

    #[test]
    fn gso_send_reaches_a_plain_receiver_across_veth() {
        in_netns("gso_send_reaches_a_plain_receiver_across_veth", |ns| {
            gso_across_veth(ns, false);
        });
    }

    #[test]
    fn gso_limits_are_invalid_input() {
        let rt = runtime();
        rt.block_on(async {
            let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let remote = b.local_addr().unwrap();
            let invalid =
                |r: io::Result<usize>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
            // 65 segments.
            assert!(invalid(try_send_segments(
                &a,
                remote,
                &[0u8; 65 * 100],
                100
            )));
            // 64 and a byte.
            assert!(invalid(try_send_segments(
                &a,
                remote,
                &[0u8; 64 * 100 + 1],
                100
            )));
            // Over the IPv4 payload limit, and zero segment size.
            let big = vec![0u8; MAX_GSO_PAYLOAD_V4 + 1];
            assert!(invalid(try_send_segments(&a, remote, &big, 1472)));
            assert!(invalid(try_send_segments(&a, remote, &big, u16::MAX)));
            assert!(invalid(try_send_segments(&a, remote, b"x", 0)));
            let v6: SocketAddr = "[::1]:9".parse().unwrap();
            let big6 = vec![0u8; MAX_GSO_PAYLOAD_V6 + 1];
            assert!(invalid(try_send_segments(&a, v6, &big6, u16::MAX)));
            // Exactly 64 segments is fine, on loopback too.
            let enabled = try_enable_gro(&b).unwrap();
            let batch: Vec<u8> = (0..64 * 100).map(|i| (i / 100) as u8).collect();
            a.writable().await.unwrap();
            assert_eq!(
                try_send_segments(&a, remote, &batch, 100).unwrap(),
                batch.len()
            );
            let mut buf = vec![0u8; 1 << 16];
            let mut seen = Vec::new();
            let mut receives = 0;
            while seen.len() < 64 {
                let got = tokio::time::timeout(Duration::from_secs(5), recv_segments(&b, &mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                receives += 1;
                assert_eq!(got.source, a.local_addr().unwrap());
                seen.extend(split_segments(&buf[..got.len], got.segment_size).map(<[u8]>::to_vec));
            }
            eprintln!("loopback GSO of 64 x 100 bytes, GRO {enabled}: {receives} receive(s)");
            for (i, d) in seen.iter().enumerate() {
                assert_eq!(d, &vec![i as u8; 100]);
            }
            // Nothing left: WouldBlock.
            let err = try_recv_segments(&b, &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        });
    }

    #[test]
    fn a_datagram_larger_than_the_buffer_is_invalid_data() {
        let rt = runtime();
        rt.block_on(async {
            let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            a.send_to(&[1u8; 100], b.local_addr().unwrap())
                .await
                .unwrap();
            a.send_to(b"next", b.local_addr().unwrap()).await.unwrap();
            let mut small = [0u8; 50];
            let err = recv_segments(&b, &mut small).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // The truncated datagram is gone; the next one is intact.
            let got = recv_segments(&b, &mut small).await.unwrap();
            assert_eq!(&small[..got.len], b"next");
            assert_eq!(got.segment_size, None);
        });
    }

    #[test]
    fn split_segments_cuts_batches() {
        let data: Vec<u8> = (0..10).collect();
        let parts: Vec<&[u8]> = split_segments(&data, Some(4)).collect();
        assert_eq!(parts, [&[0, 1, 2, 3][..], &[4, 5, 6, 7], &[8, 9]]);
        let parts: Vec<&[u8]> = split_segments(&data, Some(5)).collect();
        assert_eq!(parts, [&[0, 1, 2, 3, 4][..], &[5, 6, 7, 8, 9]]);
        assert_eq!(split_segments(&data, None).collect::<Vec<_>>(), [&data[..]]);
        assert_eq!(
            split_segments(&data, Some(0)).collect::<Vec<_>>(),
            [&data[..]]
        );
        assert_eq!(
            split_segments(&data, Some(100)).collect::<Vec<_>>(),
            [&data[..]]
        );
        let empty: &[u8] = &[];
        assert_eq!(split_segments(empty, None).collect::<Vec<_>>(), [empty]);
        assert_eq!(split_segments(empty, Some(4)).collect::<Vec<_>>(), [empty]);
    }

    #[test]
    fn gso_unsupported_recognises_kernel_refusals() {
        for code in [libc::EIO, libc::EINVAL, libc::ENOPROTOOPT, libc::EOPNOTSUPP] {
            assert!(gso_unsupported(&io::Error::from_raw_os_error(code)));
        }
        assert!(!gso_unsupported(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
        assert!(!gso_unsupported(&io::Error::from(
            io::ErrorKind::InvalidInput
        )));
    }

    /// Bytes moved by [`throughput`] per mode.
    const BENCH_BYTES: usize = 200 << 20;

    /// Sends [`BENCH_BYTES`] of 1472-byte datagrams across the veth, one
    /// `try_send_to` each or 32 per GSO send, to a receiver reading with
    /// `recv_from` or (GRO on) `recv_segments`; returns the bytes and
    /// datagrams received, the receive calls, and the time from the first
    /// send to the last receive and to the end of sending.
    fn throughput(ns_peer: &str, batched: bool) -> (usize, usize, usize, Duration, Duration) {
        let (ready_tx, ready_rx) = mpsc::channel();
        let rx = on_thread_in(ns_peer, move || {
            let rt = runtime();
            rt.block_on(async move {
                let socket = bind_path_socket("mpxgb", "10.34.0.2:0".parse().unwrap()).unwrap();
                if batched {
                    enable_gro(&socket).unwrap();
                }
                ready_tx.send(socket.local_addr().unwrap()).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let (mut bytes, mut datagrams, mut receives) = (0usize, 0usize, 0usize);
                let mut last = Instant::now();
                // Until everything is in, or nothing for 300 ms (drops).
                while bytes < BENCH_BYTES {
                    let got = tokio::time::timeout(Duration::from_millis(300), async {
                        if batched {
                            let r = recv_segments(&socket, &mut buf).await.unwrap();
                            (r.len, split_segments(&buf[..r.len], r.segment_size).count())
                        } else {
                            (socket.recv_from(&mut buf).await.unwrap().0, 1)
                        }
                    })
                    .await;
                    let Ok((n, count)) = got else { break };
                    last = Instant::now();
                    bytes += n;
                    datagrams += count;
                    receives += 1;
                }
                (bytes, datagrams, receives, last)
            })
        });
        let remote = ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let rt = runtime();
        let start = Instant::now();
        rt.block_on(async {
            let socket = bind_path_socket("mpxga", "10.34.0.1:0".parse().unwrap()).unwrap();
            let batch = vec![0x5au8; 32 * usize::from(SEGMENT)];
            let mut sent = 0;
            while sent < BENCH_BYTES {
                let r = if batched {
                    try_send_segments(&socket, remote, &batch, SEGMENT)
                } else {
                    socket.try_send_to(&batch[..usize::from(SEGMENT)], remote)
                };
                match r {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        socket.writable().await.unwrap();
                    }
                    Err(e) => panic!("send: {e}"),
                }
            }
        });
        let sending = start.elapsed();
        let (bytes, datagrams, receives, last) = rx.join().unwrap();
        (bytes, datagrams, receives, last - start, sending)
    }

    #[test]
    fn gso_gro_versus_one_datagram_per_call() {
        in_netns("gso_gro_versus_one_datagram_per_call", |ns| {
            let peer = veth_to_extra_netns(ns);
            let mut rates = Vec::new();
            for batched in [false, true] {
                let (bytes, datagrams, receives, elapsed, sending) =
                    throughput(&peer.name, batched);
                let rate = bytes as f64 / elapsed.as_secs_f64() / 1e6;
                eprintln!(
                    "{}: {} of {} MiB received ({datagrams} datagrams in {receives} receives) \
                     in {:.3} s, {rate:.0} MB/s; sender done in {:.3} s",
                    if batched {
                        "GSO+GRO x32"
                    } else {
                        "one datagram per call"
                    },
                    bytes >> 20,
                    BENCH_BYTES >> 20,
                    elapsed.as_secs_f64(),
                    sending.as_secs_f64()
                );
                rates.push(rate);
            }
            eprintln!(
                "GSO+GRO speed-up (received bytes per second): {:.2}x",
                rates[1] / rates[0]
            );
        });
    }

    #[test]
    fn bad_interface_names_are_refused() {
        let rt = runtime();
        let _enter = rt.enter();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for name in ["", "a/b", "0123456789abcdef", "x\0"] {
            let err = bind_path_socket(name, addr).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn outside_a_runtime_is_an_error() {
        let err = bind_path_socket("lo", "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
    }

    #[test]
    fn a_socket_group_gives_each_node_id_to_its_shard() {
        in_netns("a_socket_group_gives_each_node_id_to_its_shard", |_| {
            let group = bind_path_socket_group("lo", "127.0.0.1:0".parse().unwrap(), 3).unwrap();
            let port = group[0].local_addr().unwrap().port();
            assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            // Node IDs whose bytes 2..6 are 0..6: shard id % 3. Different
            // source ports too, so the kernel's own hash cannot explain it.
            for id in 0u32..6 {
                let mut datagram = vec![1u8, 0];
                datagram.extend_from_slice(&[2, 0]);
                datagram.extend_from_slice(&id.to_be_bytes());
                datagram.extend_from_slice(&[0u8; 20]);
                let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                from.send_to(&datagram, ("127.0.0.1", port)).unwrap();
            }
            sender.send_to(b"ab", ("127.0.0.1", port)).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let mut got = vec![Vec::new(); 3];
            for (shard, socket) in group.iter().enumerate() {
                let mut buf = [0u8; 64];
                while let Ok((n, _)) = socket.recv_from(&mut buf) {
                    got[shard].push(if n >= 8 {
                        u32::from_be_bytes(buf[4..8].try_into().unwrap())
                    } else {
                        u32::MAX
                    });
                }
            }
            assert_eq!(
                got[0],
                vec![0, 3, u32::MAX],
                "short datagrams go to the first"
            );
            assert_eq!(got[1], vec![1, 4]);
            assert_eq!(got[2], vec![2, 5]);
        });
    }

    #[test]
    fn path_sockets_bind_to_the_device_and_exchange() {
        in_netns("path_sockets_bind_to_the_device_and_exchange", |ns| {
            run(
                "ip",
                &[
                    "-n", ns, "link", "add", "mpxpa", "type", "veth", "peer", "name", "mpxpb",
                ],
            );
            run(
                "ip",
                &["-n", ns, "addr", "add", "10.33.0.1/24", "dev", "mpxpa"],
            );
            run("ip", &["-n", ns, "link", "set", "mpxpa", "up"]);
            run("ip", &["-n", ns, "link", "set", "mpxpb", "up"]);
            let rt = runtime();
            rt.block_on(async {
                // IPv4 on loopback.
                let a = bind_path_socket("lo", "127.0.0.1:0".parse().unwrap()).unwrap();
                let b = bind_path_socket("lo", "127.0.0.1:0".parse().unwrap()).unwrap();
                let sock = SockRef::from(&a);
                assert_eq!(sock.device().unwrap().as_deref(), Some(&b"lo"[..]));
                assert!(sock.reuse_address().unwrap());
                // The kernel doubles the value for bookkeeping.
                assert!(sock.recv_buffer_size().unwrap() >= PATH_SOCKET_BUFFER);
                assert!(sock.send_buffer_size().unwrap() >= PATH_SOCKET_BUFFER);
                a.send_to(b"ping", b.local_addr().unwrap()).await.unwrap();
                let mut buf = [0u8; 16];
                let (n, from) = tokio::time::timeout(Duration::from_secs(5), b.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&buf[..n], b"ping");
                assert_eq!(from, a.local_addr().unwrap());

                // IPv6 on loopback, v6-only.
                let c = bind_path_socket("lo", "[::1]:0".parse().unwrap()).unwrap();
                let d = bind_path_socket("lo", "[::]:0".parse().unwrap()).unwrap();
                assert!(SockRef::from(&d).only_v6().unwrap());
                c.send_to(b"ping6", ("::1", d.local_addr().unwrap().port()))
                    .await
                    .unwrap();
                let (n, _) = tokio::time::timeout(Duration::from_secs(5), d.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&buf[..n], b"ping6");

                // Bound to the veth: 127.0.0.1 is not reachable through it,
                // even though the routing table would use lo.
                let e = bind_path_socket("mpxpa", "0.0.0.0:0".parse().unwrap()).unwrap();
                assert_eq!(
                    SockRef::from(&e).device().unwrap().as_deref(),
                    Some(&b"mpxpa"[..])
                );
                let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let _ = e.send_to(b"lost", listener.local_addr().unwrap()).await;
                let lost =
                    tokio::time::timeout(Duration::from_millis(200), listener.recv_from(&mut buf))
                        .await;
                assert!(lost.is_err(), "a device-bound socket reached loopback");

                // A missing device.
                assert!(bind_path_socket("mpxnope0", "0.0.0.0:0".parse().unwrap()).is_err());
            });
        });
    }
}
