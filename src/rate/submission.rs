//! Rate control in the sending direction (submission, the talk's slide applied to
//! senders): per login, messages per hour and recipients per day; per client (IPv4
//! address, IPv6 /64), failed logins within a window, after which AUTH is refused
//! and each further lockout makes the client's next connection wait longer.
//!
//! Same rules as the rest of `rate`: in memory, bounded, nothing sleeps here.
//! Login buckets live in their own bounded map (a login still refilling is never
//! evicted; at most one per alias with a login). Failed logins live in the client's
//! entry of the [`Limiter`], which keeps clients with open connections and clients
//! locked out right now; the rest go least recently seen first.

use super::{Bounded, Bucket, ClientKey, ClientState, Limiter, Penalty, Pinned, hash_key};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failed logins of one client.
#[derive(Debug, Default)]
pub struct AuthFailures {
    /// Failures inside the window, oldest first; never more than the limit.
    recent: VecDeque<Instant>,
    /// AUTH is refused until then (when the oldest failure leaves the window).
    locked_until: Option<Instant>,
    /// Lockouts so far (decaying): the wait before the next greeting.
    penalty: Option<Penalty>,
}

impl AuthFailures {
    /// Locked out right now: live state, never evicted.
    pub(super) fn locked(&self) -> bool {
        self.locked_at(Instant::now())
    }

    fn locked_at(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| t > now)
    }
}

/// What one failed login did to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Still under the limit: this many more failures are allowed in the window.
    Counted { left: u32 },
    /// The limit is reached: AUTH is refused until the window moves on, and the
    /// client's next connection waits this long.
    LockedOut { wait: Duration },
}

impl Limiter {
    /// Records one failed login from `ip` (at most `max` within `window`).
    pub fn auth_failed(&self, ip: IpAddr, max: u32, window: Duration) -> AuthFailure {
        self.auth_failed_at(ip, max, window, Instant::now())
    }

    fn auth_failed_at(&self, ip: IpAddr, max: u32, window: Duration, now: Instant) -> AuthFailure {
        let cap = self.cfg.connect_rate_per_minute.max(1) as f64;
        let mut c = self.clients.lock();
        let s = c.entry(ClientKey::of(ip), now, || ClientState::new(cap, now));
        let a = s.auth.get_or_insert_with(Box::default);
        while a
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            a.recent.pop_front();
        }
        a.recent.push_back(now);
        let max = max.max(1) as usize;
        while a.recent.len() > max {
            a.recent.pop_front();
        }
        if a.recent.len() < max {
            return AuthFailure::Counted {
                left: (max - a.recent.len()) as u32,
            };
        }
        a.locked_until = a.recent.front().map(|t| *t + window);
        let p = self.raised(a.penalty, now);
        a.penalty = Some(p);
        AuthFailure::LockedOut {
            wait: self.delay_for(p.level),
        }
    }

    /// Whether `ip` is locked out of AUTH now.
    pub fn auth_locked(&self, ip: IpAddr) -> bool {
        self.auth_locked_at(ip, Instant::now())
    }

    fn auth_locked_at(&self, ip: IpAddr, now: Instant) -> bool {
        let c = self.clients.lock();
        c.get(&ClientKey::of(ip))
            .and_then(|s| s.auth.as_ref())
            .is_some_and(|a| a.locked_at(now))
    }

    /// The wait before greeting `ip` on a submission port: doubling per lockout
    /// (from `[limits] unknown_penalty_base` to `_max`, halving every `_decay`).
    pub fn auth_penalty(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let c = self.clients.lock();
        match c
            .get(&ClientKey::of(ip))
            .and_then(|s| s.auth.as_ref())
            .and_then(|a| a.penalty)
        {
            Some(p) => self.delay_for(self.decayed(p, now)),
            None => Duration::ZERO,
        }
    }
}

/// A count per period as a token bucket: burst `cap`, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Rate {
    cap: f64,
    per_sec: f64,
}

impl Rate {
    fn new(count: u32, period: Duration) -> Option<Rate> {
        (count > 0).then(|| Rate {
            cap: count as f64,
            per_sec: count as f64 / period.as_secs_f64(),
        })
    }
}

impl Bucket {
    /// Takes one token if there is one; Err(when the next one comes). Unlike
    /// pacing's `take`, a refusal books no later slot: the client decides.
    fn admit(&mut self, r: Rate, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * r.per_sec).min(r.cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / r.per_sec))
        }
    }

    /// When this bucket is full again.
    fn full_at(&self, r: Rate) -> Instant {
        self.at + Duration::from_secs_f64(((r.cap - self.tokens) / r.per_sec).max(0.0))
    }
}

struct LoginState {
    messages: Bucket,
    recipients: Bucket,
    /// Until both buckets are full again, forgetting them would reset the limit.
    busy_until: Instant,
}

impl Pinned for LoginState {
    fn pinned(&self) -> bool {
        self.busy_until > Instant::now()
    }
}

/// Which sending limit a login is over, and when it may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    MessagesPerHour(Duration),
    RecipientsPerDay(Duration),
}

/// Per-login sending limits (`[submission] max_messages_per_hour`,
/// `max_recipients_per_day`); 0 turns one off.
pub struct SendLimits {
    messages: Option<Rate>,
    recipients: Option<Rate>,
    logins: Mutex<Bounded<u64, LoginState>>,
}

impl SendLimits {
    pub fn new(messages_per_hour: u32, recipients_per_day: u32, tracked: usize) -> SendLimits {
        SendLimits {
            messages: Rate::new(messages_per_hour, Duration::from_secs(3600)),
            recipients: Rate::new(recipients_per_day, Duration::from_secs(86400)),
            logins: Mutex::new(Bounded::new(tracked)),
        }
    }

