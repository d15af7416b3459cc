//! Asking NAT detours for mappings: one connected UDP socket per detour (the kernel drops datagrams from
//! any other source), a fresh nonce per attempt, and a reader per socket that accepts only answers that
//! verify, carry a nonce a request waits for, and name the remote it asked for. Everything else is
//! dropped and counted.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::core::MappingResult;
use super::metrics::ClientMetrics;
use crate::key::{random_u64, Psk};
use crate::wire::{Op, Packet, Repr, Status, V1Repr, V2Repr};

/// One NAT detour.
#[derive(Debug)]
pub struct NatDetour {
    /// Its address.
    pub address: SocketAddrV4,
    /// Its key (version 2).
    pub psk: Option<Psk>,
    /// The connected socket.
    pub socket: Arc<UdpSocket>,
}

/// What a waiting request receives: `(op, status, dpt, lifetime_s)`.
type Answer = (Op, Status, u16, u32);

#[derive(Debug, Default)]
struct Waiting {
    /// Version 2: by (detour, nonce).
    by_nonce: HashMap<(usize, u64), (Ipv4Addr, u16, mpsc::Sender<Answer>)>,
    /// Version 1 (no nonce): by (detour, rip, rpt).
    by_remote: HashMap<(usize, Ipv4Addr, u16), mpsc::Sender<Answer>>,
}

