//! SMTP AUTH (RFC 4954) on the submission ports: SASL PLAIN (RFC 4616) and LOGIN,
//! only inside TLS, the login being the alias itself.
//!
//! Passwords are checked against the Argon2id hash in the table on the blocking
//! pool, at most `[submission] max_concurrent_auth` at once; an unknown login costs
//! the same verification as a wrong password. A password is never logged, never
//! kept after the check, and a failed login's name is logged only if it is an alias
//! with a login (so a password typed into the name field stays out of the log).
//! Failures count per client: at `max_auth_failures` within the window the client
//! gets `421 4.7.0` and waits longer at each lockout (`rate::submission`).
//! SCRAM is not offered: its server keys cannot be derived from Argon2 hashes, and
//! the exchange is always inside TLS.

use super::session::Session;
use super::submission::Service;
use crate::rate::submission::AuthFailure;
use crate::smtp::Reply;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a client waits for a verification slot before `454 4.7.0`.
const SLOT_WAIT: Duration = Duration::from_secs(30);

/// A SASL exchange waiting for the client's next line.
#[derive(Debug)]
pub(super) enum Exchange {
    /// `334 ` sent: the PLAIN message comes next.
    Plain,
    /// `334 VXNlcm5hbWU6` ("Username:") sent.
    LoginUser,
    /// `334 UGFzc3dvcmQ6` ("Password:") sent.
    LoginPassword { user: String },
}

/// Why a SASL response is refused before any password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SaslError {
    /// Not base64, or not UTF-8 (501 5.5.2).
    Encoding,
    /// Well encoded, but not a PLAIN message naming one login (535 5.7.8).
    Malformed,
}

/// A client's credentials (the password lives only until it is checked).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Credentials {
    pub login: String,
    pub password: String,
}

