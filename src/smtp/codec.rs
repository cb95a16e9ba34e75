//! Framing of the byte stream a client sends: command lines, and the mail data that
//! follows a 354. Pure (no I/O) and interprets nothing: verbs and arguments are
//! `smtp-proto`'s and `inbound/`'s business.
//!
//! Lenient framing is what SMTP smuggling exploits (CVE-2023-51764/51765/51766): a
//! sender's server passes some sequence through as content and the receiver takes it as
//! a line end or as the end of data. So each framing accepts one line ending, CRLF,
//! and keeps its invariant in a form that can be read off the code:
//! - **Commands** ([`LineFramer`]): a command line ends at CRLF and nowhere else. A
//!   line holding a bare CR or LF is answered once, at its CRLF ([`Frame::BareNewline`]),
//!   and never split there; a line longer than [`MAX_COMMAND_LINE`] with its CRLF is
//!   answered [`Frame::TooLong`]. Neither is ever executed.
//! - **Mail data** ([`DataDecoder`]): DATA ends exactly where the stream so far is
//!   `. CR LF` or ends in `CR LF . CR LF`. The decoder counts every raw octet of the
//!   current line since the last CRLF, bare CR and bare LF included, so "this line is
//!   exactly `.`" is one comparison, whatever came before and however the reads split.
//! - **Policy after a bare CR or LF in data**: the data is read on to its real end
//!   (`CRLF . CRLF`), then the message is refused with one reply (554 5.6.0); an
//!   over-long line (554 5.6.0) or an oversize message (552 5.3.4) likewise. Nothing
//!   between 354 and the real end is ever read as a command.
//! - **Memory is bounded**: an over-long command line is dropped while it is read on to
//!   its CRLF; a refused message stops growing while its end is searched for.
//!
//! [`Reader`] joins the two the way a session uses them. The invariants are proven by
//! properties against a reference (`tests/codec_properties.rs`, and ten million cases
//! in `cargo bench --bench properties`) and by the fuzz targets in `fuzz/`.

/// Longest command line, including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest text line without its CRLF (RFC 5321 §4.5.3.1.6: 1000 with CRLF).
pub const MAX_TEXT_LINE: usize = 998;

/// The verdict on one command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A line ending in CRLF, without a CR or LF inside; the CRLF is removed.
    Line(Vec<u8>),
    /// The line and its CRLF exceeded [`MAX_COMMAND_LINE`]; it was discarded.
    TooLong,
    /// The line held a bare CR or LF; it was discarded up to its CRLF.
    BareNewline,
}

/// Splits command lines off an input buffer, at CRLF only. Holds the "discarding an
/// over-long line" state between reads.
#[derive(Debug, Default)]
pub struct LineFramer {
    discarding: bool,
}

impl LineFramer {
    /// Takes the next complete line from the front of `buf`, or None when more input is
    /// needed. When it returns None, `buf` holds fewer than [`MAX_COMMAND_LINE`] octets.
    pub fn next_frame(&mut self, buf: &mut Vec<u8>) -> Option<Frame> {
        let Some(end) = memchr::memmem::find(buf, b"\r\n") else {
            if self.discarding || buf.len() >= MAX_COMMAND_LINE {
                // No CRLF in MAX_COMMAND_LINE octets: too long whatever follows. Drop it,
                // but keep a final CR: it may be half of the CRLF that ends the line.
                self.discarding = true;
                let keep = usize::from(buf.last() == Some(&b'\r'));
                buf.drain(..buf.len() - keep);
            }
            return None;
        };
        let text = &buf[..end];
        let frame = if std::mem::take(&mut self.discarding) || end + 2 > MAX_COMMAND_LINE {
            Frame::TooLong
        } else if memchr::memchr2(b'\r', b'\n', text).is_some() {
            Frame::BareNewline
        } else {
            Frame::Line(text.to_vec())
        };
        buf.drain(..end + 2);
        Some(frame)
    }
}

/// What went wrong in a DATA body; the first problem found is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    BareLf,
    BareCr,
    LineTooLong,
    TooBig,
}

