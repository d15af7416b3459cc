//! Offline capture readers: classic pcap (microsecond and nanosecond, both byte orders) and
//! pcapng (section header, interface description, enhanced/simple/obsolete packet blocks).
//!
//! The reader works over bytes already in memory ([`CaptureFile::parse`]). A record that ends
//! past the data is not an error but a state: [`CaptureFile::next_frame`] returns `Ok(None)` and
//! [`CaptureFile::incomplete`] says how many more bytes the record needs (a capture cut short,
//! or one still being written).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use super::link::LinkType;

/// Why a capture file could not be read.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not start with a pcap or pcapng magic number.
    #[error("not a pcap or pcapng file (first bytes {0:02x?})")]
    NotACapture(Vec<u8>),
    /// The file's (or an interface's) link type is not supported.
    #[error(
        "unsupported link type {0} (supported: 0, 1, 9, 12, 14, 101, 108, 113, 228, 229, 276)"
    )]
    UnsupportedLinkType(u32),
    /// A header or block is inconsistent.
    #[error("malformed capture at byte {offset}: {reason}")]
    Malformed {
        /// Offset of the bad header or block.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file is shorter than its own file header.
    #[error("capture file header truncated ({0} bytes)")]
    TruncatedHeader(usize),
}

/// One captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// 1-based frame number within the file (as Wireshark numbers frames).
    pub number: u64,
    /// Capture time since the Unix epoch.
    pub timestamp: Duration,
    /// The frame's link-layer type.
    pub link: LinkType,
    /// The captured bytes (possibly cut at the snap length).
    pub data: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Pcap {
        big_endian: bool,
        nanos: bool,
        link: LinkType,
    },
    PcapNg {
        big_endian: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Interface {
    link: Option<(LinkType, u32)>,
    linktype: u32,
    /// Timestamp units per second, as a power of 10 (`true`) or 2 (`false`).
    resolution: (bool, u8),
    offset_secs: i64,
}

/// A capture file in memory, iterated frame by frame with [`CaptureFile::next_frame`].
#[derive(Debug)]
pub struct CaptureFile<'a> {
    data: &'a [u8],
    parser: Parser,
}

/// A capture read incrementally from any [`Read`] (a file, a pipe), holding only the record
/// being decoded in memory.
#[derive(Debug)]
pub struct CaptureReader<R: Read> {
    reader: R,
    buffer: Vec<u8>,
    parser: Parser,
    end_of_input: bool,
    chunk_size: usize,
}

/// The format state shared by [`CaptureFile`] and [`CaptureReader`]: sans-IO, it decodes
/// records from whatever bytes it is given and says when it needs more.
#[derive(Debug)]
struct Parser {
    /// File offset of the first byte of the data the parser is given.
    base: usize,
    /// Offset of the next record in that data.
    offset: usize,
    format: Format,
    interfaces: Vec<Interface>,
    frames: u64,
    incomplete: Option<IncompleteRecord>,
}

/// Where a frame's bytes are, relative to the data given to the parser.
#[derive(Debug, Clone)]
struct FrameInfo {
    number: u64,
    timestamp: Duration,
    link: LinkType,
    range: std::ops::Range<usize>,
}

impl FrameInfo {
    fn frame(self, data: &[u8]) -> Frame<'_> {
        Frame {
            number: self.number,
            timestamp: self.timestamp,
            link: self.link,
            data: &data[self.range],
        }
    }
}

/// A record that runs past the end of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncompleteRecord {
    /// Offset of the record in the file.
    pub offset: usize,
    /// Bytes the record needs beyond what is there.
    pub missing: usize,
}

impl std::fmt::Display for IncompleteRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capture cut short: the record at byte {} needs {} more bytes",
            self.offset, self.missing
        )
    }
}

const PCAP_MAGIC_MICROS: u32 = 0xa1b2_c3d4;
const PCAP_MAGIC_NANOS: u32 = 0xa1b2_3c4d;
const PCAPNG_SECTION_HEADER: u32 = 0x0a0d_0d0a;
const PCAPNG_BYTE_ORDER_MAGIC: u32 = 0x1a2b_3c4d;
const PCAPNG_INTERFACE: u32 = 1;
const PCAPNG_OBSOLETE_PACKET: u32 = 2;
const PCAPNG_SIMPLE_PACKET: u32 = 3;
const PCAPNG_ENHANCED_PACKET: u32 = 6;

