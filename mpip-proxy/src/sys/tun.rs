//! Linux TUN device (`IFF_TUN | IFF_NO_PI`): raw IP packets in and out of a
//! non-blocking descriptor driven by tokio. With offloads
//! ([`TunDevice::create_with_offload`]) every packet read or written is led by
//! a `virtio_net_hdr` ([`crate::offload`]).
//!
//! The device is not persistent: when the last descriptor closes (the
//! [`TunDevice`] is dropped) the kernel deletes the interface together with
//! its addresses and routes.
//!
//! Configuration calls are blocking ioctls on an `AF_INET` socket of the
//! calling thread's network namespace (which should be the one the device was
//! created in).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::ifreq;
use crate::offload::VNET_HDR_LEN;

/// The transmit queue length [`TunDevice::create`] sets (a TUN starts at 500,
/// which drops packets in bursts when the reader is briefly late).
pub const DEFAULT_TXQUEUELEN: u32 = 1000;

/// A TUN device. Share it between a reading and a writing task with an
/// `Arc`: every I/O method takes `&self`.
#[derive(Debug)]
pub struct TunDevice {
    fd: AsyncFd<OwnedFd>,
    name: String,
    ifindex: u32,
    vnet_hdr: bool,
}

impl TunDevice {
    /// Creates a TUN device named `name` (may contain `%d`, which the kernel
    /// replaces by the first free number; [`TunDevice::name`] returns the
    /// result) and sets its transmit queue length to
    /// [`DEFAULT_TXQUEUELEN`]. The device starts down, without addresses.
    ///
    /// Must be called within a tokio runtime (the descriptor is registered
    /// with its reactor); outside one this returns an error.
    pub fn create(name: &str) -> io::Result<TunDevice> {
        Self::open(name, false, false)
    }

    /// Like [`TunDevice::create`], with `IFF_VNET_HDR` (a 10-byte
    /// `virtio_net_hdr` leads every packet read and written) and the offloads
    /// `TUN_F_CSUM | TUN_F_TSO4`: reads may carry IPv4 TCP packets of up to
    /// 64 KiB to segment and checksums to complete
    /// ([`crate::offload::split`]); size read buffers for
    /// [`crate::offload::MAX_READ`].
    pub fn create_with_offload(name: &str) -> io::Result<TunDevice> {
        Self::open(name, true, false)
    }

    /// One queue of a multi-queue device (`IFF_MULTI_QUEUE`): the first call
    /// with a name creates the device, later calls with the name it got
    /// attach more queues, each read by its own thread. Which queue the
    /// kernel hands a packet to follows the flow hash, or a steering program
    /// ([`crate::sys::bpf::set_tun_steering`]).
    pub fn create_queue(name: &str, offload: bool) -> io::Result<TunDevice> {
        Self::open(name, offload, true)
    }

