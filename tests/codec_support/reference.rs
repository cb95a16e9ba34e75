//! The obvious readings of RFC 5321 framing that tenso's codec is held to: a few lines
//! each, written for clarity and never for speed. Shared by the codec properties
//! (`tests/codec_properties.rs`), their bench mode (`benches/properties.rs`) and the
//! fuzz targets (`fuzz/`). Depends on nothing but `std`.
#![allow(dead_code)]

pub const CRLF: &[u8] = b"\r\n";
/// Longest command line with its CRLF, and longest text line without it (RFC 5321 §4.5.3.1).
pub const MAX_COMMAND_LINE: usize = 512;
pub const MAX_TEXT_LINE: usize = 998;

/// Where DATA ends: the first `n` such that `stream[..n]` is `. CR LF` or ends with
/// `CR LF . CR LF`. Nothing else ends DATA.
pub fn data_end(stream: &[u8]) -> Option<usize> {
    if stream.starts_with(b".\r\n") {
        return Some(3);
    }
    stream
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|p| p + 5)
}

/// Splits at every CRLF. The last piece is what follows the last CRLF (maybe empty).
pub fn split_crlf(b: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\r' && b[i + 1] == b'\n' {
            pieces.push(&b[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    pieces.push(&b[start..]);
    pieces
}

/// What the data of a DATA transfer (the stream before its terminator) holds.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The message: every line unstuffed (one leading dot removed), ended by CRLF.
    pub message: Vec<u8>,
    /// The data holds a CR not followed by LF (a bare CR).
    pub bare_cr: bool,
    /// The data holds an LF not preceded by CR (a bare LF).
    pub bare_lf: bool,
    /// Some line, unstuffed, is longer than [`MAX_TEXT_LINE`].
    pub line_too_long: bool,
}

/// Decodes `data`: the octets before the terminator found by [`data_end`] (so empty, or
/// ending in CRLF).
pub fn decode(data: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let lines = split_crlf(data);
    // `data` ends in CRLF, so the last piece is empty and is not a line.
    for line in &lines[..lines.len() - 1] {
        let text = line.strip_prefix(b".").unwrap_or(line);
        d.line_too_long |= text.len() > MAX_TEXT_LINE;
        d.bare_cr |= text.contains(&b'\r');
        d.bare_lf |= text.contains(&b'\n');
        d.message.extend_from_slice(text);
        d.message.extend_from_slice(CRLF);
    }
    d
}

/// The verdict on one command line (the octets before its CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Line(Vec<u8>),
    TooLong,
    BareNewline,
}

/// The verdict on one command line, `line` being the octets before its CRLF. A line is
/// too long when it and its CRLF exceed [`MAX_COMMAND_LINE`].
pub fn command(line: &[u8]) -> Command {
    if line.len() + 2 > MAX_COMMAND_LINE {
        Command::TooLong
    } else if line.contains(&b'\r') || line.contains(&b'\n') {
        Command::BareNewline
    } else {
        Command::Line(line.to_vec())
    }
}

/// Frames a command stream: one verdict per CRLF-terminated line, plus the incomplete
/// rest.
pub fn frame_commands(stream: &[u8]) -> (Vec<Command>, &[u8]) {
    let pieces = split_crlf(stream);
    let (rest, lines) = pieces
        .split_last()
        .expect("split_crlf yields one piece at least");
    (lines.iter().map(|l| command(l)).collect(), rest)
}

/// What a session does with its input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Command(Command),
    /// DATA ended: the decoded message, and whether it is refused (bare CR/LF, a line
    /// too long; sizes are not limited here).
    Data {
        message: Vec<u8>,
        refused: bool,
    },
}

/// A session's input: commands, and after each command for which `starts_data` says
/// yes (a DATA answered 354), mail data up to its end. Stops at the first incomplete
/// command line or unfinished data.
pub fn session(stream: &[u8], mut starts_data: impl FnMut(&Command) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    let mut rest = stream;
    while let Some(eol) = rest.windows(2).position(|w| w == CRLF) {
        let line = &rest[..eol];
        rest = &rest[eol + 2..];
        let verdict = command(line);
        let data = starts_data(&verdict);
        events.push(Event::Command(verdict));
        if !data {
            continue;
        }
        let Some(end) = data_end(rest) else {
            break;
        };
        let d = decode(&rest[..end - 3]);
        events.push(Event::Data {
            message: d.message,
            refused: d.bare_cr || d.bare_lf || d.line_too_long,
        });
        rest = &rest[end..];
    }
    events
}
