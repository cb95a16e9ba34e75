//! Shared parts of the fuzz targets: the codec's reference and invariants (the very
//! files the property tests use) and the decoding of a fuzz input's control prefix.

#[path = "../../tests/codec_support/checks.rs"]
pub mod checks;
#[path = "../../tests/codec_support/reference.rs"]
pub mod reference;

/// A fuzz input taken apart: read boundaries, one control byte, and the stream.
pub struct Split<'a> {
    /// Positions where the stream is split into reads (see `checks::split_reads`).
    pub cuts: Vec<usize>,
    /// A byte for the target's own choices (size limit, DATA decisions).
    pub control: u8,
    pub stream: &'a [u8],
}

/// The first byte says how the stream is read: `0xff` one octet per read, otherwise its
/// low 3 bits count the cuts, each from the next two bytes (little endian). The byte
/// after that is the control byte; the rest is the stream.
pub fn split(data: &[u8]) -> Option<Split<'_>> {
    let (&how, rest) = data.split_first()?;
    let n = if how == 0xff { 0 } else { usize::from(how & 7) };
    let (pos, rest) = rest.split_at_checked(2 * n)?;
    let (&control, stream) = rest.split_first()?;
    let cuts = if how == 0xff {
        (1..stream.len()).collect()
    } else {
        pos.chunks(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    };
    Some(Split {
        cuts,
        control,
        stream,
    })
}
