//! Framing of the byte stream a client sends: command lines, and the DATA body.
//!
//! Both are strict about line endings because lenient parsing is what SMTP smuggling
//! exploits: only CRLF ends a command line (a bare LF ends it too, but is answered
//! with an error so the peer notices), and only `CRLF . CRLF` ends DATA. A bare CR or
//! LF inside DATA does not end anything; the message is refused after its real end.
//! Memory is bounded: over-long lines and over-size bodies are discarded while the
//! stream is read on to the next safe boundary.

/// Longest command line, including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest text line without its CRLF (RFC 5321 §4.5.3.1.6: 1000 with CRLF).
pub const MAX_TEXT_LINE: usize = 998;

/// One framed command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line ending in CRLF; the slice excludes the CRLF.
    Line(Vec<u8>),
    /// The line exceeded [`MAX_COMMAND_LINE`]; it was discarded up to its LF.
    TooLong,
    /// The line ended in a bare LF or held a bare CR.
    BareNewline,
}

/// Splits commands off an input buffer. Holds the "discarding an over-long line"
/// state between reads.
#[derive(Debug, Default)]
pub struct LineFramer {
    discarding: bool,
}

impl LineFramer {
    /// Takes the next complete frame from the front of `buf`, or None when more
    /// input is needed.
    pub fn next_frame(&mut self, buf: &mut Vec<u8>) -> Option<Frame> {
        match memchr_lf(buf) {
            None => {
                if buf.len() >= MAX_COMMAND_LINE {
                    // Keep memory bounded: drop what we have, remember to drop the rest.
                    self.discarding = true;
                    buf.clear();
                }
                None
            }
            Some(lf) => {
                let line: Vec<u8> = buf.drain(..=lf).collect();
                if std::mem::take(&mut self.discarding) || line.len() > MAX_COMMAND_LINE {
                    return Some(Frame::TooLong);
                }
                let body = &line[..line.len() - 1];
                match body.strip_suffix(b"\r") {
                    Some(text) if !text.contains(&b'\r') => Some(Frame::Line(text.to_vec())),
                    _ => Some(Frame::BareNewline),
                }
            }
        }
    }
}

fn memchr_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// What went wrong in a DATA body; the first problem found is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    BareLf,
    BareCr,
    LineTooLong,
    TooBig,
}

/// Decodes a DATA body: removes dot-stuffing, finds `CRLF.CRLF`, checks every line.
#[derive(Debug)]
pub struct DataDecoder {
    max_size: usize,
    /// Next byte starts a line (no byte of the current line seen yet).
    line_start: bool,
    /// The current line began with a dot (removed by unstuffing).
    dot_line: bool,
    /// A CR was seen and the next byte decides whether it was part of CRLF.
    cr_pending: bool,
    line_len: usize,
    pub error: Option<DataError>,
    /// Bytes of message seen, including what was discarded after `TooBig`.
    pub size: usize,
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            max_size,
            line_start: true,
            dot_line: false,
            cr_pending: false,
            line_len: 0,
            error: None,
            size: 0,
        }
    }

    fn fail(&mut self, e: DataError) {
        self.error.get_or_insert(e);
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len();
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    /// Consumes bytes from `input`, appending the decoded message to `out`. Returns
    /// `Some(n)` when the terminating `CRLF.CRLF` was found after `n` bytes of input
    /// (the rest belongs to the next command), or None when all input was used.
    /// After an error, `out` stops growing but the terminator is still searched for.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            if self.cr_pending {
                self.cr_pending = false;
                if b == b'\n' {
                    if self.dot_line && self.line_len == 1 {
                        return Some(i);
                    }
                    self.emit(out, b"\r\n");
                    self.line_start = true;
                    self.dot_line = false;
                    self.line_len = 0;
                    continue;
                }
                self.fail(DataError::BareCr);
            }
            match b {
                b'\r' => self.cr_pending = true,
                b'\n' => {
                    // Not a line end: `\n.\n` and `\r\n.\n` must never terminate DATA.
                    self.fail(DataError::BareLf);
                    self.line_start = false;
                }
                _ => {
                    // Take the whole run of ordinary bytes at once: this loop is the
                    // hot path for every byte tenso accepts.
                    let start = i - 1;
                    let end = input[start..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .map_or(input.len(), |p| start + p);
                    let run = &input[start..end];
                    let mut skip = 0;
                    if self.line_start && b == b'.' {
                        self.dot_line = true;
                        skip = 1;
                    }
                    self.line_start = false;
                    self.line_len += run.len();
                    if self.line_len > MAX_TEXT_LINE + usize::from(self.dot_line) {
                        self.fail(DataError::LineTooLong);
                    }
                    self.emit(out, &run[skip..]);
                    i = end;
                }
            }
        }
        None
    }
}

