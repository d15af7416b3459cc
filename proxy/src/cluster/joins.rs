//! Where joins arrive: the kernel's `mptcp_pm` events name the local address of every subflow that
//! joins a connection. In a cluster every join should reach the instance's own (announced) address;
//! one that reaches the shared service address came from a client that ignored the C flag, and
//! ECMP may have sent it to another instance (which then counts it as MPJoinNoTokenFound).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mptcp_netlink::mptcp_pm::{self, PmEventKind};

use crate::metrics::Metrics;

/// The arrival address of a joined subflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The shared service address (the C flag asked clients not to).
    Service,
    /// The instance's announced address: where joins belong.
    Announced,
    /// Any other local address (for example an upstream MPTCP connection's own subflows).
    Other,
}

impl Arrival {
    /// The `address` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Service => "service",
            Arrival::Announced => "announced",
            Arrival::Other => "other",
        }
    }

    /// Every value, for labels that start at zero.
    pub const ALL: [Arrival; 3] = [Arrival::Service, Arrival::Announced, Arrival::Other];
}

/// Classifies the local address of a joined subflow.
pub fn classify(local: IpAddr, announce: IpAddr, services: &[IpAddr]) -> Arrival {
    let local = local.to_canonical();
    if local == announce {
        Arrival::Announced
    } else if services.contains(&local) {
        Arrival::Service
    } else {
        Arrival::Other
    }
}

/// Counts joined subflows by arrival address from a dedicated thread; stops when dropped.
#[derive(Debug)]
pub struct JoinCounter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JoinCounter {
    /// Subscribes to `mptcp_pm_events` in the calling thread's namespace.
    pub fn start(
        metrics: Arc<Metrics>,
        announce: IpAddr,
        services: Vec<IpAddr>,
    ) -> Result<Self, mptcp_pm::PmError> {
        let (socket, family) = mptcp_pm::open_event_socket()?;
        socket
            .set_recv_timeout(Duration::from_millis(250))
            .map_err(mptcp_pm::PmError::Socket)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cluster-joins".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let messages = match socket.recv() {
                        Ok(messages) => messages,
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            tracing::warn!("mptcp_pm event socket overflowed; joins were not counted");
                            continue;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(error) => {
                            tracing::error!(%error, "mptcp_pm event socket failed; joins are no longer counted");
                            return;
                        }
                    };
                    for message in messages.iter().filter(|m| m.msg_type == family.id) {
                        let Some(event) = mptcp_pm::decode_event(&message.payload) else {
                            continue;
                        };
                        if event.kind != PmEventKind::SubflowEstablished {
                            continue;
                        }
                        if let Some(local) = event.local_addr {
                            let arrival = classify(local, announce, &services);
                            if arrival == Arrival::Service {
                                tracing::debug!(remote = ?event.remote(), "a join arrived at the shared address");
                            }
                            metrics.cluster_join(arrival.as_str());
                        }
                    }
                }
            })
            .map_err(mptcp_pm::PmError::Socket)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for JoinCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_classified_by_local_address() {
        let announce: IpAddr = "10.2.1.2".parse().unwrap();
        let services: Vec<IpAddr> = vec!["10.99.0.1".parse().unwrap()];
        let at = |s: &str| classify(s.parse().unwrap(), announce, &services);
        assert_eq!(at("10.2.1.2"), Arrival::Announced);
        assert_eq!(at("::ffff:10.2.1.2"), Arrival::Announced);
        assert_eq!(at("10.99.0.1"), Arrival::Service);
        assert_eq!(at("10.3.0.1"), Arrival::Other);
    }
}
