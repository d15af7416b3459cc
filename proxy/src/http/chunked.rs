//! The chunked transfer coding (RFC 9112 §7.1), sans-IO: a strict decoder for bodies the proxy relays
//! (it re-frames every chunk it passes on, so nothing malformed reaches the other side), and the
//! framing it writes.
//!
//! Strict like hyper's decoder, which the smuggling corpus was first checked against: a chunk size is
//! 1-16 hex digits, optionally followed by whitespace and extensions; lines end in CRLF; chunk data is
//! followed by CRLF; the trailer section is a list of valid fields. Extensions are bounded per body,
//! trailers too.

use std::ops::Range;

/// Extension bytes allowed in one body (hyper's limit).
const EXTENSIONS_LIMIT: usize = 16 * 1024;
/// Trailer section bytes allowed in one body.
const TRAILERS_LIMIT: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk size line is malformed (no digit, more than 16 digits, a stray byte).
    #[error("invalid chunk size line")]
    Size,
    /// Chunk data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    /// Chunk extensions are malformed or too long.
    #[error("invalid chunk extension")]
    Extension,
    /// The trailer section is malformed or too long.
    #[error("invalid trailer section")]
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first size digit.
    SizeStart,
    /// In the size digits.
    Size,
    /// Whitespace after the size.
    SizeWs,
    /// In extensions, up to CR.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// In chunk data.
    Data,
    /// After chunk data, expecting CR.
    DataCr,
    /// Expecting LF after the data's CR.
    DataLf,
    /// At the start of a trailer line or of the final CRLF.
    TrailerStart,
    /// In a trailer line.
    Trailer,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final CR.
    FinalLf,
    /// The body ended.
    Done,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Payload bytes: this range of the input.
    Data(Range<usize>),
    /// The body ended (the trailer section, if any, is [`ChunkedDecoder::trailers`]).
    Done,
}

