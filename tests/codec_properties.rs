//! The SMTP input codec proven by properties (issue 10): DATA ends exactly at
//! `CRLF . CRLF`, the decoded message is the reference's, and the command framer splits
//! exactly at CRLF, on random byte strings in random reads. A bounded case count here;
//! `cargo bench --bench properties` runs the same properties with ten million cases.

mod codec_support;

/// Enough to take seconds in a debug build on a shared 2-core machine.
const CASES: u32 = 20_000;

#[test]
fn data_decoder_ends_only_at_crlf_dot_crlf() {
    codec_support::data_decoder(CASES).unwrap();
}

#[test]
fn command_framer_splits_only_at_crlf() {
    codec_support::command_framer(CASES).unwrap();
}

#[test]
fn session_input_never_frames_mail_data_as_commands() {
    codec_support::session_input(CASES).unwrap();
}