    fn open(name: &str, offload: bool, multi_queue: bool) -> io::Result<TunDevice> {
        let mut req = ifreq::ifreq(name)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "TunDevice::create must be called within a tokio runtime",
            ));
        }
        // SAFETY: the path is a valid C string; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("open /dev/net/tun: {err}"),
            ));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if offload {
            flags |= libc::IFF_VNET_HDR;
        }
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        ifreq::ioctl(&fd, libc::TUNSETIFF as libc::c_ulong, &mut req)
            .map_err(|e| io::Error::new(e.kind(), format!("TUNSETIFF {name:?}: {e}")))?;
        if offload {
            set_offloads(&fd).map_err(|e| io::Error::new(e.kind(), format!("{name:?}: {e}")))?;
        }
        let name = ifreq::ifreq_name(&req);
        let ifindex = ifindex_of(&name)?;
        // SAFETY: fd is an open descriptor owned by the OwnedFd, which the
        // AsyncFd owns from here on and never replaces; it stays open, and
        // refers to the same file description, until the AsyncFd is dropped.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)?
        };
        let device = TunDevice {
            fd,
            name,
            ifindex,
            vnet_hdr: offload,
        };
        device.set_txqueuelen(DEFAULT_TXQUEUELEN)?;
        Ok(device)
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether a `virtio_net_hdr` leads every packet read and written
    /// (created with [`TunDevice::create_with_offload`]).
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Where the IP packet starts in what is read or written.
    fn ip_offset(&self) -> usize {
        if self.vnet_hdr {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    fn request(&self) -> io::Result<libc::ifreq> {
        ifreq::ifreq(&self.name)
    }

    fn config_ioctl(
        &self,
        what: &str,
        request: libc::c_ulong,
        req: &mut libc::ifreq,
    ) -> io::Result<()> {
        let socket = ifreq::control_socket()?;
        ifreq::ioctl(&socket, request, req)
            .map_err(|e| io::Error::new(e.kind(), format!("{what} on {}: {e}", self.name)))
    }

    /// Sets the MTU (at least 68 for IPv4, 1280 to keep IPv6).
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mut req = self.request()?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.config_ioctl("SIOCSIFMTU", libc::SIOCSIFMTU, &mut req)
    }

    /// Sets the transmit queue length (packets the kernel queues for the
    /// reader before dropping).
    pub fn set_txqueuelen(&self, len: u32) -> io::Result<()> {
        let len = libc::c_int::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "txqueuelen too large"))?;
        let mut req = self.request()?;
        // ifr_qlen is the int member of the union, the same slot as ifr_ifindex.
        req.ifr_ifru.ifru_ifindex = len;
        self.config_ioctl("SIOCSIFTXQLEN", libc::SIOCSIFTXQLEN, &mut req)
    }

    /// Sets the IPv4 address and netmask (`prefix_len` 0..=32). Once the
    /// device is up the kernel adds the connected route for the subnet.
    pub fn set_ipv4(&self, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mask = prefix_mask_v4(prefix_len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("IPv4 prefix length {prefix_len} > 32"),
            )
        })?;
        let mut req = self.request()?;
        req.ifr_ifru.ifru_addr = ifreq::sockaddr_v4(addr);
        self.config_ioctl("SIOCSIFADDR", libc::SIOCSIFADDR, &mut req)?;
        let mut req = self.request()?;
        req.ifr_ifru.ifru_netmask = ifreq::sockaddr_v4(mask);
        self.config_ioctl("SIOCSIFNETMASK", libc::SIOCSIFNETMASK, &mut req)
    }

    /// Brings the device up.
    pub fn set_up(&self) -> io::Result<()> {
        let mut req = self.request()?;
        self.config_ioctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.config_ioctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut req)
    }

    /// Reads one packet into `buf`, waiting until one is available. Size
    /// `buf` for the MTU: a longer packet is consumed and reported as an
    /// `InvalidData` error (the device is still usable). With
    /// [`TunDevice::vnet_hdr`] the packet is led by its virtio header.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let offset = self.ip_offset();
        self.fd
            .async_io(Interest::READABLE, |fd| {
                read_fd(fd.as_raw_fd(), buf, offset)
            })
            .await
    }

    /// Writes one packet (a whole IPv4 or IPv6 packet, led by a virtio
    /// header with [`TunDevice::vnet_hdr`]), waiting while the descriptor is
    /// not writable.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| write_fd(fd.as_raw_fd(), packet))
            .await
    }

    /// Reads one packet if one is queued; `WouldBlock` otherwise.
    ///
    /// This is a plain `read(2)`, not gated on the readiness tokio has seen,
    /// so it also works before the runtime ever polled the descriptor (for
    /// example to drain the queue after [`TunDevice::recv`]). A
    /// `WouldBlock` here leaves tokio's readiness as it was; the next
    /// `recv` then finds out and waits.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf, self.ip_offset())
    }

    /// Writes one packet if the descriptor accepts it now; `WouldBlock`
    /// otherwise. A plain `write(2)`, like [`TunDevice::try_recv`].
    pub fn try_send(&self, packet: &[u8]) -> io::Result<usize> {
        write_fd(self.fd.as_raw_fd(), packet)
    }

    /// Polls for one packet (for hand-written futures and streams).
    pub fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let offset = self.ip_offset();
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            match guard.try_io(|fd| read_fd(fd.as_raw_fd(), buf, offset)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TunDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// `TUNSETVNETHDRSZ` to [`VNET_HDR_LEN`], then `TUNSETOFFLOAD` with checksum
/// and IPv4 TSO.
fn set_offloads(fd: &OwnedFd) -> io::Result<()> {
    let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, valid for
    // the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("TUNSETVNETHDRSZ: {err}"),
        ));
    }
    let offloads = libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("TUNSETOFFLOAD: {err}")));
    }
    Ok(())
}