/// Decodes one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Digits read of the current size, then the data left in the chunk.
    remaining: u64,
    digits: u8,
    extension_bytes: usize,
    /// The trailer fields, each line with its CRLF.
    trailers: Vec<u8>,
    line_start: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: State::SizeStart,
            remaining: 0,
            digits: 0,
            extension_bytes: 0,
            trailers: Vec::new(),
            line_start: 0,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The trailer fields (each line with its CRLF; empty without trailers), once done.
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Decodes from the start of `input`. Returns how many bytes were used and what they held: payload
    /// (a range of `input`), the end of the body, or nothing (framing only: call again with the rest, or
    /// with more bytes once all was used).
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Step>), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take =
                    (input.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok((i + take, Some(Step::Data(i..i + take))));
            }
            let byte = input[i];
            i += 1;
            self.state = match (self.state, byte) {
                (State::SizeStart | State::Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return Err(ChunkError::Size);
                    }
                    self.digits += 1;
                    self.remaining = (self.remaining << 4) | u64::from(hex(b));
                    State::Size
                }
                (State::Size | State::SizeWs, b' ' | b'\t') => State::SizeWs,
                (State::Size | State::SizeWs, b';') => State::Extension,
                (State::Size | State::SizeWs, b'\r') => State::SizeLf,
                (State::SizeStart | State::Size | State::SizeWs, _) => {
                    return Err(ChunkError::Size)
                }
                (State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => {
                    self.extension_bytes += 1;
                    if self.extension_bytes > EXTENSIONS_LIMIT {
                        return Err(ChunkError::Extension);
                    }
                    State::Extension
                }
                (State::Extension, _) => return Err(ChunkError::Extension),
                (State::SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    }
                }
                (State::SizeLf, _) => return Err(ChunkError::Size),
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => State::SizeStart,
                (State::DataCr | State::DataLf, _) => return Err(ChunkError::DataEnd),
                (State::TrailerStart, b'\r') => State::FinalLf,
                (State::Trailer, b'\r') => State::TrailerLf,
                (State::TrailerStart | State::Trailer, b'\n') => return Err(ChunkError::Trailers),
                (State::TrailerStart | State::Trailer, b) => {
                    if self.trailers.len() >= TRAILERS_LIMIT {
                        return Err(ChunkError::Trailers);
                    }
                    self.trailers.push(b);
                    State::Trailer
                }
                (State::TrailerLf, b'\n') => {
                    if !valid_field(&self.trailers[self.line_start..]) {
                        return Err(ChunkError::Trailers);
                    }
                    self.trailers.extend_from_slice(b"\r\n");
                    self.line_start = self.trailers.len();
                    State::TrailerStart
                }
                (State::FinalLf, b'\n') => {
                    self.state = State::Done;
                    return Ok((i, Some(Step::Done)));
                }
                (State::TrailerLf | State::FinalLf, _) => return Err(ChunkError::Trailers),
                // Data is handled before the match; nothing follows the end.
                (State::Data | State::Done, _) => return Err(ChunkError::DataEnd),
            };
        }
        Ok((i, None))
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// `name: value` with a token name and a value of visible characters, spaces, tabs and obs-text.
fn valid_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|b| is_tchar(*b))
        && value
            .iter()
            .all(|b| *b == b'\t' || *b == b' ' || (0x21..0x7f).contains(b) || *b >= 0x80)
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends the framing before `len` bytes of chunk data (`len` > 0).
pub fn put_chunk_start(out: &mut Vec<u8>, len: usize) {
    super::wire::put_hex(out, len as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends the framing after chunk data.
pub fn put_chunk_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk, the trailer fields (each line with its CRLF) and the final CRLF.
pub fn put_last_chunk(out: &mut Vec<u8>, trailers: &[u8]) {
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `input` fed in pieces of `piece` bytes; returns the payload and the trailers.
    fn decode_all(input: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<u8>, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let mut buffered = Vec::new();
        let mut fed = 0;
        while !decoder.is_done() {
            if buffered.is_empty() {
                if fed == input.len() {
                    return Err(ChunkError::DataEnd);
                }
                let end = (fed + piece).min(input.len());
                buffered.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            let (used, step) = decoder.decode(&buffered)?;
            if let Some(Step::Data(range)) = step {
                payload.extend_from_slice(&buffered[range]);
            }
            buffered.drain(..used);
        }
        Ok((payload, decoder.trailers().to_vec(), fed - buffered.len()))
    }

    #[test]
    fn bodies_decode_in_any_pieces() {
        let body = b"5\r\nhello\r\n1a;ext=1;q=\"x y\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\nx-sum:  6 \r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, 100] {
            let (payload, trailers, used) = decode_all(body, piece).expect("valid");
            assert_eq!(payload, b"helloabcdefghijklmnopqrstuvwxyz");
            assert_eq!(trailers, b"X-T: 1\r\nx-sum:  6 \r\n");
            assert_eq!(&body[used..], b"NEXT", "piece {piece}");
        }
        let (payload, trailers, _) = decode_all(b"3 \t;a\r\nabc\r\n0\r\n\r\n", 4).expect("bws");
        assert_eq!(
            (payload.as_slice(), trailers.as_slice()),
            (&b"abc"[..], &b""[..])
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for (bad, error) in [
            (&b"zz\r\nhello\r\n0\r\n\r\n"[..], ChunkError::Size),
            (
                b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
                ChunkError::Size,
            ),
            (b"3\r\nabcdef\r\n0\r\n\r\n", ChunkError::DataEnd),
            (b"\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5;a\nb\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5;\0\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"0\r\nno colon\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nX : 1\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nX: a\x01\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nX: 1\n\r\n", ChunkError::Trailers),
            (b"0\r\n\rx", ChunkError::Trailers),
        ] {
            assert_eq!(decode_all(bad, 3).map(|_| ()), Err(error), "{bad:?}");
        }
        // Cut short: the input ends before the body does.
        assert!(decode_all(b"5\r\nhello\r\n0\r\n", 100).is_err());
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(EXTENSIONS_LIMIT + 1));
        assert_eq!(
            decode_all(long_extension.as_bytes(), 1000).map(|_| ()),
            Err(ChunkError::Extension)
        );
    }

    proptest! {
        #[test]
        fn what_the_proxy_writes_decodes_to_the_same(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            piece in 1usize..64,
        ) {
            let mut encoded = Vec::new();
            for chunk in &chunks {
                put_chunk_start(&mut encoded, chunk.len());
                encoded.extend_from_slice(chunk);
                put_chunk_end(&mut encoded);
            }
            put_last_chunk(&mut encoded, b"x-t: 1\r\n");
            let (payload, trailers, used) = decode_all(&encoded, piece).expect("valid");
            prop_assert_eq!(payload, chunks.concat());
            prop_assert_eq!(trailers, b"x-t: 1\r\n".to_vec());
            prop_assert_eq!(used, encoded.len());
        }

        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut decoder = ChunkedDecoder::new();
            let mut rest = &input[..];
            while let Ok((used, step)) = decoder.decode(rest) {
                if let Some(Step::Data(range)) = &step {
                    prop_assert!(range.end <= rest.len());
                }
                rest = &rest[used..];
                if (used == 0 && step.is_none()) || rest.is_empty() || decoder.is_done() {
                    break;
                }
            }
        }
    }
}
