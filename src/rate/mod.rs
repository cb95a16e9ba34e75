//! Rate controls from the talk's slide: connections per client, connect rate per
//! client, and the growing delay after a client caused "user unknown"; plus the
//! outbound pacing buckets (per destination domain, per alias).
//!
//! All state is in memory and bounded: at most `tracked_clients` entries, the least
//! recently seen evicted first, so an attacker cycling source addresses cannot grow
//! it. Eviction never forgets live state: a client with open connections is never
//! evicted (its count is what limits it), so the bound is `tracked_clients` plus the
//! clients connected right now (at most `[smtp] max_connections`). Lookups are O(1)
//! under a short, non-poisoning mutex; nothing here sleeps or does I/O — the session
//! waits out a penalty itself, so one delayed client never delays another.

pub mod submission;

use crate::config::LimitsConfig;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A client for limiting purposes: the IPv4 address, or the IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        // IPv4 keys carry bit 32, which a /64 prefix (low 64 bits zero) never has.
        let v4 = |a: std::net::Ipv4Addr| ClientKey((1u128 << 32) | u32::from(a) as u128);
        match ip {
            IpAddr::V4(a) => v4(a),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(a) => v4(a),
                // One /64 is usually one customer: limit it as one client.
                None => ClientKey(u128::from(v6) & !((1u128 << 64) - 1)),
            },
        }
    }
}

/// Whether an entry holds live state that eviction must keep.
trait Pinned {
    fn pinned(&self) -> bool {
        false
    }
}

impl Pinned for Bucket {}

/// A map that keeps at most `cap` evictable entries, evicting the least recently
/// touched; pinned entries (live state) are never evicted and not counted.
struct Bounded<K, V> {
    map: HashMap<K, (V, Instant)>,
    cap: usize,
}

impl<K: Eq + Hash + Copy, V: Pinned> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            cap: cap.max(16),
        }
    }

    fn entry(&mut self, k: K, now: Instant, init: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            // Evict the oldest tenth of the evictable entries in one pass: amortized
            // O(1) per insert. Pinned entries stay whatever their age.
            let mut ages: Vec<Instant> = self
                .map
                .values()
                .filter(|(v, _)| !v.pinned())
                .map(|(_, t)| *t)
                .collect();
            if !ages.is_empty() {
                let cut = ages.len() / 10;
                ages.select_nth_unstable(cut);
                let limit = ages[cut];
                self.map.retain(|_, (v, t)| v.pinned() || *t > limit);
            }
        }
        let e = self.map.entry(k).or_insert_with(|| (init(), now));
        e.1 = now;
        &mut e.0
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A token bucket refilled continuously. Refused takers are counted as waiting, so
/// each gets its own later slot instead of all coming back at the same instant.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
    /// Takers refused and told to come back; each success pays one off.
    waiting: f64,
}