/// Decodes a DATA body: finds its end, removes dot-stuffing, checks every line.
///
/// Invariant: `line_len` is the number of raw octets of the current line received so
/// far (since the last CRLF, or since DATA began), every octet counted, bare CR and
/// bare LF included; a CR whose successor has not arrived yet is held in `cr_pending`
/// and not counted. DATA ends at a CRLF that closes a line of exactly one octet, a dot.
#[derive(Debug)]
pub struct DataDecoder {
    max_size: usize,
    line_len: usize,
    /// The current line's first octet is a dot (removed: dot-stuffing).
    dot_first: bool,
    /// The last octet was CR: the next one decides whether it ends the line.
    cr_pending: bool,
    pub error: Option<DataError>,
    /// Octets of decoded message, including what was discarded after an error.
    pub size: usize,
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            max_size,
            line_len: 0,
            dot_first: false,
            cr_pending: false,
            error: None,
            size: 0,
        }
    }

    fn fail(&mut self, e: DataError) {
        self.error.get_or_insert(e);
    }

    /// Appends decoded octets; after any error `out` stops growing (memory stays bounded).
    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len();
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    /// Takes `run`, octets of the current line (not empty, no CRLF in it).
    fn line_octets(&mut self, out: &mut Vec<u8>, run: &[u8]) {
        let mut text = run;
        if self.line_len == 0 && run[0] == b'.' {
            self.dot_first = true;
            text = &run[1..];
        }
        self.line_len += run.len();
        if self.line_len - usize::from(self.dot_first) > MAX_TEXT_LINE {
            self.fail(DataError::LineTooLong);
        }
        self.emit(out, text);
    }

    /// Consumes bytes from `input`, appending the decoded message to `out`. Returns
    /// `Some(n)` when DATA ended after `n` bytes of input (the rest belongs to the next
    /// command), or None when all input was used. After an error, `out` stops growing
    /// but the end of DATA is still searched for.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if std::mem::take(&mut self.cr_pending) {
                if input[i] == b'\n' {
                    i += 1;
                    if self.line_len == 1 && self.dot_first {
                        return Some(i);
                    }
                    self.emit(out, b"\r\n");
                    self.line_len = 0;
                    self.dot_first = false;
                    continue;
                }
                // A bare CR is an octet of the line like any other; input[i] is next.
                self.fail(DataError::BareCr);
                self.line_octets(out, b"\r");
                continue;
            }
            match input[i] {
                b'\r' => {
                    self.cr_pending = true;
                    i += 1;
                }
                b'\n' => {
                    self.fail(DataError::BareLf);
                    self.line_octets(out, b"\n");
                    i += 1;
                }
                _ => {
                    // The whole run of ordinary octets at once: this is the hot path
                    // for every byte tenso accepts.
                    let end =
                        memchr::memchr2(b'\r', b'\n', &input[i..]).map_or(input.len(), |p| i + p);
                    self.line_octets(out, &input[i..end]);
                    i = end;
                }
            }
        }
        None
    }
}

/// What the session does next with its input.
#[derive(Debug)]
pub enum Input {
    /// The verdict on the next command line.
    Command(Frame),
    /// The mail data ended (`CRLF . CRLF`); the decoder holds its verdict and size.
    EndOfData(DataDecoder),
}

/// A session's input: command lines, or mail data from [`Reader::start_data`] (the 354)
/// up to its end. Consumes from the front of the session's buffer exactly the octets
/// each [`Input`] covers, so what follows the end of data is framed as commands and
/// nothing before it is.
#[derive(Debug, Default)]
pub struct Reader {
    framer: LineFramer,
    data: Option<DataDecoder>,
}

impl Reader {
    /// The 354 was sent: what follows is mail data.
    pub fn start_data(&mut self, max_size: usize) {
        debug_assert!(self.data.is_none(), "DATA inside DATA");
        self.data = Some(DataDecoder::new(max_size));
    }

    pub fn in_data(&self) -> bool {
        self.data.is_some()
    }