/// Dot-stuffs a message for sending (RFC 5321 §4.5.2) and appends `CRLF.CRLF`.
/// The message must end in CRLF (it always does after [`DataDecoder`]).
pub fn dot_stuff(msg: &[u8], out: &mut Vec<u8>) {
    out.reserve(msg.len() + 64);
    let mut line_start = true;
    for &b in msg {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !msg.is_empty() && !msg.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]], max: usize) -> (Vec<u8>, Option<DataError>, Option<Vec<u8>>) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        for (k, c) in chunks.iter().enumerate() {
            if let Some(n) = d.feed(c, &mut out) {
                let mut rest = c[n..].to_vec();
                for later in &chunks[k + 1..] {
                    rest.extend_from_slice(later);
                }
                return (out, d.error, Some(rest));
            }
        }
        (out, d.error, None)
    }

    #[test]
    fn data_cases() {
        type Case = (
            &'static [u8],
            &'static [u8],
            Option<DataError>,
            Option<&'static [u8]>,
        );
        let cases: &[Case] = &[
            (
                b"a\r\nb\r\n.\r\nQUIT\r\n",
                b"a\r\nb\r\n",
                None,
                Some(b"QUIT\r\n"),
            ),
            (b".\r\n", b"", None, Some(b"")),
            (b"..x\r\n.\r\n", b".x\r\n", None, Some(b"")),
            (b"...\r\n.\r\n", b"..\r\n", None, Some(b"")),
            (b".x\r\n.\r\n", b"x\r\n", None, Some(b"")),
            // smuggling forms: none of these end DATA
            (
                b"a\n.\nMAIL FROM:<x@y>\r\n",
                b"a",
                Some(DataError::BareLf),
                None,
            ),
            (b"a\r\n.\nb\r\n", b"a\r\n", Some(DataError::BareLf), None),
            (b"a\n.\r\nb\r\n", b"a", Some(DataError::BareLf), None),
            (b"a\r.\rb\r\n", b"a", Some(DataError::BareCr), None),
            (b"a\rb\r\n.\r\n", b"a", Some(DataError::BareCr), Some(b"")),
            (
                b"a\nb\r\n.\r\nNEXT",
                b"a",
                Some(DataError::BareLf),
                Some(b"NEXT"),
            ),
        ];
        for (input, want_out, want_err, want_rest) in cases {
            let (out, err, rest) = decode_all(&[input], 1 << 20);
            assert_eq!(
                out,
                *want_out,
                "output for {:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(
                err,
                *want_err,
                "error for {:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(
                rest.as_deref(),
                *want_rest,
                "rest for {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn terminator_split_across_reads() {
        let (out, err, rest) = decode_all(&[b"hi\r", b"\n.", b"\r", b"\nX"], 100);
        assert_eq!(out, b"hi\r\n");
        assert_eq!(err, None);
        assert_eq!(rest.unwrap(), b"X");
    }

    #[test]
    fn line_length_limit() {
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode_all(&[&ok], 1 << 20).1, None);
        let mut stuffed = vec![b'.'; 999]; // a 998-octet line of dots, stuffed
        stuffed.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode_all(&[&stuffed], 1 << 20).1, None);
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            decode_all(&[&long], 1 << 20).1,
            Some(DataError::LineTooLong)
        );
    }

    #[test]
    fn size_limit_keeps_memory_bounded() {
        let mut big = Vec::new();
        for _ in 0..100 {
            big.extend_from_slice(b"0123456789\r\n");
        }
        big.extend_from_slice(b".\r\n");
        let (out, err, rest) = decode_all(&[&big], 100);
        assert_eq!(err, Some(DataError::TooBig));
        assert!(out.len() <= 100);
        assert!(rest.is_some());
    }

    #[test]
    fn framer() {
        let mut f = LineFramer::default();
        let mut buf = b"EHLO x\r\nNOOP\nRS".to_vec();
        assert_eq!(
            f.next_frame(&mut buf),
            Some(Frame::Line(b"EHLO x".to_vec()))
        );
        assert_eq!(f.next_frame(&mut buf), Some(Frame::BareNewline));
        assert_eq!(f.next_frame(&mut buf), None);
        buf.extend_from_slice(b"ET\r\nA\rB\r\n");
        assert_eq!(f.next_frame(&mut buf), Some(Frame::Line(b"RSET".to_vec())));
        assert_eq!(f.next_frame(&mut buf), Some(Frame::BareNewline));
        let mut long = vec![b'A'; 600];
        assert_eq!(f.next_frame(&mut long), None);
        long.extend_from_slice(b"AAAA\r\nNOOP\r\n");
        assert_eq!(f.next_frame(&mut long), Some(Frame::TooLong));
        assert_eq!(f.next_frame(&mut long), Some(Frame::Line(b"NOOP".to_vec())));
    }

    #[test]
    fn stuffing_round_trip() {
        let msg = b"a\r\n.b\r\n..\r\n.\r\nend\r\n";
        let mut wire = Vec::new();
        dot_stuff(msg, &mut wire);
        let (out, err, rest) = decode_all(&[&wire], 1 << 20);
        assert_eq!(err, None);
        assert_eq!(out, msg);
        assert_eq!(rest.unwrap(), b"");
    }
}
