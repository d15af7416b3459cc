//! The root qdiscs the throttle replaces, saved and put back: before an interface gets the throttle's
//! HTB root, its qdisc tree (the root and every child qdisc, with kind, handle and options) is saved in
//! memory and in a state file; when the throttle removes its root (at exit, on a policy change, or at
//! the next start after a crash) the tree is rebuilt.
//!
//! What comes back: the root and child qdiscs as the kernel dumped them (`TCA_KIND`, `TCA_OPTIONS`,
//! size table and shared blocks). A root or child with handle `0:` is the kernel's default and comes
//! back by itself when the throttle's root is deleted. Classes and filters of a classful root the
//! operator had (for example an HTB of their own) are not saved: a warning names them at start.
//!
//! Under `mq` (the default root of a multi-queue NIC: one child qdisc per TX queue): while the
//! throttle runs, its single HTB root replaces `mq`, so every TX queue is fed from one qdisc behind one
//! lock and the per-queue children are gone; at exit `mq` and its children (tuned ones included) are
//! rebuilt.

use std::io::Write;
use std::path::{Path, PathBuf};

use mptcp_netlink::{MessageBuilder, NetlinkError, NetlinkSocket, NLM_F_CREATE, NLM_F_REPLACE};

use crate::tc::{self, TC_H_INGRESS, TC_H_ROOT};

/// Attributes of a qdisc replayed as dumped.
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_STAB: u16 = 8;
const TCA_INGRESS_BLOCK: u16 = 13;
const TCA_EGRESS_BLOCK: u16 = 14;
/// `clsact`'s and `ingress`'s parent.
const TC_H_CLSACT: u32 = TC_H_INGRESS;

/// One qdisc of a saved tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedQdisc {
    /// Its handle (`major << 16`); 0 for a kernel default.
    pub handle: u32,
    /// Its parent (`TC_H_ROOT` for the root, a class id otherwise).
    pub parent: u32,
    /// `TCA_KIND`.
    pub kind: String,
    /// The replayed attributes, raw (`nla_len`, `nla_type` with flags, value), in dump order.
    pub attributes: Vec<u8>,
}

/// The qdisc tree of one interface before the throttle replaced its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRoot {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name (a restart checks that the index still names it).
    pub ifname: String,
    /// The root first, then its descendants, parents before children.
    pub qdiscs: Vec<SavedQdisc>,
    /// Classes the root had (not saved; for the warning).
    pub classes: usize,
}

impl SavedRoot {
    /// Whether the root was the kernel's default (nothing to rebuild beyond deleting ours).
    pub fn is_default(&self) -> bool {
        self.qdiscs.iter().all(|q| q.handle == 0)
    }

    /// A line for logs: `mq 7: (4 children)`.
    pub fn describe(&self) -> String {
        match self.qdiscs.first() {
            Some(root) => format!(
                "{} {:x}: ({} children)",
                root.kind,
                root.handle >> 16,
                self.qdiscs.len() - 1
            ),
            None => "none".into(),
        }
    }
}