impl Bucket {
    fn full(cap: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: cap,
            at: now,
            waiting: 0.0,
        }
    }

    /// Takes one token; Err(wait) says when this taker's slot comes.
    fn take(&mut self, cap: f64, per_sec: f64, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(cap);
        self.at = now;
        if self.tokens >= cap {
            // Full again: whoever was told to wait has come and gone.
            self.waiting = 0.0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.waiting = (self.waiting - 1.0).max(0.0);
            Ok(())
        } else {
            self.waiting += 1.0;
            Err(Duration::from_secs_f64(
                (self.waiting - self.tokens) / per_sec,
            ))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Penalty {
    /// Unknown-user events, after decay.
    level: u32,
    last: Instant,
}

struct ClientState {
    connections: usize,
    bucket: Bucket,
    penalty: Option<Penalty>,
    /// Failed submission logins (boxed: few clients have any).
    auth: Option<Box<submission::AuthFailures>>,
}

impl ClientState {
    fn new(cap: f64, now: Instant) -> ClientState {
        ClientState {
            connections: 0,
            bucket: Bucket::full(cap, now),
            penalty: None,
            auth: None,
        }
    }
}

impl Pinned for ClientState {
    /// A client with open connections, or locked out of AUTH: forgetting it would
    /// reset its limit.
    fn pinned(&self) -> bool {
        self.connections > 0 || self.auth.as_ref().is_some_and(|a| a.locked())
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyFromClient,
    ConnectRate,
}

pub struct Limiter {
    cfg: LimitsConfig,
    clients: Mutex<Bounded<ClientKey, ClientState>>,
}

/// Released when the session ends: the client's connection count goes down.
pub struct ConnectionGuard<'a> {
    limiter: &'a Limiter,
    key: ClientKey,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut c = self.limiter.clients.lock();
        if let Some((s, _)) = c.map.get_mut(&self.key) {
            s.connections = s.connections.saturating_sub(1);
        }
    }
}

impl Limiter {
    pub fn new(cfg: &LimitsConfig) -> Limiter {
        Limiter {
            clients: Mutex::new(Bounded::new(cfg.tracked_clients)),
            cfg: cfg.clone(),
        }
    }

    fn per_sec(&self) -> f64 {
        self.cfg.connect_rate_per_minute.max(1) as f64 / 60.0
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionGuard<'_>, Refusal> {
        let key = ClientKey::of(ip);
        let now = Instant::now();
        let cap = self.cfg.connect_rate_per_minute.max(1) as f64;
        let per_sec = self.per_sec();
        let mut c = self.clients.lock();
        let s = c.entry(key, now, || ClientState::new(cap, now));
        if s.connections >= self.cfg.max_connections_per_ip {
            return Err(Refusal::TooManyFromClient);
        }
        if self.cfg.connect_rate_per_minute > 0 && s.bucket.take(cap, per_sec, now).is_err() {
            return Err(Refusal::ConnectRate);
        }
        s.connections += 1;
        drop(c);
        Ok(ConnectionGuard { limiter: self, key })
    }

    fn decayed(&self, p: Penalty, now: Instant) -> u32 {
        let decay = self.cfg.unknown_penalty_decay.as_secs_f64().max(0.001);
        let halvings = (now.saturating_duration_since(p.last).as_secs_f64() / decay) as u32;
        p.level.saturating_sub(halvings)
    }

    fn delay_for(&self, level: u32) -> Duration {
        if level == 0 {
            return Duration::ZERO;
        }
        let base = self.cfg.unknown_penalty_base;
        let d = base.saturating_mul(1u32 << (level - 1).min(20));
        d.min(self.cfg.unknown_penalty_max)
    }

    /// The delay before greeting `ip` (and before each further reply of an
    /// offending session): doubling per "user unknown", capped, decaying.
    pub fn penalty(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let c = self.clients.lock();
        match c.get(&ClientKey::of(ip)).and_then(|s| s.penalty) {
            Some(p) => self.delay_for(self.decayed(p, now)),
            None => Duration::ZERO,
        }
    }

    /// Records one "user unknown" caused by `ip`; returns the new delay.
    pub fn unknown_user(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let cap = self.cfg.connect_rate_per_minute.max(1) as f64;
        let mut c = self.clients.lock();
        let s = c.entry(ClientKey::of(ip), now, || ClientState::new(cap, now));
        let p = self.raised(s.penalty, now);
        s.penalty = Some(p);
        self.delay_for(p.level)
    }

    /// A penalty after one more event: its decayed level plus one, no higher than
    /// where the delay stops growing (the cap).
    fn raised(&self, p: Option<Penalty>, now: Instant) -> Penalty {
        let level = p.map_or(0, |p| self.decayed(p, now));
        let max_level = 1
            + (self.cfg.unknown_penalty_max.as_secs_f64()
                / self.cfg.unknown_penalty_base.as_secs_f64().max(0.001))
            .log2()
            .ceil()
            .max(0.0) as u32;
        Penalty {
            level: (level + 1).min(max_level.max(1)),
            last: now,
        }
    }

    pub fn tracked(&self) -> usize {
        self.clients.lock().len()
    }
}

/// Outbound pacing: one token bucket per key (destination domain, alias).
pub struct Pacer {
    per_sec: f64,
    cap: f64,
    buckets: Mutex<Bounded<u64, Bucket>>,
}

fn hash_key(k: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(k.to_ascii_lowercase().as_bytes());
    h.finish()
}

impl Pacer {
    /// `count` per `period`; None when unlimited (count 0).
    pub fn new(count: u32, period: Duration, tracked: usize) -> Option<Pacer> {
        (count > 0).then(|| Pacer {
            per_sec: count as f64 / period.as_secs_f64(),
            // Burst of a tenth of the period's allowance: spread out, not batched.
            cap: (count as f64 / 10.0).max(1.0),
            buckets: Mutex::new(Bounded::new(tracked)),
        })
    }

    /// Takes one message slot for `key`; Err(wait) when over the limit.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut b = self.buckets.lock();
        let cap = self.cap;
        b.entry(hash_key(key), now, || Bucket::full(cap, now))
            .take(cap, self.per_sec, now)
    }

    /// Gives back the slot `take` just took for `key` (the message did not go after all).
    pub fn refund(&self, key: &str) {
        let mut b = self.buckets.lock();
        if let Some((bucket, _)) = b.map.get_mut(&hash_key(key)) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_connections_per_ip: 2,
            connect_rate_per_minute: 3,
            unknown_penalty_base: Duration::from_millis(100),
            unknown_penalty_max: Duration::from_millis(800),
            unknown_penalty_decay: Duration::from_secs(3600),
            tracked_clients: 16,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn per_client_and_rate() {
        let l = Limiter::new(&cfg());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::TooManyFromClient));
        drop(g1);
        let _g3 = l.admit(a).unwrap();
        drop(_g3);
        // the bucket (3 per minute) is empty now
        assert_eq!(l.admit(a).err(), Some(Refusal::ConnectRate));
        // another client is unaffected
        assert!(l.admit("192.0.2.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn ipv6_slash64_is_one_client() {
        let a = ClientKey::of("2001:db8:1:2::1".parse().unwrap());
        let b = ClientKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            ClientKey::of("0.0.0.1".parse().unwrap()),
            ClientKey::of("::1".parse().unwrap())
        );
    }

    #[test]
    fn penalty_doubles_and_caps() {
        let l = Limiter::new(&cfg());
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(l.penalty(a), Duration::ZERO);
        let got: Vec<u128> = (0..6).map(|_| l.unknown_user(a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 800, 800]);
        assert_eq!(l.penalty(a), Duration::from_millis(800));
        assert_eq!(l.penalty("192.0.2.8".parse().unwrap()), Duration::ZERO);
    }

    #[test]
    fn memory_stays_bounded() {
        let l = Limiter::new(&cfg());
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.unknown_user(ip);
        }
        assert!(l.tracked() <= 16, "{}", l.tracked());
    }

    #[test]
    fn eviction_never_forgets_open_connections() {
        // Many /64s churn through a small table while one client keeps its limit.
        let l = Limiter::new(&LimitsConfig {
            connect_rate_per_minute: 0,
            ..cfg()
        });
        let a: IpAddr = "2001:db8:aaaa:1::1".parse().unwrap();
        let _g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        for i in 0..1000u64 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8_0000_0000u128 + i as u128) << 64,
            ));
            drop(l.admit(ip).unwrap());
        }
        assert_eq!(l.admit(a).err(), Some(Refusal::TooManyFromClient));
        assert!(l.tracked() <= 16 + 1, "{}", l.tracked());
    }

    #[test]
    fn a_panic_holding_the_lock_does_not_cascade() {
        let l = std::sync::Arc::new(Limiter::new(&cfg()));
        let l2 = l.clone();
        let r = std::thread::spawn(move || {
            let _held = l2.clients.lock();
            panic!("a bug while holding the limiter lock");
        })
        .join();
        assert!(r.is_err());
        // parking_lot releases the lock on unwind and does not poison it.
        assert!(l.admit("192.0.2.9".parse().unwrap()).is_ok());
        assert_eq!(l.penalty("192.0.2.9".parse().unwrap()), Duration::ZERO);
    }

    #[test]
    fn pacer_spreads() {
        let p = Pacer::new(60, Duration::from_secs(60), 10).unwrap();
        assert!(p.take("d.test").is_ok()); // burst of 6
        for _ in 0..5 {
            assert!(p.take("d.test").is_ok());
        }
        let wait = p.take("d.test").unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // The next refused taker is sent to a later slot, not the same instant.
        let later = p.take("d.test").unwrap_err();
        assert!(
            later >= wait + Duration::from_millis(900),
            "{wait:?} {later:?}"
        );
        assert!(p.take("other.test").is_ok());
    }
}