/// Reads one packet; the IP header starts `ip_offset` bytes in (after the
/// virtio header, if any).
fn read_fd(fd: RawFd, buf: &mut [u8], ip_offset: usize) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n >= 0 {
            let n = n as usize;
            // A packet larger than the buffer is cut to the buffer's size
            // (this kernel returns the copied length, not the packet's), so
            // a full buffer is checked against the IP header's length.
            let real_len = if n > buf.len() {
                Some(n)
            } else if n == buf.len() {
                buf.get(ip_offset..)
                    .and_then(ip_packet_len)
                    .map(|len| len + ip_offset)
                    .filter(|len| *len > n)
            } else {
                None
            };
            if let Some(len) = real_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "TUN packet of {len} bytes dropped: larger than the {}-byte buffer",
                        buf.len()
                    ),
                ));
            }
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn write_fd(fd: RawFd, packet: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: packet is valid for reads of packet.len() bytes.
        let n = unsafe { libc::write(fd, packet.as_ptr() as *const libc::c_void, packet.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The length an IPv4 or IPv6 header announces for its packet.
fn ip_packet_len(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => packet
            .get(2..4)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
        6 => packet
            .get(4..6)
            .map(|b| 40 + usize::from(u16::from_be_bytes([b[0], b[1]]))),
        _ => None,
    }
}

/// The index of interface `name` in the calling thread's namespace.
pub(crate) fn ifindex_of(name: &str) -> io::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: c_name is a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("if_nametoindex {name:?}: {err}"),
        ));
    }
    Ok(index)
}