/// Base64 of a SASL response, decoded to UTF-8 text (`=` is the empty response).
pub(super) fn decode(b64: &str) -> Result<String, SaslError> {
    let b64 = b64.trim();
    if b64 == "=" {
        return Ok(String::new());
    }
    let bytes = B64.decode(b64).map_err(|_| SaslError::Encoding)?;
    String::from_utf8(bytes).map_err(|_| SaslError::Encoding)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. An authorization identity other
/// than the login itself (acting for someone else) is not supported.
pub(super) fn parse_plain(msg: &str) -> Result<Credentials, SaslError> {
    let mut parts = msg.split('\0');
    let (Some(authz), Some(login), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    if login.is_empty() || password.is_empty() || !(authz.is_empty() || authz == login) {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials {
        login: login.to_string(),
        password: password.to_string(),
    })
}

/// The first word of a command line is AUTH.
fn is_auth(line: &[u8]) -> bool {
    let verb = line.split(|&b| b == b' ').next().unwrap_or(&[]);
    verb.eq_ignore_ascii_case(b"AUTH")
}

impl Session {
    /// Whether a submission session handles this line itself: AUTH, or the next step
    /// of a SASL exchange. Port 25 never does (its AUTH gets 502).
    pub(super) fn auth_takes(&self, line: &[u8]) -> bool {
        self.sub
            .as_ref()
            .is_some_and(|s| s.sasl.is_some() || is_auth(line))
    }

    pub(super) async fn auth_line(&mut self, line: Vec<u8>) {
        let Some(sub) = self.sub.as_mut() else { return };
        let svc = sub.svc.clone();
        let text = String::from_utf8_lossy(&line).into_owned();
        match sub.sasl.take() {
            Some(step) => self.auth_step(&svc, step, &text).await,
            None => self.auth_start(&svc, &text).await,
        }
    }

    /// `AUTH mechanism [initial-response]`.
    async fn auth_start(&mut self, svc: &Arc<Service>, line: &str) {
        let mut words = line.split_ascii_whitespace().skip(1);
        let (mech, initial) = (words.next(), words.next());
        let reply = if !self.stream.is_tls() {
            svc.counters
                .auth_without_tls
                .fetch_add(1, Ordering::Relaxed);
            Some(Reply::new(
                538,
                "5.7.11",
                "encryption required: STARTTLS first",
            ))
        } else if self.helo.is_none() {
            Some(Reply::new(503, "5.5.1", "send EHLO first"))
        } else if self.sub.as_ref().is_some_and(|s| s.login.is_some()) {
            Some(Reply::new(503, "5.5.1", "already authenticated"))
        } else if self.tx.is_some() {
            Some(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ))
        } else if mech.is_none() || words.next().is_some() {
            Some(Reply::new(
                501,
                "5.5.4",
                "syntax: AUTH mechanism [initial-response]",
            ))
        } else {
            None
        };
        if let Some(r) = reply {
            return self.reply(r);
        }
        if self.ctx.limiter.auth_locked(self.peer.ip()) {
            svc.counters
                .auth_refused_locked
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), "AUTH refused: client locked out after failed logins");
            return self.close_with(Reply::new(
                421,
                "4.7.0",
                "too many failed logins, try again later",
            ));
        }
        let mech = mech.unwrap_or_default().to_ascii_uppercase();
        match (mech.as_str(), initial) {
            ("PLAIN", None) => self.challenge(Exchange::Plain, ""),
            ("PLAIN", Some(r)) => self.auth_step(svc, Exchange::Plain, r).await,
            ("LOGIN", None) => self.challenge(Exchange::LoginUser, "VXNlcm5hbWU6"),
            ("LOGIN", Some(r)) => self.auth_step(svc, Exchange::LoginUser, r).await,
            _ => self.reply(Reply::new(
                504,
                "5.5.4",
                "mechanism not supported (PLAIN, LOGIN)",
            )),
        }
    }

    fn challenge(&mut self, next: Exchange, text: &'static str) {
        if let Some(s) = self.sub.as_mut() {
            s.sasl = Some(next);
        }
        self.reply(Reply::new(334, "", text));
    }

    /// One client response in the exchange `step`.
    async fn auth_step(&mut self, svc: &Arc<Service>, step: Exchange, response: &str) {
        if response.trim() == "*" {
            return self.reply(Reply::new(501, "5.0.0", "authentication cancelled"));
        }
        let text = match decode(response) {
            Ok(t) => t,
            Err(_) => {
                return self.reply(Reply::new(
                    501,
                    "5.5.2",
                    "cannot decode the response (base64)",
                ));
            }
        };
        let creds = match step {
            Exchange::Plain => parse_plain(&text),
            Exchange::LoginUser => {
                return self.challenge(Exchange::LoginPassword { user: text }, "UGFzc3dvcmQ6");
            }
            Exchange::LoginPassword { user } => match (user.is_empty(), text.is_empty()) {
                (false, false) => Ok(Credentials {
                    login: user,
                    password: text,
                }),
                _ => Err(SaslError::Malformed),
            },
        };
        match creds {
            Ok(c) => self.verify(svc, c).await,
            Err(_) => self.auth_failed(svc, None).await,
        }
    }

    /// Checks the password off the async workers, within the verification bound.
    async fn verify(&mut self, svc: &Arc<Service>, creds: Credentials) {
        let permit = match tokio::time::timeout(
            SLOT_WAIT,
            svc.verifications.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => return self.auth_tempfail(svc, "no verification slot in time"),
        };
        let (logins, dummy) = (svc.logins.clone(), svc.dummy_hash.clone());
        let name = crate::table::logins::Logins::canonical(&creds.login);
        let lookup = name.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let _slot = permit;
            let stored = match lookup.as_deref().map(|n| logins.hash_of(n)) {
                Some(Err(e)) => return Err(e),
                found => found.and_then(Result::ok).flatten(),
            };
            let ok = crate::table::logins::verify(
                stored.as_deref().unwrap_or(&dummy),
                creds.password.as_bytes(),
            );
            Ok((ok && stored.is_some(), stored.is_some()))
        })
        .await;
        match checked {
            Ok(Ok((true, _))) => {
                let login = name.unwrap_or_default();
                svc.counters.auth_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client = %self.peer.ip(), %login, "authenticated");
                if let Some(s) = self.sub.as_mut() {
                    s.login = Some(login);
                }
                self.reply(Reply::new(235, "2.7.0", "authentication successful"));
            }
            Ok(Ok((false, known))) => self.auth_failed(svc, name.filter(|_| known)).await,
            // The table could not say: not the client's failure, not counted as one.
            Ok(Err(e)) => self.auth_tempfail(svc, &format!("cannot read the login: {e}")),
            Err(_) => self.auth_tempfail(svc, "verification task failed"),
        }
    }

    fn auth_tempfail(&mut self, svc: &Service, why: &str) {
        svc.counters.auth_tempfail.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client = %self.peer.ip(), why, "AUTH: temporary failure");
        self.reply(Reply::new(454, "4.7.0", "temporary authentication failure"));
    }

    /// 535, or 421 and close once the client reaches the limit. `known`: the login
    /// named, when it is one (never a guess that might be a password).
    async fn auth_failed(&mut self, svc: &Service, known: Option<String>) {
        svc.counters.auth_failed.fetch_add(1, Ordering::Relaxed);
        let s = &self.ctx.cfg.submission;
        let outcome = self.ctx.limiter.auth_failed(
            self.peer.ip(),
            s.max_auth_failures,
            s.auth_failure_window,
        );
        let login = known.as_deref().unwrap_or("(not a login)");
        match outcome {
            AuthFailure::Counted { left } => {
                tracing::warn!(client = %self.peer.ip(), login, left, "authentication failed");
                self.reply(Reply::new(
                    535,
                    "5.7.8",
                    "authentication credentials invalid",
                ));
            }
            AuthFailure::LockedOut { wait } => {
                svc.counters.auth_locked_out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %self.peer.ip(), login, next_wait_ms = wait.as_millis() as u64, "authentication failed: too many failures, client locked out");
                self.close_with(Reply::new(
                    421,
                    "4.7.0",
                    "too many failed logins, try again later",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_messages() {
        let c = |l: &str, p: &str| {
            Ok(Credentials {
                login: l.into(),
                password: p.into(),
            })
        };
        let cases: &[(&str, Result<Credentials, SaslError>)] = &[
            ("\0alice@a.test\0pw", c("alice@a.test", "pw")),
            ("alice@a.test\0alice@a.test\0pw", c("alice@a.test", "pw")),
            ("\0alice@a.test\0pw with\0nul", Err(SaslError::Malformed)),
            ("bob@a.test\0alice@a.test\0pw", Err(SaslError::Malformed)),
            ("\0\0pw", Err(SaslError::Malformed)),
            ("\0alice@a.test\0", Err(SaslError::Malformed)),
            ("alice@a.test pw", Err(SaslError::Malformed)),
            ("", Err(SaslError::Malformed)),
        ];
        for (msg, want) in cases {
            assert_eq!(&parse_plain(msg), want, "{msg:?}");
        }
        assert_eq!(decode("AGFAYi50ZXN0AHB3").unwrap(), "\0a@b.test\0pw");
        assert_eq!(decode("=").unwrap(), "");
        assert_eq!(decode("not base64!"), Err(SaslError::Encoding));
        assert_eq!(decode("/w=="), Err(SaslError::Encoding), "not UTF-8");
        assert!(is_auth(b"auth PLAIN") && is_auth(b"AUTH") && !is_auth(b"AUTHX y"));
    }

    proptest! {
        /// Any login and password without NUL survive the PLAIN encoding unchanged.
        #[test]
        fn plain_round_trip(login in "[^\0]{1,40}", password in "[^\0]{1,40}", authz in any::<bool>()) {
            let msg = format!("{}\0{login}\0{password}", if authz { login.as_str() } else { "" });
            let b64 = B64.encode(msg.as_bytes());
            let got = parse_plain(&decode(&b64).unwrap()).unwrap();
            prop_assert_eq!(got, Credentials { login, password });
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn any_response_is_handled(s in "\\PC{0,80}") {
            if let Ok(t) = decode(&s) {
                let _ = parse_plain(&t);
            }
        }
    }
}
