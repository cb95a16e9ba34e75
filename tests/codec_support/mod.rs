//! Properties of tenso's SMTP input codec (`tenso::smtp::codec`): the invariants of
//! [`checks`], against the obvious reference in [`reference`], on random byte strings
//! fed in random chunkings. (The fuzz targets in `fuzz/` check the same invariants on
//! the fuzzer's inputs.)
//!
//! The streams are drawn mostly from {CR, LF, '.', NUL, 'a', ' '} with near-terminators,
//! command words and long runs mixed in, so that terminators, near-terminators and
//! line-length limits are dense; the chunkings split them across reads (down to one
//! octet per read). Each property is a function taking a case count, so the CI test
//! (`tests/codec_properties.rs`, a bounded count) and the bench mode
//! (`benches/properties.rs`, ten million cases and more) run the very same checks.
#![allow(dead_code)]

pub mod checks;
pub mod reference;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

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

/// Where [`checks::split_reads`] splits a stream.
pub fn cuts(stream: &[u8], how: &Chunking) -> Vec<usize> {
    match how {
        Chunking::Octets => (1..stream.len()).collect(),
        Chunking::Cuts(_) if stream.is_empty() => Vec::new(),
        Chunking::Cuts(ix) => ix.iter().map(|i| i.index(stream.len())).collect(),
    }
}

/// The reads `stream` arrives in.
pub fn reads<'a>(stream: &'a [u8], how: &Chunking) -> Vec<&'a [u8]> {
    checks::split_reads(stream, &cuts(stream, how))
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Found inputs become named regression cases in the codec's unit tests.
        failure_persistence: None,
        ..Config::default()
    })
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

pub fn data_decoder(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&data_case(), |c| {
            checks::check_data(&c.stream, &cuts(&c.stream, &c.reads), c.max_size)
                .map_err(TestCaseError::fail)
        })
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

pub fn command_framer(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&command_case(), |c| {
            checks::check_framer(&c.stream, &cuts(&c.stream, &c.reads)).map_err(TestCaseError::fail)
        })
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

pub fn session_input(cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&session_case(), |c| {
            checks::check_session(&c.stream, &cuts(&c.stream, &c.reads), &c.accept)
                .map_err(TestCaseError::fail)
        })
        .map_err(|e| e.to_string())
}
