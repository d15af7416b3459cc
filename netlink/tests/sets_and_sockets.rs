//! Named maps with per-element counters and socket listings against the kernel, in a testbed namespace.

use std::net::TcpListener;

use mptcp_netlink::nft::{self, cstring};
use mptcp_netlink::nft_set::{dump_elements, Field, SetSpec};
use mptcp_netlink::sock_diag::listening_tcp_ports;
use nftnl::{Batch, MsgType, ProtoFamily, Table};
use testbed::{Options, Testbed};

#[test]
fn map_elements_are_added_dumped_and_deleted_in_batches() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    let pair = vec![Field::Ipv4Addr, Field::InetService];
    let mut spec = SetSpec::map("mpx_sets", ProtoFamily::Ipv4, "m", pair.clone(), pair);
    spec.counter = true;
    let key = |n: u16| {
        let mut k = [10, 0, (n >> 8) as u8, n as u8, 0, 0, 0, 0];
        k[4..6].copy_from_slice(&n.to_be_bytes());
        k
    };
    let (all, after_delete) = testbed::in_namespace(&ns, || {
        let table = Table::new(cstring("mpx_sets"), ProtoFamily::Ipv4);
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        batch.add(&spec, MsgType::Add);
        let elements: Vec<_> = (0..1000u16)
            .map(|n| (key(n), key(n.wrapping_add(1))))
            .collect();
        // More than one message's worth: the batch is split.
        spec.add_new_elements(
            &mut batch,
            elements.iter().map(|(k, d)| (&k[..], Some(&d[..]))),
        );
        nft::send_batch(batch, "table, map and 1000 elements").unwrap();
        let all = dump_elements("mpx_sets", ProtoFamily::Ipv4, "m").unwrap();
        let gone: Vec<_> = (0..10u16).map(key).collect();
        let mut batch = Batch::new();
        spec.delete_elements(&mut batch, gone.iter().map(|k| &k[..]));
        nft::send_batch(batch, "delete 10").unwrap();
        // Deleting one that is absent fails the whole batch.
        let mut batch = Batch::new();
        spec.delete_elements(&mut batch, gone.iter().map(|k| &k[..]));
        assert!(nft::send_batch(batch, "delete again").is_err());
        // Adding one that exists fails it too (add_new_elements).
        let mut batch = Batch::new();
        spec.add_new_elements(&mut batch, [(&key(500)[..], Some(&key(501)[..]))]);
        assert!(nft::send_batch(batch, "add again").is_err());
        (
            all,
            dump_elements("mpx_sets", ProtoFamily::Ipv4, "m").unwrap(),
        )
    })
    .unwrap();
    assert_eq!(all.len(), 1000);
    let e = all.iter().find(|e| e.key == key(77)).expect("element 77");
    assert_eq!(e.data.as_deref(), Some(&key(78)[..]));
    assert_eq!(e.counter, Some((0, 0)), "a fresh element's counter");
    assert_eq!(after_delete.len(), 990);
    let listed = bed
        .exec(&ns, &["nft", "list", "map", "ip", "mpx_sets", "m"])
        .unwrap();
    assert!(
        listed.contains("10.0.0.77 . 77 counter packets 0 bytes 0 : 10.0.0.78 . 78"),
        "{listed}"
    );
}

#[test]
fn listening_ports_come_from_sock_diag() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    let (with, without) = testbed::in_namespace(&ns, || {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let ports = (
            v4.local_addr().unwrap().port(),
            v6.local_addr().unwrap().port(),
        );
        let with = listening_tcp_ports().unwrap();
        drop((v4, v6));
        ((ports, with), listening_tcp_ports().unwrap())
    })
    .unwrap();
    let ((v4, v6), listed) = with;
    assert!(listed.contains(&v4) && listed.contains(&v6), "{listed:?}");
    assert!(
        !without.contains(&v4) && !without.contains(&v6),
        "{without:?}"
    );
}