/// The netmask of an IPv4 prefix length, `None` above 32.
pub fn prefix_mask_v4(prefix_len: u8) -> Option<Ipv4Addr> {
    match prefix_len {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run, runtime, udp_packet};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask_v4(0), Some(Ipv4Addr::new(0, 0, 0, 0)));
        assert_eq!(prefix_mask_v4(1), Some(Ipv4Addr::new(128, 0, 0, 0)));
        assert_eq!(prefix_mask_v4(24), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(prefix_mask_v4(31), Some(Ipv4Addr::new(255, 255, 255, 254)));
        assert_eq!(prefix_mask_v4(32), Some(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(prefix_mask_v4(33), None);
        assert_eq!(prefix_mask_v4(255), None);
    }

    #[test]
    fn header_lengths() {
        assert_eq!(ip_packet_len(&[]), None);
        assert_eq!(ip_packet_len(&[0x45, 0]), None);
        assert_eq!(ip_packet_len(&[0x45, 0, 0x05, 0xdc]), Some(1500));
        assert_eq!(ip_packet_len(&[0x60, 0, 0, 0, 0x00, 0x08]), Some(48));
        assert_eq!(ip_packet_len(&[0x10, 0, 0, 0, 0, 0]), None);
        // A full buffer holding a complete packet is fine.
        let (r, w) = std::os::unix::net::UnixDatagram::pair().unwrap();
        w.send(&[0x45, 0, 0, 4]).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(read_fd(r.as_raw_fd(), &mut buf, 0).unwrap(), 4);
        w.send(&[0x45, 0, 0, 5, 0]).unwrap();
        let err = read_fd(r.as_raw_fd(), &mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Behind a virtio header: the IP length is read after it.
        let mut buf = [0u8; 14];
        w.send(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 4])
            .unwrap();
        assert_eq!(read_fd(r.as_raw_fd(), &mut buf, 10).unwrap(), 14);
        w.send(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 5, 0])
            .unwrap();
        let err = read_fd(r.as_raw_fd(), &mut buf, 10).unwrap_err();
        assert!(err.to_string().contains("15 bytes"), "{err}");
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        for name in ["", "0123456789abcdef", "a/b", "a\0b"] {
            let err = TunDevice::create(name).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn tun_configure_exchange_and_vanish() {
        in_netns("tun_configure_exchange_and_vanish", |ns| {
            let rt = runtime();
            rt.block_on(async {
                let tun = Arc::new(TunDevice::create("mpxtun%d").expect("create"));
                assert_eq!(tun.name(), "mpxtun0");
                assert_eq!(ifindex_of("mpxtun0").unwrap(), tun.ifindex());
                tun.set_mtu(1400).unwrap();
                tun.set_ipv4(Ipv4Addr::new(10, 77, 0, 1), 24).unwrap();
                tun.set_up().unwrap();

                let json = run("ip", &["-n", ns, "-j", "addr", "show", "dev", "mpxtun0"]);
                assert!(json.contains("\"local\":\"10.77.0.1\""), "{json}");
                assert!(json.contains("\"prefixlen\":24"), "{json}");
                assert!(json.contains("\"mtu\":1400"), "{json}");
                assert!(json.contains("\"txqlen\":1000"), "{json}");
                assert!(json.contains("\"UP\""), "{json}");
                let routes = run("ip", &["-n", ns, "route", "show", "dev", "mpxtun0"]);
                assert!(routes.contains("10.77.0.0/24"), "{routes}");

                // No IPv4 queued yet; the kernel may already have sent IPv6
                // router solicitations / MLD reports (48-byte packets) since
                // the device came up.
                let mut buf = [0u8; 2048];
                loop {
                    match tun.try_recv(&mut buf) {
                        Ok(n) => assert_eq!(buf[0] >> 4, 6, "unexpected {:?}", &buf[..n]),
                        Err(e) => {
                            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                            break;
                        }
                    }
                }

                // Kernel -> TUN: a datagram to a peer in the subnet.
                let reader = {
                    let tun = Arc::clone(&tun);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 2048];
                        loop {
                            let n = tun.recv(&mut buf).await.unwrap();
                            let p = &buf[..n];
                            // Skip anything else the kernel sends (IPv6 RS, ...).
                            if n >= 20 && p[0] >> 4 == 4 && p[9] == 17 {
                                return p.to_vec();
                            }
                        }
                    })
                };
                let sock = tokio::net::UdpSocket::bind("10.77.0.1:0").await.unwrap();
                sock.send_to(b"hello tun", "10.77.0.2:9999").await.unwrap();
                let packet = tokio::time::timeout(Duration::from_secs(5), reader)
                    .await
                    .expect("packet within 5 s")
                    .unwrap();
                assert_eq!(&packet[12..16], &[10, 77, 0, 1]);
                assert_eq!(&packet[16..20], &[10, 77, 0, 2]);
                assert_eq!(&packet[22..24], &9999u16.to_be_bytes());
                assert!(packet.ends_with(b"hello tun"));

                // TUN -> kernel: a datagram from the peer to our socket.
                let port = sock.local_addr().unwrap().port();
                let inbound = udp_packet(
                    Ipv4Addr::new(10, 77, 0, 2),
                    Ipv4Addr::new(10, 77, 0, 1),
                    9999,
                    port,
                    b"hello host",
                );
                let writer = Arc::clone(&tun);
                let sent = tokio::spawn(async move { writer.send(&inbound).await })
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(sent, 20 + 8 + 10);
                let mut rbuf = [0u8; 64];
                let (n, from) =
                    tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut rbuf))
                        .await
                        .expect("datagram within 5 s")
                        .unwrap();
                assert_eq!(&rbuf[..n], b"hello host");
                assert_eq!(from, "10.77.0.2:9999".parse().unwrap());
                // try_send works too.
                let again = udp_packet(
                    Ipv4Addr::new(10, 77, 0, 2),
                    Ipv4Addr::new(10, 77, 0, 1),
                    9999,
                    port,
                    b"again",
                );
                assert_eq!(tun.try_send(&again).unwrap(), again.len());
                let (n, _) =
                    tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut rbuf))
                        .await
                        .unwrap()
                        .unwrap();
                assert_eq!(&rbuf[..n], b"again");

                // A burst: one async receive, then drain with try_recv.
                for i in 0..3u8 {
                    sock.send_to(&[i], "10.77.0.3:9999").await.unwrap();
                }
                let mut got = Vec::new();
                let mut buf = vec![0u8; 2048];
                let n = tokio::time::timeout(
                    Duration::from_secs(5),
                    std::future::poll_fn(|cx| tun.poll_recv(cx, &mut buf)),
                )
                .await
                .unwrap()
                .unwrap();
                got.push(buf[..n].to_vec());
                for _ in 0..100 {
                    match tun.try_recv(&mut buf) {
                        Ok(n) => got.push(buf[..n].to_vec()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if got.iter().filter(|p| p[0] >> 4 == 4).count() >= 3 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => panic!("try_recv: {e}"),
                    }
                }
                let payloads: Vec<u8> = got
                    .iter()
                    .filter(|p| p[0] >> 4 == 4 && p[16..20] == [10, 77, 0, 3])
                    .map(|p| p[28])
                    .collect();
                assert_eq!(payloads, vec![0, 1, 2]);

                // A packet larger than the buffer is an error, not a panic.
                sock.send_to(&[7u8; 1000], "10.77.0.3:9999").await.unwrap();
                let mut small = [0u8; 100];
                let err = loop {
                    match tokio::time::timeout(Duration::from_secs(5), tun.recv(&mut small))
                        .await
                        .unwrap()
                    {
                        Ok(n) => assert_eq!(small[0] >> 4, 6, "{:?}", &small[..n]),
                        Err(e) => break e,
                    }
                };
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
                assert!(err.to_string().contains("1028 bytes"), "{err}");
                // The next packet is read normally.
                sock.send_to(b"after", "10.77.0.3:9999").await.unwrap();
                let mut buf = vec![0u8; 2048];
                loop {
                    let n = tun.recv(&mut buf).await.unwrap();
                    if buf[0] >> 4 == 4 {
                        assert!(buf[..n].ends_with(b"after"));
                        break;
                    }
                }

                // A second device gets the next number.
                let second = TunDevice::create("mpxtun%d").unwrap();
                assert_eq!(second.name(), "mpxtun1");
                drop(second);

                drop(tun);
                // Closing the descriptor deletes the device and its route.
                let mut gone = false;
                for _ in 0..50 {
                    let links = run("ip", &["-n", ns, "-br", "link"]);
                    if !links.contains("mpxtun") {
                        gone = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(gone, "TUN devices still present after drop");
                let routes = run("ip", &["-n", ns, "route"]);
                assert!(!routes.contains("10.77.0.0"), "{routes}");
            });
        });
    }

    /// A TCP segment from the fake peer 10.78.0.2:80 to `port`, led by a
    /// zeroed virtio header, ready for `send`.
    fn peer_segment(
        port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        use crate::packet::{build, checksum};
        let mut p = build::ipv4_tcp(
            Ipv4Addr::new(10, 78, 0, 2),
            Ipv4Addr::new(10, 78, 0, 1),
            80,
            port,
            seq,
            flags,
            options,
            payload,
        );
        p[28..32].copy_from_slice(&ack.to_be_bytes());
        checksum::update_tcp_checksum(&mut p).unwrap();
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn tun_offload_segments_and_checksums() {
        use crate::offload::{coalesce, split, VnetHeader, F_NEEDS_CSUM, GSO_TCPV4, MAX_READ};
        use crate::packet::{checksum, InnerPacket};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const MTU: usize = 1400;
        in_netns("tun_offload_segments_and_checksums", |_ns| {
            let rt = runtime();
            rt.block_on(async {
                let tun = TunDevice::create_with_offload("mpxtso%d").expect("create");
                assert!(tun.vnet_hdr());
                tun.set_mtu(MTU as u16).unwrap();
                tun.set_ipv4(Ipv4Addr::new(10, 78, 0, 1), 24).unwrap();
                tun.set_up().unwrap();
                let mut buf = vec![0u8; MAX_READ];
                // Reads until an IPv4 packet of `protocol`, returned with its
                // virtio header.
                async fn next(tun: &TunDevice, buf: &mut [u8], protocol: u8) -> Vec<u8> {
                    loop {
                        let n = tokio::time::timeout(Duration::from_secs(5), tun.recv(buf))
                            .await
                            .expect("packet within 5 s")
                            .unwrap();
                        let ip = &buf[VNET_HDR_LEN..n];
                        if ip.len() >= 20 && ip[0] >> 4 == 4 && ip[9] == protocol {
                            return buf[..n].to_vec();
                        }
                    }
                }

                // UDP: the checksum is left to us.
                let sock = tokio::net::UdpSocket::bind("10.78.0.1:0").await.unwrap();
                sock.send_to(b"checksum me", "10.78.0.2:9").await.unwrap();
                let read = next(&tun, &mut buf, 17).await;
                let header = VnetHeader::parse(&read).unwrap();
                assert_eq!(header.flags & F_NEEDS_CSUM, F_NEEDS_CSUM, "{header:?}");
                let mut out = Vec::new();
                split(&read, MTU, 25, &mut out).unwrap();
                let udp = &out[0][25..];
                let info = InnerPacket::parse(udp).unwrap();
                let sum = checksum::sum(
                    checksum::pseudo_header_sum(&info, udp.len() - 20),
                    &udp[20..],
                );
                assert_eq!(checksum::finish(sum), 0);

                // TCP: the kernel connects to a fake peer, which this test
                // plays through the device (writes with a zeroed header).
                let connect = tokio::spawn(tokio::net::TcpStream::connect("10.78.0.2:80"));
                let syn = next(&tun, &mut buf, 6).await;
                let syn_ip = &syn[VNET_HDR_LEN..];
                let port = u16::from_be_bytes([syn_ip[20], syn_ip[21]]);
                let isn = u32::from_be_bytes([syn_ip[24], syn_ip[25], syn_ip[26], syn_ip[27]]);
                let mss = [2, 4, 0x05, 0x50]; // 1360
                let synack = peer_segment(port, 5000, isn.wrapping_add(1), 0x12, &mss, &[]);
                tun.send(&synack).await.unwrap();
                let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
                    .await
                    .expect("connected within 5 s")
                    .unwrap()
                    .unwrap();
                let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
                let writer = {
                    let data = data.clone();
                    tokio::spawn(async move { stream.write_all(&data).await.map(|_| stream) })
                };
                let first = isn.wrapping_add(1);
                let mut received = vec![0u8; data.len()];
                let mut have = vec![false; data.len()];
                let mut next_byte = 0usize;
                let mut tso_reads = 0;
                while next_byte < data.len() {
                    let read = next(&tun, &mut buf, 6).await;
                    let header = VnetHeader::parse(&read).unwrap();
                    if header.gso_type == GSO_TCPV4 {
                        tso_reads += 1;
                    }
                    let mut out = Vec::new();
                    split(&read, MTU, 25, &mut out).unwrap();
                    for seg in &out {
                        let seg = &seg[25..];
                        assert!(seg.len() <= MTU);
                        assert_eq!(checksum::finish(checksum::sum(0, &seg[..20])), 0);
                        assert!(checksum::tcp_checksum_ok(seg).unwrap());
                        let info = InnerPacket::parse(seg).unwrap();
                        let tcp = info.tcp.unwrap();
                        let at = tcp.sequence.wrapping_sub(first) as usize;
                        let payload = &seg[tcp.offset + tcp.header_len..];
                        assert!(payload.len() <= 1360);
                        if at + payload.len() <= data.len() {
                            received[at..at + payload.len()].copy_from_slice(payload);
                            have[at..at + payload.len()].fill(true);
                        }
                    }
                    while next_byte < data.len() && have[next_byte] {
                        next_byte += 1;
                    }
                    let ack = first.wrapping_add(next_byte as u32);
                    tun.send(&peer_segment(port, 5001, ack, 0x10, &[], &[]))
                        .await
                        .unwrap();
                }
                assert!(received == data, "the stream arrived intact");
                assert!(tso_reads > 0, "no TSO read in a 200 kB transfer");
                let mut stream = writer.await.unwrap().unwrap();

                // Peer -> kernel: three segments coalesced into one TSO write.
                let ack = first.wrapping_add(data.len() as u32);
                let segments: Vec<Vec<u8>> = (0..3u8)
                    .map(|i| {
                        let flags = if i == 2 { 0x18 } else { 0x10 };
                        let seq = 5001 + 1000 * u32::from(i);
                        let p = peer_segment(port, seq, ack, flags, &[], &[i + 1; 1000]);
                        p[VNET_HDR_LEN..].to_vec()
                    })
                    .collect();
                let views: Vec<&[u8]> = segments.iter().map(|p| &p[..]).collect();
                let mut write = Vec::new();
                assert_eq!(coalesce(&views, &mut write), 3);
                tun.send(&write).await.unwrap();
                let mut got = vec![0u8; 3000];
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
                    .await
                    .expect("coalesced data within 5 s")
                    .unwrap();
                assert!(got[..1000].iter().all(|b| *b == 1));
                assert!(got[1000..2000].iter().all(|b| *b == 2));
                assert!(got[2000..].iter().all(|b| *b == 3));

                // A header on a packet too short for one is an error, not a panic.
                let short = [0u8; VNET_HDR_LEN - 1];
                assert!(split(&short, MTU, 25, &mut Vec::new()).is_err());
            });
        });
    }

    #[test]
    fn create_outside_a_runtime_is_an_error() {
        in_netns("create_outside_a_runtime_is_an_error", |ns| {
            let err = TunDevice::create("mpxtun%d").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::Other, "{err}");
            // The descriptor was closed: no device left behind.
            let links = run("ip", &["-n", ns, "-br", "link"]);
            assert!(!links.contains("mpxtun"), "{links}");
        });
    }
}
