//! Properties of tenso's SMTP input codec (`tenso::smtp::codec`), checked against the
//! obvious reference in [`reference`] on random byte strings fed in random chunkings.
//!
//! The streams are drawn mostly from {CR, LF, '.', NUL, 'a', ' '} with near-terminators,
//! command words and long runs mixed in, so that terminators, near-terminators and
//! line-length limits are dense; the chunkings split them across reads (down to one
//! octet per read). Each property is a function taking a case count, so the CI test
//! (`tests/codec_properties.rs`, a bounded count) and the bench mode
//! (`benches/properties.rs`, ten million cases and more) run the very same checks.
#![allow(dead_code)]

pub mod reference;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tenso::smtp::codec::{DataDecoder, DataError, Frame, Input, LineFramer, Reader};

/// One element of a random stream: mostly single octets of the dense alphabet.
pub fn element() -> impl Strategy<Value = Vec<u8>> {
    const DENSE: &[u8] = b"\r\n.\0a ";
    const NEAR: &[&[u8]] = &[
        b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"..",
        b"\r\r\n", b"\n\r\n",
    ];
    const WORDS: &[&[u8]] = &[
        b"DATA",
        b"MAIL FROM:<a@b.test>",
        b"RCPT TO:<c@d.test>",
        b"QUIT",
        b"NOOP",
        b"RSET",
    ];
    prop_oneof![
        16 => prop::sample::select(DENSE).prop_map(|b| vec![b]),
        2 => any::<u8>().prop_map(|b| vec![b]),
        4 => prop::sample::select(NEAR).prop_map(<[u8]>::to_vec),
        1 => prop::sample::select(WORDS).prop_map(<[u8]>::to_vec),
        // Around the command-line limit (512 with CRLF) and the text-line limit (998).
        1 => prop_oneof![505usize..515, 994usize..1003].prop_map(|n| vec![b'a'; n]),
    ]
}

/// A random stream of up to `max` elements.
pub fn stream(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(element(), 0..max).prop_map(|v| v.concat())
}

/// Where a stream is split into reads.
#[derive(Debug, Clone)]
pub enum Chunking {
    /// At these positions (taken modulo the stream's length).
    Cuts(Vec<Index>),
    /// One octet per read.
    Octets,
}

pub fn chunking() -> impl Strategy<Value = Chunking> {
    prop_oneof![
        7 => prop::collection::vec(any::<Index>(), 0..6).prop_map(Chunking::Cuts),
        1 => Just(Chunking::Octets),
    ]
}

/// The reads `stream` arrives in (never an empty read: a read of 0 octets is EOF).
pub fn reads<'a>(stream: &'a [u8], how: &Chunking) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = match how {
        Chunking::Octets => (1..stream.len()).collect(),
        Chunking::Cuts(_) if stream.is_empty() => Vec::new(),
        Chunking::Cuts(ix) => ix.iter().map(|i| i.index(stream.len())).collect(),
    };
    cuts.push(0);
    cuts.push(stream.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Found inputs become named regression cases in the codec's unit tests.
        failure_persistence: None,
        ..Config::default()
    })
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)*)));
        }
    };
}

/// A DATA transfer: random octets, then a real terminator, then what the client sends
/// next. The reference decides where DATA ends (maybe inside the random part).
#[derive(Debug, Clone)]
pub struct DataCase {
    pub stream: Vec<u8>,
    pub reads: Chunking,
    pub max_size: usize,
}

pub fn data_case() -> impl Strategy<Value = DataCase> {
    (
        stream(48),
        stream(8),
        chunking(),
        prop_oneof![0usize..200, Just(1 << 20)],
    )
        .prop_map(|(data, next, reads, max_size)| {
            let mut stream = data;
            stream.extend_from_slice(b"\r\n.\r\n");
            stream.extend_from_slice(&next);
            DataCase {
                stream,
                reads,
                max_size,
            }
        })
}

/// DATA ends at stream position n iff the reference says so; the rest is untouched; the
/// decoded message equals the reference's, or is refused with one of the problems the
/// reference sees and is a prefix of it; memory stays within `max_size`.
pub fn check_data(case: &DataCase) -> Result<(), TestCaseError> {
    let want_end = reference::data_end(&case.stream).expect("generated with a terminator");
    let mut dec = DataDecoder::new(case.max_size);
    let mut out = Vec::new();
    let mut offset = 0;
    let mut got_end = None;
    for read in reads(&case.stream, &case.reads) {
        let ended = dec.feed(read, &mut out);
        ensure!(
            out.len() <= case.max_size,
            "decoded {} octets beyond max_size {}",
            out.len(),
            case.max_size
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
        got_end == Some(want_end),
        "DATA ended at {got_end:?}, reference at {want_end} in {:?}",
        String::from_utf8_lossy(&case.stream)
    );
    let want = reference::decode(&case.stream[..want_end - 3]);
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
    if want.message.len() > case.max_size {
        problems.push(DataError::TooBig);
    }
    match dec.error {
        None => {
            ensure!(problems.is_empty(), "accepted although {problems:?}");
            ensure!(out == want.message, "decoded message differs");
        }
        Some(e) => {
            ensure!(
                problems.contains(&e),
                "refused for {e:?}, reference: {problems:?}"
            );
            ensure!(
                want.message.starts_with(&out),
                "refused message output is not a prefix of the reference"
            );
        }
    }
    Ok(())
}

pub fn data_decoder(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&data_case(), |c| check_data(&c))
        .map_err(|e| e.to_string())
}

