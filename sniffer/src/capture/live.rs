//! Live capture on one or more interfaces: our own `AF_PACKET`/`SOCK_DGRAM` socket with the
//! [`bpf`] filter attached in the kernel (`SO_ATTACH_FILTER`), handed to pnet
//! (`pnet::datalink::linux::Config::socket_fd`) for reading. One thread per interface feeds a
//! bounded channel; frames start at the network header (link type raw IP).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pnet::datalink::{self, Channel};
use thiserror::Error;

use super::bpf;

/// Why live capture could not start.
#[derive(Debug, Error)]
pub enum LiveCaptureError {
    /// No interface with that name.
    #[error("no interface named {0}")]
    NoSuchInterface(String),
    /// A system call failed.
    #[error("{call} on {interface}: {source}")]
    Os {
        /// The call.
        call: &'static str,
        /// The interface.
        interface: String,
        /// The OS error.
        source: io::Error,
    },
    /// pnet returned a non-Ethernet channel.
    #[error("unexpected pnet channel type on {0}")]
    UnexpectedChannel(String),
}

/// Options of a live capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveOptions {
    /// Interfaces to capture on.
    pub interfaces: Vec<String>,
    /// Bytes kept of each accepted packet.
    pub snap_len: u32,
    /// Put the interfaces in promiscuous mode.
    pub promiscuous: bool,
    /// Frames queued between the capture threads and the reader.
    pub queue_len: usize,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            interfaces: Vec::new(),
            snap_len: 256,
            promiscuous: false,
            queue_len: 16_384,
        }
    }
}

/// A captured frame (starting at the IP header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFrame {
    /// Index of the interface in [`LiveOptions::interfaces`].
    pub interface: usize,
    /// Receive time since the Unix epoch (taken in the capture thread).
    pub timestamp: Duration,
    /// The bytes (IPv4 or IPv6 packet, cut at the snap length).
    pub data: Vec<u8>,
}

/// A running live capture. Dropping it stops the threads.
#[derive(Debug)]
pub struct LiveCapture {
    frames: Receiver<LiveFrame>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct OwnedFd(i32);

impl Drop for OwnedFd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by socket() and is owned by this value.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn os_error(call: &'static str, interface: &str) -> LiveCaptureError {
    LiveCaptureError::Os {
        call,
        interface: interface.to_string(),
        source: io::Error::last_os_error(),
    }
}

/// Opens an `AF_PACKET` datagram socket bound to `ifindex` with the MPTCP filter attached.
fn filtered_socket(
    interface: &str,
    ifindex: u32,
    snap_len: u32,
) -> Result<OwnedFd, LiveCaptureError> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(os_error("socket(AF_PACKET)", interface));
    }
    let fd = OwnedFd(fd);
    let mut program: Vec<libc::sock_filter> = bpf::mptcp_filter(snap_len)
        .into_iter()
        .map(|instruction| libc::sock_filter {
            code: instruction.code,
            jt: instruction.jt,
            jf: instruction.jf,
            k: instruction.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points to `program`, alive for the call; the kernel copies it.
    let result = unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(os_error("setsockopt(SO_ATTACH_FILTER)", interface));
    }
    // SAFETY: zeroed sockaddr_ll is valid; we fill family, protocol and ifindex.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex as i32;
    // SAFETY: address is a valid sockaddr_ll of the given size.
    let result = unsafe {
        libc::bind(
            fd.0,
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(os_error("bind(AF_PACKET)", interface));
    }
    Ok(fd)
}

impl LiveCapture {
    /// Starts capturing on every interface of `options`.
    pub fn start(options: &LiveOptions) -> Result<LiveCapture, LiveCaptureError> {
        let all = datalink::interfaces();
        let (sender, frames) = mpsc::sync_channel(options.queue_len.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        for name in &options.interfaces {
            let interface = all
                .iter()
                .find(|candidate| &candidate.name == name)
                .ok_or_else(|| LiveCaptureError::NoSuchInterface(name.clone()))?;
            let fd = filtered_socket(name, interface.index, options.snap_len)?;
            let config = datalink::linux::Config {
                read_buffer_size: 65_536,
                read_timeout: Some(Duration::from_millis(100)),
                promiscuous: options.promiscuous,
                socket_fd: Some(fd.0),
                ..Default::default()
            };
            // pnet owns (and closes) the socket from here on.
            let raw = fd.0;
            std::mem::forget(fd);
            let channel = datalink::linux::channel(interface, config).map_err(|source| {
                LiveCaptureError::Os {
                    call: "pnet channel",
                    interface: name.clone(),
                    source,
                }
            })?;
            let Channel::Ethernet(_, receiver) = channel else {
                // SAFETY: the fd is still ours when pnet did not take it.
                unsafe { libc::close(raw) };
                return Err(LiveCaptureError::UnexpectedChannel(name.clone()));
            };
            receivers.push(receiver);
        }
        let threads = receivers
            .into_iter()
            .enumerate()
            .map(|(index, receiver)| {
                let sender: SyncSender<LiveFrame> = sender.clone();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || capture_loop(index, receiver, sender, stop))
            })
            .collect();
        Ok(LiveCapture {
            frames,
            stop,
            threads,
        })
    }

    /// The next frame, waiting at most `timeout`; `None` on timeout or when every capture
    /// thread ended.
    pub fn next_frame(&self, timeout: Duration) -> Option<LiveFrame> {
        self.frames.recv_timeout(timeout).ok()
    }

    /// A flag that stops the capture when set (for signal handlers and tests).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn capture_loop(
    interface: usize,
    mut receiver: Box<dyn datalink::DataLinkReceiver>,
    sender: SyncSender<LiveFrame>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match receiver.next() {
            Ok(data) => {
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let frame = LiveFrame {
                    interface,
                    timestamp,
                    data: data.to_vec(),
                };
                if sender.send(frame).is_err() {
                    return;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}
