//! A read buffer: bytes received and not yet used, with room to read more into. Allocated on first use,
//! grown up to a limit when a read fills it, compacted rather than reallocated.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from a socket and not used yet.
#[derive(Debug)]
pub struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    initial: usize,
    limit: usize,
}

impl Buffer {
    /// An empty buffer that allocates `initial` bytes on first use and grows to at most `limit`.
    pub fn new(initial: usize, limit: usize) -> Self {
        Self {
            data: Vec::new(),
            start: 0,
            end: 0,
            initial: initial.max(1),
            limit: limit.max(initial.max(1)),
        }
    }

    /// The bytes not used yet.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// How many bytes are waiting.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether no byte is waiting.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks the first `n` waiting bytes used.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether the buffer holds as much as it may: the next read has no room.
    #[cfg(test)]
    pub fn is_full(&self) -> bool {
        self.len() >= self.limit
    }

    /// Room to read into: compacts, and grows (doubling, up to the limit) when full.
    fn spare(&mut self) -> &mut [u8] {
        if self.data.is_empty() {
            self.data = vec![0; self.initial];
        }
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() && self.data.len() < self.limit {
            let size = (self.data.len() * 2).min(self.limit);
            self.data.resize(size, 0);
        }
        &mut self.data[self.end..]
    }

    /// Reads once from `io` into the buffer; returns the bytes read (0 at the end of the stream). A full
    /// buffer is an error (callers use bytes before reading more).
    pub async fn fill<R: AsyncRead + Unpin + ?Sized>(&mut self, io: &mut R) -> io::Result<usize> {
        let spare = self.spare();
        if spare.is_empty() {
            return Err(io::Error::other("read buffer full"));
        }
        let room = spare.len();
        let n = io.read(spare).await?;
        self.filled(n, room);
        Ok(n)
    }

    /// Reads what a socket has without waiting (`WouldBlock` when nothing).
    pub fn try_fill(&mut self, stream: &tokio::net::TcpStream) -> io::Result<usize> {
        let spare = self.spare();
        if spare.is_empty() {
            return Err(io::Error::other("read buffer full"));
        }
        let room = spare.len();
        let n = stream.try_read(spare)?;
        self.filled(n, room);
        Ok(n)
    }

    /// Counts `n` bytes read into `room`; a read that filled all the room grows the buffer (up to the
    /// limit), so a bulk transfer takes fewer, larger reads.
    fn filled(&mut self, n: usize, room: usize) {
        self.end += n;
        if n == room && self.data.len() < self.limit {
            let size = (self.data.len() * 2).min(self.limit);
            self.data.resize(size, 0);
        }
    }

    /// Gives memory back when the buffer is empty and grew past its initial size.
    pub fn shrink(&mut self) {
        if self.is_empty() && self.data.len() > self.initial {
            self.data = Vec::new();
        }
    }

    /// Frees the memory (for a connection that becomes a tunnel); the waiting bytes go with it.
    pub fn release(&mut self) {
        *self = Self::new(self.initial, self.limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_compacts_and_grows_to_the_limit() {
        let mut buffer = Buffer::new(4, 8);
        let mut source: &[u8] = b"abcdefghijkl";
        assert_eq!(buffer.fill(&mut source).await.expect("read"), 4);
        assert_eq!(buffer.bytes(), b"abcd");
        // That read filled all the room: the buffer grew to 8.
        buffer.consume(3);
        assert_eq!(buffer.fill(&mut source).await.expect("read"), 4);
        assert_eq!(buffer.bytes(), b"defgh");
        assert_eq!(buffer.fill(&mut source).await.expect("read"), 3);
        assert_eq!(buffer.bytes(), b"defghijk");
        assert!(buffer.is_full());
        assert!(buffer.fill(&mut source).await.is_err());
        buffer.consume(8);
        assert!(buffer.is_empty());
        buffer.shrink();
        assert_eq!(buffer.fill(&mut source).await.expect("read"), 1);
        assert_eq!(buffer.bytes(), b"l");
    }
}