/// Walks attributes keeping their flags (the nested bit must be replayed as dumped).
fn raw_attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((u16::from_ne_bytes([buf[2], buf[3]]), &buf[..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// Reads the qdisc tree of `ifindex` from a dump of every qdisc. `None` when `ours(kind, handle)` says
/// the root is the throttle's own (never saved as the original).
pub fn capture(
    route: &mut NetlinkSocket,
    ifindex: u32,
    ifname: &str,
    ours: impl Fn(&str, u32) -> bool,
) -> Result<Option<SavedRoot>, NetlinkError> {
    let mut qdiscs = Vec::new();
    for message in route.dump(tc::dump_qdiscs(), "dump qdiscs")? {
        let Some(object) = tc::parse_tc_object(&message.payload) else {
            continue;
        };
        if object.ifindex != ifindex || object.parent == TC_H_CLSACT || object.kind == "ingress" {
            continue;
        }
        let mut attributes = Vec::new();
        for (kind, raw) in raw_attributes(&message.payload[20..]) {
            if matches!(
                kind & 0x3fff,
                TCA_OPTIONS | TCA_STAB | TCA_INGRESS_BLOCK | TCA_EGRESS_BLOCK
            ) {
                attributes.extend_from_slice(raw);
                attributes.resize((attributes.len() + 3) & !3, 0);
            }
        }
        qdiscs.push(SavedQdisc {
            handle: object.handle,
            parent: object.parent,
            kind: object.kind,
            attributes,
        });
    }
    let Some(root_at) = qdiscs.iter().position(|q| q.parent == TC_H_ROOT) else {
        return Ok(None);
    };
    let root = qdiscs.remove(root_at);
    if ours(&root.kind, root.handle) {
        return Ok(None);
    }
    // Parents before children: a qdisc's parent class belongs to the qdisc of the same major.
    let mut ordered = vec![root];
    while !qdiscs.is_empty() {
        let before = qdiscs.len();
        let mut i = 0;
        while i < qdiscs.len() {
            let parent_major = qdiscs[i].parent & 0xffff_0000;
            if ordered
                .iter()
                .any(|q| q.handle & 0xffff_0000 == parent_major)
            {
                ordered.push(qdiscs.remove(i));
            } else {
                i += 1;
            }
        }
        if qdiscs.len() == before {
            break; // orphans (a dump raced a change): not ours to rebuild
        }
    }
    let classes = count_classes(route, ifindex, ordered[0].handle)?;
    Ok(Some(SavedRoot {
        ifindex,
        ifname: ifname.to_owned(),
        qdiscs: ordered,
        classes,
    }))
}

/// `RTM_GETTCLASS`.
const RTM_GETTCLASS: u16 = 42;

fn count_classes(
    route: &mut NetlinkSocket,
    ifindex: u32,
    root: u32,
) -> Result<usize, NetlinkError> {
    if root == 0 {
        return Ok(0);
    }
    let request = MessageBuilder::new(RTM_GETTCLASS, 0).header(&tc::tcmsg(ifindex, 0, 0, 0));
    Ok(route
        .dump(request, "dump classes")?
        .iter()
        .filter_map(|m| tc::parse_tc_object(&m.payload))
        .filter(|c| c.ifindex == ifindex && c.handle & 0xffff_0000 == root & 0xffff_0000)
        .count())
}

fn replace_qdisc(ifindex: u32, qdisc: &SavedQdisc, handle: u32, parent: u32) -> MessageBuilder {
    let mut message = MessageBuilder::new(tc::RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE)
        .header(&tc::tcmsg(ifindex, handle, parent, 0))
        .attr_str(TCA_KIND, &qdisc.kind);
    for (kind, raw) in raw_attributes(&qdisc.attributes) {
        message = message.attr(kind, &raw[4..]);
    }
    message
}

/// Deletes the throttle's root on `saved.ifindex` and rebuilds the saved tree. Returns what could not be
/// rebuilt (the kernel default stays there instead).
pub fn restore(route: &mut NetlinkSocket, saved: &SavedRoot) -> Vec<String> {
    let mut problems = Vec::new();
    match route.request(tc::delete_root(saved.ifindex), "delete htb root") {
        Ok(_) => {}
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let Some(root) = saved.qdiscs.first() else {
        return problems;
    };
    // The kernel put its default back; rebuild what differs from a default.
    let mut major_map = vec![(root.handle & 0xffff_0000, root.handle & 0xffff_0000)];
    if root.handle != 0 {
        if let Err(e) = route.request(
            replace_qdisc(saved.ifindex, root, root.handle, TC_H_ROOT),
            "restore root qdisc",
        ) {
            problems.push(format!("root {} {:x}:: {e}", root.kind, root.handle >> 16));
            return problems;
        }
    } else if let Some(current) = current_root(route, saved.ifindex) {
        // A default root gets a fresh handle: its children's parents follow it.
        major_map[0].1 = current & 0xffff_0000;
    }
    for qdisc in &saved.qdiscs[1..] {
        if qdisc.handle == 0 {
            continue;
        }
        let parent_major = qdisc.parent & 0xffff_0000;
        let parent = major_map
            .iter()
            .find(|(old, _)| *old == parent_major)
            .map_or(qdisc.parent, |(_, new)| new | (qdisc.parent & 0xffff));
        match route.request(
            replace_qdisc(saved.ifindex, qdisc, qdisc.handle, parent),
            "restore child qdisc",
        ) {
            Ok(_) => major_map.push((qdisc.handle & 0xffff_0000, qdisc.handle & 0xffff_0000)),
            Err(e) => problems.push(format!("{} {:x}:: {e}", qdisc.kind, qdisc.handle >> 16)),
        }
    }
    problems
}

fn current_root(route: &mut NetlinkSocket, ifindex: u32) -> Option<u32> {
    route
        .dump(tc::dump_qdiscs(), "dump qdiscs")
        .ok()?
        .iter()
        .filter_map(|m| tc::parse_tc_object(&m.payload))
        .find(|q| q.ifindex == ifindex && q.parent == TC_H_ROOT)
        .map(|q| q.handle)
}

/// The state file of table `table` in the calling thread's network namespace: one per namespace (by the
/// namespace's inode) and table, so several throttles on one host do not mix.
pub fn state_file(dir: &Path, table: &str) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let namespace = std::fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .map_or(0, |m| m.ino());
    dir.join(format!("throttle-{table}-netns{namespace}.qdiscs"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes `saved` to `path` (replaced atomically): one line per qdisc,
/// `IFINDEX IFNAME HANDLE PARENT KIND ATTRIBUTES` (numbers and attributes in hex).
pub fn write_state(path: &Path, saved: &[SavedRoot]) -> std::io::Result<()> {
    if saved.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    writeln!(
        file,
        "# mptcp-throttle: root qdiscs replaced by the throttle, restored at exit or next start"
    )?;
    for root in saved {
        for qdisc in &root.qdiscs {
            writeln!(
                file,
                "{} {} {:x} {:x} {} {}",
                root.ifindex,
                root.ifname,
                qdisc.handle,
                qdisc.parent,
                qdisc.kind,
                if qdisc.attributes.is_empty() {
                    "-".into()
                } else {
                    hex(&qdisc.attributes)
                }
            )?;
        }
    }
    file.sync_all()?;
    std::fs::rename(temporary, path)
}

/// Reads a state file; a missing file is an empty list, unreadable lines are skipped.
pub fn read_state(path: &Path) -> Vec<SavedRoot> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut saved: Vec<SavedRoot> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [ifindex, ifname, handle, parent, kind, attributes] = fields[..] else {
            continue;
        };
        let (Ok(ifindex), Ok(handle), Ok(parent)) = (
            ifindex.parse::<u32>(),
            u32::from_str_radix(handle, 16),
            u32::from_str_radix(parent, 16),
        ) else {
            continue;
        };
        let attributes = if attributes == "-" {
            Vec::new()
        } else {
            match unhex(attributes) {
                Some(bytes) => bytes,
                None => continue,
            }
        };
        let qdisc = SavedQdisc {
            handle,
            parent,
            kind: kind.to_owned(),
            attributes,
        };
        match saved.iter_mut().find(|r| r.ifindex == ifindex) {
            Some(root) => root.qdiscs.push(qdisc),
            None => saved.push(SavedRoot {
                ifindex,
                ifname: ifname.to_owned(),
                qdiscs: vec![qdisc],
                classes: 0,
            }),
        }
    }
    saved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trips() {
        let saved = vec![SavedRoot {
            ifindex: 7,
            ifname: "eth1".into(),
            qdiscs: vec![
                SavedQdisc {
                    handle: 0x0007_0000,
                    parent: TC_H_ROOT,
                    kind: "mq".into(),
                    attributes: Vec::new(),
                },
                SavedQdisc {
                    handle: 0x8001_0000,
                    parent: 0x0007_0002,
                    kind: "tbf".into(),
                    attributes: vec![8, 0, 2, 0x80, 1, 2, 3, 4],
                },
            ],
            classes: 0,
        }];
        let dir = std::env::temp_dir().join(format!("mptcp-restore-test-{}", std::process::id()));
        let path = dir.join("state");
        write_state(&path, &saved).unwrap();
        assert_eq!(read_state(&path), saved);
        write_state(&path, &[]).unwrap();
        assert!(!path.exists());
        assert!(read_state(&path).is_empty());
        let _ = std::fs::remove_dir(dir);
    }

    #[test]
    fn raw_attributes_keep_the_nested_flag() {
        let attrs = [8u8, 0, 2, 0x80, 1, 2, 3, 4, 5, 0, 1, 0, 9, 0, 0, 0];
        let walked = raw_attributes(&attrs);
        assert_eq!(walked.len(), 2);
        assert_eq!(walked[0].0, 0x8002);
        assert_eq!(walked[1], (1, &attrs[8..13]));
    }
}