/// The client side of the NAT detour protocol.
#[derive(Debug)]
pub struct Requester {
    detours: Vec<NatDetour>,
    waiting: Arc<Mutex<Waiting>>,
    timeout: Duration,
    attempts: u32,
    metrics: Arc<ClientMetrics>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Requester {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

impl Requester {
    /// Starts a reader per detour.
    pub fn new(
        detours: Vec<NatDetour>,
        timeout: Duration,
        attempts: u32,
        metrics: Arc<ClientMetrics>,
    ) -> Arc<Self> {
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let readers = detours
            .iter()
            .enumerate()
            .map(|(index, detour)| {
                tokio::spawn(read_answers(
                    index,
                    detour.socket.clone(),
                    detour.psk.clone(),
                    waiting.clone(),
                    metrics.clone(),
                ))
            })
            .collect();
        Arc::new(Self {
            detours,
            waiting,
            timeout,
            attempts,
            metrics,
            readers,
        })
    }

    /// The detours' addresses.
    pub fn addresses(&self) -> Vec<SocketAddrV4> {
        self.detours.iter().map(|d| d.address).collect()
    }

    /// The local address the route to detour `index` uses (its socket is connected).
    pub fn local_address(&self, index: usize) -> Option<std::net::IpAddr> {
        self.detours
            .get(index)?
            .socket
            .local_addr()
            .ok()
            .map(|a| a.ip())
    }

    /// Asks detour `index` for a mapping to `remote` (proposing its port), with retries.
    pub async fn request(&self, index: usize, remote: SocketAddrV4) -> MappingResult {
        let result = self
            .exchange(
                index,
                Op::Request,
                *remote.ip(),
                remote.port(),
                remote.port(),
            )
            .await;
        let label = match &result {
            Some((_, Status::Ok, _, _)) => "granted",
            Some(_) => "refused",
            None => "no_answer",
        };
        self.metrics.request(index, label);
        match result {
            Some((_, Status::Ok, dpt, lifetime)) if dpt != 0 => MappingResult::Granted {
                dpt,
                lifetime: if self.detours[index].psk.is_some() {
                    Duration::from_secs(u64::from(lifetime))
                } else {
                    Duration::MAX
                },
            },
            Some((_, status, _, _)) => MappingResult::Refused(status),
            None => MappingResult::NoAnswer,
        }
    }

    /// Gives a mapping back (version 2 only; version 1 mappings expire at the detour). Returns whether
    /// the detour confirmed.
    pub async fn release(&self, index: usize, remote: SocketAddrV4, dpt: u16) -> bool {
        if self.detours[index].psk.is_none() {
            return false;
        }
        matches!(
            self.exchange(index, Op::Release, *remote.ip(), remote.port(), dpt)
                .await,
            Some((Op::Released, Status::Ok, _, _))
        )
    }

    async fn exchange(
        &self,
        index: usize,
        op: Op,
        rip: Ipv4Addr,
        rpt: u16,
        dpt: u16,
    ) -> Option<Answer> {
        let detour = &self.detours[index];
        let (tx, mut rx) = mpsc::channel(4);
        let mut nonces = Vec::new();
        if detour.psk.is_none() {
            self.lock().by_remote.insert((index, rip, rpt), tx.clone());
        }
        let mut answer = None;
        for _ in 0..self.attempts {
            let bytes = match &detour.psk {
                Some(psk) => {
                    let nonce = random_u64();
                    nonces.push(nonce);
                    self.lock()
                        .by_nonce
                        .insert((index, nonce), (rip, rpt, tx.clone()));
                    psk.sign(&V2Repr {
                        op,
                        status: Status::Ok,
                        key_id: psk.id(),
                        nonce,
                        timestamp_ms: crate::config::unix_ms(),
                        rip,
                        rpt,
                        dpt,
                        lifetime_s: 0,
                    })
                }
                None => Repr::V1(V1Repr { op, rip, rpt, dpt }).to_bytes(),
            };
            if let Err(error) = detour.socket.send(&bytes).await {
                tracing::debug!(detour = %detour.address, %error, "sending a request failed");
            }
            if let Ok(Some(received)) = tokio::time::timeout(self.timeout, rx.recv()).await {
                answer = Some(received);
                break;
            }
        }
        let mut waiting = self.lock();
        for nonce in nonces {
            waiting.by_nonce.remove(&(index, nonce));
        }
        waiting.by_remote.remove(&(index, rip, rpt));
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn read_answers(
    index: usize,
    socket: Arc<UdpSocket>,
    psk: Option<Psk>,
    waiting: Arc<Mutex<Waiting>>,
    metrics: Arc<ClientMetrics>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            // ICMP port unreachable from an earlier send surfaces here on a connected socket.
            Err(error) => {
                tracing::debug!(%error, "detour socket");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let sender = match check_answer(index, &buf[..len], psk.as_ref(), &waiting) {
            Ok(found) => found,
            Err(reason) => {
                metrics.dropped(reason);
                tracing::debug!(reason, "answer dropped");
                continue;
            }
        };
        let (tx, answer) = sender;
        let _ = tx.try_send(answer);
    }
}

/// Checks one datagram from detour `index`: the waiting request's channel and the answer, or why it is
/// dropped.
fn check_answer(
    index: usize,
    bytes: &[u8],
    psk: Option<&Psk>,
    waiting: &Mutex<Waiting>,
) -> Result<(mpsc::Sender<Answer>, Answer), &'static str> {
    let packet = Packet::new_checked(bytes).map_err(|_| "malformed")?;
    let repr = Repr::parse(&packet).map_err(|_| "malformed")?;
    let waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    match (repr, psk) {
        (Repr::V2(answer), Some(psk)) => {
            if !psk.verify(&packet) {
                return Err("bad_mac");
            }
            if !answer.op.is_answer() {
                return Err("not_an_answer");
            }
            let (rip, rpt, tx) = waiting
                .by_nonce
                .get(&(index, answer.nonce))
                .ok_or("unknown_nonce")?;
            if (answer.rip, answer.rpt) != (*rip, *rpt) {
                return Err("mismatch");
            }
            Ok((
                tx.clone(),
                (answer.op, answer.status, answer.dpt, answer.lifetime_s),
            ))
        }
        (Repr::V1(answer), None) => {
            if answer.op != Op::Response {
                return Err("not_an_answer");
            }
            let tx = waiting
                .by_remote
                .get(&(index, answer.rip, answer.rpt))
                .ok_or("unknown_request")?;
            Ok((tx.clone(), (Op::Response, Status::Ok, answer.dpt, 0)))
        }
        _ => Err("wrong_version"),
    }
}

/// Opens the connected socket for a detour.
pub async fn connect(address: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?;
    socket.connect(SocketAddr::V4(address)).await?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk() -> Psk {
        Psk::parse("00112233445566778899aabbccddeeff").unwrap()
    }

    fn answer(nonce: u64, rip: Ipv4Addr) -> V2Repr {
        V2Repr {
            op: Op::Response,
            status: Status::Ok,
            key_id: 0,
            nonce,
            timestamp_ms: 0,
            rip,
            rpt: 80,
            dpt: 8080,
            lifetime_s: 60,
        }
    }

    #[test]
    fn only_verified_awaited_matching_answers_pass() {
        let waiting = Mutex::new(Waiting::default());
        let (tx, _rx) = mpsc::channel(1);
        let server = Ipv4Addr::new(10, 1, 3, 2);
        waiting
            .lock()
            .unwrap()
            .by_nonce
            .insert((0, 7), (server, 80, tx));
        let key = psk();
        let good = key.sign(&answer(7, server));
        let (_, got) = check_answer(0, &good, Some(&key), &waiting).unwrap();
        assert_eq!(got, (Op::Response, Status::Ok, 8080, 60));

        let mut forged = good.clone();
        forged[31] ^= 1;
        assert_eq!(
            check_answer(0, &forged, Some(&key), &waiting).unwrap_err(),
            "bad_mac"
        );
        let other = Psk::parse(&"77".repeat(16)).unwrap();
        assert_eq!(
            check_answer(0, &other.sign(&answer(7, server)), Some(&key), &waiting).unwrap_err(),
            "bad_mac"
        );
        assert_eq!(
            check_answer(0, &key.sign(&answer(8, server)), Some(&key), &waiting).unwrap_err(),
            "unknown_nonce"
        );
        assert_eq!(
            check_answer(1, &good, Some(&key), &waiting).unwrap_err(),
            "unknown_nonce",
            "an answer is only good from the detour asked"
        );
        assert_eq!(
            check_answer(
                0,
                &key.sign(&answer(7, Ipv4Addr::new(10, 9, 9, 9))),
                Some(&key),
                &waiting
            )
            .unwrap_err(),
            "mismatch"
        );
        let request = V2Repr {
            op: Op::Request,
            ..answer(7, server)
        };
        assert_eq!(
            check_answer(0, &key.sign(&request), Some(&key), &waiting).unwrap_err(),
            "not_an_answer"
        );
        let v1 = Repr::V1(V1Repr {
            op: Op::Response,
            rip: server,
            rpt: 80,
            dpt: 80,
        })
        .to_bytes();
        assert_eq!(
            check_answer(0, &v1, Some(&key), &waiting).unwrap_err(),
            "wrong_version",
            "an unauthenticated answer never satisfies a version 2 request"
        );
        assert_eq!(
            check_answer(0, b"junk", Some(&key), &waiting).unwrap_err(),
            "malformed"
        );
    }
}
