//! One record per MPTCP option, printed as JSON or as a readable line.
//!
//! Field names are the RFC field names in snake_case. Values follow Wireshark's
//! `tcp.options.mptcp.*` fields so the output can be compared with
//! `tshark -T fields`: integers are raw wire values; `flags` is the MP_CAPABLE/DSS flags byte
//! and, for MP_JOIN SYN/SYN-ACK, MP_PRIO and MP_TCPRST, the whole subtype byte (as Wireshark
//! shows it); one-bit flags (`backup`, `data_fin`, `echo`, `transient`) are 0 or 1; `hmac` is a
//! number for the 64-bit truncated HMACs and a hex string for the 160-bit MP_JOIN ACK HMAC.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::wire::mptcp::{
    AddAddrForm, MpJoinRepr, MptcpRepr, Packet, Subtype, DSS_FLAG_DATA_ACK, DSS_FLAG_DATA_ACK_64,
    DSS_FLAG_DATA_FIN, DSS_FLAG_DSN_64, DSS_FLAG_MAPPING,
};
use crate::wire::Segment;

/// An HMAC value: the truncated 64-bit forms as numbers, the 160-bit form as hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum HmacField {
    /// MP_JOIN SYN-ACK and ADD_ADDR: 64 bits.
    Truncated(u64),
    /// MP_JOIN third ACK: 160 bits, lowercase hex.
    Full(String),
}

/// One MPTCP option with its packet's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct OptionRecord {
    /// 1-based frame number within the capture.
    pub frame: u64,
    /// Capture time, seconds since the Unix epoch.
    pub ts: EpochSeconds,
    /// Source address.
    pub src: String,
    /// Destination address.
    pub dst: String,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Subtype name (`mp_capable`, ...), or the raw number for unknown subtypes.
    pub subtype: String,
    /// MP_CAPABLE version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u8>,
    /// Flags (see the module documentation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<u8>,
    /// MP_CAPABLE sender's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_key: Option<u64>,
    /// MP_CAPABLE / MP_FASTCLOSE receiver's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver_key: Option<u64>,
    /// MP_CAPABLE / DSS data-level length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_len: Option<u16>,
    /// MP_CAPABLE / DSS checksum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<u16>,
    /// MP_JOIN SYN receiver's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<u32>,
    /// MP_JOIN sender's random number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<u32>,
    /// MP_JOIN / ADD_ADDR HMAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac: Option<HmacField>,
    /// MP_JOIN / ADD_ADDR / MP_PRIO address id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_id: Option<u8>,
    /// MP_JOIN / MP_PRIO backup flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<u8>,
    /// DSS data ACK (raw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_ack: Option<u64>,
    /// DSS / MP_FAIL data sequence number (raw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn: Option<u64>,
    /// DSS subflow sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subflow_seq: Option<u32>,
    /// DSS DATA_FIN flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_fin: Option<u8>,
    /// ADD_ADDR address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// ADD_ADDR port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// ADD_ADDR v1 echo flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<u8>,
    /// REMOVE_ADDR address ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_ids: Option<Vec<u8>>,
    /// MP_TCPRST reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<u8>,
    /// MP_TCPRST transient flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transient: Option<u8>,
    /// Token (server's token) of the connection the option belongs to, once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<u32>,
    /// DSS checksum. Not part of the JSON: Wireshark 4.0 does not show it for well-formed
    /// DSS options, so the JSON leaves it out to stay field-compatible; the text line shows it.
    #[serde(skip)]
    pub dss_checksum: Option<u16>,
    /// Why the option could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A timestamp in seconds, serialized as a JSON number.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EpochSeconds(pub f64);

impl Eq for EpochSeconds {}

impl Serialize for EpochSeconds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

