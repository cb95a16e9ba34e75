//! Where the decoded DATA bytes go: into memory up to [`SPILL_AT`], then into a spool
//! draft in chunks of [`CHUNK`], so a session holds at most about `SPILL_AT + CHUNK`
//! bytes of message however large the message is.
//!
//! Only the destination changes here, never the decoding: the decoder appends to
//! `Session::data` until the spill and to `Session::tail` after it. What stays in
//! memory is the header section (everything the end-of-DATA header work reads); the
//! body goes to disk. A header section longer than `SPILL_AT` is cut at a line end:
//! the end of DATA then reads the message back whole (within `[smtp]
//! whole_message_memory`), so every field is examined. DKIM, ARC and DMARC read the
//! draft in pieces for their body hashes; steps that need the whole message (the spam
//! gate, signing, bounces coming home, DMARC pre-flight pooling, submission) read the
//! draft back at the end of DATA; with those off, nothing large is ever in memory. A
//! draft that cannot be written makes the end of DATA a 4xx, never a 250.

use super::session::Session;
use crate::smtp::Reply;
use crate::spool::Draft;

/// Bytes of a message kept in memory before it continues on disk.
pub(super) const SPILL_AT: usize = 128 * 1024;
/// Bytes gathered before each write to the draft.
pub(super) const CHUNK: usize = 64 * 1024;

/// Where a message being received is.
#[derive(Default)]
pub(super) enum Spill {
    /// All in `Session::data`.
    #[default]
    Memory,
    /// Head in `Session::data`, the rest in the draft (plus `Session::tail`).
    Disk(Draft),
    /// The draft could not be written: the rest is decoded and thrown away.
    Failed { no_space: bool },
}

impl Session {
    /// After a feed of the DATA decoder: moves bytes to disk when memory holds enough.
    pub(super) async fn spill(&mut self) {
        match &mut self.spill {
            Spill::Memory if self.data.len() >= SPILL_AT => {
                let rest = self.data.split_off(split_point(&self.data));
                self.spill = match self.ctx.spool.draft().await {
                    Ok(d) => Spill::Disk(d),
                    Err(e) => self.spill_failed(e),
                };
                self.tail = rest;
                self.write_tail().await;
            }
            Spill::Disk(_) if self.tail.len() >= CHUNK => self.write_tail().await,
            Spill::Failed { .. } => self.tail.clear(),
            _ => {}
        }
    }

    async fn write_tail(&mut self) {
        let Spill::Disk(draft) = &mut self.spill else {
            self.tail.clear();
            return;
        };
        match draft.append(std::mem::take(&mut self.tail)).await {
            Ok(buf) => self.tail = buf,
            Err(e) => self.spill = self.spill_failed(e),
        }
    }

    fn spill_failed(&self, e: crate::spool::SpoolError) -> Spill {
        tracing::error!(client = %self.peer.ip(), error = %e, "cannot write the message being received to the spool");
        Spill::Failed {
            no_space: e.is_no_space(),
        }
    }

    /// At the end of DATA: the draft holding the rest of the message, if it spilled;
    /// Err(reply) when the rest could not be stored.
    pub(super) async fn finish_spill(&mut self) -> Result<Option<Draft>, Reply> {
        if !self.tail.is_empty() {
            self.write_tail().await;
        }
        self.tail = Vec::new();
        match std::mem::take(&mut self.spill) {
            Spill::Memory => Ok(None),
            Spill::Disk(d) => Ok(Some(d)),
            Spill::Failed { no_space } => Err(self.ctx.storage_failure(no_space)),
        }
    }
}

/// Copies of a message the end of DATA may hold at once while it builds the copy to
/// commit (the message, its stripped and traced copies, a signed one): what a read
/// back counts against `[smtp] whole_message_memory`.
const WHOLE_COPIES: u64 = 3;
/// The longest a session waits for room in `whole_message_memory`: then 451, and the
/// client retries later.
const WHOLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `[smtp] whole_message_memory` in KiB, the semaphore's unit (u32 permits).
pub(super) fn whole_budget_kib(cfg: &crate::config::Config) -> usize {
    (cfg.smtp.whole_message_memory / 1024).clamp(1, u32::MAX as u64 / 2) as usize
}

/// Room taken in `whole_message_memory`; given back when dropped.
pub(super) type WholeRoom = Option<tokio::sync::OwnedSemaphorePermit>;

impl Session {
    /// The whole message in `body`: the draft of a spilled one is appended to it,
    /// once there is room for it in `[smtp] whole_message_memory` (kept until the
    /// returned room is dropped, after the message's copies are gone).
    pub(super) async fn read_back(
        &self,
        body: &mut Vec<u8>,
        spilled: Result<Option<Draft>, Reply>,
    ) -> Result<WholeRoom, Reply> {
        let Some(draft) = spilled? else {
            return Ok(None);
        };
        let budget = self.ctx.whole_memory.clone();
        let want = (body.len() as u64 + draft.len()) * WHOLE_COPIES / 1024 + 1;
        // One message larger than the whole budget takes all of it: it waits to be alone.
        let want = want.min(whole_budget_kib(&self.ctx.cfg) as u64) as u32;
        let room = match tokio::time::timeout(WHOLE_WAIT, budget.acquire_many_owned(want)).await {
            Ok(Ok(p)) => p,
            _ => {
                tracing::warn!(client = %self.peer.ip(), size = body.len() as u64 + draft.len(), "no room to check the message whole within {}s: 451", WHOLE_WAIT.as_secs());
                return Err(Reply::new(
                    451,
                    "4.3.0",
                    "too many large messages being checked, try again later",
                ));
            }
        };
        match draft.read_all().await {
            Ok(rest) => {
                body.extend_from_slice(&rest);
                Ok(Some(room))
            }
            Err(e) => {
                tracing::error!(client = %self.peer.ip(), error = %e, "cannot read back the message being received");
                Err(self.ctx.storage_failure(e.is_no_space()))
            }
        }
    }
}

/// Whether `head` holds the whole header section (its empty line; a message without
/// header fields starts with it).
pub(super) fn header_complete(head: &[u8]) -> bool {
    head.starts_with(b"\r\n") || head.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Where the in-memory head ends: after the header section's blank line when it is
/// in `data`, else after the last complete line.
fn split_point(data: &[u8]) -> usize {
    if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        return p + 4;
    }
    data.windows(2)
        .rposition(|w| w == b"\r\n")
        .map_or(data.len(), |p| p + 2)
}

#[cfg(test)]
mod tests {
    use super::split_point;

    #[test]
    fn the_header_is_complete_when_its_empty_line_is_there() {
        assert!(super::header_complete(b"A: b\r\n\r\nbody"));
        assert!(super::header_complete(b"\r\nbody without fields"));
        assert!(!super::header_complete(b"A: b\r\nC: d\r\n"));
        assert!(!super::header_complete(b"A: b\r\n\r"));
    }

    #[test]
    fn the_head_ends_after_the_header_section_or_a_line() {
        assert_eq!(split_point(b"A: b\r\n\r\nbody\r\nmore"), 8);
        assert_eq!(split_point(b"A: b\r\nC: d\r\nE: f"), 12);
        assert_eq!(split_point(b"no line end"), 11);
        assert_eq!(split_point(b"\r\n\r\nbody"), 4);
    }
}
