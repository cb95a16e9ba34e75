//! tenso (転送, "forwarding"): a forwarding mail relay for alias domains.
//!
//! Mail for `alice@alias.example` arrives over SMTP; tenso looks the alias up in its
//! forwarding table and sends the message on to the destinations the user chose,
//! with the envelope sender rewritten to the alias itself (the talk's proposal 2: SPF
//! passes at the destination, no SRS, no change to SMTP). Bounces come back to tenso
//! and each user picks what happens to them: keep them in a local pool (2a) or forward
//! them with `MAIL FROM:<>` (2b).
//!
//! # The flow a message takes
//! ```text
//! client ─► inbound ─► forward (table) ─► spool::commit ─► 250 ─► queue ─► delivery ─► next hop
//!                                              ▲                              │
//!                                    bounce (DSNs, pool, 2a/2b) ◄─────────────┘
//! control ◄─ cli   (admin commands go through the running daemon: sled locks its db)
//! ```
//! Layers, lowest first: `smtp`, `config`, `time`, `disk` (base) → `spool`, `table` (state) →
//! `forward` (logic) → `inbound`, `queue`, `control` (services) → `daemon`, `cli`.
//!
//! # Glossary (RFC 5321 words)
//! - **envelope**: the SMTP-level sender and recipients, apart from the message.
//! - **reverse-path**: the MAIL FROM address; `<>` (null) for bounces.
//! - **forward-path**: a RCPT TO address.
//! - **alias**: an address in a local domain that tenso forwards (`alice@alias.example`,
//!   or `@alias.example` for a catch-all).
//! - **destination**: where an alias forwards to (`alice@gmail.example`).
//! - **attempt**: one delivery try of one queued message to one next hop.
//! - **bounce policy**: per alias, `pool` (2a) or `forward` (2b).

pub mod bounce;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod delivery;
pub mod disk;
pub mod dns;
pub mod forward;
pub mod inbound;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod rate;
pub mod signing;
pub mod smtp;
pub mod spool;
pub mod table;
pub mod time;
