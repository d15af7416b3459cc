//! nftables maps with concatenated keys against the kernel: a map and a rule that looks packets up in it
//! are created in one batch, ten thousand elements go in and come out, and `nft` reads them back.

use mptcp_netlink::nft::{self, PayloadLoad, RegisterExpr};
use mptcp_netlink::nft_expr::{PayloadToRegister, SetLookup, REG32_00};
use mptcp_netlink::nft_set::{Field, SetSpec};
use mptcp_netlink::NetlinkSocket;
use nftnl::expr::{Cmp, CmpOp};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};
use testbed::{Options, Testbed};

const TABLE: &str = "mpx_map_test";

fn map() -> SetSpec {
    SetSpec::map(
        TABLE,
        ProtoFamily::Inet,
        "dl4",
        vec![
            Field::Ipv4Addr,
            Field::Ipv4Addr,
            Field::InetService,
            Field::InetService,
        ],
        vec![Field::ClassId],
    )
}

fn key(spec: &SetSpec, i: u32) -> Vec<u8> {
    let client = [10, 9, (i >> 8) as u8, i as u8];
    spec.key_bytes(&[
        &[10, 0, 1, 1],
        &client,
        &443u16.to_be_bytes(),
        &(40000 + (i % 20000) as u16).to_be_bytes(),
    ])
}

#[test]
fn map_with_concatenated_key_holds_ten_thousand_elements() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    let spec = map();
    testbed::in_namespace(&ns, || {
        let socket = NetlinkSocket::open(libc::NETLINK_NETFILTER).unwrap();
        let table = Table::new(nft::cstring(TABLE), ProtoFamily::Inet);
        let mut chain = Chain::new(c"postrouting", &table);
        chain.set_hook(Hook::PostRouting, 0);
        chain.set_type(ChainType::Filter);
        chain.set_policy(Policy::Accept);
        let mut rule = Rule::new(&chain);
        rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_NFPROTO as u32));
        rule.add_expr(&Cmp::new(CmpOp::Eq, libc::NFPROTO_IPV4 as u8));
        rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_L4PROTO as u32));
        rule.add_expr(&Cmp::new(CmpOp::Eq, libc::IPPROTO_TCP as u8));
        for (i, load) in [
            PayloadLoad::network(12, 4),
            PayloadLoad::network(16, 4),
            PayloadLoad::transport(0, 2),
            PayloadLoad::transport(2, 2),
        ]
        .into_iter()
        .enumerate()
        {
            rule.add_expr(&PayloadToRegister {
                load,
                dreg: REG32_00 + i as u32,
            });
        }
        rule.add_expr(&SetLookup::of(&spec));
        rule.add_expr(&RegisterExpr::meta_set(libc::NFT_META_PRIORITY as u32));
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        batch.add(&chain, MsgType::Add);
        batch.add(&spec, MsgType::Add);
        batch.add(&rule, MsgType::Add);
        nft::send_batch_on(&socket, batch, "create").unwrap();

        let keys: Vec<Vec<u8>> = (0..10_000).map(|i| key(&spec, i)).collect();
        let class = 0x4d50_0010u32.to_ne_bytes();
        let mut batch = Batch::new();
        spec.add_elements(
            &mut batch,
            keys.iter().map(|k| (k.as_slice(), Some(&class[..]))),
        );
        let started = std::time::Instant::now();
        nft::send_batch_on(&socket, batch, "add 10000").unwrap();
        eprintln!("10000 elements in one batch: {:?}", started.elapsed());

        // Deleting a key that is not there fails the batch, and nothing in it applies.
        let missing = key(&spec, 20_000);
        let mut batch = Batch::new();
        spec.delete_elements(&mut batch, keys[..10].iter().map(Vec::as_slice));
        spec.delete_elements(&mut batch, [missing.as_slice()]);
        let err = nft::send_batch_on(&socket, batch, "delete missing").unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");

        let mut batch = Batch::new();
        spec.delete_elements(&mut batch, keys[..4000].iter().map(Vec::as_slice));
        nft::send_batch_on(&socket, batch, "delete 4000").unwrap();
    })
    .unwrap();

    let listed: serde_json::Value = serde_json::from_str(
        &bed.exec(&ns, &["nft", "-j", "list", "map", "inet", TABLE, "dl4"])
            .unwrap(),
    )
    .unwrap();
    let map = listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|item| item.get("map"))
        .unwrap();
    assert_eq!(
        map["type"],
        serde_json::json!(["ipv4_addr", "ipv4_addr", "inet_service", "inet_service"])
    );
    assert_eq!(map["map"], "classid");
    let elements = map["elem"].as_array().unwrap();
    assert_eq!(elements.len(), 6000);
    let text = serde_json::to_string(&elements[0]).unwrap();
    assert!(text.contains("4d50:10"), "{text}");
    let chain = bed
        .exec(&ns, &["nft", "list", "chain", "inet", TABLE, "postrouting"])
        .unwrap();
    assert!(
        chain.contains("meta priority set ip saddr . ip daddr . tcp sport . tcp dport map @dl4"),
        "{chain}"
    );

    testbed::in_namespace(&ns, || {
        let socket = NetlinkSocket::open(libc::NETLINK_NETFILTER).unwrap();
        let mut batch = Batch::new();
        spec.flush(&mut batch);
        nft::send_batch_on(&socket, batch, "flush").unwrap();
    })
    .unwrap();
    let flushed = bed
        .exec(&ns, &["nft", "list", "map", "inet", TABLE, "dl4"])
        .unwrap();
    assert!(!flushed.contains("4d50"), "{flushed}");
}
