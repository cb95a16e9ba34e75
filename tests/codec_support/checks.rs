//! The invariants of tenso's SMTP input codec, checked against [`super::reference`] for
//! one stream split into reads at given positions. Shared by the properties (which draw
//! the streams), their bench mode, and the fuzz targets in `fuzz/` (which take them from
//! the fuzzer); depends on nothing but `std` and `tenso`.
#![allow(dead_code)]

use super::reference::{self, Command, Event};
use tenso::smtp::codec::{DataDecoder, DataError, Frame, Input, LineFramer, Reader};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

/// The reads `stream` arrives in when split at `cuts` (any positions; taken modulo the
/// stream's length). Never an empty read: a read of 0 octets is EOF.
pub fn split_reads<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    if stream.is_empty() {
        return Vec::new();
    }
    let mut at: Vec<usize> = cuts.iter().map(|c| c % stream.len()).collect();
    at.push(0);
    at.push(stream.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
}

fn shown(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// DATA ends at stream position n iff the reference says so (and never when it finds no
/// end); the decoded message equals the reference's, or is refused for one of the
/// problems the reference sees and is a prefix of it; memory stays within `max_size`.
pub fn check_data(stream: &[u8], cuts: &[usize], max_size: usize) -> Result<(), String> {
    let want_end = reference::data_end(stream);
    let mut dec = DataDecoder::new(max_size);
    let mut out = Vec::new();
    let mut offset = 0;
    let mut got_end = None;
    for read in split_reads(stream, cuts) {
        let ended = dec.feed(read, &mut out);
        ensure!(
            out.len() <= max_size,
            "decoded {} > max_size {max_size}",
            out.len()
        );
        if let Some(n) = ended {
            ensure!(
                (1..=read.len()).contains(&n),
                "end {n} outside a read of {}",
                read.len()
            );
            got_end = Some(offset + n);
            break;
        }
        offset += read.len();
    }
    ensure!(
        got_end == want_end,
        "DATA ended at {got_end:?}, reference at {want_end:?} in {}",
        shown(stream)
    );
    let Some(end) = want_end else {
        return Ok(());
    };
    let want = reference::decode(&stream[..end - 3]);
    ensure!(
        dec.size == want.message.len(),
        "size {} != reference {}",
        dec.size,
        want.message.len()
    );
    let mut problems = Vec::new();
    if want.bare_cr {
        problems.push(DataError::BareCr);
    }
    if want.bare_lf {
        problems.push(DataError::BareLf);
    }
    if want.line_too_long {
        problems.push(DataError::LineTooLong);
    }
    if want.message.len() > max_size {
        problems.push(DataError::TooBig);
    }
    match dec.error {
        None => {
            ensure!(
                problems.is_empty(),
                "accepted although {problems:?}: {}",
                shown(stream)
            );
            ensure!(
                out == want.message,
                "decoded message differs: {}",
                shown(stream)
            );
        }
        Some(e) => {
            ensure!(
                problems.contains(&e),
                "refused for {e:?}, reference: {problems:?}"
            );
            ensure!(
                want.message.starts_with(&out),
                "refused output is not a prefix"
            );
        }
    }
    Ok(())
}

fn verdict(f: &Frame) -> Command {
    match f {
        Frame::Line(l) => Command::Line(l.clone()),
        Frame::TooLong => Command::TooLong,
        Frame::BareNewline => Command::BareNewline,
    }
}

/// The framer yields one verdict per CRLF-terminated line and nothing else: only a line
/// without CR or LF inside and within the length limit comes out as a command; what it
/// keeps buffered is the incomplete rest, bounded.
pub fn check_framer(stream: &[u8], cuts: &[usize]) -> Result<(), String> {
    let (want, rest) = reference::frame_commands(stream);
    let mut framer = LineFramer::default();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for read in split_reads(stream, cuts) {
        buf.extend_from_slice(read);
        while let Some(f) = framer.next_frame(&mut buf) {
            got.push(verdict(&f));
        }
        ensure!(
            buf.len() < reference::MAX_COMMAND_LINE,
            "{} octets buffered",
            buf.len()
        );
    }
    ensure!(
        got == want,
        "frames {got:?}, reference {want:?} for {}",
        shown(stream)
    );
    ensure!(
        rest.ends_with(&buf) && (buf == rest || rest.len() >= reference::MAX_COMMAND_LINE),
        "buffered {}, rest {}",
        shown(&buf),
        shown(rest)
    );
    Ok(())
}

/// The decision the session takes on a command: a `DATA` answered 354 starts mail data.
/// `accept[k]` says whether the k-th DATA is answered 354 (later ones are).
fn starts_data(accept: &[bool], k: &mut usize, c: &Command) -> bool {
    if *c != Command::Line(b"DATA".to_vec()) {
        return false;
    }
    *k += 1;
    accept.get(*k - 1).copied().unwrap_or(true)
}

/// The session's input, as [`Reader`] frames it, equals the reference's: the same
/// commands in the same order and the same messages. So no octet of mail data is ever
/// framed as a command and no command is lost into data.
pub fn check_session(stream: &[u8], cuts: &[usize], accept: &[bool]) -> Result<(), String> {
    const MAX: usize = 1 << 20;
    let mut k = 0;
    let want = reference::session(stream, |c| starts_data(accept, &mut k, c));
    let mut reader = Reader::default();
    let (mut buf, mut message) = (Vec::new(), Vec::new());
    let mut got = Vec::new();
    let mut k = 0;
    for read in split_reads(stream, cuts) {
        buf.extend_from_slice(read);
        while let Some(input) = reader.next_input(&mut buf, &mut message) {
            match input {
                Input::Command(f) => {
                    let v = verdict(&f);
                    if starts_data(accept, &mut k, &v) {
                        reader.start_data(MAX);
                    }
                    got.push(Event::Command(v));
                }
                Input::EndOfData(dec) => got.push(Event::Data {
                    message: std::mem::take(&mut message),
                    refused: dec.error.is_some(),
                }),
            }
        }
    }
    ensure!(
        got.len() == want.len(),
        "{} events, reference {}: {}",
        got.len(),
        want.len(),
        shown(stream)
    );
    for (g, w) in got.iter().zip(&want) {
        let same = match (g, w) {
            (
                Event::Data {
                    message: gm,
                    refused: true,
                },
                Event::Data {
                    message: wm,
                    refused: true,
                },
            ) => wm.starts_with(gm),
            _ => g == w,
        };
        ensure!(same, "event {g:?}, reference {w:?}");
    }
    Ok(())
}