    /// Takes the next input from the front of `buf`, appending decoded mail data to
    /// `message`; None when more input is needed (in data, `buf` was used up).
    pub fn next_input(&mut self, buf: &mut Vec<u8>, message: &mut Vec<u8>) -> Option<Input> {
        let Some(dec) = &mut self.data else {
            return self.framer.next_frame(buf).map(Input::Command);
        };
        match dec.feed(buf, message) {
            None => {
                buf.clear();
                None
            }
            Some(n) => {
                buf.drain(..n);
                self.data.take().map(Input::EndOfData)
            }
        }
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
            // Found by the properties (issue 10): the old decoder ended DATA at each of
            // these, so the text after them ran as commands. A bare CR or LF is an octet
            // of its line, so none of these lines is exactly ".".
            (b"a\r\n.\n\r\nMAIL", b"a\r\n", Some(DataError::BareLf), None),
            (b"a\r\n.\r\r\nMAIL", b"a\r\n", Some(DataError::BareCr), None),
            (b"a\r\n\r.\r\nMAIL", b"a\r\n", Some(DataError::BareCr), None),
            (b".\n\r\nMAIL", b"", Some(DataError::BareLf), None),
            (b".\r\r\nMAIL", b"", Some(DataError::BareCr), None),
            (b"\r.\r\nMAIL", b"", Some(DataError::BareCr), None),
            (b"\r\r.\r\nMAIL", b"", Some(DataError::BareCr), None),
            (
                b"a\r\n.\n\r\r\nMAIL",
                b"a\r\n",
                Some(DataError::BareLf),
                None,
            ),
            (
                b"a\r\n.\r\r\r\nMAIL",
                b"a\r\n",
                Some(DataError::BareCr),
                None,
            ),
            // ... and each is refused at the real end that follows.
            (
                b"a\r\n.\n\r\nMAIL\r\n.\r\nQUIT",
                b"a\r\n",
                Some(DataError::BareLf),
                Some(b"QUIT"),
            ),
        ];
        for (input, want_out, want_err, want_rest) in cases {
            // In one read, and one octet per read.
            let octets: Vec<&[u8]> = input.chunks(1).collect();
            for reads in [&[*input][..], &octets] {
                let (out, err, rest) = decode_all(reads, 1 << 20);
                let shown = String::from_utf8_lossy(input);
                assert_eq!(out, *want_out, "output for {shown:?}");
                assert_eq!(err, *want_err, "error for {shown:?}");
                assert_eq!(rest.as_deref(), *want_rest, "rest for {shown:?}");
            }
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
        // A bare LF does not end the line: "NOOP<LF>RSET" is one line, refused at its CRLF.
        assert_eq!(f.next_frame(&mut buf), None);
        buf.extend_from_slice(b"ET\r\nA\rB\r\nC\r");
        assert_eq!(f.next_frame(&mut buf), Some(Frame::BareNewline));
        assert_eq!(f.next_frame(&mut buf), Some(Frame::BareNewline));
        assert_eq!(f.next_frame(&mut buf), None);
        buf.extend_from_slice(b"\n");
        assert_eq!(f.next_frame(&mut buf), Some(Frame::Line(b"C".to_vec())));
        let mut long = vec![b'A'; 600];
        assert_eq!(f.next_frame(&mut long), None);
        long.extend_from_slice(b"AAAA\r\nNOOP\r\n");
        assert_eq!(f.next_frame(&mut long), Some(Frame::TooLong));
        assert_eq!(f.next_frame(&mut long), Some(Frame::Line(b"NOOP".to_vec())));
    }

    #[test]
    fn framer_line_limit_and_crlf_across_discard() {
        let mut f = LineFramer::default();
        let mut ok = vec![b'A'; MAX_COMMAND_LINE - 2];
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(f.next_frame(&mut ok), Some(Frame::Line(l)) if l.len() == 510));
        // 511 octets and a CR arrive, then the LF: too long, and the CRLF is still found
        // although the line was dropped in between.
        let mut buf = vec![b'A'; MAX_COMMAND_LINE - 1];
        buf.push(b'\r');
        assert_eq!(f.next_frame(&mut buf), None);
        assert_eq!(buf, b"\r");
        buf.extend_from_slice(b"\nNOOP\r\n");
        assert_eq!(f.next_frame(&mut buf), Some(Frame::TooLong));
        assert_eq!(f.next_frame(&mut buf), Some(Frame::Line(b"NOOP".to_vec())));
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
