//! A node's in-memory view of the table, so RCPT is answered without a round trip:
//! the set of local domains (with their catch-all flag) and, for a shared
//! (PostgreSQL) table, the entries recently looked up — present or absent.
//!
//! Bounded: the domain set is as large as the table's domains (small); entries sit in
//! an LRU cache of `[table] view_entries` keys, so a million aliases cost only what is
//! hot. Kept right by invalidation, never by time: every change made on any node
//! reaches this view through the change feed (PostgreSQL LISTEN/NOTIFY, see `pg`),
//! which drops the key (and, when domains may have changed, the domain set); a
//! periodic check of the table's change counter catches anything the feed missed.
//!
//! The freshness rule: the view answers while its change feed is connected, and for
//! `[table] view_grace` after the feed was lost; past that every lookup goes to the
//! database (and fails as temporary if it cannot be reached). When the feed comes
//! back, everything is dropped: changes may have been missed meanwhile.
//!
//! A fill races with invalidation: a reader that looked a key up before a change and
//! stores its answer after it would bring back the old value. Every invalidation
//! bumps a generation under the same lock a fill takes, and a fill only lands if the
//! generation it started from is still current.

use super::AliasEntry;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct View {
    state: Mutex<State>,
    entries: Option<moka::sync::Cache<Vec<u8>, Option<AliasEntry>>>,
    grace: Duration,
}

struct State {
    generation: u64,
    domains: Option<Arc<HashMap<String, bool>>>,
    /// None while the change feed is connected (or for a one-node store); the time
    /// it was lost otherwise.
    feed_lost: Option<Instant>,
}

impl View {
    /// A view for the one-node store: domains only, always fresh (every change goes
    /// through this process).
    pub fn local() -> View {
        View {
            state: Mutex::new(State {
                generation: 0,
                domains: None,
                feed_lost: None,
            }),
            entries: None,
            grace: Duration::ZERO,
        }
    }

    /// A view of a shared table: `max_entries` cached lookups; not fresh until its
    /// change feed first connects.
    pub fn shared(max_entries: u64, grace: Duration) -> View {
        View {
            state: Mutex::new(State {
                generation: 0,
                domains: None,
                // "Lost" long ago: nothing is answered from memory before the feed runs.
                feed_lost: Some(Instant::now() - grace - Duration::from_secs(1)),
            }),
            entries: Some(moka::sync::Cache::new(max_entries.max(1))),
            grace,
        }
    }

    fn fresh(s: &State, grace: Duration) -> bool {
        s.feed_lost.is_none_or(|t| t.elapsed() < grace)
    }

    /// The generation a fill starts from.
    pub fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    pub fn domains(&self) -> Option<Arc<HashMap<String, bool>>> {
        let s = self.state.lock();
        if Self::fresh(&s, self.grace) {
            s.domains.clone()
        } else {
            None
        }
    }

    pub fn put_domains(&self, generation: u64, m: Arc<HashMap<String, bool>>) {
        let mut s = self.state.lock();
        if s.generation == generation && Self::fresh(&s, self.grace) {
            s.domains = Some(m);
        }
    }

    /// The cached answer for a key: Some(None) is a remembered absence.
    pub fn entry(&self, key: &[u8]) -> Option<Option<AliasEntry>> {
        let cache = self.entries.as_ref()?;
        if !Self::fresh(&self.state.lock(), self.grace) {
            return None;
        }
        cache.get(key)
    }

    pub fn put_entry(&self, generation: u64, key: &[u8], value: Option<AliasEntry>) {
        let Some(cache) = &self.entries else { return };
        let s = self.state.lock();
        if s.generation == generation && Self::fresh(&s, self.grace) {
            cache.insert(key.to_vec(), value);
        }
    }

    /// One alias changed; `membership` when domains or catch-alls may have too.
    pub fn invalidate(&self, key: &[u8], membership: bool) {
        let mut s = self.state.lock();
        s.generation += 1;
        if let Some(c) = &self.entries {
            c.invalidate(key);
        }
        if membership {
            s.domains = None;
        }
    }

    pub fn invalidate_all(&self) {
        let mut s = self.state.lock();
        s.generation += 1;
        s.domains = None;
        if let Some(c) = &self.entries {
            c.invalidate_all();
        }
    }

    /// The change feed is connected (again): start from nothing, then answer.
    pub fn feed_up(&self) {
        self.invalidate_all();
        self.state.lock().feed_lost = None;
    }

    /// The change feed is gone: the view answers for `grace` more, then not at all.
    pub fn feed_down(&self) {
        let mut s = self.state.lock();
        if s.feed_lost.is_none() {
            s.feed_lost = Some(Instant::now());
        }
    }

    /// Is the change feed connected? (Health, status.)
    pub fn feed_connected(&self) -> bool {
        self.state.lock().feed_lost.is_none()
    }

    pub fn cached_entries(&self) -> u64 {
        self.entries.as_ref().map_or(0, |c| c.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BouncePolicy;

    fn entry() -> AliasEntry {
        AliasEntry {
            dests: vec!["a@d.test".into()],
            bounce: BouncePolicy::Pool,
            created: 1,
            updated: 1,
            dmarc_preflight: None,
            spam: None,
            state: Default::default(),
        }
    }

    #[test]
    fn a_fill_that_raced_with_a_change_is_dropped() {
        let v = View::shared(10, Duration::from_secs(60));
        v.feed_up();
        let g = v.generation();
        v.invalidate(b"k", false);
        v.put_entry(g, b"k", Some(entry()));
        assert!(v.entry(b"k").is_none());
        let g = v.generation();
        v.put_entry(g, b"k", None);
        assert_eq!(v.entry(b"k"), Some(None));
        v.invalidate(b"k", false);
        assert!(v.entry(b"k").is_none());
    }

    #[test]
    fn nothing_is_answered_without_a_feed_past_the_grace() {
        let v = View::shared(10, Duration::ZERO);
        let g = v.generation();
        v.put_entry(g, b"k", Some(entry()));
        assert!(v.entry(b"k").is_none(), "no feed yet");
        v.feed_up();
        let g = v.generation();
        v.put_entry(g, b"k", Some(entry()));
        v.put_domains(g, Arc::new(HashMap::new()));
        assert!(v.entry(b"k").is_some() && v.domains().is_some());
        v.feed_down();
        assert!(v.entry(b"k").is_none() && v.domains().is_none());
        // Back: everything from before is gone (changes may have been missed).
        v.feed_up();
        assert!(v.entry(b"k").is_none() && v.domains().is_none());
    }
}
