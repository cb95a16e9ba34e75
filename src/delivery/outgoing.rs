//! The message as it goes out: tenso's trace fields for this copy, then the queued
//! message — in memory when it is small, or read from its spool file in bounded
//! chunks when it is large — dot-stuffed on the way to the socket.
//!
//! Nothing here writes or keeps a file; a large message costs [`CHUNK`] bytes of
//! memory per transfer, however large it is. How it fails: a spool file that cannot
//! be read (or is shorter than its span) is an I/O error for the transfer, which the
//! caller treats like a broken connection (deferred, retried).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from the spool file per write to the socket.
pub const CHUNK: usize = 64 * 1024;

/// Where the body of a queued message lies in its spool file.
#[derive(Debug, Clone)]
pub struct FileSpan {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// Any octet above 127 in it (recorded when the message was received).
    pub eight_bit: bool,
}

#[derive(Debug, Clone)]
pub enum Body {
    Memory(Arc<Vec<u8>>),
    File(Arc<FileSpan>),
}

/// Trace fields plus the message; CRLF lines throughout.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub head: Vec<u8>,
    pub body: Body,
}

impl Outgoing {
    /// A message held in memory as one piece (generated mail, tests, benches).
    pub fn memory(bytes: Vec<u8>) -> Outgoing {
        Outgoing {
            head: Vec::new(),
            body: Body::Memory(Arc::new(bytes)),
        }
    }

    pub fn len(&self) -> usize {
        self.head.len()
            + match &self.body {
                Body::Memory(b) => b.len(),
                Body::File(f) => f.len as usize,
            }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the next hop must offer 8BITMIME for it.
    pub fn eight_bit(&self) -> bool {
        !self.head.is_ascii()
            || match &self.body {
                Body::Memory(b) => !b.is_ascii(),
                Body::File(f) => f.eight_bit,
            }
    }

    /// Writes the message dot-stuffed (RFC 5321 §4.5.2) and the final `.CRLF`.
    pub async fn write_stuffed<W: AsyncWrite + Unpin>(&self, out: &mut W) -> io::Result<()> {
        let mut st = Stuffer::default();
        let mut wire = Vec::with_capacity(CHUNK + CHUNK / 16);
        st.push(&self.head, &mut wire);
        match &self.body {
            Body::Memory(b) => {
                for chunk in b.chunks(CHUNK) {
                    st.push(chunk, &mut wire);
                    flush_full(out, &mut wire).await?;
                }
            }
            Body::File(f) => {
                let mut file = tokio::fs::File::open(&f.path).await?;
                file.seek(io::SeekFrom::Start(f.offset)).await?;
                let mut left = f.len as usize;
                let mut buf = vec![0u8; CHUNK];
                while left > 0 {
                    let n = file.read(&mut buf[..left.min(CHUNK)]).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "queued message shorter than its envelope says",
                        ));
                    }
                    st.push(&buf[..n], &mut wire);
                    flush_full(out, &mut wire).await?;
                    left -= n;
                }
            }
        }
        st.finish(&mut wire);
        out.write_all(&wire).await
    }
}

/// Writes `wire` once it holds a chunk's worth (a small message goes out in one write).
async fn flush_full<W: AsyncWrite + Unpin>(out: &mut W, wire: &mut Vec<u8>) -> io::Result<()> {
    if wire.len() >= CHUNK {
        out.write_all(wire).await?;
        wire.clear();
    }
    Ok(())
}

/// Dot-stuffing across chunk boundaries: remembers whether the next byte starts a line
/// and the last two bytes (a message not ending in CRLF gets one before the dot).
struct Stuffer {
    line_start: bool,
    last: [u8; 2],
}

impl Default for Stuffer {
    fn default() -> Stuffer {
        Stuffer {
            line_start: true,
            last: *b"\r\n",
        }
    }
}

impl Stuffer {
    /// Copies `chunk` line by line (a line at a time, not a byte at a time: this is
    /// the hot path of every delivery), doubling a dot that starts a line.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + 16);
        let mut rest = chunk;
        while let Some(&first) = rest.first() {
            if self.line_start && first == b'.' {
                out.push(b'.');
            }
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |p| p + 1);
            out.extend_from_slice(&rest[..end]);
            self.line_start = rest[end - 1] == b'\n';
            rest = &rest[end..];
        }
        match chunk {
            [.., a, b] => self.last = [*a, *b],
            [b] => self.last = [self.last[1], *b],
            [] => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if &self.last != b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn wire(o: &Outgoing) -> Vec<u8> {
        let mut out = Vec::new();
        o.write_stuffed(&mut out).await.unwrap();
        out
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        /// Head + body, from memory or from a file span, in any split: the same bytes
        /// as stuffing the whole message at once with the codec's `dot_stuff`.
        #[test]
        fn streamed_stuffing_equals_stuffing_the_whole(
            lines in proptest::collection::vec("[.a-c]{0,4}", 0..40),
            cut in 0usize..200,
            pad in 0usize..10,
        ) {
            let msg: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();
            let cut = cut.min(msg.len());
            let mut want = Vec::new();
            crate::smtp::codec::dot_stuff(&msg, &mut want);
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("m");
            let mut file = vec![b'x'; pad];
            file.extend_from_slice(&msg[cut..]);
            std::fs::write(&path, &file).unwrap();
            let span = FileSpan { path, offset: pad as u64, len: (msg.len() - cut) as u64, eight_bit: false };
            for body in [Body::Memory(Arc::new(msg[cut..].to_vec())), Body::File(Arc::new(span.clone()))] {
                let o = Outgoing { head: msg[..cut].to_vec(), body };
                prop_assert_eq!(o.len(), msg.len());
                prop_assert_eq!(&rt().block_on(wire(&o)), &want);
            }
        }
    }

    #[test]
    fn a_short_file_is_an_error_not_a_truncated_message() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m");
        std::fs::write(&path, b"abc\r\n").unwrap();
        let o = Outgoing {
            head: Vec::new(),
            body: Body::File(Arc::new(FileSpan {
                path,
                offset: 0,
                len: 50,
                eight_bit: false,
            })),
        };
        let mut out = Vec::new();
        assert!(rt().block_on(o.write_stuffed(&mut out)).is_err());
    }
}
