//! Path sockets: one UDP socket per local interface, bound to the device so
//! that its datagrams leave through that interface whatever the routing
//! table prefers.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Send and receive buffer size asked for path sockets.
pub const PATH_SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `address` (port 0 picks one) and to the device
/// `interface` (`SO_BINDTODEVICE`), with `SO_REUSEADDR`, 4 MiB buffers
/// (`SO_*BUFFORCE` when privileged, else capped by `net.core.*mem_max`),
/// `IPV6_V6ONLY` for IPv6, non-blocking, registered with the current tokio
/// runtime (an error outside one).
pub fn bind_path_socket(interface: &str, address: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    super::ifreq::validate_name(interface, false)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "bind_path_socket must be called within a tokio runtime",
        ));
    }
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
    tokio::net::UdpSocket::from_std(socket.into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run, runtime};
    use socket2::SockRef;
    use std::time::Duration;

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
