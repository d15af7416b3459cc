//! Walker over the options area of a TCP header.

use thiserror::Error;

/// TCP option kind: end of option list.
pub const KIND_END: u8 = 0;
/// TCP option kind: no operation (padding).
pub const KIND_NOP: u8 = 1;

/// A malformed TCP options area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TcpOptionsError {
    /// An option's kind byte is the last byte of the area, so its length byte is missing.
    #[error("TCP option kind {kind} at offset {offset} has no length byte")]
    MissingLength {
        /// The option kind.
        kind: u8,
        /// Offset of the option in the options area.
        offset: usize,
    },
    /// An option's length is below 2 or runs past the end of the options area.
    #[error("TCP option kind {kind} at offset {offset} has bad length {length}")]
    BadLength {
        /// The option kind.
        kind: u8,
        /// Offset of the option in the options area.
        offset: usize,
        /// The length byte.
        length: u8,
    },
}

/// One TCP option: its kind and its full bytes (kind and length bytes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOption<'a> {
    /// The option kind.
    pub kind: u8,
    /// Offset of the option in the options area.
    pub offset: usize,
    /// The whole option, kind and length bytes included.
    pub bytes: &'a [u8],
}

/// Iterator over the options of a TCP header. Stops at End-of-Option-List, skips NOPs, and
/// yields one error (then stops) on a malformed option.
#[derive(Debug, Clone)]
pub struct TcpOptionIter<'a> {
    area: &'a [u8],
    offset: usize,
}

impl<'a> TcpOptionIter<'a> {
    /// Walks `area`, the bytes between the fixed 20-byte TCP header and the payload.
    pub fn new(area: &'a [u8]) -> Self {
        TcpOptionIter { area, offset: 0 }
    }
}

impl<'a> Iterator for TcpOptionIter<'a> {
    type Item = Result<TcpOption<'a>, TcpOptionsError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let offset = self.offset;
            let kind = *self.area.get(offset)?;
            match kind {
                KIND_END => {
                    self.offset = self.area.len();
                    return None;
                }
                KIND_NOP => {
                    self.offset += 1;
                    continue;
                }
                _ => {}
            }
            self.offset = self.area.len();
            let Some(&length) = self.area.get(offset + 1) else {
                return Some(Err(TcpOptionsError::MissingLength { kind, offset }));
            };
            let end = offset + usize::from(length);
            if length < 2 || end > self.area.len() {
                return Some(Err(TcpOptionsError::BadLength {
                    kind,
                    offset,
                    length,
                }));
            }
            self.offset = end;
            return Some(Ok(TcpOption {
                kind,
                offset,
                bytes: &self.area[offset..end],
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_nops_and_stops_at_end() {
        let area = [
            1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 30, 4, 0x80, 0, 0, 30, 4,
        ];
        let options: Vec<_> = TcpOptionIter::new(&area).collect();
        assert_eq!(options.len(), 2);
        let timestamps = options[0].unwrap();
        assert_eq!(
            (timestamps.kind, timestamps.offset, timestamps.bytes.len()),
            (8, 2, 10)
        );
        let mptcp = options[1].unwrap();
        assert_eq!((mptcp.kind, mptcp.bytes), (30, &[30, 4, 0x80, 0][..]));
    }

    #[test]
    fn reports_truncated_option_once() {
        let options: Vec<_> = TcpOptionIter::new(&[1, 30, 40, 0]).collect();
        assert_eq!(
            options,
            vec![Err(TcpOptionsError::BadLength {
                kind: 30,
                offset: 1,
                length: 40
            })]
        );
        let options: Vec<_> = TcpOptionIter::new(&[30]).collect();
        assert_eq!(
            options,
            vec![Err(TcpOptionsError::MissingLength {
                kind: 30,
                offset: 0
            })]
        );
        let options: Vec<_> = TcpOptionIter::new(&[30, 1, 0, 0]).collect();
        assert_eq!(options.len(), 1);
        assert!(options[0].is_err());
    }
}