impl OptionRecord {
    /// Builds the record of one MPTCP option (`bytes`: the whole option) of `segment`.
    pub fn new(
        frame: u64,
        timestamp: Duration,
        segment: &Segment<'_>,
        bytes: &[u8],
    ) -> OptionRecord {
        let mut record = OptionRecord {
            frame,
            ts: EpochSeconds(timestamp.as_secs_f64()),
            src: segment.src.to_string(),
            dst: segment.dst.to_string(),
            sport: segment.src_port,
            dport: segment.dst_port,
            ..OptionRecord::default()
        };
        let unchecked = Packet::new_unchecked(bytes);
        record.subtype = match bytes.len() {
            0..=2 => "unknown".to_string(),
            _ => match unchecked.subtype() {
                Ok(subtype) => subtype.name().to_string(),
                Err(_) => unchecked.subtype_value().to_string(),
            },
        };
        let packet = match Packet::new_checked(bytes) {
            Ok(packet) => packet,
            Err(error) => {
                record.error = Some(error.to_string());
                record.add_partial_fields(bytes);
                return record;
            }
        };
        let repr = match MptcpRepr::parse(&packet) {
            Ok(repr) => repr,
            Err(error) => {
                record.error = Some(error.to_string());
                return record;
            }
        };
        match repr {
            MptcpRepr::MpCapable(capable) => {
                record.version = Some(capable.version);
                record.flags = Some(capable.flags);
                record.sender_key = capable.sender_key;
                record.receiver_key = capable.receiver_key;
                record.data_len = capable.data_len;
                record.checksum = capable.checksum;
            }
            MptcpRepr::MpJoin(MpJoinRepr::Syn {
                backup,
                address_id,
                token,
                nonce,
            }) => {
                record.flags = Some(packet.subtype_byte());
                record.backup = Some(u8::from(backup));
                record.address_id = Some(address_id);
                record.token = Some(token);
                record.nonce = Some(nonce);
            }
            MptcpRepr::MpJoin(MpJoinRepr::SynAck {
                backup,
                address_id,
                hmac,
                nonce,
            }) => {
                record.flags = Some(packet.subtype_byte());
                record.backup = Some(u8::from(backup));
                record.address_id = Some(address_id);
                record.hmac = Some(HmacField::Truncated(hmac));
                record.nonce = Some(nonce);
            }
            MptcpRepr::MpJoin(MpJoinRepr::Ack { hmac }) => {
                record.hmac = Some(HmacField::Full(hex(&hmac)));
            }
            MptcpRepr::Dss(dss) => {
                record.flags = Some(packet.dss_flags());
                record.data_ack = dss.data_ack.map(|ack| ack.value());
                if let Some(mapping) = dss.mapping {
                    record.dsn = Some(mapping.dsn.value());
                    record.subflow_seq = Some(mapping.subflow_seq);
                    record.data_len = Some(mapping.data_len);
                    record.dss_checksum = mapping.checksum;
                }
                record.data_fin = Some(u8::from(dss.data_fin));
            }
            MptcpRepr::AddAddr(add) => {
                record.address_id = Some(add.address_id);
                record.address = Some(add.address);
                record.port = add.port;
                if let AddAddrForm::V1 { echo, hmac } = add.form {
                    record.echo = Some(u8::from(echo));
                    record.hmac = hmac.map(HmacField::Truncated);
                }
            }
            MptcpRepr::RemoveAddr(remove) => {
                record.address_ids = Some(remove.address_ids().to_vec());
            }
            MptcpRepr::MpPrio(prio) => {
                record.flags = Some(packet.subtype_byte());
                record.backup = Some(u8::from(prio.backup));
                record.address_id = prio.address_id;
            }
            MptcpRepr::MpFail(fail) => record.dsn = Some(fail.dsn),
            MptcpRepr::MpFastclose(fastclose) => record.receiver_key = Some(fastclose.receiver_key),
            MptcpRepr::MpTcpRst(rst) => {
                record.flags = Some(packet.subtype_byte());
                record.reason = Some(rst.reason);
                record.transient = Some(u8::from(rst.transient()));
            }
        }
        record
    }