    /// Counts one message (at MAIL) for `login`.
    pub fn message(&self, login: &str) -> Result<(), OverLimit> {
        self.take(login, true).map_err(OverLimit::MessagesPerHour)
    }

    /// Counts one recipient (at RCPT) for `login`.
    pub fn recipient(&self, login: &str) -> Result<(), OverLimit> {
        self.take(login, false).map_err(OverLimit::RecipientsPerDay)
    }

    fn take(&self, login: &str, message: bool) -> Result<(), Duration> {
        let rate = if message {
            self.messages
        } else {
            self.recipients
        };
        let Some(rate) = rate else { return Ok(()) };
        let now = Instant::now();
        let full = |r: Option<Rate>| r.map_or(0.0, |r| r.cap);
        let (mcap, rcap) = (full(self.messages), full(self.recipients));
        let mut m = self.logins.lock();
        let s = m.entry(hash_key(login), now, || LoginState {
            messages: Bucket::full(mcap, now),
            recipients: Bucket::full(rcap, now),
            busy_until: now,
        });
        let bucket = if message {
            &mut s.messages
        } else {
            &mut s.recipients
        };
        let r = bucket.admit(rate, now);
        let until = bucket.full_at(rate);
        s.busy_until = s.busy_until.max(until);
        r
    }

    pub fn tracked(&self) -> usize {
        self.logins.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;

    fn limiter() -> Limiter {
        Limiter::new(&LimitsConfig {
            unknown_penalty_base: Duration::from_millis(100),
            unknown_penalty_max: Duration::from_millis(400),
            unknown_penalty_decay: Duration::from_secs(3600),
            tracked_clients: 16,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn lockout_after_max_failures_and_growing_wait() {
        let l = limiter();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2::99".parse().unwrap();
        let w = Duration::from_secs(600);
        assert_eq!(l.auth_failed(a, 3, w), AuthFailure::Counted { left: 2 });
        assert_eq!(
            l.auth_failed(same_64, 3, w),
            AuthFailure::Counted { left: 1 },
            "one /64 is one client"
        );
        assert!(!l.auth_locked(a));
        assert_eq!(l.auth_penalty(a), Duration::ZERO);
        assert_eq!(
            l.auth_failed(a, 3, w),
            AuthFailure::LockedOut {
                wait: Duration::from_millis(100)
            }
        );
        assert!(l.auth_locked(same_64));
        assert_eq!(l.auth_penalty(a), Duration::from_millis(100));
        // Another client is not affected.
        let b: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(!l.auth_locked(b));
        // Each further lockout doubles the wait, up to the cap.
        let waits: Vec<_> = (0..3)
            .map(|_| match l.auth_failed(a, 3, w) {
                AuthFailure::LockedOut { wait } => wait.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [200, 400, 400]);
    }

    #[test]
    fn the_window_slides() {
        let l = limiter();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let w = Duration::from_secs(600);
        let t0 = Instant::now();
        let at = |m: u64| t0 + Duration::from_secs(60 * m);
        assert!(matches!(
            l.auth_failed_at(a, 2, w, at(0)),
            AuthFailure::Counted { .. }
        ));
        // Ten minutes on, the first failure has left the window.
        assert_eq!(
            l.auth_failed_at(a, 2, w, at(10)),
            AuthFailure::Counted { left: 1 }
        );
        assert!(matches!(
            l.auth_failed_at(a, 2, w, at(15)),
            AuthFailure::LockedOut { .. }
        ));
        // Locked until the older of the two leaves the window (minute 20).
        assert!(l.auth_locked_at(a, at(19)));
        assert!(!l.auth_locked_at(a, at(20)));
    }

    #[test]
    fn locked_out_clients_survive_eviction() {
        let l = limiter();
        let a: IpAddr = "192.0.2.77".parse().unwrap();
        let w = Duration::from_secs(600);
        l.auth_failed(a, 1, w);
        assert!(l.auth_locked(a));
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.unknown_user(ip);
        }
        assert!(l.auth_locked(a), "a live lockout was evicted");
        assert!(l.tracked() <= 16 + 1, "{}", l.tracked());
    }

    #[test]
    fn per_login_messages_and_recipients() {
        let s = SendLimits::new(2, 3, 16);
        assert!(s.message("alice@a.test").is_ok());
        assert!(s.message("ALICE@a.test").is_ok(), "same login, any case");
        match s.message("alice@a.test") {
            Err(OverLimit::MessagesPerHour(wait)) => {
                // 2 per hour: the next one comes in about half an hour.
                assert!(wait > Duration::from_secs(1700) && wait <= Duration::from_secs(1800))
            }
            other => panic!("{other:?}"),
        }
        assert!(
            s.message("bob@a.test").is_ok(),
            "another login is not affected"
        );
        for _ in 0..3 {
            s.recipient("alice@a.test").unwrap();
        }
        assert!(matches!(
            s.recipient("alice@a.test"),
            Err(OverLimit::RecipientsPerDay(_))
        ));
        let off = SendLimits::new(0, 0, 16);
        for _ in 0..100 {
            off.message("x@a.test").unwrap();
            off.recipient("x@a.test").unwrap();
        }
        assert_eq!(off.tracked(), 0, "no state when the limits are off");
    }

    #[test]
    fn busy_logins_are_never_evicted() {
        let s = SendLimits::new(1, 0, 16);
        s.message("alice@a.test").unwrap();
        for i in 0..1000 {
            // Each other login is busy too (one message of one per hour): pinned.
            let _ = s.message(&format!("u{i}@a.test"));
        }
        assert!(s.message("alice@a.test").is_err());
    }
}
