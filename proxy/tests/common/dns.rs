//! A name server on loopback for resolver tests and benchmarks: answers every A query with 10.0.3.2
//! and every AAAA query with fd00:3::2 (TTL 300 s), and counts the queries it got.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

/// Starts the server on 127.0.0.1; returns its address and the query counter.
pub fn start() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
    let addr = socket.local_addr().expect("addr");
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut response = Message::new();
            response
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .add_queries(query.queries().to_vec());
            for q in query.queries() {
                let rdata = match q.query_type() {
                    RecordType::A => RData::A(A::new(10, 0, 3, 2)),
                    RecordType::AAAA => RData::AAAA(AAAA::new(0xfd00, 3, 0, 0, 0, 0, 0, 2)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(q.name().clone(), 300, rdata));
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, peer);
            }
        }
    });
    (addr, queries)
}
