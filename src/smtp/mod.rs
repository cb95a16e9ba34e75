//! The SMTP protocol without I/O: replies with enhanced status codes, command-line
//! framing, the DATA decoder (dot-unstuffing, strict CRLF), addresses and paths.
//!
//! Nothing here touches a socket, the disk or tokio; everything is a pure function or
//! a small state machine so it can be tested table-driven and fuzzed. Command and
//! ESMTP parameter parsing is delegated to `smtp-proto`; this module adds what that
//! crate leaves to its user (bare CR/LF, line-length limits, `<postmaster>`, quoting).

pub mod address;
pub mod author;
pub mod codec;
pub mod header;
pub mod reply;

pub use address::{Mailbox, Path};
pub use reply::Reply;