fn u16_at(data: &[u8], at: usize, big_endian: bool) -> u16 {
    let bytes = [data[at], data[at + 1]];
    if big_endian {
        u16::from_be_bytes(bytes)
    } else {
        u16::from_le_bytes(bytes)
    }
}

fn u32_at(data: &[u8], at: usize, big_endian: bool) -> u32 {
    let bytes = [data[at], data[at + 1], data[at + 2], data[at + 3]];
    if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    }
}

fn link_of(linktype: u32) -> Result<LinkType, CaptureError> {
    LinkType::from_linktype(linktype).ok_or(CaptureError::UnsupportedLinkType(linktype))
}

/// Reads a whole file into memory (the caller keeps the bytes alive for [`CaptureFile`]).
pub fn read_file(path: &Path) -> Result<Vec<u8>, CaptureError> {
    std::fs::read(path).map_err(|source| CaptureError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl Parser {
    /// Recognises the format from the magic number and reads the file header.
    fn new(data: &[u8]) -> Result<Parser, CaptureError> {
        if data.len() < 4 {
            return Err(CaptureError::NotACapture(data.to_vec()));
        }
        let magic_le = u32_at(data, 0, false);
        let magic_be = u32_at(data, 0, true);
        let format = if magic_le == PCAPNG_SECTION_HEADER {
            if data.len() < 12 {
                return Err(CaptureError::TruncatedHeader(data.len()));
            }
            let big_endian = match u32_at(data, 8, false) {
                PCAPNG_BYTE_ORDER_MAGIC => false,
                _ if u32_at(data, 8, true) == PCAPNG_BYTE_ORDER_MAGIC => true,
                _ => {
                    return Err(CaptureError::Malformed {
                        offset: 8,
                        reason: "bad pcapng byte-order magic",
                    })
                }
            };
            Format::PcapNg { big_endian }
        } else {
            let (big_endian, nanos) = match (magic_le, magic_be) {
                (PCAP_MAGIC_MICROS, _) => (false, false),
                (PCAP_MAGIC_NANOS, _) => (false, true),
                (_, PCAP_MAGIC_MICROS) => (true, false),
                (_, PCAP_MAGIC_NANOS) => (true, true),
                _ => return Err(CaptureError::NotACapture(data[..4].to_vec())),
            };
            if data.len() < 24 {
                return Err(CaptureError::TruncatedHeader(data.len()));
            }
            // The low 16 bits hold the link type; the high bits may carry FCS information.
            let linktype = u32_at(data, 20, big_endian) & 0xffff;
            Format::Pcap {
                big_endian,
                nanos,
                link: link_of(linktype)?,
            }
        };
        let offset = match format {
            Format::Pcap { .. } => 24,
            Format::PcapNg { .. } => 0,
        };
        Ok(Parser {
            base: 0,
            offset,
            format,
            interfaces: Vec::new(),
            frames: 0,
            incomplete: None,
        })
    }

    fn need_more(
        &mut self,
        data_len: usize,
        offset: usize,
        record_len: usize,
    ) -> Option<FrameInfo> {
        self.incomplete = Some(IncompleteRecord {
            offset: self.base + offset,
            missing: record_len - (data_len - offset),
        });
        None
    }

    /// The next frame in `data`; `Ok(None)` when `data` holds no complete record at the
    /// current offset (`incomplete` then says what is missing, if anything started).
    fn next(&mut self, data: &[u8]) -> Result<Option<FrameInfo>, CaptureError> {
        self.incomplete = None;
        match self.format {
            Format::Pcap {
                big_endian,
                nanos,
                link,
            } => self.next_pcap(data, big_endian, nanos, link),
            Format::PcapNg { .. } => self.next_pcapng(data),
        }
    }

    fn next_pcap(
        &mut self,
        data: &[u8],
        big_endian: bool,
        nanos: bool,
        link: LinkType,
    ) -> Result<Option<FrameInfo>, CaptureError> {
        let at = self.offset;
        if at == data.len() {
            return Ok(None);
        }
        if data.len() - at < 16 {
            return Ok(self.need_more(data.len(), at, 16));
        }
        let secs = u32_at(data, at, big_endian);
        let fraction = u32_at(data, at + 4, big_endian);
        let captured = u32_at(data, at + 8, big_endian) as usize;
        if captured > MAX_RECORD_LEN {
            return Err(CaptureError::Malformed {
                offset: self.base + at,
                reason: "record longer than 16 MiB",
            });
        }
        let start = at + 16;
        if captured > data.len() - start {
            return Ok(self.need_more(data.len(), at, 16 + captured));
        }
        self.offset = start + captured;
        self.frames += 1;
        let nanos = if nanos {
            fraction
        } else {
            fraction.saturating_mul(1000)
        };
        Ok(Some(FrameInfo {
            number: self.frames,
            timestamp: Duration::new(u64::from(secs), 0) + Duration::from_nanos(u64::from(nanos)),
            link,
            range: start..start + captured,
        }))
    }

    fn next_pcapng(&mut self, data: &[u8]) -> Result<Option<FrameInfo>, CaptureError> {
        loop {
            let at = self.offset;
            if at == data.len() {
                return Ok(None);
            }
            if data.len() - at < 12 {
                return Ok(self.need_more(data.len(), at, 12));
            }
            let block_type = u32_at(data, at, false);
            if block_type == PCAPNG_SECTION_HEADER {
                let big_endian = match u32_at(data, at + 8, false) {
                    PCAPNG_BYTE_ORDER_MAGIC => false,
                    _ if u32_at(data, at + 8, true) == PCAPNG_BYTE_ORDER_MAGIC => true,
                    _ => {
                        return Err(CaptureError::Malformed {
                            offset: self.base + at + 8,
                            reason: "bad pcapng byte-order magic",
                        })
                    }
                };
                self.format = Format::PcapNg { big_endian };
                self.interfaces.clear();
            }
            let Format::PcapNg { big_endian } = self.format else {
                unreachable!("pcapng reader on a pcap file")
            };
            let block_type = u32_at(data, at, big_endian);
            let total_len = u32_at(data, at + 4, big_endian) as usize;
            if total_len > MAX_RECORD_LEN {
                return Err(CaptureError::Malformed {
                    offset: self.base + at,
                    reason: "block longer than 16 MiB",
                });
            }
            if total_len < 12 || total_len % 4 != 0 {
                return Err(CaptureError::Malformed {
                    offset: self.base + at,
                    reason: "bad pcapng block length",
                });
            }
            if total_len > data.len() - at {
                return Ok(self.need_more(data.len(), at, total_len));
            }
            self.offset = at + total_len;
            let body = &data[at + 8..at + total_len - 4];
            match block_type {
                PCAPNG_INTERFACE => {
                    if body.len() < 8 {
                        return Err(CaptureError::Malformed {
                            offset: self.base + at,
                            reason: "short interface description block",
                        });
                    }
                    let linktype = u32::from(u16_at(body, 0, big_endian));
                    let mut interface = Interface {
                        link: LinkType::from_linktype(linktype).map(|link| (link, linktype)),
                        linktype,
                        resolution: (true, 6),
                        offset_secs: 0,
                    };
                    let mut option = 8;
                    while option + 4 <= body.len() {
                        let code = u16_at(body, option, big_endian);
                        let len = usize::from(u16_at(body, option + 2, big_endian));
                        let value = option + 4;
                        if code == 0 || value + len > body.len() {
                            break;
                        }
                        match (code, len) {
                            (9, 1) => {
                                let resolution = body[value];
                                interface.resolution = (resolution & 0x80 == 0, resolution & 0x7f);
                            }
                            (14, 8) => {
                                let high = u64::from(u32_at(body, value, big_endian));
                                let low = u64::from(u32_at(body, value + 4, big_endian));
                                let (first, second) =
                                    if big_endian { (high, low) } else { (low, high) };
                                interface.offset_secs = (first | (second << 32)) as i64;
                            }
                            _ => {}
                        }
                        option = value + len.div_ceil(4) * 4;
                    }
                    self.interfaces.push(interface);
                }
                PCAPNG_ENHANCED_PACKET | PCAPNG_OBSOLETE_PACKET => {
                    if body.len() < 20 {
                        return Err(CaptureError::Malformed {
                            offset: self.base + at,
                            reason: "short packet block",
                        });
                    }
                    let interface_id = if block_type == PCAPNG_ENHANCED_PACKET {
                        u32_at(body, 0, big_endian) as usize
                    } else {
                        usize::from(u16_at(body, 0, big_endian))
                    };
                    let high = u64::from(u32_at(body, 4, big_endian));
                    let low = u64::from(u32_at(body, 8, big_endian));
                    let captured = u32_at(body, 12, big_endian) as usize;
                    if captured > body.len() - 20 {
                        return Err(CaptureError::Malformed {
                            offset: self.base + at,
                            reason: "packet block captured length exceeds block",
                        });
                    }
                    let frame_data = at + 8 + 20..at + 8 + 20 + captured;
                    return self
                        .pcapng_frame(interface_id, (high << 32) | low, frame_data)
                        .map(Some);
                }
                PCAPNG_SIMPLE_PACKET => {
                    if body.len() < 4 {
                        return Err(CaptureError::Malformed {
                            offset: self.base + at,
                            reason: "short simple packet block",
                        });
                    }
                    let original = u32_at(body, 0, big_endian) as usize;
                    let captured = original.min(body.len() - 4);
                    let frame_data = at + 8 + 4..at + 8 + 4 + captured;
                    return self.pcapng_frame(0, 0, frame_data).map(Some);
                }
                _ => {}
            }
        }
    }

    fn pcapng_frame(
        &mut self,
        interface_id: usize,
        units: u64,
        range: std::ops::Range<usize>,
    ) -> Result<FrameInfo, CaptureError> {
        let interface = *self
            .interfaces
            .get(interface_id)
            .ok_or(CaptureError::Malformed {
                offset: self.base + self.offset,
                reason: "packet for an undeclared interface",
            })?;
        let (link, _) = interface
            .link
            .ok_or(CaptureError::UnsupportedLinkType(interface.linktype))?;
        let timestamp = match interface.resolution {
            (true, exponent) => {
                let per_second = 10u64.checked_pow(u32::from(exponent)).unwrap_or(u64::MAX);
                let nanos = if exponent <= 9 {
                    (units % per_second) * 10u64.pow(9 - u32::from(exponent))
                } else {
                    (units % per_second) / 10u64.pow((u32::from(exponent) - 9).min(19))
                };
                Duration::new(units / per_second, nanos as u32)
            }
            (false, exponent) => {
                let exponent = u32::from(exponent).min(63);
                let secs = units >> exponent;
                let fraction = units & ((1u64 << exponent) - 1);
                let nanos = ((u128::from(fraction) * 1_000_000_000) >> exponent) as u32;
                Duration::new(secs, nanos)
            }
        };
        let timestamp = if interface.offset_secs >= 0 {
            timestamp + Duration::from_secs(interface.offset_secs as u64)
        } else {
            timestamp.saturating_sub(Duration::from_secs(interface.offset_secs.unsigned_abs()))
        };
        self.frames += 1;
        Ok(FrameInfo {
            number: self.frames,
            timestamp,
            link,
            range,
        })
    }
}

impl<'a> CaptureFile<'a> {
    /// Recognises the format from the magic number and reads the file header.
    pub fn parse(data: &'a [u8]) -> Result<CaptureFile<'a>, CaptureError> {
        Ok(CaptureFile {
            data,
            parser: Parser::new(data)?,
        })
    }

    /// The next frame, `Ok(None)` at the end of the data (see [`incomplete`](Self::incomplete)).
    pub fn next_frame(&mut self) -> Result<Option<Frame<'a>>, CaptureError> {
        let data = self.data;
        Ok(self.parser.next(data)?.map(|info| info.frame(data)))
    }

    /// After [`next_frame`](Self::next_frame) returned `Ok(None)`: the record that needs more
    /// bytes, if the data did not end on a record boundary.
    pub fn incomplete(&self) -> Option<IncompleteRecord> {
        self.parser.incomplete
    }
}

/// Longest record accepted (tshark's own limit is far lower); bounds a reader's buffer.
const MAX_RECORD_LEN: usize = 16 * 1024 * 1024;

/// Bytes read from the input at a time.
const READ_CHUNK: usize = 256 * 1024;

impl<R: Read> CaptureReader<R> {
    /// Reads the file header from `reader`.
    pub fn new(reader: R) -> Result<CaptureReader<R>, CaptureError> {
        Self::with_chunk_size(reader, READ_CHUNK)
    }

    /// Like [`new`](Self::new), reading at most `chunk_size` bytes at a time.
    pub fn with_chunk_size(
        mut reader: R,
        chunk_size: usize,
    ) -> Result<CaptureReader<R>, CaptureError> {
        let chunk_size = chunk_size.max(1);
        let mut buffer = Vec::with_capacity(chunk_size);
        let mut end_of_input = false;
        // The longest file header is pcap's 24 bytes.
        while buffer.len() < 24 && !end_of_input {
            end_of_input = fill(&mut reader, &mut buffer, chunk_size)? == 0;
        }
        let parser = Parser::new(&buffer)?;
        Ok(CaptureReader {
            reader,
            buffer,
            parser,
            end_of_input,
            chunk_size,
        })
    }

    /// The next frame; `Ok(None)` at the end of the input (see [`incomplete`](Self::incomplete)).
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, CaptureError> {
        loop {
            if let Some(info) = self.parser.next(&self.buffer)? {
                return Ok(Some(info.frame(&self.buffer)));
            }
            if self.end_of_input {
                return Ok(None);
            }
            // Drop what was consumed, then read more.
            let consumed = self.parser.offset;
            self.buffer.drain(..consumed);
            self.parser.base += consumed;
            self.parser.offset = 0;
            self.end_of_input = fill(&mut self.reader, &mut self.buffer, self.chunk_size)? == 0;
        }
    }

    /// After [`next_frame`](Self::next_frame) returned `Ok(None)`: the record that needs more
    /// bytes, if the input did not end on a record boundary.
    pub fn incomplete(&self) -> Option<IncompleteRecord> {
        self.parser.incomplete
    }
}

/// Appends up to `chunk_size` bytes from `reader`; returns how many were read (0 at the end).
fn fill<R: Read>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
    chunk_size: usize,
) -> Result<usize, CaptureError> {
    // `read_to_end` on a `Take` fills the spare capacity without zeroing it first.
    buffer.reserve(chunk_size);
    let mut limited = reader.take(chunk_size as u64);
    limited
        .read_to_end(buffer)
        .map_err(|source| CaptureError::Io {
            path: "input".to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_header(linktype: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&PCAP_MAGIC_NANOS.to_be_bytes());
        bytes.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        bytes.extend_from_slice(&linktype.to_be_bytes());
        bytes
    }

    #[test]
    fn big_endian_nanosecond_pcap_and_truncation() {
        let mut bytes = pcap_header(101);
        for (secs, nanos, payload) in [(10u32, 5u32, &[1u8, 2][..]), (11, 7, &[3][..])] {
            bytes.extend_from_slice(&secs.to_be_bytes());
            bytes.extend_from_slice(&nanos.to_be_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(payload);
        }
        bytes.extend_from_slice(&[0, 0, 0]);
        let mut file = CaptureFile::parse(&bytes).unwrap();
        let first = file.next_frame().unwrap().unwrap();
        assert_eq!(
            (first.number, first.timestamp, first.data),
            (1, Duration::new(10, 5), &[1, 2][..])
        );
        assert_eq!(first.link, LinkType::RawIp);
        let second = file.next_frame().unwrap().unwrap();
        assert_eq!((second.number, second.timestamp), (2, Duration::new(11, 7)));
        assert_eq!(file.next_frame().unwrap(), None);
        let incomplete = IncompleteRecord {
            offset: 24 + 16 + 2 + 16 + 1,
            missing: 13,
        };
        assert_eq!(file.incomplete(), Some(incomplete));
    }

    #[test]
    fn rejects_unknown_magic_and_link_type() {
        assert!(matches!(
            CaptureFile::parse(b"hello world"),
            Err(CaptureError::NotACapture(_))
        ));
        assert!(matches!(
            CaptureFile::parse(&pcap_header(147)),
            Err(CaptureError::UnsupportedLinkType(147))
        ));
    }
}
