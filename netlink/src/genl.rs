//! Generic netlink: resolving a family (and its multicast groups) by name through `nlctrl`.

use crate::socket::{
    attr_string, attr_u16, attr_u32, parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket,
};

/// `GENL_ID_CTRL`: the controller family's fixed id.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `struct genlmsghdr` size.
pub const GENL_HDRLEN: usize = 4;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// A resolved generic netlink family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlFamily {
    /// Family id (the message type of its requests).
    pub id: u16,
    /// Multicast groups by name.
    pub groups: Vec<(String, u32)>,
}

impl GenlFamily {
    /// The id of multicast group `name`.
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

/// `struct genlmsghdr` for `cmd` at `version`.
pub fn genl_header(cmd: u8, version: u8) -> [u8; GENL_HDRLEN] {
    [cmd, version, 0, 0]
}

/// Starts a request of generic netlink family `family_id`: `cmd` at `version`.
pub fn request(family_id: u16, cmd: u8, version: u8) -> MessageBuilder {
    MessageBuilder::new(family_id, 0).header(&genl_header(cmd, version))
}

/// Looks up a generic netlink family by name.
pub fn resolve_family(socket: &mut NetlinkSocket, name: &str) -> Result<GenlFamily, NetlinkError> {
    let operation = format!("resolve genl family {name}");
    let replies = socket.request(
        request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 2).attr_str(CTRL_ATTR_FAMILY_NAME, name),
        &operation,
    )?;
    for reply in replies {
        let Some(attrs) = reply.payload.get(GENL_HDRLEN..) else {
            continue;
        };
        let mut id = None;
        let mut groups = Vec::new();
        for (kind, value) in parse_attrs(attrs) {
            match kind {
                CTRL_ATTR_FAMILY_ID => id = attr_u16(value),
                CTRL_ATTR_MCAST_GROUPS => {
                    for (_, group) in parse_attrs(value) {
                        let mut group_name = None;
                        let mut group_id = None;
                        for (k, v) in parse_attrs(group) {
                            match k {
                                CTRL_ATTR_MCAST_GRP_NAME => group_name = Some(attr_string(v)),
                                CTRL_ATTR_MCAST_GRP_ID => group_id = attr_u32(v),
                                _ => {}
                            }
                        }
                        if let (Some(n), Some(i)) = (group_name, group_id) {
                            groups.push((n, i));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(id) = id {
            return Ok(GenlFamily { id, groups });
        }
    }
    Err(NetlinkError::Kernel {
        operation,
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
        message: None,
    })
}