    /// For a malformed option, the fields that precede the problem, read in wire order the way
    /// Wireshark does before it gives up on the option.
    fn add_partial_fields(&mut self, bytes: &[u8]) {
        if bytes.len() < 3 || bytes[0] != crate::wire::mptcp::OPTION_KIND {
            return;
        }
        let length = usize::from(bytes[1]).min(bytes.len());
        let bytes = &bytes[..length];
        if bytes.len() < 3 {
            return;
        }
        let low_nibble = bytes.get(2).map_or(0, |b| b & 0x0f);
        let be = |at: usize, width: usize| -> Option<u64> {
            let field = bytes.get(at..at + width)?;
            Some(
                field
                    .iter()
                    .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)),
            )
        };
        match Subtype::from_wire(bytes[2] >> 4) {
            Some(Subtype::MpCapable) => {
                self.version = Some(low_nibble);
                self.flags = bytes.get(3).copied();
            }
            Some(Subtype::Dss) => {
                let Some(&flags) = bytes.get(3) else { return };
                self.flags = Some(flags);
                self.data_fin = Some(u8::from(flags & DSS_FLAG_DATA_FIN != 0));
                let mut at = 4;
                if flags & DSS_FLAG_DATA_ACK != 0 {
                    let width = if flags & DSS_FLAG_DATA_ACK_64 != 0 {
                        8
                    } else {
                        4
                    };
                    let Some(ack) = be(at, width) else { return };
                    self.data_ack = Some(ack);
                    at += width;
                }
                if flags & DSS_FLAG_MAPPING != 0 {
                    let width = if flags & DSS_FLAG_DSN_64 != 0 { 8 } else { 4 };
                    let Some(dsn) = be(at, width) else { return };
                    self.dsn = Some(dsn);
                    at += width;
                    let Some(subflow_seq) = be(at, 4) else { return };
                    self.subflow_seq = Some(subflow_seq as u32);
                    self.data_len = be(at + 4, 2).map(|len| len as u16);
                }
            }
            Some(Subtype::AddAddr) => {
                self.address_id = bytes.get(3).copied();
                if low_nibble != 4 && low_nibble != 6 {
                    self.echo = Some(low_nibble & 1);
                }
            }
            Some(Subtype::MpPrio) => {
                self.flags = Some(bytes[2]);
                self.backup = Some(low_nibble & 1);
            }
            Some(Subtype::MpTcpRst) => {
                self.flags = Some(bytes[2]);
                self.transient = Some(low_nibble & 1);
                self.reason = bytes.get(3).copied();
            }
            Some(Subtype::MpFastclose) => self.receiver_key = be(4, 8),
            Some(Subtype::MpFail) => self.dsn = be(4, 8),
            Some(Subtype::MpJoin | Subtype::RemoveAddr) | None => {}
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialize")
    }

    /// A readable line: frame, time, endpoints, subtype, then `name=value` for each field.
    pub fn to_text(&self) -> String {
        fn text<T: ToString>(value: Option<T>) -> Option<String> {
            value.map(|value| value.to_string())
        }
        let hmac = self.hmac.as_ref().map(|hmac| match hmac {
            HmacField::Truncated(value) => format!("0x{value:016x}"),
            HmacField::Full(hex) => format!("0x{hex}"),
        });
        let address_ids = self
            .address_ids
            .as_ref()
            .map(|ids| ids.iter().map(u8::to_string).collect::<Vec<_>>().join(","));
        let fields = [
            ("version", text(self.version)),
            ("flags", self.flags.map(|flags| format!("0x{flags:02x}"))),
            ("sender_key", text(self.sender_key)),
            ("receiver_key", text(self.receiver_key)),
            ("token", self.token.map(|token| format!("0x{token:08x}"))),
            ("nonce", text(self.nonce)),
            ("hmac", hmac),
            ("address_id", text(self.address_id)),
            ("backup", text(self.backup)),
            ("address", text(self.address)),
            ("port", text(self.port)),
            ("echo", text(self.echo)),
            ("address_ids", address_ids),
            ("data_ack", text(self.data_ack)),
            ("dsn", text(self.dsn)),
            ("subflow_seq", text(self.subflow_seq)),
            ("data_len", text(self.data_len)),
            (
                "checksum",
                self.checksum
                    .or(self.dss_checksum)
                    .map(|c| format!("0x{c:04x}")),
            ),
            ("data_fin", text(self.data_fin)),
            ("reason", text(self.reason)),
            ("transient", text(self.transient)),
            (
                "connection",
                self.connection.map(|token| format!("0x{token:08x}")),
            ),
            ("error", self.error.clone()),
        ];
        let mut line = format!(
            "{} {:.6} {} > {} {}",
            self.frame,
            self.ts.0,
            endpoint(&self.src, self.sport),
            endpoint(&self.dst, self.dport),
            self.subtype
        );
        for (name, value) in fields {
            if let Some(value) = value {
                let _ = write!(line, " {name}={value}");
            }
        }
        line
    }
}

fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}
