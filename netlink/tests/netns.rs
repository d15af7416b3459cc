//! The netlink layer against the kernel, in a testbed namespace: path-manager endpoints and nft batches.

use std::net::IpAddr;

use mptcp_netlink::mptcp_pm::{flags, PathManager, PmAddress};
use mptcp_netlink::nft;
use nftnl::{Batch, MsgType, ProtoFamily, Table};
use testbed::{Options, Testbed, PROXY_PATH2};

#[test]
fn endpoints_are_added_listed_and_deleted() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    let listed = testbed::in_namespace(&ns, || {
        let mut pm = PathManager::open().expect("mptcp_pm family");
        let mut endpoint = PmAddress::new(IpAddr::V4(PROXY_PATH2), 0);
        endpoint.id = Some(42);
        endpoint.flags = flags::SIGNAL;
        pm.add_endpoint(&endpoint).unwrap();
        let after_add = pm.endpoints().unwrap();
        // A second add of the same id is refused with a kernel error, not a hang.
        assert!(pm.add_endpoint(&endpoint).is_err());
        pm.del_endpoint(42, endpoint.addr).unwrap();
        (after_add, pm.endpoints().unwrap())
    })
    .unwrap();
    let (after_add, after_del) = listed;
    let ours = after_add.iter().find(|e| e.id == Some(42)).expect("listed");
    assert_eq!(ours.addr, IpAddr::V4(PROXY_PATH2));
    assert_eq!(ours.flags & flags::SIGNAL, flags::SIGNAL);
    assert!(after_del.iter().all(|e| e.id != Some(42)), "{after_del:?}");
    let shown = bed.exec(&ns, &["ip", "mptcp", "endpoint", "show"]).unwrap();
    assert!(!shown.contains("id 42"), "{shown}");
}

#[test]
fn nft_batches_apply_atomically_and_report_kernel_errors() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    testbed::in_namespace(&ns, || {
        let table = Table::new(nft::cstring("mpx_netlink_test"), ProtoFamily::Inet);
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        nft::send_batch(batch, "add table").unwrap();
        // Deleting a table that is not there fails as a whole, with the errno.
        let missing = Table::new(nft::cstring("mpx_netlink_missing"), ProtoFamily::Inet);
        let mut batch = Batch::new();
        batch.add(&missing, MsgType::Del);
        let started = std::time::Instant::now();
        let err = nft::send_batch(batch, "delete missing table").unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
        // Answered at once, not after the socket's 5 s receive timeout.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    })
    .unwrap();
    let tables = bed.exec(&ns, &["nft", "list", "tables"]).unwrap();
    assert!(tables.contains("mpx_netlink_test"), "{tables}");
    testbed::in_namespace(&ns, || {
        nft::send_batch(
            nft::delete_table_batch("mpx_netlink_test", ProtoFamily::Inet),
            "delete table",
        )
        .unwrap();
    })
    .unwrap();
    let tables = bed.exec(&ns, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("mpx_netlink_test"), "{tables}");
}

#[test]
fn links_addresses_and_limits_over_netlink() {
    if testbed::skip_unless_root() {
        return;
    }
    let bed = Testbed::new(Options::default()).unwrap();
    let ns = bed.proxy_ns().to_owned();
    bed.exec(
        &ns,
        &[
            "ip", "link", "add", "mpxa", "type", "veth", "peer", "name", "mpxb",
        ],
    )
    .unwrap();
    let service: IpAddr = "10.99.0.1".parse().unwrap();
    let limits = testbed::in_namespace(&ns, || {
        use mptcp_netlink::rtnl;
        let lo = rtnl::link_index("lo").unwrap();
        rtnl::add_address(lo, service, 32).unwrap();
        let again = rtnl::add_address(lo, service, 32).unwrap_err();
        assert_eq!(again.errno(), Some(libc::EEXIST), "{again}");
        rtnl::set_link_up(rtnl::link_index("mpxa").unwrap()).unwrap();
        assert!(rtnl::link_index("no-such-link").is_err());
        PathManager::open().unwrap().limits().unwrap()
    })
    .unwrap();
    // The testbed sets `ip mptcp limits set subflow 2 add_addr_accepted 2` in the proxy namespace.
    assert_eq!(limits, (2, 2));
    let lo = bed.exec(&ns, &["ip", "addr", "show", "dev", "lo"]).unwrap();
    assert!(lo.contains("10.99.0.1/32"), "{lo}");
    let link = bed.exec(&ns, &["ip", "link", "show", "mpxa"]).unwrap();
    assert!(link.contains(",UP"), "{link}");
    testbed::in_namespace(&ns, || {
        use mptcp_netlink::rtnl;
        let lo = rtnl::link_index("lo").unwrap();
        rtnl::delete_address(lo, service, 32).unwrap();
        let gone = rtnl::delete_address(lo, service, 32).unwrap_err();
        assert_eq!(gone.errno(), Some(libc::EADDRNOTAVAIL), "{gone}");
    })
    .unwrap();
    let lo = bed.exec(&ns, &["ip", "addr", "show", "dev", "lo"]).unwrap();
    assert!(!lo.contains("10.99.0.1"), "{lo}");
}