/// A command stream in random reads.
#[derive(Debug, Clone)]
pub struct CommandCase {
    pub stream: Vec<u8>,
    pub reads: Chunking,
}

pub fn command_case() -> impl Strategy<Value = CommandCase> {
    (stream(64), chunking()).prop_map(|(stream, reads)| CommandCase { stream, reads })
}

fn verdict(f: &Frame) -> reference::Command {
    match f {
        Frame::Line(l) => reference::Command::Line(l.clone()),
        Frame::TooLong => reference::Command::TooLong,
        Frame::BareNewline => reference::Command::BareNewline,
    }
}

/// The framer yields one verdict per CRLF-terminated line and nothing else: only a line
/// without CR or LF inside and within the length limit comes out as a command; what it
/// keeps buffered is the incomplete rest, bounded.
pub fn check_framer(case: &CommandCase) -> Result<(), TestCaseError> {
    let (want, rest) = reference::frame_commands(&case.stream);
    let mut framer = LineFramer::default();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for read in reads(&case.stream, &case.reads) {
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
        "frames {got:?}, reference {want:?} for {:?}",
        String::from_utf8_lossy(&case.stream)
    );
    ensure!(
        rest.ends_with(&buf) && (buf == rest || rest.len() >= reference::MAX_COMMAND_LINE),
        "buffered {:?}, rest {:?}",
        String::from_utf8_lossy(&buf),
        String::from_utf8_lossy(rest)
    );
    Ok(())
}

pub fn command_framer(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&command_case(), |c| check_framer(&c))
        .map_err(|e| e.to_string())
}

/// A session's input: commands (DATA among them, often) and mail data, in random reads.
#[derive(Debug, Clone)]
pub struct SessionCase {
    pub stream: Vec<u8>,
    pub reads: Chunking,
    /// Whether the k-th `DATA` is answered 354 (the session may refuse it: no
    /// recipients); later ones are.
    pub accept: Vec<bool>,
}

pub fn session_case() -> impl Strategy<Value = SessionCase> {
    let part = prop_oneof![
        6 => element(),
        1 => Just(b"DATA\r\n".to_vec()),
        1 => Just(b"\r\n.\r\n".to_vec()),
        1 => Just(b"MAIL FROM:<a@b.test>\r\n".to_vec()),
    ];
    (
        prop::collection::vec(part, 0..64).prop_map(|v| v.concat()),
        chunking(),
        prop::collection::vec(any::<bool>(), 0..6),
    )
        .prop_map(|(stream, reads, accept)| SessionCase {
            stream,
            reads,
            accept,
        })
}

/// The decision the session takes on a command: a `DATA` answered 354 starts mail data.
fn starts_data(accept: &[bool], k: &mut usize, c: &reference::Command) -> bool {
    if *c != reference::Command::Line(b"DATA".to_vec()) {
        return false;
    }
    *k += 1;
    accept.get(*k - 1).copied().unwrap_or(true)
}

/// The session's input, as [`Reader`] frames it, equals the reference's: the same
/// commands in the same order and the same messages. So no octet of mail data is ever
/// framed as a command and no command is lost into data.
pub fn check_session(case: &SessionCase) -> Result<(), TestCaseError> {
    const MAX: usize = 1 << 20;
    let mut k = 0;
    let want = reference::session(&case.stream, |c| starts_data(&case.accept, &mut k, c));
    let mut reader = Reader::default();
    let (mut buf, mut message) = (Vec::new(), Vec::new());
    let mut got = Vec::new();
    let mut k = 0;
    for read in reads(&case.stream, &case.reads) {
        buf.extend_from_slice(read);
        while let Some(input) = reader.next_input(&mut buf, &mut message) {
            match input {
                Input::Command(f) => {
                    let v = verdict(&f);
                    if starts_data(&case.accept, &mut k, &v) {
                        reader.start_data(MAX);
                    }
                    got.push(reference::Event::Command(v));
                }
                Input::EndOfData(dec) => got.push(reference::Event::Data {
                    message: std::mem::take(&mut message),
                    refused: dec.error.is_some(),
                }),
            }
        }
    }
    ensure!(
        got.len() == want.len(),
        "{} events, reference {}",
        got.len(),
        want.len()
    );
    for (g, w) in got.iter().zip(&want) {
        let same = match (g, w) {
            (
                reference::Event::Data {
                    message: gm,
                    refused: true,
                },
                reference::Event::Data {
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

pub fn session_input(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&session_case(), |c| check_session(&c))
        .map_err(|e| e.to_string())
}
